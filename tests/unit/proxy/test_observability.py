"""Access log formats, request ids in headers, the state report and its gauges, readiness, config rules."""

from __future__ import annotations

import io
import itertools
import re
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from discovery.model import Endpoint, ServiceRoutes, Snapshot
from proxy import logs
from proxy.admin import readiness
from proxy.config import DEFAULTS, ConfigError, load
from proxy.h1.head import SANE_REQUEST_ID as _SANE_REQUEST_ID
from proxy.h1.head import new_request_id
from proxy.headers import client_response_head, error_response, upstream_request_head
from proxy.metrics import Metrics, StateCollector
from proxy.outcomes import RecentErrors
from proxy.pool import Pools
from proxy.state import InstanceState, Report, ServiceState, merge, pools_state, read_reports, write_report


def _req(**kw: object) -> SimpleNamespace:
    base = dict(method="GET", host=b"shop.example", target=b"/cart?id=7", headers=[], http10=False, http2=False,
                request_id=b"rid-1")
    base.update(kw)
    return SimpleNamespace(**base)


def _writer(fmt: str, tmp_path: Path) -> tuple[logs.AccessWriter, Path]:
    path = tmp_path / "access.log"
    logs.configure("json", "info", io.TextIOWrapper(io.BytesIO()), buffered=False)
    return logs.access_writer(fmt, str(path)), path


class TestAccessFormats:
    def test_common_is_the_ncsa_line(self, tmp_path: Path) -> None:
        write, path = _writer("common", tmp_path)
        write(_req(), "/cart", 200, "shop", "10.0.0.5:80", 1.0, 512, "192.0.2.1")
        write(_req(http10=True, method="HEAD"), "/cart", 404, "none", "", 0.1, 0, "192.0.2.2")
        write(_req(http2=True), "/cart", 200, "shop", "10.0.0.5:80", 1.0, 5, "192.0.2.3")
        first, second, third = path.read_text().splitlines()
        assert re.fullmatch(
            r'192\.0\.2\.1 - - \[\d\d/[A-Z][a-z]{2}/\d{4}:\d\d:\d\d:\d\d \+0000\] "GET /cart\?id=7 HTTP/1\.1" 200 512',
            first,
        ), first
        assert second.endswith('"HEAD /cart?id=7 HTTP/1.0" 404 -')
        assert third.endswith('"GET /cart?id=7 HTTP/2.0" 200 5')  # a request on an HTTP/2 stream

    def test_combined_adds_referer_and_agent_escaped(self, tmp_path: Path) -> None:
        write, path = _writer("combined", tmp_path)
        headers = [(b"Referer", b"https://a.example/"), (b"User-Agent", b'evil"agent\x01')]
        write(_req(headers=headers), "/cart", 200, "shop", "u", 1.0, 5, "192.0.2.1")
        line = path.read_text().rstrip("\n")
        assert line.endswith('"https://a.example/" "evil\\x22agent\\x01"'), line
        write(_req(), "/cart", 200, "shop", "u", 1.0, 5, "192.0.2.1")
        assert path.read_text().splitlines()[1].endswith('5 "-" "-"')

    def test_json_carries_the_request_id(self, tmp_path: Path) -> None:
        import json
        write, path = _writer("json", tmp_path)
        write(_req(), "/cart", 502, "shop", "u", 1.0, 0, "192.0.2.1")
        line = json.loads(path.read_text())
        assert line["request_id"] == "rid-1" and line["status"] == 502 and line["event"] == "access"


class TestRequestIds:
    def test_sane_ids_are_kept_and_others_refused(self) -> None:
        for good in (b"abc", b"0f" * 16, b"a.b_c-d:e@f/g+h=i~"):
            assert _SANE_REQUEST_ID(good)
        for bad in (b"", b"a b", b"x" * 129, b"a\r\nX-Evil: 1", b'a"b', "é".encode()):
            assert not _SANE_REQUEST_ID(bad)
        ids = {new_request_id() for _ in range(1000)}
        assert len(ids) == 1000 and all(re.fullmatch(rb"[0-9a-f]{32}", i) for i in ids)

    def test_fresh_ids_are_not_a_counter(self) -> None:
        """Consecutive ids share no prefix and are not one apart: another client's id cannot be guessed."""
        ids = [int(new_request_id(), 16) for _ in range(600)]  # across at least two batches
        steps = {b - a for a, b in itertools.pairwise(ids)}
        assert len(steps) == len(ids) - 1  # a counter would give one step, again and again
        assert len({i >> 64 for i in ids}) == len(ids)  # no per-process prefix either

    def test_one_id_upstream_and_back(self) -> None:
        head = upstream_request_head(
            b"GET", b"/", [(b"Host", b"h"), (b"X-Request-ID", b"from-client")], client_ip=b"1.2.3.4",
            proto=b"http", port=b"80", default_host=b"h", chunked=False, request_id=b"settled",
        )
        assert head.count(b"X-Request-ID") == 1 and b"X-Request-ID: settled\r\n" in head
        back = client_response_head(200, b"OK", [(b"x-request-id", b"upstream-own")], chunked=False,
                                    keep_alive=True, http10=False, request_id=b"settled")
        assert back.lower().count(b"x-request-id") == 1 and b"X-Request-ID: settled\r\n" in back
        assert b"X-Request-ID: abc\r\n" in error_response(502, "x", keep_alive=True, request_id=b"abc")


