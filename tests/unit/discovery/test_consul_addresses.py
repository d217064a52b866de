"""Several Consul addresses: parsing the list, moving to the next address on the failures another server may
not have, and the start-time ACL check. Fakes stand in for py-consul's client, except in TestRealClient, where
py-consul talks HTTP to small aiohttp servers on loopback that answer the way Consul does."""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import aiohttp
import consul
import consul.exceptions
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from discovery.consul import ConsulAccessError, ConsulAddress, ConsulClient, ConsulError
from proxy.config import ConfigError, load

A, B, C = (ConsulAddress("http", "127.0.0.1", port) for port in (8500, 8501, 8502))


class TestParseList:
    def test_one_address_is_a_list_of_one(self) -> None:
        assert ConsulAddress.parse_list("127.0.0.1:8500") == (A,)

    def test_several_keep_their_order_schemes_and_default_ports(self) -> None:
        assert ConsulAddress.parse_list(" 127.0.0.1:8501 , http://127.0.0.1:8500,https://c3:8501,https://c4,c5") == (
            B, A, ConsulAddress("https", "c3", 8501), ConsulAddress("https", "c4", 443),
            ConsulAddress("http", "c5", 8500),
        )

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("127.0.0.1:8500,ftp://c2:21", "consul address 'ftp://c2:21': scheme must be http or https"),
            ("127.0.0.1:8500, c2:port", "consul address ' c2:port': invalid port"),
            ("c1:8500,c2:99999", "consul address 'c2:99999': invalid port"),
            ("c1:8500,http://c2:8500/v1", "consul address 'http://c2:8500/v1': must not have a path"),
            ("c1:8500,,c3:8500", "consul address list 'c1:8500,,c3:8500': item 2 is empty"),
            ("c1:8500,", "consul address list 'c1:8500,': item 2 is empty"),
            ("c1:8500,c2:8500,http://c1:8500", "consul address 'http://c1:8500' is listed twice"),
            ("", "consul address '': missing host"),
            ("c1:0", "consul address 'c1:0': invalid port"),
            ("c1:8500,[::1", "consul address '[::1': Invalid IPv6 URL"),
            ("c1:8500,[:]:8500", "consul address '[:]:8500'"),
            ("c1:8500,[fe80::zz]:8500", "consul address '[fe80::zz]:8500'"),
            ("user:pw@c2:8500", "consul address 'user:pw@c2:8500': must not have user info"),
            ("c2:8500?x=1", "consul address 'c2:8500?x=1': must not have a path"),
            ("c 2:8500", "consul address 'c 2:8500': invalid host"),
        ],
    )
    def test_a_bad_item_is_named(self, text: str, message: str) -> None:
        with pytest.raises(ValueError, match="^" + re.escape(message)):
            ConsulAddress.parse_list(text)

    def test_str_is_a_url(self) -> None:
        assert [str(a) for a in ConsulAddress.parse_list("c1,https://c2:8501,[::1]:8500")] == [
            "http://c1:8500", "https://c2:8501", "http://[::1]:8500"
        ]

    def test_settings_parse_the_list_and_name_the_key_of_a_bad_one(self) -> None:
        settings = load(config_file=None, environ={"FERRYMAN_CONSUL_ADDR": "c1:8500,https://c2:8501"}, flags={})
        assert settings.consul.addresses == (ConsulAddress("http", "c1", 8500), ConsulAddress("https", "c2", 8501))
        with pytest.raises(ConfigError) as info:
            load(config_file=None, environ={}, flags={"consul_addr": "c1:8500,c2:x"})
        assert "consul_addr" in str(info.value) and "'c2:x': invalid port" in str(info.value)


# --- fakes of py-consul's client: one per address, each answering from a script ---

Answer = Callable[[], Any]  # returns a value or raises, like py-consul's awaitables


def ok(value: Any) -> Answer:
    return lambda: value


def fails(exc: BaseException) -> Answer:
    def answer() -> Any:
        raise exc
    return answer


