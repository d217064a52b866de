"""Fabio conformance: what Fabio's documentation and its own test tables say a tag does, run against a real
Ferryman following a real Consul agent (issue 15).

Cases are written from Fabio's behaviour (route/parse_new_test.go, route/table_test.go, route/target_test.go,
route/matcher_test.go, route/access_rules_test.go and the docs under docs/content), never copied. Each area is
one table; a case either behaves as in Fabio, or is listed in `DIFFERS` with the reason and what Ferryman does
instead (asserted too, so a difference never drifts unnoticed). Counts by area: `AREA_COUNTS` at the end.

Differences that remain (each also marked `differs=` at its case):
- lookup: Fabio's prefix match is a string prefix (`/foo` matches `/foobar`); Ferryman's stops at a segment
  boundary, so `/foobar` is not a request for `/foo` (a deliberate safety choice, README "Declaring routes").
- lookup: Fabio keeps `/foo` and `/foo/` as two routes; Ferryman treats them as the same prefix.
- matchers: Fabio's iprefix matcher is a string prefix too (`/foo` matches `/Fool`); Ferryman's stops at a
  segment boundary, as its prefix matcher does.
- access: Fabio checks every X-Forwarded-For entry whoever sent it; Ferryman reads X-Forwarded-For only from
  `trusted_proxies` (the right-most untrusted entry), so a client cannot get itself refused or, with allow=,
  must be allowed itself: from an untrusted peer a denied address in X-Forwarded-For does not refuse, and an
  address outside allow= in it does not refuse either.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yarl

from .harness import Backend, ConsulAgent, FerrymanProcess, fetch, wait_until

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Case:
    """One request and what Fabio answers: the instance that serves it (its Backend name), or a status, a
    Location, or the path/header the instance receives."""

    id: str
    path: str
    host: str = "conf.test"
    headers: dict[str, str] = field(default_factory=dict)
    status: int = 200
    served_by: str | None = None
    location: str | None = None
    upstream_path: str | None = None
    upstream_header: tuple[str, str | None] | None = None  # (name, value; None: absent)
    differs: str = ""  # why Ferryman answers otherwise; the expectations above are then Ferryman's


# --- lookup order: Fabio's table lookup (host first, then longest prefix, then the routes for any host) ---
LOOKUP_SERVICES = {
    "lk-any-root": ["urlprefix-/"],
    "lk-any-foo": ["urlprefix-/foo"],
    "lk-abc-root": ["urlprefix-abc.test/"],
    "lk-abc-foo": ["urlprefix-abc.test/foo"],
    "lk-abc-foobar": ["urlprefix-abc.test/foo/bar"],
    "lk-z-foo": ["urlprefix-z.abc.test/foo"],
    "lk-wild-root": ["urlprefix-*.abc.test/"],
    "lk-wild-foo": ["urlprefix-*.abc.test/foo"],
    "lk-wild-aaa": ["urlprefix-*.aaa.abc.test/"],
}
LOOKUP = [
    Case("generic-root", "/", host="other.test", served_by="lk-any-root"),
    Case("generic-prefix", "/foo/x", host="other.test", served_by="lk-any-foo"),
    Case("host-beats-generic", "/", host="abc.test", served_by="lk-abc-root"),
    Case("host-case-insensitive", "/", host="ABC.test", served_by="lk-abc-root"),
    Case("host-default-port-ignored", "/foo", host="abc.test:80", served_by="lk-abc-foo"),
    Case("longest-prefix", "/foo/bar/baz", host="abc.test", served_by="lk-abc-foobar"),
    Case("shorter-prefix", "/foo/baz", host="abc.test", served_by="lk-abc-foo"),
    Case("exact-host-before-wildcard", "/foo/x", host="z.abc.test", served_by="lk-z-foo"),
    Case("exact-host-falls-to-wildcard", "/x", host="z.abc.test", served_by="lk-wild-root"),
    Case("wildcard-prefix", "/foo", host="y.abc.test", served_by="lk-wild-foo"),
    Case("longer-wildcard-first", "/foo", host="b.aaa.abc.test", served_by="lk-wild-aaa"),
    Case("wildcard-not-the-bare-domain", "/x", host="abc.test", served_by="lk-abc-root"),
    Case("no-host-match-falls-to-generic", "/foo", host="nomatch.test", served_by="lk-any-foo"),
    Case("string-prefix", "/foobar", host="other.test", served_by="lk-any-root",
         differs="Fabio: /foo matches /foobar (string prefix); Ferryman: segment boundary, so the / route"),
    Case("trailing-slash-route", "/foo/", host="other.test", served_by="lk-any-foo"),
]

# --- redirects: Fabio's Target.BuildRedirectURL table and its HTTP-to-HTTPS pattern ---
REDIRECT_SERVICES = {
    "rd-fixed": ["urlprefix-r1.test/ redirect=301,http://bar.com/"],
    "rd-deep": ["urlprefix-r2.test/ redirect=301,http://bar.com/a/b/c?foo=bar"],
    "rd-path": ["urlprefix-r3.test/ redirect=301,http://bar.com/$path"],
    "rd-path-noslash": ["urlprefix-r4.test/ redirect=301,http://bar.com$path"],
    "rd-sub": ["urlprefix-r5.test/ redirect=302,http://bar.com/bbb/$path"],
    "rd-strip": ["urlprefix-r6.test/stripme redirect=301,http://bar.com/$path strip=/stripme"],
    "rd-prepend": ["urlprefix-r7.test/ redirect=301,http://bar.com/$path prepend=/prefix"],
    "rd-both": ["urlprefix-r8.test/stripme redirect=301,http://bar.com/$path prepend=/prefix strip=/stripme"],
    "rd-host": ["urlprefix-*:{port}/r9 redirect=301,https://$host$path"],
    "rd-host-static": ["urlprefix-*:{port}/r10 redirect=301,https://$host/"],
}
REDIRECTS = [
    Case("fixed-root", "/", host="r1.test", status=301, location="http://bar.com/"),
    Case("fixed-ignores-path", "/a/b/c", host="r1.test", status=301, location="http://bar.com/"),
    Case("fixed-ignores-query", "/?aaa=1", host="r1.test", status=301, location="http://bar.com/"),
    Case("deep-keeps-own-query", "/abc?aaa=1", host="r2.test", status=301, location="http://bar.com/a/b/c?foo=bar"),
    Case("path-root", "/", host="r3.test", status=301, location="http://bar.com/"),
    Case("path-no-double-slash", "/abc", host="r3.test", status=301, location="http://bar.com/abc"),
    Case("path-deep", "/a/b/c", host="r3.test", status=301, location="http://bar.com/a/b/c"),
    Case("path-query", "/abc/?aaa=1", host="r3.test", status=301, location="http://bar.com/abc/?aaa=1"),
    Case("path-escapes-kept", "/a%2fbc", host="r3.test", status=301, location="http://bar.com/a%2fbc"),
    Case("path-space-kept", "/%20/a%2f/", host="r3.test", status=301, location="http://bar.com/%20/a%2f/"),
    Case("noslash-root", "/", host="r4.test", status=301, location="http://bar.com/"),
    Case("noslash-path", "/a/b/c", host="r4.test", status=301, location="http://bar.com/a/b/c"),
    Case("sub-root", "/", host="r5.test", status=302, location="http://bar.com/bbb/"),
    Case("sub-query", "/abc/?aaa=1", host="r5.test", status=302, location="http://bar.com/bbb/abc/?aaa=1"),
    Case("strip-root", "/stripme/", host="r6.test", status=301, location="http://bar.com/"),
    Case("strip-path", "/stripme/a/b/c", host="r6.test", status=301, location="http://bar.com/a/b/c"),
    Case("strip-query", "/stripme/?aaa=1", host="r6.test", status=301, location="http://bar.com/?aaa=1"),
    Case("prepend-root", "/", host="r7.test", status=301, location="http://bar.com/prefix/"),
    Case("prepend-path", "/abc/?aaa=1", host="r7.test", status=301, location="http://bar.com/prefix/abc/?aaa=1"),
    Case("strip-and-prepend", "/stripme/abc", host="r8.test", status=301, location="http://bar.com/prefix/abc"),
    Case("host-and-path", "/r9/abc?aaa=1", host="foo.com", status=301, location="https://foo.com/r9/abc?aaa=1"),
    Case("host-static", "/r10/abc", host="foo.com", status=301, location="https://foo.com/"),
]

# --- matchers: Fabio's prefix, iprefix and glob matchers (route/matcher_test.go, docs/content/ref/proxy.matcher.md),
# per route with matcher= here, globally with path_matcher in test_global_glob_matcher_as_fabio ---
MATCHER_SERVICES = {
    "mt-foo": ["urlprefix-mt.test/foo"], "mt-root": ["urlprefix-mt.test/"],
    "mi-foo": ["urlprefix-mi.test/Foo matcher=iprefix"], "mi-root": ["urlprefix-mi.test/"],
    "mg-q": ["urlprefix-mg.test/foo? matcher=glob"], "mg-star": ["urlprefix-mg.test/bar* matcher=glob"],
    "mg-mid": ["urlprefix-mg.test/x/*/y matcher=glob"], "mg-super": ["urlprefix-mg.test/z/**/y matcher=glob"],
    "mg-root": ["urlprefix-mg.test/"],
}
MATCHERS = [
    Case("prefix-exact", "/foo", host="mt.test", served_by="mt-foo"),
    Case("prefix-slash", "/foo/", host="mt.test", served_by="mt-foo"),
    Case("prefix-deeper", "/foo/bar", host="mt.test", served_by="mt-foo"),
    Case("prefix-other", "/fo", host="mt.test", served_by="mt-root"),
    Case("prefix-case-sensitive", "/FOO", host="mt.test", served_by="mt-root"),
    Case("prefix-string", "/foobar", host="mt.test", served_by="mt-root",
         differs="Fabio: /foo matches /foobar; Ferryman: only on a segment boundary"),
    Case("iprefix-same-case", "/Foo", host="mi.test", served_by="mi-foo"),
    Case("iprefix-other-case", "/foo", host="mi.test", served_by="mi-foo"),
    Case("iprefix-deeper", "/FOO/x", host="mi.test", served_by="mi-foo"),
    Case("iprefix-shorter", "/fo", host="mi.test", served_by="mi-root"),
    Case("iprefix-string", "/Fool", host="mi.test", served_by="mi-root",
         differs="Fabio: iprefix /foo matches /Fool; Ferryman: only on a segment boundary"),
    Case("glob-question-mark", "/fool", host="mg.test", served_by="mg-q"),
    Case("glob-question-mark-one-char", "/fools", host="mg.test", served_by="mg-root"),
    Case("glob-star", "/barbaz", host="mg.test", served_by="mg-star"),
    Case("glob-star-crosses-slash", "/bar/baz", host="mg.test", served_by="mg-star"),
    Case("glob-star-mid", "/x/a/y", host="mg.test", served_by="mg-mid"),
    Case("glob-star-mid-deeper", "/x/a/b/y", host="mg.test", served_by="mg-mid"),
    Case("glob-super", "/z/a/b/c/y", host="mg.test", served_by="mg-super"),
    Case("glob-whole-path", "/z/a/b/c/yz", host="mg.test", served_by="mg-root"),
]

# --- proxy path handling and the options that shape the upstream request ---
PATH_SERVICES = {
    "px-strip": ["urlprefix-px.test/api strip=/api"],
    "px-prepend": ["urlprefix-px.test/v1 prepend=/internal"],
    "px-both": ["urlprefix-px.test/old strip=/old prepend=/new"],
    "px-dst": ["urlprefix-dst.test/ host=dst"],
    "px-named": ["urlprefix-named.test/ host=backend.internal"],
    "px-root": ["urlprefix-px.test/"],
}
PATHS = [
    Case("strip", "/api/users?id=1", host="px.test", upstream_path="/users?id=1",
         upstream_header=("X-Forwarded-Prefix", "/api")),
    Case("strip-all", "/api", host="px.test", upstream_path="/"),
    Case("prepend", "/v1/x", host="px.test", upstream_path="/internal/v1/x",
         upstream_header=("X-Forwarded-Prefix", None)),
    Case("strip-then-prepend", "/old/a", host="px.test", upstream_path="/new/a"),
    Case("dot-segments-forwarded-normalized", "/api/../admin", host="px.test", served_by="px-root",
         upstream_path="/admin"),
    Case("escaped-dots-forwarded-normalized", "/api/%2e%2e/admin", host="px.test", served_by="px-root",
         upstream_path="/admin"),
    Case("reserved-escape-kept", "/x/a%2Fb", host="px.test", served_by="px-root", upstream_path="/x/a%2Fb"),
    Case("strip-after-normalizing", "/x/../api/v", host="px.test", served_by="px-strip", upstream_path="/v"),
    Case("spoofed-prefix-replaced", "/v1/x", host="px.test", headers={"X-Forwarded-Prefix": "/evil"},
         upstream_header=("X-Forwarded-Prefix", None)),
    Case("host-named", "/", host="named.test", upstream_header=("Host", "backend.internal")),
]

# --- access rules: Fabio's allow=/deny= (docs/content/feature/access-control.md, route/access_rules_test.go) ---
ACCESS_SERVICES = {
    "ac-allow-lo": ["urlprefix-ac.test/allow-lo allow=ip:127.0.0.0/8,ip:::1"],
    "ac-allow-ten": ["urlprefix-ac.test/allow-ten allow=ip:10.0.0.0/8,ip:fe80::/10"],
    "ac-deny-lo": ["urlprefix-ac.test/deny-lo deny=ip:127.0.0.1"],
    "ac-deny-ten": ["urlprefix-ac.test/deny-ten deny=ip:10.0.0.0/8,ip:fe80::1234"],
    "ac-deny-bare": ["urlprefix-ac.test/deny-bare deny=127.0.0.0/8"],
}
SPOOF = {"X-Forwarded-For": "10.1.2.3"}
ACCESS = [
    Case("allow-in", "/allow-lo", host="ac.test"),
    Case("allow-out", "/allow-ten", host="ac.test", status=403),
    Case("deny-in", "/deny-lo", host="ac.test", status=403),
    Case("deny-out", "/deny-ten", host="ac.test"),
    Case("deny-documented-bare-cidr", "/deny-bare", host="ac.test", status=403),
    # Hostile: a spoofed X-Forwarded-For from an untrusted peer never grants access...
    Case("spoofed-xff-cannot-get-allowed", "/allow-ten", host="ac.test", headers=SPOOF, status=403),
    Case("spoofed-xff-cannot-escape-deny", "/deny-lo", host="ac.test", headers={"X-Forwarded-For": "8.8.8.8"},
         status=403),
    # ...and is not read at all from an untrusted peer.
    Case("untrusted-xff-not-read-deny", "/deny-ten", host="ac.test", headers=SPOOF,
         differs="Fabio refuses when any X-Forwarded-For entry is denied, whoever sent it; Ferryman reads the "
                 "header only from trusted_proxies"),
    Case("untrusted-xff-not-read-allow", "/allow-lo", host="ac.test", headers=SPOOF,
         differs="Fabio refuses when an X-Forwarded-For entry is outside allow=; Ferryman reads the header only "
                 "from trusted_proxies"),
]
# The same rules behind a trusted proxy (trusted_proxies = 127.0.0.1): the right-most untrusted entry decides.
TRUSTED_ACCESS = [
    Case("trusted-xff-allowed", "/allow-ten", host="ac.test", headers=SPOOF),
    Case("trusted-xff-right-most-untrusted", "/allow-ten", host="ac.test",
         headers={"X-Forwarded-For": "10.1.2.3, 8.8.8.8"}, status=403),
    Case("trusted-xff-denied", "/deny-ten", host="ac.test", headers=SPOOF, status=403),
    Case("trusted-xff-not-loopback", "/allow-lo", host="ac.test", headers=SPOOF, status=403),
]

# --- tag parsing: Fabio's tag forms, as /api/routes shows them, or refused with the option named ---
PARSING_SERVICES = {
    "tp-blanks": ["  urlprefix-/tp-blanks"],
    "tp-host": ["urlprefix-TP.test/x"],
    "tp-opts": ["urlprefix-/tp-opts strip=/tp-opts proto=http tlsskipverify=true"],
    "tp-auth": ["urlprefix-/tp-auth auth=realm"],
    "tp-register": ["urlprefix-/tp-register register=web"],
    "tp-tcp": ["urlprefix-:1234 proto=tcp"],
    "tp-pxy": ["urlprefix-/tp-pxy pxyproto=true"],
    "tp-both": ["urlprefix-/tp-both allow=ip:10.0.0.0/8 deny=ip:10.1.0.0/16"],
}
PARSED = {"tp-blanks@*any*/tp-blanks", "tp-host@tp.test/x", "tp-opts@*any*/tp-opts", "tp-auth@*any*/tp-auth",
          "tp-tcp@*any*:1234"}
REFUSED = {"tp-register": "register=", "tp-pxy": "pxyproto=",
           "tp-both": "allow= and deny="}

# --- the global matcher: Fabio's `proxy.matcher = glob` is Ferryman's `path_matcher = glob` ---
GLOBAL_GLOB_SERVICES = {
    "gg-foo": ["urlprefix-gg.test/foo"], "gg-star": ["urlprefix-gg.test/foo/*"],
    "gg-lit": ["urlprefix-gg.test/foo/bar"], "gg-prefix": ["urlprefix-gg.test/api matcher=prefix"],
}
GLOBAL_GLOB = [
    Case("literal-is-whole-path", "/foo", host="gg.test", served_by="gg-foo"),
    Case("literal-not-a-prefix", "/fools", host="gg.test", status=404),
    Case("star", "/foo/x/y", host="gg.test", served_by="gg-star"),
    Case("literal-sorts-before-star", "/foo/bar", host="gg.test", served_by="gg-lit"),
    Case("route-option-beats-global", "/api/v1", host="gg.test", served_by="gg-prefix"),
    Case("no-match", "/other", host="gg.test", status=404),
]

AREAS = {"lookup": LOOKUP, "redirects": REDIRECTS, "matchers": MATCHERS, "paths": PATHS, "access": ACCESS}
SERVICES = {"lookup": LOOKUP_SERVICES, "redirects": REDIRECT_SERVICES, "matchers": MATCHER_SERVICES,
            "paths": PATH_SERVICES, "access": ACCESS_SERVICES}
AREA_COUNTS = {
    **{area: len(cases) for area, cases in AREAS.items()},
    "access": len(ACCESS) + len(TRUSTED_ACCESS),
    "global-glob": len(GLOBAL_GLOB),
    "parsing": len(PARSED) + len(REFUSED),
    "variables": 3,
    "sharing": 4,
}
DIFFERS = [f"{area}/{c.id}: {c.differs}" for area, cases in AREAS.items() for c in cases if c.differs]


def _route_services(ferryman: FerrymanProcess) -> set[str]:
    return {name for r in ferryman.routes()["routes"] for name in r["id"].split("@")[0].split("+")}


async def _register(consul: ConsulAgent, ferryman: FerrymanProcess, backends: list[Backend],
                    services: dict[str, list[str]], instances: int = 1) -> list[str]:
    ids = []
    for name, tags in services.items():
        for i in range(instances):
            backend = await Backend(name if instances == 1 else f"{name}-{i}").start()
            backends.append(backend)
            ids.append(f"{name}-{i}")
            tags = [t.replace("{port}", str(ferryman.port)) for t in tags]
            await asyncio.to_thread(consul.register, name, f"{name}-{i}", backend.port, tags)
    await asyncio.to_thread(wait_until, lambda: set(services) <= _route_services(ferryman), 15,
                            f"routes of {sorted(services)}")
    return ids


async def _check(http: aiohttp.ClientSession, proxy: FerrymanProcess, case: Case) -> list[str]:
    """What differs from the case's expectations (empty: conforms)."""
    # encoded=True: the client library would otherwise re-quote the path (`%2f` -> `%2F`) before sending it.
    url = yarl.URL(f"{proxy.url}{case.path}", encoded=True)
    status, body, headers = await fetch(http, url, headers={"Host": case.host, **case.headers},
                                        allow_redirects=False)
    problems = []
    if status != case.status:
        problems.append(f"status {status}, expected {case.status}")
    if case.location is not None and headers.get("Location") != case.location:
        problems.append(f"Location {headers.get('Location')!r}, expected {case.location!r}")
    if status == 200 and (case.served_by or case.upstream_path or case.upstream_header):
        echo: dict[str, Any] = json.loads(body)
        if case.served_by is not None and echo["instance"] != case.served_by:
            problems.append(f"served by {echo['instance']}, expected {case.served_by}")
        if case.upstream_path is not None and echo["path"] != case.upstream_path:
            problems.append(f"upstream path {echo['path']!r}, expected {case.upstream_path!r}")
        if case.upstream_header is not None:
            name, value = case.upstream_header
            got = next((v for k, v in echo["headers"] if k.lower() == name.lower()), None)
            if got != value:
                problems.append(f"upstream {name} {got!r}, expected {value!r}")
    return [f"{case.id}: {p}" for p in problems]


