"""Several Consul datacenters (`consul_dc = "dc1,dc2"`, in order of preference): parsing the list, the pure
choice of the datacenter that serves each service, what /api/routes shows, and the client's per-datacenter and
KV reads through py-consul against a loopback server that answers like Consul. The watcher's side is in
test_watcher.py (TestDatacenters); the real thing, two datacenters joined over the WAN, in
tests/integration/test_multi_dc.py."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from discovery.consul import ConsulAddress, ConsulClient, ConsulError, parse_datacenters
from discovery.model import Endpoint, Problem, RouteSpec, ServiceRoutes, ServiceSettings, Snapshot
from discovery.snapshot import build_dc_snapshot, build_snapshot, datacenter_switches, serving_datacenters
from proxy.admin import routes_document
from proxy.config import ConfigError, load
from proxy.listener import Router
from proxy.pool import Pools, sticky_value
from proxy.table import RoutingTable

# --- consul_dc ---


class TestParseDatacenters:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("", ()),
            ("  ", ()),
            ("dc1", ("dc1",)),
            ("dc1,dc2", ("dc1", "dc2")),
            (" eu-west_1 , us-east-1 ,dc3", ("eu-west_1", "us-east-1", "dc3")),
        ],
        ids=["empty-is-the-agents", "blank-is-the-agents", "one", "two-in-order", "blanks-around-items"],
    )
    def test_valid(self, text: str, expected: tuple[str, ...]) -> None:
        assert parse_datacenters(text) == expected

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("dc1,,dc2", "datacenter list 'dc1,,dc2': item 2 is empty"),
            ("dc1,", "datacenter list 'dc1,': item 2 is empty"),
            (",dc1", "datacenter list ',dc1': item 1 is empty"),
            ("dc1,dc 2", "datacenter 'dc 2': a name has only letters, digits, '-' and '_'"),
            ("dc1,dc.2", "datacenter 'dc.2': a name has only letters, digits, '-' and '_'"),
            ("dc1,dc2,dc1", "datacenter 'dc1' is listed twice"),
            ("dc1,DC1", "datacenter 'DC1' is listed twice"),
        ],
    )
    def test_a_bad_item_is_named(self, text: str, message: str) -> None:
        with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
            parse_datacenters(text)

    def test_settings_parse_the_list_and_name_the_key_of_a_bad_one(self) -> None:
        settings = load(config_file=None, environ={"FERRYMAN_CONSUL_DC": "dc1,dc2"}, flags={})
        assert settings.consul.datacenters == ("dc1", "dc2")
        assert load(config_file=None, environ={}, flags={}).consul.datacenters == ()
        with pytest.raises(ConfigError) as info:
            load(config_file=None, environ={}, flags={"consul_dc": "dc1,dc2,dc1"})
        assert "consul_dc" in str(info.value) and "'dc1' is listed twice" in str(info.value)

    @pytest.mark.parametrize(
        ("dc", "expected"),
        [(None, ("",)), ("", ("",)), ("dc2", ("dc2",)), ("dc1,dc2", ("dc1", "dc2")), (["dc1", "dc2"], ("dc1", "dc2"))],
    )
    def test_the_client_follows_the_agents_datacenter_or_the_listed_ones(self, dc: Any, expected: Any) -> None:
        client = ConsulClient(ConsulAddress("http", "127.0.0.1", 8500), token=None, dc=dc, wait_s=2)
        assert client.datacenters == expected

    def test_the_client_refuses_a_bad_list(self) -> None:
        with pytest.raises(ValueError, match="listed twice"):
            ConsulClient(ConsulAddress("http", "127.0.0.1", 8500), token=None, dc="dc1,dc1", wait_s=2)


# --- which datacenter serves a service (pure) ---


def entry(service: str, instance_id: str, port: int, status: str = "passing", **meta: str) -> dict[str, Any]:
    svc: dict[str, Any] = {"ID": instance_id, "Service": service, "Address": "10.0.0.5", "Port": port}
    if meta:
        svc["Meta"] = {k.replace("_", "-"): v for k, v in meta.items()}
    return {
        "Node": {"Node": "node-1", "Address": "10.0.0.1"},
        "Service": svc,
        "Checks": [{"CheckID": "serfHealth", "Status": "passing"},
                   {"CheckID": f"service:{instance_id}", "Status": status}],
    }


UP = [entry("web", "w-1", 8001), entry("web", "w-2", 8002)]
DOWN = [entry("web", "w-1", 8001, "critical"), entry("web", "w-2", 8002, "critical")]
WARNING = [entry("web", "w-1", 8001, "warning")]
INVALID = [{"Node": {"Node": "node-1"}, "Service": {"ID": "w-0", "Port": 8000},
            "Checks": [{"CheckID": "serfHealth", "Status": "passing"}]}]  # passing, but no address anywhere
CATALOG = {"web": ["urlprefix-/"]}
UNKNOWN = None  # the datacenter's health of the service has not been read


@dataclass
class Case:
    health: dict[str, Any]  # dc -> entries, or UNKNOWN
    expected: list[tuple[str, str]] | None  # [(dc, instance id)] served; None: the service is not in the table
    datacenters: tuple[str, ...] = ("dc1", "dc2")
    problems: list[str] = field(default_factory=list)


CASES = {
    "first-healthy-wins": Case({"dc1": UP, "dc2": [entry("web", "w-9", 8009)]}, [("dc1", "w-1"), ("dc1", "w-2")]),
    "first-all-critical": Case({"dc1": DOWN, "dc2": [entry("web", "w-9", 8009)]}, [("dc2", "w-9")]),
    "first-one-left-is-enough": Case({"dc1": [DOWN[0], UP[1]], "dc2": UP}, [("dc1", "w-2")]),
    "first-has-no-instance": Case({"dc1": [], "dc2": UP}, [("dc2", "w-1"), ("dc2", "w-2")]),
    "warning-is-not-healthy": Case({"dc1": WARNING, "dc2": UP}, [("dc2", "w-1"), ("dc2", "w-2")]),
    "first-not-known-yet": Case({"dc1": UNKNOWN, "dc2": UP}, [("dc2", "w-1"), ("dc2", "w-2")]),
    "second-not-known": Case({"dc1": DOWN, "dc2": UNKNOWN}, []),
    "none-healthy-anywhere": Case({"dc1": DOWN, "dc2": DOWN}, []),
    "known-nowhere-left-out": Case({"dc1": UNKNOWN, "dc2": UNKNOWN}, None),
    "invalid-healthy-entry-does-not-count": Case({"dc1": INVALID, "dc2": UP}, [("dc2", "w-1"), ("dc2", "w-2")],
                                                 problems=["instance_invalid"]),
    "third-of-three": Case({"dc1": DOWN, "dc2": [], "dc3": UP}, [("dc3", "w-1"), ("dc3", "w-2")],
                           datacenters=("dc1", "dc2", "dc3")),
    "order-is-the-preference": Case({"dc1": [entry("web", "w-9", 8009)], "dc2": UP}, [("dc2", "w-1"), ("dc2", "w-2")],
                                    datacenters=("dc2", "dc1")),
    "one-named-datacenter-is-not-labelled": Case({"dc2": UP}, [("", "w-1"), ("", "w-2")], datacenters=("dc2",)),
}


class TestServingDatacenter:
    @pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
    def test_the_first_datacenter_with_a_healthy_instance_serves(self, case: Case) -> None:
        health = {"web": {dc: entries for dc, entries in case.health.items() if entries is not None}}
        snapshot = build_dc_snapshot(case.datacenters, {dc: CATALOG for dc in case.datacenters}, health)
        web = snapshot.service("web")
        if case.expected is None:
            assert web is None
            return
        assert web is not None and web.routes == (RouteSpec("", "/"),)
        assert [(e.dc, e.instance_id) for e in web.endpoints] == case.expected
        assert [p.kind for p in snapshot.problems] == case.problems

    def test_routes_are_the_union_of_every_datacenters_tags(self) -> None:
        catalogs = {
            "dc1": {"web": ["urlprefix-/", "v1"], "api": ["v1"]},
            "dc2": {"web": ["urlprefix-/", "urlprefix-/web"], "api": ["urlprefix-/api"], "shop": ["urlprefix-/s"]},
        }
        health = {"web": {"dc1": UP}, "api": {"dc1": [entry("api", "a-1", 9001)], "dc2": []},
                  "shop": {"dc2": [entry("shop", "s-9", 7009)]}}
        snapshot = build_dc_snapshot(("dc1", "dc2"), catalogs, health)
        assert {s.name: s.routes for s in snapshot.services} == {
            "api": (RouteSpec("", "/api"),),
            "shop": (RouteSpec("", "/s"),),
            "web": (RouteSpec("", "/"), RouteSpec("", "/web")),
        }
        # api's route comes from dc2, its instances from dc1, the preferred one that has some
        assert serving_datacenters(snapshot.services) == {"api": "dc1", "shop": "dc2", "web": "dc1"}

    def test_balancing_settings_come_from_the_preferred_datacenter_even_after_a_failover(self) -> None:
        health = {"web": {"dc1": [entry("web", "w-1", 8001, "critical", ferryman_lb="least_conn")],
                          "dc2": [entry("web", "w-9", 8009, ferryman_lb="p2c", ferryman_sticky="sid")]}}
        web = build_dc_snapshot(("dc1", "dc2"), {"dc1": CATALOG, "dc2": CATALOG}, health).service("web")
        assert web is not None and web.endpoints[0].dc == "dc2"
        assert web.settings == ServiceSettings(lb="least_conn", sticky="sid")

    def test_the_single_datacenter_snapshot_is_unchanged(self) -> None:
        catalog = {"web": ["urlprefix-/"], "api": ["urlprefix-/api", "urlprefix-bad tag"]}
        health = {"web": UP, "api": [entry("api", "a-1", 9001)]}
        single = build_snapshot(catalog, health)
        assert single == build_dc_snapshot(("",), {"": catalog}, {k: {"": v} for k, v in health.items()})
        assert single.problems == (Problem("route_tag_invalid", "api", single.problems[0].detail,
                                           "urlprefix-bad tag"),)
        web = single.service("web")
        assert web is not None and [(e.dc, e.key) for e in web.endpoints] == [("", "node-1/w-1"), ("", "node-1/w-2")]


class TestSwitches:
    @pytest.mark.parametrize(
        ("before", "after", "expected"),
        [
            ({}, {"web": "dc1"}, []),
            ({"web": "dc1"}, {"web": "dc1"}, []),
            ({"web": "dc1"}, {"web": "dc2"}, [("web", "dc1", "dc2")]),
            ({"web": "dc2"}, {"web": "dc1"}, [("web", "dc2", "dc1")]),
            ({"web": "dc1"}, {}, []),
            ({"web": "dc1", "api": "dc1"}, {"web": "dc2", "api": "dc2", "new": "dc2"},
             [("api", "dc1", "dc2"), ("web", "dc1", "dc2")]),
        ],
        ids=["first-time-is-no-switch", "unchanged", "failover", "failback", "none-serving-is-no-switch",
             "several-sorted"],
    )
    def test_switches(self, before: dict[str, str], after: dict[str, str], expected: list[Any]) -> None:
        assert datacenter_switches(before, after) == expected

    def test_serving_datacenters_skips_unlabelled_and_empty_services(self) -> None:
        snapshot = Snapshot(services=(
            ServiceRoutes("a", (RouteSpec("", "/a"),), (Endpoint("a", "a-1", "10.0.0.1", 1, dc="dc2"),)),
            ServiceRoutes("b", (RouteSpec("", "/b"),), ()),
            ServiceRoutes("c", (RouteSpec("", "/c"),), (Endpoint("c", "c-1", "10.0.0.1", 1),)),
        ))
        assert serving_datacenters(snapshot.services) == {"a": "dc2"}


class TestEndpointIdentity:
    def test_the_datacenter_is_part_of_the_identity_only_when_named(self) -> None:
        one = Endpoint("web", "w-1", "10.0.0.5", 8001, node="node-1")
        dc1 = Endpoint("web", "w-1", "10.0.0.5", 8001, node="node-1", dc="dc1")
        dc2 = Endpoint("web", "w-1", "10.0.0.5", 8001, node="node-1", dc="dc2")
        assert one.key == "node-1/w-1"  # as before datacenters: sticky cookies and state keep their values
        assert (dc1.key, dc2.key) == ("dc1/node-1/w-1", "dc2/node-1/w-1")
        assert dc1 != dc2 and dc1 != one  # a switch of datacenter is a change of the pool
        assert len({sticky_value(e) for e in (one, dc1, dc2)}) == 3

    def test_routes_document_shows_each_instances_datacenter(self) -> None:
        snapshot = Snapshot(services=(
            ServiceRoutes("web", (RouteSpec("", "/"),), (Endpoint("web", "w-9", "10.0.0.9", 8009, "n9", dc="dc2"),)),
            ServiceRoutes("one", (RouteSpec("", "/one"),), (Endpoint("one", "o-1", "10.0.0.1", 8001, "n1"),)),
        ))
        pools = Pools()
        pools.reconcile(snapshot)
        document = routes_document(Router(RoutingTable.from_snapshot(snapshot, 3)), pools)
        instances = {r["service"]: r["instances"] for r in document["routes"]}
        assert instances == {
            "web": [{"id": "w-9", "node": "n9", "address": "10.0.0.9", "port": 8009, "weight": 1,
                     "datacenter": "dc2", "service": "web"}],
            "one": [{"id": "o-1", "node": "n1", "address": "10.0.0.1", "port": 8001, "weight": 1,
                     "datacenter": None, "service": "one"}],
        }


# --- the client, py-consul for real, against a loopback server answering like Consul ---


@dataclass
class Answer:
    status: int
    body: Any  # JSON-encoded unless bytes/str
    index: str | None = "42"


@dataclass
class FakeServer:
    """Answers by (path, dc); records every request's path and query."""

    answers: dict[tuple[str, str], Answer] = field(default_factory=dict)
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    address: ConsulAddress | None = None

    async def handle(self, request: web.Request) -> web.Response:
        query = dict(request.query)
        self.requests.append((request.path, query))
        answer = self.answers.get((request.path, query.get("dc", ""))) or self.answers.get((request.path, "*"))
        if answer is None:
            return web.Response(status=404, text="no answer scripted")
        body = answer.body if isinstance(answer.body, str | bytes) else json.dumps(answer.body)
        headers = {"X-Consul-Index": answer.index} if answer.index is not None else {}
        return web.Response(status=answer.status, body=body.encode() if isinstance(body, str) else body,
                            headers=headers, content_type="application/json")

    def client(self, dc: str | None = None, token: str | None = None) -> ConsulClient:
        assert self.address is not None
        return ConsulClient(self.address, token=token, dc=dc, wait_s=1)


