"""The static provider's file: services, routes and instances to a Snapshot; errors name file, line and key."""

from __future__ import annotations

import pytest

from discovery.static import StaticError, parse_static

GOOD = """\
[[services]]
name = "web"
routes = ["/", "www.example.com/"]
instances = ["127.0.0.1:8081", "[::1]:8082"]

[[services]]
name = "api"
routes = ["/api strip=/api"]
instances = [{ address = "10.0.0.5", port = 8080, id = "api-a", weight = 3 }]
meta = { ferryman-lb = "round_robin" }
"""


def test_a_good_file_becomes_a_snapshot() -> None:
    snapshot = parse_static(GOOD, "s.toml")
    web, api = snapshot.service("web"), snapshot.service("api")
    assert web is not None and api is not None
    assert sorted((r.host, r.path) for r in web.routes) == [("", "/"), ("www.example.com", "/")]
    assert sorted((e.address, e.port) for e in web.endpoints) == [("127.0.0.1", 8081), ("::1", 8082)]
    (a,) = api.endpoints
    assert (a.instance_id, a.address, a.port, a.weight) == ("api-a", "10.0.0.5", 8080, 3)
    assert api.settings.lb == "round_robin"
    assert api.routes[0].options.strip == "/api"


@pytest.mark.parametrize("text, message", [
    ("[[services]]\nname = 'x'\nroutes = ['/']\ninstances = ['nohost']\n",
     r"s\.toml:1: service 'x': instances\[0\]: 'nohost' is not host:port"),
    ("[[services]]\nname = 'x'\ninstances = []\n\n[[services]]\nname = 'y'\nroutes = ['no-slash']\n",
     r"s\.toml: service 'y': .*no path"),
    ("[[services]]\nname = 'x'\n[[services]]\nname = 'x'\n", r"s\.toml:3: service 'x' is declared twice"),
    ("[[services]]\nname = 'x'\nport = 1\n", r"s\.toml:1: service 'x': unknown key 'port'"),
    ("[[services]]\nname = 'x'\ninstances = [{ address = 'a', port = 70000 }]\n", r"port 70000 is not a TCP port"),
    ("[[services]]\nname = 'x'\ninstances = [{ address = 'a', port = 1, weight = 0 }]\n", r"weight 0"),
    ("[[services]]\nname = 'x'\nmeta = { ferryman-lb = 'fastest' }\ninstances = ['a:1']\nroutes = ['/']\n",
     r"service 'x'.*lb"),
    ("services = 3\n", r"'services' must be \[\[services\]\] tables"),
    ("[other]\n", r"unknown key 'other'"),
    ("[[services]\n", r"invalid TOML"),
    ("[[services]]\nname = 'bad name'\n", r"key 'name' must be a service name"),
])
def test_bad_files_say_where_and_what(text: str, message: str) -> None:
    with pytest.raises(StaticError, match=message):
        parse_static(text, "s.toml")


def test_routes_from_service_meta() -> None:
    from discovery.snapshot import build_snapshot

    entry = {
        "Node": {"Node": "n1", "Address": "127.0.0.1"},
        "Service": {"ID": "m-1", "Service": "m", "Address": "127.0.0.1", "Port": 80, "Meta": {
            "ferryman-route": "/meta strip=/meta", "ferryman-route-1": "meta.example.com/",
            "ferryman-route-2": "no-path", "other": "/ignored"}},
        "Checks": [],
    }
    snapshot = build_snapshot({"m": ["urlprefix-"]}, {"m": [entry]})
    (service,) = snapshot.services
    assert sorted((r.host, r.path, r.options.strip) for r in service.routes) == [
        ("", "/meta", "/meta"), ("meta.example.com", "/", None)]
    assert [(p.kind, p.item) for p in snapshot.problems] == [("service_meta_invalid", "ferryman-route-2=no-path")]
