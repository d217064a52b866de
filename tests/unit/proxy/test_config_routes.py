"""`[[routes]]` in the config file: routes beside the tags, weighted splits, header rules; errors name the
file, line and key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from discovery.model import Endpoint, ServiceRoutes, Snapshot
from discovery.tags import parse_route_tag
from proxy.config import ConfigError, load_file
from proxy.headers import client_response_head, upstream_request_head
from proxy.table import RoutedWorld, RoutePart, RoutingTable

GOOD = """\
[[routes]]
route = "/shop strip=/shop"
split = { shop = 95, shop-canary = 5 }

[[routes]]
route = "api.example.com/ header=X-Beta:1"
service = "api-beta"
request_headers = { set = { X-Env = "prod" }, add = { X-Trace = "on" }, remove = ["X-Debug"] }
response_headers = { remove = ["Server", "X-Powered-By"], set = { Cache-Control = "no-store" } }
"""


def _load(tmp_path: Path, text: str) -> dict[str, Any]:
    path = tmp_path / "f.toml"
    path.write_text(text)
    return load_file(path)


def test_routes_load_and_build_into_the_table(tmp_path: Path) -> None:
    routes = _load(tmp_path, GOOD)["routes"]
    assert [r.services for r in routes] == [(("shop", 95), ("shop-canary", 5)), (("api-beta", 1),)]
    snapshot = Snapshot((ServiceRoutes("shop", (parse_route_tag("urlprefix-/shop"),),
                                       (Endpoint("shop", "shop-1", "127.0.0.1", 1),)),))
    table = RoutingTable.from_snapshot(RoutedWorld(snapshot, (RoutePart.declared("file", routes),)), 1)
    split = table.lookup("h", "/shop/x")
    assert split is not None and split.id == "shop+shop-canary@*any*/shop" and split.strip == "/shop"
    # The file's route won over the tag's for the same host and path.
    assert [p.item for p in table.conflicts] == ["shop@*any*/shop"]
    draws = [split.pick_service(i / 1000) for i in range(1000)]
    assert draws.count("shop-canary") == 50


def test_header_rules_apply_both_ways(tmp_path: Path) -> None:
    route = _load(tmp_path, GOOD)["routes"][1]
    head = upstream_request_head(
        b"GET", b"/", [(b"Host", b"api.example.com"), (b"X-Env", b"dev"), (b"x-debug", b"1")], client_ip=b"1.2.3.4",
        proto=b"http", port=b"80", default_host=b"x", chunked=False, rules=route.request,
    ).decode()
    assert "X-Env: prod\r\n" in head and "X-Env: dev" not in head and "x-debug" not in head.lower()
    assert "X-Trace: on\r\n" in head and "Host: api.example.com\r\n" in head
    back = client_response_head(200, b"OK", [(b"Server", b"gunicorn"), (b"X-Powered-By", b"php"),
                                             (b"Cache-Control", b"max-age=60"), (b"Content-Length", b"2")],
                                chunked=False, keep_alive=True, http10=False, rules=route.response).decode()
    assert "Server" not in back and "X-Powered-By" not in back and "max-age" not in back
    assert "Cache-Control: no-store\r\n" in back and "Content-Length: 2\r\n" in back


@pytest.mark.parametrize("text, message", [
    ('[[routes]]\nroute = "/x"\n', r"f\.toml:1: routes\[0\]: give either 'service' or 'split'"),
    ('[[routes]]\nroute = "/x"\nservice = "a"\nsplit = { a = 1, b = 1 }\n', "give either"),
    ('\n[[routes]]\nroute = "nopath"\nservice = "a"\n', r"f\.toml:2: routes\[0\]: key 'route': .*no path"),
    ('[[routes]]\nroute = "/x"\nsplit = { a = 1 }\n', "two or more services"),
    ('[[routes]]\nroute = "/x"\nsplit = { a = 1, b = 0 }\n', "weights above 0"),
    ('[[routes]]\nroute = "/x"\nservice = "a"\nrequest_headers = { set = { Content-Length = "1" } }\n',
     "framing or routing"),
    ('[[routes]]\nroute = "/x"\nservice = "a"\nresponse_headers = { drop = [] }\n', "set, add and/or remove"),
    ('[[routes]]\nroute = "/x"\nservice = "a"\nrequest_headers = { set = { "X A" = "1" } }\n', "not a field name"),
    ('[[routes]]\nroute = "/x"\nservice = "a"\nweight = 3\n', "unknown key 'weight'"),
    ('[[routes]]\nroute = "/x"\nservice = "a"\n[[routes]]\nroute = "/y"\nservice = "b"\nrequest_headers = 1\n',
     r"f\.toml:4: routes\[1\]: request_headers must be a table"),
])
def test_bad_routes_name_file_line_and_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, text)


def test_prepend_host_and_rewrite(tmp_path: Path) -> None:
    from proxy.table import Route

    route = Route.from_spec("s", parse_route_tag("urlprefix-/app strip=/app prepend=/v2 host=internal.svc"))
    assert route.upstream_target("/app/users?id=1") == "/v2/users?id=1"
    assert route.upstream_target("/app") == "/v2/"
    assert route.upstream_host_bytes == b"internal.svc"
    head = upstream_request_head(b"GET", b"/", [(b"Host", b"shop.example")], client_ip=b"1.2.3.4", proto=b"http",
                                 port=b"80", default_host=b"x", chunked=False, upstream_host=b"internal.svc").decode()
    assert "Host: internal.svc\r\n" in head and "X-Forwarded-Host: shop.example\r\n" in head
    text = ('[[routes]]\nroute = "/old"\nservice = "s"\n'
            'rewrite = { pattern = "^/old/(\\\\w+)$", replacement = "/new/item/\\\\1" }\n')
    (config,) = _load(tmp_path, text)["routes"]
    rewritten = Route.from_config(config)
    assert rewritten.upstream_target("/old/abc?x=1") == "/new/item/abc?x=1"
    assert rewritten.upstream_target("/old/a/b") == "/old/a/b"  # no match: unchanged


@pytest.mark.parametrize("text, message", [
    ('rewrite = { pattern = "(", replacement = "/" }', "rewrite: "),
    ('rewrite = { pattern = "^/a", replacement = "/\\\\2" }', "rewrite: invalid group reference"),
    ('rewrite = "/x"', "rewrite must be a table"),
])
def test_bad_rewrites(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, f'[[routes]]\nroute = "/old"\nservice = "s"\n{text}\n')


@pytest.mark.parametrize("tag, message", [
    ("urlprefix-/a prepend=v2", "prepend="), ("urlprefix-/a prepend=/../x", "prepend="),
    ("urlprefix-/a host=*.x", "host"),
])
def test_bad_prepend_and_host(tag: str, message: str) -> None:
    from discovery.tags import TagError

    with pytest.raises(TagError, match=message):
        parse_route_tag(tag)


@pytest.mark.parametrize("field", ["X-Request-ID", "X-Forwarded-For", "Forwarded", "X-Real-IP"])
def test_rules_cannot_touch_what_this_hop_writes(tmp_path: Path, field: str) -> None:
    with pytest.raises(ConfigError, match="writes itself"):
        _load(tmp_path, f'[[routes]]\nroute = "/x"\nservice = "a"\nrequest_headers = {{ set = {{ {field} = "1" }} }}\n')


def test_a_redirect_never_becomes_protocol_relative() -> None:
    from proxy.table import Route

    route = Route.from_spec("s", parse_route_tag("urlprefix-/ redirect=301,/$path"))
    assert route.location("//evil.example/x", "", "h") == b"/evil.example/x"
    assert route.location("/a", "b=1", "h") == b"/a?b=1"


class TestPathMatcher:
    """`path_matcher` (Fabio's proxy.matcher) in the file, the environment or a flag; [[routes]] follow it."""

    ROUTES = 'path_matcher = "glob"\n\n[[routes]]\nroute = "/static/*"\nservice = "web"\n'

    def test_file_routes_follow_the_files_matcher(self, tmp_path: Path) -> None:
        """A [[routes]] route without matcher= takes the file's path_matcher, wherever the key is written."""
        loaded = _load(tmp_path, self.ROUTES)
        assert loaded["path_matcher"] == "glob"
        assert [r.spec.options.matcher for r in loaded["routes"]] == ["glob"]

    def test_a_flag_wins_for_the_routes_too(self, tmp_path: Path) -> None:
        """--path-matcher over the file's key: the routes are parsed with the flag's matcher."""
        from proxy.config import load
        path = tmp_path / "f.toml"
        path.write_text(self.ROUTES.replace("/static/*", "/static"))
        settings = load(config_file=str(path), environ={"FERRYMAN_PATH_MATCHER": "iprefix"},
                        flags={"path_matcher": "prefix"})
        assert settings.path_matcher == "prefix"
        assert [r.spec.options.matcher for r in settings.routes] == ["prefix"]
        settings = load(config_file=str(path), environ={"FERRYMAN_PATH_MATCHER": "iprefix"}, flags={})
        assert [r.spec.options.matcher for r in settings.routes] == ["iprefix"]

    def test_a_bad_value_names_the_key(self, tmp_path: Path) -> None:
        """An unknown matcher is a config error naming the file, line and key."""
        with pytest.raises(ConfigError, match=r"f.toml:1: key 'path_matcher': must be one of prefix, glob, iprefix"):
            _load(tmp_path, 'path_matcher = "regex"\n')

    def test_a_bad_glob_route_names_the_setting(self, tmp_path: Path) -> None:
        """A [[routes]] path that is no glob under path_matcher = glob is refused at load, naming the setting."""
        with pytest.raises(ConfigError, match=r"path_matcher = glob"):
            _load(tmp_path, self.ROUTES.replace("/static/*", "/static["))