@pytest.mark.parametrize("area", list(AREAS))
async def test_area_conforms_to_fabio(area: str, consul: ConsulAgent, ferryman: FerrymanProcess,
                                      backends: list[Backend], http: aiohttp.ClientSession) -> None:
    """Every case of the area answers as in Fabio, or as its `differs` note says Ferryman does instead."""
    ids = await _register(consul, ferryman, backends, SERVICES[area])
    try:
        problems = [p for case in AREAS[area] for p in await _check(http, ferryman, case)]
        assert problems == []
    finally:
        for instance in ids:
            await asyncio.to_thread(consul.deregister, instance)


@pytest.fixture
def trusted_ferryman(consul: ConsulAgent, workdir: Path) -> Iterator[FerrymanProcess]:
    proc = FerrymanProcess(consul.addr, workdir, extra=["--trusted-proxies", "127.0.0.1"])
    proc.start()
    yield proc
    proc.stop()


async def test_access_behind_a_trusted_proxy(consul: ConsulAgent, trusted_ferryman: FerrymanProcess,
                                             backends: list[Backend], http: aiohttp.ClientSession) -> None:
    """From a trusted proxy, the right-most untrusted X-Forwarded-For address is the one allow/deny judge."""
    ids = await _register(consul, trusted_ferryman, backends, {f"{k}-t": v for k, v in ACCESS_SERVICES.items()})
    try:
        problems = [p for case in TRUSTED_ACCESS for p in await _check(http, trusted_ferryman, case)]
        assert problems == []
    finally:
        for instance in ids:
            await asyncio.to_thread(consul.deregister, instance)