def _endpoint(i: int, service: str = "web", node: str = "n1") -> Endpoint:
    return Endpoint(service, f"{service}-{i}", "127.0.0.1", 8000 + i, node=node)


def _pools(*endpoints: Endpoint) -> Pools:
    pools = Pools()
    pools.reconcile(Snapshot((ServiceRoutes("web", (), tuple(endpoints)),)))
    return pools


class TestReport:
    def test_states_in_flight_errors_and_draining(self) -> None:
        a, b, c = _endpoint(1), _endpoint(2), _endpoint(3)
        pools = _pools(a, b, c)
        pool = pools.get("web")
        assert pool is not None
        pool.policy = replace(DEFAULTS.health, eject_after=1, eject_base=95.0)
        assert pool.failed(b, 5.0) == 95.0  # ejected until t=100, one recent error
        pool.mark_down(c.key, True)
        pool.acquire(a)
        pool.acquire(a)
        (web,) = pools_state(pools, now=10.0)
        states = {i.id: (i.state, i.in_flight, i.errors_recent) for i in web.instances}
        assert states == {"web-1": ("healthy", 2, 0), "web-2": ("ejected", 0, 1), "web-3": ("down", 0, 0)}
        # web-1 leaves Consul with two requests in flight: draining until they finish, then gone.
        pools.reconcile(Snapshot((ServiceRoutes("web", (), (b, c)),)))
        (web,) = pools_state(pools, now=10.0)
        assert [(i.id, i.state) for i in web.instances][-1] == ("web-1", "draining")
        pool.release(a)
        pool.release(a)
        (web,) = pools_state(pools, now=10.0)
        assert "web-1" not in {i.id for i in web.instances}

    def test_repeated_instance_ids_get_distinct_labels(self) -> None:
        pools = _pools(_endpoint(1, node="n1"), _endpoint(1, node="n2"), _endpoint(2))
        (web,) = pools_state(pools, now=0.0)
        assert sorted(i.label for i in web.instances) == ["n1/web-1", "n2/web-1", "web-2"]

    def test_recent_errors_window(self) -> None:
        errors = RecentErrors(window=60)
        for t in (0.0, 30.0, 59.0):
            errors.add("k", t)
        assert errors.count("k", 59.5) == 3
        assert errors.count("k", 61.0) == 2
        assert errors.count("k", 95.0) == 1
        assert errors.count("k", 200.0) == 0 and errors.count("other", 0.0) == 0

    def test_merge_adds_up_workers_and_takes_the_worst(self) -> None:
        def inst(state: str, flying: int = 0, errors: int = 0, key: str = "n1/web-1") -> InstanceState:
            return InstanceState(key, key.split("/")[1], "n1", "127.0.0.1", 8001, 1, state, flying, errors,
                                 key.split("/")[1])

        base = Report(services=(ServiceState("web", "p2c", (inst("healthy"),)),), synced=True, reachable=True,
                      last_success=100.0, generation=4, routes=2)
        w1 = Report(services=(ServiceState("web", "p2c", (inst("healthy", 2, 1),
                                                           inst("draining", 1, 0, key="n1/web-9"))),),
                    connections=3, synced=True, reachable=True, last_success=90.0, generation=3)
        w2 = Report(services=(ServiceState("web", "p2c", (inst("ejected", 1, 4),)),), connections=2, synced=True,
                    reachable=True, last_success=95.0, generation=5)
        merged = merge(base, [w1, w2], expected=2)
        (web,) = merged.services
        first, draining = web.instances
        assert (first.state, first.in_flight, first.errors_recent) == ("ejected", 3, 5)
        assert (draining.id, draining.state, draining.in_flight) == ("web-9", "draining", 1)
        assert (merged.connections, merged.last_success, merged.generation, merged.synced) == (5, 90.0, 3, True)
        assert merged.routes == 2 and merged.workers == 2
        # A worker that has not reported keeps the whole proxy not synced (not ready).
        assert not merge(base, [w1], expected=2).synced

    def test_report_files_round_trip_and_age_out(self, tmp_path: Path) -> None:
        import os
        report = Report(services=(ServiceState("web", "p2c", (InstanceState(
            "n1/web-1", "web-1", "n1", "::1", 80, 2, "healthy", 1, 0, "web-1"),)),), synced=True, at=1000.0)
        write_report(str(tmp_path), report)
        assert read_reports(str(tmp_path), [os.getpid()], now=1001.0, max_age=5.0) == [report]
        assert read_reports(str(tmp_path), [os.getpid()], now=1010.0, max_age=5.0) == []
        assert read_reports(str(tmp_path), [os.getpid() + 1], now=1001.0, max_age=5.0) == []