class FakeApi:
    """Stands for consul.aio.Consul at one address; `answers[endpoint]` is used for every call to it."""

    def __init__(self, name: str, answers: dict[str, Answer] | None = None) -> None:
        self.name = name
        self.answers = answers or {}
        self.calls: list[str] = []
        self.closed = False
        self.gate: asyncio.Event | None = None  # when set, calls wait for it (requests in flight together)
        self.catalog = SimpleNamespace(services=lambda **kw: self._call("services", kw))
        self.health = SimpleNamespace(service=lambda name, **kw: self._call(f"health:{name}", kw))
        self.acl = SimpleNamespace(token=SimpleNamespace(read_self=lambda: self._call("self", {})))
        # Reads that need parameters py-consul's helpers lack (stale, cached) go through its HTTP client.
        self.http = SimpleNamespace(get=lambda callback, path, params=(), headers=None: self._call(
            "health:" + path.rsplit("/", 1)[1] if path.startswith("/v1/health/service/") else "checks", {}))

    def prepare_headers(self, token: str | None) -> dict[str, str]:
        return {}

    async def _call(self, endpoint: str, kwargs: dict[str, Any]) -> Any:
        self.calls.append(endpoint)
        if self.gate is not None:
            await self.gate.wait()
        answer = self.answers.get(endpoint.split(":")[0]) or self.answers.get(endpoint)
        if answer is None:
            raise AssertionError(f"{self.name}: no answer scripted for {endpoint}")
        return answer()

    async def close(self) -> None:
        self.closed = True


def client(apis: list[FakeApi], token: str | None = None) -> ConsulClient:
    c = ConsulClient([A, B, C][: len(apis)], token=token, dc=None, wait_s=2)
    c._api = lambda at: apis[at]  # type: ignore[method-assign]
    return c


CATALOG = ok(("7", {"consul": [], "web": ["urlprefix-/"]}))
HEALTHY = ok(("7", [{"Node": {"Node": "s1"}, "Service": {"ID": "consul"}, "Checks": []}]))
# aiohttp reads only these three fields of the ConnectionKey it is given, so a stand-in is enough.
REFUSED = fails(aiohttp.ClientConnectorError(SimpleNamespace(ssl=None, host="127.0.0.1", port=8500),  # type: ignore[arg-type]
                                             ConnectionRefusedError(111, "Connection refused")))
NO_LEADER = fails(consul.ConsulException("500 No cluster leader"))
RPC_ERROR = fails(consul.ConsulException("500 rpc error making call: EOF"))


def failovers(logs: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, str]]:
    return [(e["from"], e["to"], e["reason"]) for e in logs if e["event"] == "consul_failover"]