async def test_global_deny_refuses_every_route(consul: ConsulAgent, workdir: Path, backends: list[Backend],
                                               http: aiohttp.ClientSession) -> None:
    """The `deny` setting answers 403 on every route, whatever X-Forwarded-For an untrusted client sends."""
    proxy = FerrymanProcess(consul.addr, workdir, extra=["--deny", "127.0.0.0/8"])
    await asyncio.to_thread(proxy.start)
    try:
        ids = await _register(consul, proxy, backends, {"gd-web": ["urlprefix-gd.test/"]})
        try:
            for headers in ({}, SPOOF):
                status, _, _ = await fetch(http, f"{proxy.url}/x", headers={"Host": "gd.test", **headers})
                assert status == 403
        finally:
            for instance in ids:
                await asyncio.to_thread(consul.deregister, instance)
    finally:
        await asyncio.to_thread(proxy.stop)


async def test_tag_parsing_as_fabio_or_refused_naming_the_option(
    consul: ConsulAgent, ferryman: FerrymanProcess, backends: list[Backend],
) -> None:
    """Fabio's tag forms route as in Fabio; options Ferryman does not implement refuse the tag, logged as
    `route_tag_invalid` with the option named; never a route that quietly behaves otherwise."""
    parsed = ("tp-blanks", "tp-host", "tp-opts", "tp-auth", "tp-tcp")
    ids = await _register(consul, ferryman, backends, {k: PARSING_SERVICES[k] for k in parsed})
    for name in REFUSED:
        backend = await Backend(name).start()
        backends.append(backend)
        ids.append(f"{name}-0")
        await asyncio.to_thread(consul.register, name, f"{name}-0", backend.port, PARSING_SERVICES[name])
    try:
        def refused() -> dict[str, str]:
            return {e["service"]: e["error"] for e in ferryman.log_events()
                    if e.get("event") == "route_tag_invalid" and e.get("service") in REFUSED}

        await asyncio.to_thread(wait_until, lambda: set(refused()) == set(REFUSED), 15, "the refused tags")
        assert {name: named in refused()[name] for name, named in REFUSED.items()} == dict.fromkeys(REFUSED, True)
        ids_routed = {r["id"] for r in ferryman.routes()["routes"]}
        assert PARSED <= ids_routed
        assert not any(i.split("@")[0] in REFUSED for i in ids_routed)
    finally:
        for instance in ids:
            await asyncio.to_thread(consul.deregister, instance)


