"""Path normalization for matching (RFC 3986 §6.2.2): unreserved escapes decoded, dot-segments removed, `%2F`
never a separator; and the property that matching on it agrees with an independent reading of the RFC."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from discovery.model import Endpoint, RouteSpec, ServiceRoutes, Snapshot
from proxy.table import Route, RoutingTable, normalize_path


@pytest.mark.parametrize("raw, matched", [
    ("/a/b", "/a/b"),
    ("/public/../admin", "/admin"),
    ("/a/./b", "/a/b"),
    ("/a/b/..", "/a/"),
    ("/a/b/.", "/a/b/"),
    ("/%2e%2e/admin", "/admin"),
    ("/a/%2E%2E/b", "/b"),
    ("/%7euser", "/~user"),
    ("/a%2Fb", "/a%2Fb"),          # an encoded slash is not a separator
    ("/a/..%2fb", "/a/..%2Fb"),    # so this is one segment, not a dot-segment
    ("/x/%41PI", "/x/API"),
    ("/x/%c3%a9", "/x/%C3%A9"),    # not unreserved: kept, hex upper-cased
    ("/..", "/"),
    ("/../../x", "/x"),
    ("/a%", "/a%"),
    ("/a%zz", "/a%zz"),
])
def test_normalization(raw: str, matched: str) -> None:
    assert normalize_path(raw) == matched


def _reference(path: str) -> str:
    """RFC 3986 §6.2.2.2 and §5.2.4 written out literally, as a check on the implementation under test."""
    unreserved = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
    decoded, i = "", 0
    while i < len(path):
        if path[i] == "%" and i + 2 < len(path) and all(c in "0123456789abcdefABCDEF" for c in path[i + 1:i + 3]):
            char = chr(int(path[i + 1:i + 3], 16))
            decoded += char if char in unreserved else "%" + path[i + 1:i + 3].upper()
            i += 3
        else:
            decoded += path[i]
            i += 1
    inp, out = decoded, ""
    while inp:
        if inp.startswith("../"):
            inp = inp[3:]
        elif inp.startswith("./"):
            inp = inp[2:]
        elif inp.startswith("/./"):
            inp = "/" + inp[3:]
        elif inp == "/.":
            inp = "/"
        elif inp.startswith("/../"):
            inp = "/" + inp[4:]
            out = out[: out.rfind("/")] if "/" in out else ""
        elif inp == "/..":
            inp = "/"
            out = out[: out.rfind("/")] if "/" in out else ""
        elif inp in (".", ".."):
            inp = ""
        else:
            start = 1 if inp.startswith("/") else 0
            end = inp.find("/", start)
            end = len(inp) if end < 0 else end
            out += inp[:end]
            inp = inp[end:]
    return out or "/"


SEGMENT = st.sampled_from(["a", "admin", "public", "api", "v1", ".", "..", "%2e", "%2E%2e", "%2F", "%2f..", "%7e",
                           "%41", "x%2Fy", "", "%", "%zz", "é", "%c3%a9"])
PATHS = st.lists(SEGMENT, min_size=1, max_size=8).map(lambda segments: "/" + "/".join(segments))


@settings(max_examples=500, deadline=None)
@given(PATHS)
def test_matches_the_rfc_reading_and_is_idempotent(path: str) -> None:
    normalized = normalize_path(path)
    assert normalized == _reference(path)
    assert normalize_path(normalized) == normalized
    assert normalized.startswith("/")
    assert normalized.count("/") <= path.count("/")  # decoding never makes a separator


TABLE = RoutingTable.from_snapshot(Snapshot(tuple(
    ServiceRoutes(name, (RouteSpec("", prefix),), (Endpoint(name, f"{name}-1", "127.0.0.1", 1),))
    for name, prefix in (("root", "/"), ("public", "/public"), ("admin", "/admin"), ("api", "/api/v1"))
)), 1)


@settings(max_examples=500, deadline=None)
@given(PATHS)
def test_a_request_matches_the_route_its_normalized_path_matches(path: str) -> None:
    """What the proxy routes on (its normalization of the raw path) picks the route that the RFC reading of the
    path picks: `/public/../admin` cannot reach a route the upstream would not see it under."""
    chosen = TABLE.lookup("any.host", normalize_path(path))
    expected = TABLE.lookup("any.host", _reference(path))
    assert isinstance(chosen, Route) and chosen == expected


def test_strip_applies_to_the_path_that_matched() -> None:
    route = Route("api@*any*/api", "api", "", "/api", strip="/api")
    assert route.upstream_target("/api/v1?x=1") == "/v1?x=1"
    assert route.upstream_target(normalize_path("/x/../api/v1") + "?x=1") == "/v1?x=1"
    assert route.upstream_target(normalize_path("/api/%7euser/a%2fb", upper=False)) == "/~user/a%2fb"