class TestFailover:
    async def test_unreachable_moves_the_next_request_to_the_next_address(self) -> None:
        a, b = FakeApi("a", {"services": REFUSED}), FakeApi("b", {"services": CATALOG})
        c = client([a, b])
        with capture_logs() as logs:
            with pytest.raises(ConsulError) as info:
                await c.services(0)
            assert info.value.reason == "unreachable"
            assert c.address == B
            assert await c.services(0) == (7, {"consul": [], "web": ["urlprefix-/"]})
            assert await c.services(7) == (7, {"consul": [], "web": ["urlprefix-/"]})
        assert (a.calls, b.calls) == (["services"], ["services", "services"])
        assert failovers(logs) == [("http://127.0.0.1:8500", "http://127.0.0.1:8501", "unreachable")]
        failover = next(e for e in logs if e["event"] == "consul_failover")
        assert failover["log_level"] == "warning"

    @pytest.mark.parametrize(
        ("answer", "reason", "status"),
        [
            (REFUSED, "unreachable", None),
            (fails(aiohttp.ServerDisconnectedError()), "unreachable", None),
            (fails(OSError(104, "Connection reset by peer")), "unreachable", None),
            (fails(TimeoutError()), "timeout", None),
            (fails(consul.Timeout()), "timeout", None),
            (NO_LEADER, "bad_response", 500),
            (RPC_ERROR, "bad_response", 500),
            (fails(consul.ConsulException("503 Service Unavailable")), "bad_response", 503),
            (fails(consul.exceptions.ClientError("429 rate limit exceeded")), "bad_response", 429),
        ],
    )
    async def test_errors_another_server_may_not_have_fail_over(self, answer: Answer, reason: str,
                                                                status: int | None) -> None:
        c = client([FakeApi("a", {"services": answer}), FakeApi("b")])
        with pytest.raises(ConsulError) as info:
            await c.services(0)
        assert (info.value.reason, info.value.status, info.value.failover) == (reason, status, True)
        assert c.address == B

    @pytest.mark.parametrize(
        ("answer", "reason", "status"),
        [
            (fails(consul.ACLPermissionDenied("ACL not found")), "forbidden", 403),
            (fails(consul.ACLPermissionDenied("Permission denied")), "forbidden", 403),
            (fails(consul.exceptions.BadRequest("400 Bad request")), "bad_response", 400),
            (fails(consul.ConsulException("Failed to decode JSON: <html>")), "bad_response", None),
            (ok(("not-a-number", {})), "bad_response", None),
            (ok(("7", ["not", "an", "object"])), "bad_response", None),
        ],
    )
    async def test_errors_every_server_would_give_stay(self, answer: Answer, reason: str,
                                                       status: int | None) -> None:
        c = client([FakeApi("a", {"services": answer}), FakeApi("b")])
        with capture_logs() as logs, pytest.raises(ConsulError) as info:
            await c.services(0)
        assert (info.value.reason, info.value.status, info.value.failover) == (reason, status, False)
        assert c.address == A and failovers(logs) == []

    async def test_requests_failing_together_on_one_address_switch_once(self) -> None:
        """A server that dies fails the catalog query and every health query blocked on it at once: one switch
        (one log line), not one per query, and not a hop past the next address."""
        a = FakeApi("a", {"services": REFUSED, "health": REFUSED})
        a.gate = asyncio.Event()
        c = client([a, FakeApi("b"), FakeApi("c")])
        queries = [asyncio.create_task(c.services(5))] + [
            asyncio.create_task(c.health(name, 5)) for name in ("web", "api", "admin")
        ]
        await asyncio.sleep(0)
        with capture_logs() as logs:
            a.gate.set()
            results = await asyncio.gather(*queries, return_exceptions=True)
        assert all(isinstance(r, ConsulError) and r.reason == "unreachable" for r in results)
        assert c.address == B
        assert failovers(logs) == [("http://127.0.0.1:8500", "http://127.0.0.1:8501", "unreachable")]

    async def test_each_failing_address_moves_on_and_the_last_wraps_to_the_first(self) -> None:
        """The leader killed, the other two without a leader yet: the client goes round until one answers."""
        a = FakeApi("a", {"services": REFUSED})
        b = FakeApi("b", {"services": NO_LEADER})
        c3 = FakeApi("c", {"services": RPC_ERROR})
        c = client([a, b, c3])
        with capture_logs() as logs:
            for _ in range(4):
                with pytest.raises(ConsulError):
                    await c.services(0)
            b.answers["services"] = CATALOG
            assert (await c.services(0))[0] == 7
            assert (await c.services(0))[0] == 7  # and stays there
        assert failovers(logs) == [
            ("http://127.0.0.1:8500", "http://127.0.0.1:8501", "unreachable"),
            ("http://127.0.0.1:8501", "http://127.0.0.1:8502", "bad_response"),
            ("http://127.0.0.1:8502", "http://127.0.0.1:8500", "bad_response"),
            ("http://127.0.0.1:8500", "http://127.0.0.1:8501", "unreachable"),
        ]
        # Warnings until every address has failed; then the round goes on at debug level (no line per retry
        # through a long outage), until an address answers.
        levels = [e["log_level"] for e in logs if e["event"] == "consul_failover"]
        assert levels == ["warning", "warning", "debug", "debug"]
        assert (len(a.calls), len(b.calls), len(c3.calls)) == (2, 3, 1)

    async def test_an_answer_makes_the_next_switch_a_warning_again(self) -> None:
        a, b = FakeApi("a", {"services": REFUSED}), FakeApi("b", {"services": REFUSED})
        c = client([a, b])
        with capture_logs() as logs:
            for _ in range(3):  # a -> b (warning), b -> a (debug: a failed already), a -> b (debug)
                with pytest.raises(ConsulError):
                    await c.services(0)
            b.answers["services"] = CATALOG
            await c.services(0)
            b.answers["services"] = NO_LEADER
            with pytest.raises(ConsulError):
                await c.services(0)  # b -> a: a new outage, a warning again
        levels = [e["log_level"] for e in logs if e["event"] == "consul_failover"]
        assert levels == ["warning", "debug", "debug", "warning"]

    async def test_one_address_retries_the_same_one_without_failover_lines(self) -> None:
        a = FakeApi("a", {"services": REFUSED})
        c = client([a])
        with capture_logs() as logs:
            for _ in range(3):
                with pytest.raises(ConsulError):
                    await c.services(0)
        assert c.address == A and len(a.calls) == 3 and failovers(logs) == []

    async def test_health_fails_over_like_the_catalog(self) -> None:
        b = FakeApi("b", {"health": HEALTHY})
        c = client([FakeApi("a", {"health": NO_LEADER}), b])
        with pytest.raises(ConsulError):
            await c.health("consul", 3)
        assert (await c.health("consul", 3))[0] == 7 and b.calls == ["health:consul"]

    async def test_clients_are_made_per_address_on_first_use_and_all_closed(self) -> None:
        c = ConsulClient([A, B, C], token="t", dc="dc2", wait_s=2)
        assert c._apis == {}
        first = c._api(0)
        assert c._api(0) is first and set(c._apis) == {0}
        second = c._api(1)
        assert (second.http.base_uri, second.token, second.dc) == ("http://127.0.0.1:8501", "t", "dc2")
        await c.close()
        assert c._apis == {} and first.http._session.closed and second.http._session.closed

    def test_a_single_address_is_accepted_as_before(self) -> None:
        assert ConsulClient(A, token=None, dc=None, wait_s=2).addresses == (A,)
        with pytest.raises(ValueError):
            ConsulClient([], token=None, dc=None, wait_s=2)