def _samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


class TestStateGauges:
    def test_series_follow_the_instances(self) -> None:
        pools = _pools(_endpoint(1), _endpoint(2))
        current = {"pools": pools}
        metrics = Metrics()
        metrics.registry.register(StateCollector(lambda: Report(
            services=pools_state(current["pools"], 0.0), connections=7, synced=True, last_success=123.0,
            generation=2, routes=3)))
        samples = _samples(metrics)
        assert samples[("ferryman_upstream_up", (("instance", "web-1"), ("service", "web")))] == 1
        assert samples[("ferryman_upstream_instances", (("service", "web"), ("state", "healthy")))] == 2
        assert samples[("ferryman_upstream_instances", (("service", "web"), ("state", "draining")))] == 0
        assert samples[("ferryman_client_connections", ())] == 7
        assert samples[("ferryman_discovery_last_success_timestamp_seconds", ())] == 123.0
        assert samples[("ferryman_routing_table_generation", ())] == 2
        assert ("ferryman_build_info", (("version", __import__("proxy").__version__),)) in samples
        current["pools"] = _pools(_endpoint(2))
        samples = _samples(metrics)
        assert ("ferryman_upstream_up", (("instance", "web-1"), ("service", "web"))) not in samples

    def test_request_metrics_have_route_labels_and_bytes(self) -> None:
        metrics = Metrics()
        metrics.observe_request("web", "web@*any*/", "GET", 200, 0.01, 0.005, 10, 20)
        metrics.observe_request("web", "web@*any*/", "BREW", 200, 0.01, None, 0, 0)
        samples = _samples(metrics)
        key = (("code", "200"), ("method", "GET"), ("route", "web@*any*/"), ("service", "web"))
        assert samples[("ferryman_requests_total", key)] == 1
        assert samples[("ferryman_requests_total", (("code", "200"), ("method", "OTHER"),
                                                     ("route", "web@*any*/"), ("service", "web")))] == 1
        assert samples[("ferryman_upstream_duration_seconds_count", (("service", "web"),))] == 1
        assert samples[("ferryman_request_bytes_total", (("service", "web"),))] == 10
        assert samples[("ferryman_response_bytes_total", (("service", "web"),))] == 20


class TestReadiness:
    def test_rules(self) -> None:
        fresh = Report(synced=True, last_success=1000.0)
        assert readiness(fresh, 60, now=1010.0) == (True, "ready")
        assert not readiness(Report(), 60, now=0.0)[0]
        ok, why = readiness(fresh, 60, now=1100.0)
        assert not ok and "stale" in why
        assert readiness(fresh, 0, now=999999.0)[0]  # the watchdog off
        assert readiness(Report(synced=True, last_success=1000.0, draining=True), 60, 1000.0) == (
            False, "draining: shutting down")


class TestConfigRules:
    def test_max_sync_age_must_outlast_the_blocking_wait(self, tmp_path: Path) -> None:
        config = tmp_path / "f.toml"
        config.write_text("consul_wait = 30\nmax_sync_age = 20\n")
        with pytest.raises(ConfigError, match=rf"{re.escape(str(config))}:2: key 'max_sync_age'.*longer than"):
            load(config_file=str(config), environ={}, flags={})
        with pytest.raises(ConfigError, match="flag --consul-wait: key 'consul_wait'"):
            load(config_file=None, environ={}, flags={"consul_wait": "120"})
        assert load(config_file=None, environ={"FERRYMAN_MAX_SYNC_AGE": "0"}, flags={"consul_wait": "120"})

    def test_access_keys(self) -> None:
        with pytest.raises(ConfigError, match=r"access_log_format.*json, common, combined"):
            load(config_file=None, environ={"FERRYMAN_ACCESS_LOG_FORMAT": "apache"}, flags={})
        with pytest.raises(ConfigError, match="access_log_sample"):
            load(config_file=None, environ={}, flags={"access_log_sample": "1.5"})