async def test_services_sharing_a_route_split_it_as_fabio(
    consul: ConsulAgent, ferryman: FerrymanProcess, backends: list[Backend], http: aiohttp.ClientSession,
) -> None:
    """Two services declaring the same route share it by instance count (1 + 3 instances: 25/75); `weight=` gives
    a service a fixed share (0.5 beside 2 instances of the other: 50/50), as Fabio's route weights do."""
    ids = await _register(consul, ferryman, backends, {"sh-blue": ["urlprefix-sh.test/"]}, instances=1)
    ids += await _register(consul, ferryman, backends, {"sh-green": ["urlprefix-sh.test/"]}, instances=3)
    ids += await _register(consul, ferryman, backends, {"sw-blue": ["urlprefix-sw.test/"]}, instances=2)
    ids += await _register(consul, ferryman, backends, {"sw-green": ["urlprefix-sw.test/ weight=0.5"]}, instances=1)
    try:
        async def every_instance_seen() -> bool:
            seen = set()
            for host in ("sh.test", "sw.test"):
                for _ in range(60):
                    seen.add(json.loads((await fetch(http, f"{ferryman.url}/", headers={"Host": host}))[1])["instance"])
            return len(seen) == 7

        for _ in range(50):
            if await every_instance_seen():
                break
            await asyncio.sleep(0.2)

        async def share(host: str, side: str, n: int = 400) -> float:
            hits = 0
            for _ in range(n):
                status, body, _ = await fetch(http, f"{ferryman.url}/", headers={"Host": host})
                assert status == 200
                hits += json.loads(body)["instance"].startswith(side)
            return hits / n

        assert 0.65 <= await share("sh.test", "sh-green") <= 0.85
        assert 0.40 <= await share("sw.test", "sw-green") <= 0.60
        assert not [p for p in ferryman.log_events() if p.get("event") == "route_conflict"
                    and str(p.get("service", "")).startswith(("sh-", "sw-"))]
    finally:
        for instance in ids:
            await asyncio.to_thread(consul.deregister, instance)