ACL_DISABLED = fails(consul.ACLDisabled("ACL support disabled"))
ACL_NOT_FOUND = fails(consul.ACLPermissionDenied("ACL not found"))
SELF = ok({"AccessorID": "f5728cbb-69d3-ebc1-466e-155a24c2bb2f", "Description": "ferryman", "Policies": []})


class TestCheckAccess:
    """What Consul 1.8.7 answered, per case, is what the fakes answer (see test_consul_acl.py for the real one)."""

    async def test_acls_disabled_passes_without_reading_anything_else(self) -> None:
        a = FakeApi("a", {"self": ACL_DISABLED})
        await client([a], token="anything").check_access()
        assert a.calls == ["self"]

    async def test_a_token_consul_does_not_know_is_refused(self) -> None:
        with pytest.raises(ConsulAccessError, match="Consul does not know the consul_token \\(ACL not found\\)"):
            await client([FakeApi("a", {"self": ACL_NOT_FOUND})], token="wrong").check_access()

    async def test_no_token_and_an_anonymous_token_that_reads_nothing_is_refused(self) -> None:
        apis = [FakeApi("a", {"self": ACL_NOT_FOUND, "services": ok(("9", {}))})]
        with pytest.raises(ConsulAccessError) as info:
            await client(apis).check_access()
        assert info.value.reason == "forbidden"
        assert info.value.detail.startswith("no consul_token is set, and the anonymous token may not read any service")
        assert 'service_prefix "" { policy = "read" }' in info.value.detail

    async def test_no_token_but_an_anonymous_token_allowed_to_read_passes(self) -> None:
        await client([FakeApi("a", {"self": ACL_NOT_FOUND, "services": CATALOG, "health": HEALTHY})]).check_access()

    async def test_a_token_without_service_read_is_refused_naming_its_accessor(self) -> None:
        apis = [FakeApi("a", {"self": SELF, "services": ok(("9", {}))})]
        with pytest.raises(ConsulAccessError) as info:
            await client(apis, token="secret-1").check_access()
        assert info.value.detail.startswith(
            "the consul_token (accessor f5728cbb-69d3-ebc1-466e-155a24c2bb2f, 'ferryman') may not read any service"
        )
        assert "secret-1" not in info.value.detail

    async def test_a_token_without_node_read_is_refused(self) -> None:
        apis = [FakeApi("a", {"self": SELF, "services": CATALOG, "health": ok(("9", []))})]
        with pytest.raises(ConsulAccessError, match=r"may read services but not nodes .*node_prefix"):
            await client(apis, token="secret-1").check_access()
        assert apis[0].calls == ["self", "services", "health:consul"]

    async def test_a_scoped_token_is_probed_with_a_service_it_sees(self) -> None:
        apis = [FakeApi("a", {"self": SELF, "services": ok(("9", {"web": []})), "health": HEALTHY})]
        await client(apis, token="secret-1").check_access()
        assert apis[0].calls == ["self", "services", "health:web"]

    async def test_a_token_deleted_between_the_checks_is_refused(self) -> None:
        apis = [FakeApi("a", {"self": SELF, "services": ACL_NOT_FOUND})]
        with pytest.raises(ConsulAccessError, match="Consul refuses the consul_token: ACL not found"):
            await client(apis, token="secret-1").check_access()

    async def test_no_address_answering_is_not_a_config_error(self) -> None:
        apis = [FakeApi("a", {"self": REFUSED}), FakeApi("b", {"self": NO_LEADER})]
        with capture_logs() as logs:
            await client(apis, token="t").check_access()
        assert [e["event"] for e in logs if e["event"] != "consul_failover"] == ["consul_access_unchecked"]

    async def test_the_check_fails_over_to_an_address_that_answers(self) -> None:
        apis = [FakeApi("a", {"self": REFUSED}), FakeApi("b", {"self": ACL_NOT_FOUND})]
        with pytest.raises(ConsulAccessError):
            await client(apis, token="wrong").check_access()
        assert [api.calls for api in apis] == [["self"], ["self"]]

    async def test_a_silent_address_is_given_up_after_the_check_timeout(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr("discovery.consul._CHECK_TIMEOUT_S", 0.05)
        silent = FakeApi("a", {"self": ACL_DISABLED})
        silent.gate = asyncio.Event()  # never set
        apis = [silent, FakeApi("b", {"self": ACL_DISABLED})]
        c = client(apis, token="t")
        await asyncio.wait_for(c.check_access(), 2)
        assert c.address == B


# --- py-consul for real, against loopback servers answering like Consul ---


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def fake_consul() -> AsyncIterator[Callable[[int, str], Any]]:
    """Start an aiohttp server answering every request with (status, body) and X-Consul-Index: 42."""
    runners: list[web.AppRunner] = []

    async def start(status: int, body: str) -> ConsulAddress:
        async def handler(request: web.Request) -> web.Response:
            return web.Response(status=status, text=body, headers={"X-Consul-Index": "42"})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return ConsulAddress("http", "127.0.0.1", port)

    yield start
    for runner in runners:
        await runner.cleanup()


class TestRealClient:
    async def test_refused_then_no_leader_then_an_answer(self, fake_consul: Any) -> None:
        dead = ConsulAddress("http", "127.0.0.1", _closed_port())
        no_leader = await fake_consul(500, "No cluster leader")
        good = await fake_consul(200, '{"consul": [], "web": ["urlprefix-/"]}')
        c = ConsulClient([dead, no_leader, good], token=None, dc=None, wait_s=1)
        try:
            with capture_logs() as logs:
                with pytest.raises(ConsulError) as first:
                    await c.services(0)
                with pytest.raises(ConsulError) as second:
                    await c.services(0)
                assert await c.services(0) == (42, {"consul": [], "web": ["urlprefix-/"]})
        finally:
            await c.close()
        assert (first.value.reason, second.value.reason, second.value.status) == ("unreachable", "bad_response", 500)
        assert second.value.detail == "500 No cluster leader"
        assert [(e["from"], e["to"]) for e in logs if e["event"] == "consul_failover"] == [
            (str(dead), str(no_leader)), (str(no_leader), str(good))
        ]

    async def test_forbidden_stays_and_acl_disabled_passes_the_check(self, fake_consul: Any) -> None:
        refusing = await fake_consul(403, "ACL not found")
        c = ConsulClient([refusing, await fake_consul(200, "{}")], token="wrong", dc=None, wait_s=1)
        try:
            with pytest.raises(ConsulError) as info:
                await c.health("web", 0)
            assert (info.value.reason, info.value.status, c.address) == ("forbidden", 403, refusing)
        finally:
            await c.close()
        no_acl = ConsulClient(await fake_consul(401, "ACL support disabled"), token="x", dc=None, wait_s=1)
        try:
            await no_acl.check_access()
        finally:
            await no_acl.close()