@pytest.fixture
async def server() -> AsyncIterator[FakeServer]:
    fake = FakeServer()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    fake.address = ConsulAddress("http", "127.0.0.1", runner.addresses[0][1])
    try:
        yield fake
    finally:
        await runner.cleanup()


async def closing(client: ConsulClient, call: Callable[[ConsulClient], Awaitable[Any]]) -> Any:
    try:
        return await call(client)
    finally:
        await client.close()


def b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


class TestClientDatacenters:
    async def test_each_query_names_its_datacenter_and_no_dc_reads_the_first(self, server: FakeServer) -> None:
        server.answers[("/v1/catalog/services", "*")] = Answer(200, {"web": ["urlprefix-/"]})
        server.answers[("/v1/health/service/web", "*")] = Answer(200, [])
        c = server.client("dc1,dc2")
        try:
            assert await c.services(0, dc="dc2") == (42, {"web": ["urlprefix-/"]})
            await c.services(7)
            await c.health("web", 7, dc="dc2")
        finally:
            await c.close()
        assert [(path, q.get("dc"), q.get("index")) for path, q in server.requests] == [
            ("/v1/catalog/services", "dc2", None),
            ("/v1/catalog/services", "dc1", "7"),
            ("/v1/health/service/web", "dc2", "7"),
        ]

    async def test_the_agents_own_datacenter_sends_no_dc(self, server: FakeServer) -> None:
        server.answers[("/v1/catalog/services", "")] = Answer(200, {})
        await closing(server.client(None), lambda c: c.services(0))
        assert "dc" not in server.requests[0][1]

    async def test_a_datacenter_out_of_reach_does_not_move_to_another_address(self, server: FakeServer) -> None:
        server.answers[("/v1/health/service/web", "dc2")] = Answer(500, "No path to datacenter")
        assert server.address is not None
        c = ConsulClient([server.address, ConsulAddress("http", "127.0.0.1", 1)], token=None, dc="dc1,dc2",
                         wait_s=1)
        try:
            with capture_logs() as logs:
                with pytest.raises(ConsulError) as info:
                    await c.health("web", 0, dc="dc2")
        finally:
            await c.close()
        assert (info.value.reason, info.value.status, info.value.failover) == ("bad_response", 500, False)
        assert c.address == server.address and not [e for e in logs if e["event"] == "consul_failover"]

    async def test_check_access_reads_every_datacenter_and_names_unknown_ones(self, server: FakeServer) -> None:
        server.answers[("/v1/acl/token/self", "*")] = Answer(200, {"AccessorID": "a-1", "Description": "ferryman"})
        server.answers[("/v1/catalog/datacenters", "*")] = Answer(200, ["dc1", "dc2"])
        server.answers[("/v1/catalog/services", "dc1")] = Answer(200, {"consul": []})
        server.answers[("/v1/health/service/consul", "dc1")] = Answer(200, [{"Node": {}, "Service": {}}])
        server.answers[("/v1/catalog/services", "dc2")] = Answer(200, {})  # the token reads nothing there
        with pytest.raises(Exception, match="may not read any service in datacenter dc2"):
            await closing(server.client("dc1,dc9,dc2", token="t"), lambda c: c.check_access())
        with capture_logs() as logs:
            with pytest.raises(Exception, match="in datacenter dc2"):
                await closing(server.client("dc9,dc2", token="t"), lambda c: c.check_access())
        unknown = [e for e in logs if e["event"] == "consul_dc_unknown"]
        assert [(e["datacenters"], e["known"], e["log_level"]) for e in unknown] == [(["dc9"], ["dc1", "dc2"],
                                                                                      "error")]
        assert "consul_dc" in unknown[0]["detail"] and unknown[0]["problem"] == "configuration"
        assert ("/v1/catalog/services", {"dc": "dc9"}) not in server.requests

    async def test_an_unknown_datacenter_is_named_with_acls_off_too(self, server: FakeServer) -> None:
        """Without ACLs (401 on token/self) the access check ends early; the datacenters are checked first."""
        server.answers[("/v1/acl/token/self", "*")] = Answer(401, "ACL support disabled")
        server.answers[("/v1/catalog/datacenters", "*")] = Answer(200, ["dc1"])
        with capture_logs() as logs:
            await closing(server.client("dc1,dc-typo"), lambda c: c.check_access())
        unknown = [e for e in logs if e["event"] == "consul_dc_unknown"]
        assert [(e["datacenters"], e["log_level"], e["problem"]) for e in unknown] == [
            (["dc-typo"], "error", "configuration")]