async def test_a_port_in_the_host_restricts_the_route_to_that_listener(
    consul: ConsulAgent, ferryman: FerrymanProcess, backends: list[Backend], http: aiohttp.ClientSession,
) -> None:
    """Fabio's documented HTTP-to-HTTPS pattern: `host:PORT/ redirect=...` fires only on the listener of that
    port, beside a plain route for the same host (which a request arriving elsewhere gets): no redirect loop,
    no collision."""
    ids = await _register(consul, ferryman, backends, {
        "hp-redirect": [f"urlprefix-hp.test:{ferryman.port}/ redirect=301,https://hp.test$path"],
        "hp-other-port": ["urlprefix-hp2.test:1/"],
        "hp-plain": ["urlprefix-hp.test/", "urlprefix-hp2.test/"],
    })
    try:
        status, _, headers = await fetch(http, f"{ferryman.url}/a?b=1", headers={"Host": "hp.test"},
                                         allow_redirects=False)
        assert (status, headers.get("Location")) == (301, "https://hp.test/a?b=1")
        status, body, _ = await fetch(http, f"{ferryman.url}/a", headers={"Host": "hp2.test"})
        assert status == 200 and json.loads(body)["instance"] == "hp-plain"  # port 1 is another listener
    finally:
        for instance in ids:
            await asyncio.to_thread(consul.deregister, instance)


def test_the_differences_listed_are_the_cases_marked() -> None:
    """The module docstring's list and the marked cases stay in step; the counts are what the report gives."""
    assert len(DIFFERS) == 5
    assert AREA_COUNTS == {"lookup": 15, "redirects": 22, "matchers": 19, "global-glob": 6, "paths": 10,
                           "access": 13, "parsing": 8, "variables": 3, "sharing": 4}


async def test_global_glob_matcher_as_fabio(consul: ConsulAgent, workdir: Path, backends: list[Backend],
                                            http: aiohttp.ClientSession) -> None:
    """`--path-matcher glob` (Fabio's proxy.matcher = glob): plain tags match as whole-path globs, in Fabio's
    order; a route's matcher= still wins; a path that is no glob is refused naming the setting."""
    proxy = FerrymanProcess(consul.addr, workdir, extra=["--path-matcher", "glob"])
    await asyncio.to_thread(proxy.start)
    try:
        ids = await _register(consul, proxy, backends, GLOBAL_GLOB_SERVICES)
        backend = await Backend("gg-bad").start()
        backends.append(backend)
        await asyncio.to_thread(consul.register, "gg-bad", "gg-bad-0", backend.port, ["urlprefix-gg.test/[x"])
        ids.append("gg-bad-0")
        try:
            problems = [p for case in GLOBAL_GLOB for p in await _check(http, proxy, case)]
            assert problems == []

            def refused() -> list[str]:
                return [str(e.get("error")) for e in proxy.log_events()
                        if e.get("event") == "route_tag_invalid" and e.get("service") == "gg-bad"]

            await asyncio.to_thread(wait_until, lambda: bool(refused()), 15, "the bad glob refused")
            assert "path_matcher = glob" in refused()[0]
        finally:
            for instance in ids:
                await asyncio.to_thread(consul.deregister, instance)
    finally:
        await asyncio.to_thread(proxy.stop)