class TestClientKV:
    async def test_recursive_read_decodes_values(self, server: FakeServer) -> None:
        server.answers[("/v1/kv/ferryman/tls/", "*")] = Answer(200, [
            {"Key": "ferryman/tls/cert.pem", "Value": b64(b"-----BEGIN\x00\xff"), "Flags": 0},
            {"Key": "ferryman/tls/", "Value": None, "Flags": 0},
        ], index="77")
        index, values = await closing(server.client("dc1,dc2"), lambda c: c.kv("ferryman/tls/", 12))
        assert (index, values) == (77, {"ferryman/tls/cert.pem": b"-----BEGIN\x00\xff", "ferryman/tls/": b""})
        path, query = server.requests[0]
        assert (path, query) == ("/v1/kv/ferryman/tls/", {"index": "12", "wait": "1s", "recurse": "1", "dc": "dc1"})

    async def test_no_key_under_the_prefix_is_empty_with_the_index(self, server: FakeServer) -> None:
        server.answers[("/v1/kv/ferryman/", "*")] = Answer(404, "", index="91")
        assert await closing(server.client(), lambda c: c.kv("/ferryman/", 0)) == (91, {})
        assert server.requests[0] == ("/v1/kv/ferryman/", {"recurse": "1"})

    @pytest.mark.parametrize(
        ("answer", "reason", "status", "failover"),
        [
            (Answer(403, "Permission denied"), "forbidden", 403, False),
            (Answer(500, "No cluster leader"), "bad_response", 500, True),
            (Answer(200, [{"Key": "k", "Value": "not base64!"}]), "bad_response", None, False),
            (Answer(200, {"Key": "k"}), "bad_response", None, False),
            (Answer(200, [{"Value": b64(b"x")}]), "bad_response", None, False),
            (Answer(200, [], index="nope"), "bad_response", None, False),
            (Answer(200, [], index=None), "bad_response", None, False),
        ],
        ids=["forbidden", "no-leader", "bad-base64", "not-a-list", "no-key", "bad-index", "no-index"],
    )
    async def test_errors_are_consul_errors(
        self, server: FakeServer, answer: Answer, reason: str, status: int | None, failover: bool
    ) -> None:
        server.answers[("/v1/kv/p", "*")] = answer
        with pytest.raises(ConsulError) as info:
            await closing(server.client(), lambda c: c.kv("p", 0))
        assert (info.value.reason, info.value.status, info.value.failover) == (reason, status, failover)

    async def test_another_datacenter(self, server: FakeServer) -> None:
        server.answers[("/v1/kv/p", "dc2")] = Answer(200, [{"Key": "p", "Value": b64(b"v")}])
        assert await closing(server.client("dc1,dc2"), lambda c: c.kv("p", 0, dc="dc2")) == (42, {"p": b"v"})