async def test_dc_variable_in_tags_as_fabio(consul: ConsulAgent, ferryman: FerrymanProcess, backends: list[Backend],
                                            http: aiohttp.ClientSession) -> None:
    """`$DC` and `${DC}` in a tag's host and path are the instance's datacenter (the test agent's `dc1`), as in
    Fabio; a name Fabio does not expand refuses the tag, naming it, where Fabio would route `""` there."""
    ids = await _register(consul, ferryman, backends, {
        "var-host": ["urlprefix-$DC.vars.test/"], "var-path": ["urlprefix-vars.test/${DC}/api"],
    })
    backend = await Backend("var-bad").start()
    backends.append(backend)
    await asyncio.to_thread(consul.register, "var-bad", "var-bad-0", backend.port, ["urlprefix-/$REGION/api"])
    ids.append("var-bad-0")
    try:
        cases = [Case("dc-in-host", "/x", host="dc1.vars.test", served_by="var-host"),
                 Case("dc-in-path", "/dc1/api/x", host="vars.test", served_by="var-path", upstream_path="/dc1/api/x")]
        assert [p for case in cases for p in await _check(http, ferryman, case)] == []

        def refused() -> list[str]:
            return [str(e.get("error")) for e in ferryman.log_events()
                    if e.get("event") == "route_tag_invalid" and e.get("service") == "var-bad"]

        await asyncio.to_thread(wait_until, lambda: bool(refused()), 15, "the unknown variable refused")
        assert "$REGION" in refused()[0]
    finally:
        for instance in ids:
            await asyncio.to_thread(consul.deregister, instance)


async def test_api_routes_lists_every_service_sharing_a_route(
    consul: ConsulAgent, ferryman: FerrymanProcess, backends: list[Backend],
) -> None:
    """/api/routes shows a route two services share with both, each with its weight, share and instances."""
    ids = await _register(consul, ferryman, backends, {"ar-blue": ["urlprefix-ar.test/"]}, instances=2)
    ids += await _register(consul, ferryman, backends, {"ar-green": ["urlprefix-ar.test/ weight=0.2"]}, instances=1)
    try:
        def shared() -> dict[str, Any] | None:
            return next((r for r in ferryman.routes()["routes"] if r["id"] == "ar-blue+ar-green@ar.test/"
                         and sum(len(s["instances"]) for s in r["services"]) == 3), None)

        await asyncio.to_thread(wait_until, lambda: shared() is not None, 15, "the shared route with 3 instances")
        route = shared()
        assert route is not None
        assert [(s["name"], s["weight"], s["share"], sorted(i["id"] for i in s["instances"]))
                for s in route["services"]] == [("ar-blue", None, 0.8, ["ar-blue-0", "ar-blue-1"]),
                                                ("ar-green", 0.2, 0.2, ["ar-green-0"])]
        assert sorted(i["service"] for i in route["instances"]) == ["ar-blue", "ar-blue", "ar-green"]
    finally:
        for instance in ids:
            await asyncio.to_thread(consul.deregister, instance)
