"""Pools and round robin: which instance a request gets, and how that state survives a table swap."""

from __future__ import annotations

from dataclasses import replace

import pytest

from discovery.model import Endpoint, RouteSpec, ServiceRoutes, ServiceSettings, Snapshot
from discovery.tags import parse_route_tag
from proxy.balancer import RoundRobin
from proxy.config import DEFAULTS
from proxy.pool import Pool, Pools, Reconciled

A = Endpoint("web", "a", "10.0.0.1", 80, node="n1")
B = Endpoint("web", "b", "10.0.0.2", 80, node="n1")
C = Endpoint("web", "c", "10.0.0.3", 80, node="n2")


ROUND_ROBIN = (parse_route_tag("urlprefix-/ lb=round_robin"),)


def snapshot(routes: tuple[RouteSpec, ...] = ROUND_ROBIN, **services: tuple[Endpoint, ...]) -> Snapshot:
    return Snapshot(tuple(ServiceRoutes(name, routes, eps) for name, eps in sorted(services.items())))


def picks(balancer: RoundRobin, endpoints: tuple[Endpoint, ...], n: int, exclude: set[str] | None = None
          ) -> list[str]:
    out = []
    for _ in range(n):
        endpoint = balancer.pick(endpoints, exclude or set())
        out.append(endpoint.instance_id if endpoint else "-")
    return out


class TestRoundRobin:
    """Each instance in turn, skipping the ones a request already tried."""

    @pytest.mark.parametrize(
        ("endpoints", "expected"),
        [
            ((A,), ["a", "a", "a"]),
            ((A, B), ["a", "b", "a", "b"]),
            ((A, B, C), ["a", "b", "c", "a", "b", "c"]),
        ],
        ids=["one", "two", "three"],
    )
    def test_rotates(self, endpoints: tuple[Endpoint, ...], expected: list[str]) -> None:
        assert picks(RoundRobin(), endpoints, len(expected)) == expected

    def test_spreads_evenly(self) -> None:
        counts = {"a": 0, "b": 0, "c": 0}
        for name in picks(RoundRobin(), (A, B, C), 300):
            counts[name] += 1
        assert counts == {"a": 100, "b": 100, "c": 100}

    @pytest.mark.parametrize(
        ("exclude", "expected"),
        [
            ({A.key}, ["b", "c", "b", "c"]),
            ({B.key}, ["a", "c", "a", "c"]),
            ({A.key, C.key}, ["b", "b"]),
        ],
        ids=["first-tried", "middle-tried", "all-but-one-tried"],
    )
    def test_exclude_skips_tried_instances(self, exclude: set[str], expected: list[str]) -> None:
        assert picks(RoundRobin(), (A, B, C), len(expected), exclude) == expected

    def test_exclude_is_by_key_not_by_address(self) -> None:
        """Two instances on one address are distinct (Consul service IDs are unique per node)."""
        twin = Endpoint("web", "a2", A.address, A.port, node="n1")
        assert picks(RoundRobin(), (A, twin), 2, {A.key}) == ["a2", "a2"]

    @pytest.mark.parametrize(
        ("endpoints", "exclude"),
        [((), set()), ((A, B), {A.key, B.key})],
        ids=["empty", "all-excluded"],
    )
    def test_none_when_nothing_to_pick(self, endpoints: tuple[Endpoint, ...], exclude: set[str]) -> None:
        assert RoundRobin().pick(endpoints, exclude) is None

    def test_keeps_rotating_when_the_pool_grows(self) -> None:
        balancer = RoundRobin()
        assert picks(balancer, (A, B), 1) == ["a"]
        assert picks(balancer, (A, B, C), 3) == ["b", "c", "a"]


class TestPool:
    """A pool hands out its endpoints and counts requests in flight per instance."""

    def test_pick_uses_the_balancer(self) -> None:
        pool = Pool("web", (A, B))
        picked = [pool.pick() for _ in range(3)]
        assert [e.instance_id if e else "-" for e in picked] == ["a", "b", "a"]

    def test_pick_from_empty_pool(self) -> None:
        assert Pool("web").pick() is None
        assert len(Pool("web")) == 0

    def test_acquire_and_release_count_in_flight(self) -> None:
        pool = Pool("web", (A, B))
        pool.acquire(A)
        pool.acquire(A)
        pool.acquire(B)
        assert pool.in_flight == {A.key: 2, B.key: 1}
        pool.release(A)
        pool.release(B)
        assert pool.in_flight == {A.key: 1}
        pool.release(A)
        assert pool.in_flight == {}

    def test_release_without_acquire_never_goes_negative(self) -> None:
        pool = Pool("web", (A,))
        pool.release(A)
        assert pool.in_flight == {}
        pool.acquire(A)
        assert pool.in_flight == {A.key: 1}


class TestReconcile:
    """Pools outlive snapshots: existing pools are updated in place, so round-robin position survives."""

    def test_first_snapshot_adds_pools(self) -> None:
        pools = Pools()
        assert pools.reconcile(snapshot(web=(A, B), api=())) == Reconciled(added=["api", "web"], removed=[],
                                                                           changed=[])
        assert len(pools) == 2
        web = pools.get("web")
        assert web is not None and web.endpoints == (A, B)

    def test_same_pool_object_and_position_after_swap(self) -> None:
        pools = Pools()
        pools.reconcile(snapshot(web=(A, B)))
        web = pools.get("web")
        assert web is not None
        first = web.pick()
        assert first == A
        web.acquire(A)

        changes = pools.reconcile(snapshot(web=(A, B, C)))

        assert changes == Reconciled(added=[], removed=[], changed=["web"])
        assert pools.get("web") is web
        assert [web.pick(), web.pick(), web.pick()] == [B, C, A]  # continues after A, does not restart
        assert web.in_flight == {A.key: 1}

    def test_algorithm_comes_from_the_lb_option_and_defaults_to_p2c(self) -> None:
        pools = Pools()
        pools.reconcile(snapshot((RouteSpec("", "/"),), web=(A, B)))
        web = pools.get("web")
        assert web is not None and (web.algorithm, web.hash_on) == ("p2c", None)

        spec = parse_route_tag("urlprefix-/ lb=hash hash_key=header:X-User")
        changes = pools.reconcile(snapshot((spec,), web=(A, B)))

        assert pools.get("web") is web
        assert changes.changed == ["web"]
        assert (web.algorithm, web.hash_on) == ("hash", ("header", "x-user"))
        assert web.pick(key="alice") == web.pick(key="alice")

    def test_unchanged_service_is_not_reported(self) -> None:
        pools = Pools()
        pools.reconcile(snapshot(web=(A, B), api=(C,)))
        changes = pools.reconcile(snapshot(web=(A, B), api=()))
        assert changes == Reconciled(added=[], removed=[], changed=["api"])

    def test_vanished_services_are_removed(self) -> None:
        pools = Pools()
        pools.reconcile(snapshot(web=(A,), api=(B,), old=(C,)))
        assert pools.reconcile(snapshot(web=(A,))) == Reconciled(added=[], removed=["api", "old"], changed=[])
        assert [p.service for p in pools] == ["web"]
        assert pools.get("api") is None

    def test_service_with_no_healthy_instance_keeps_its_pool(self) -> None:
        """A routed service whose instances all fail keeps an empty pool (the server answers 503)."""
        pools = Pools()
        pools.reconcile(snapshot(web=(A,)))
        web = pools.get("web")
        assert pools.reconcile(snapshot(web=())) == Reconciled(added=[], removed=[], changed=["web"])
        assert pools.get("web") is web and web is not None and web.pick() is None

    def test_returning_service_gets_a_fresh_pool(self) -> None:
        pools = Pools()
        pools.reconcile(snapshot(web=(A, B)))
        old = pools.get("web")
        pools.reconcile(snapshot())
        assert pools.reconcile(snapshot(web=(A, B))) == Reconciled(added=["web"], removed=[], changed=[])
        assert pools.get("web") is not old


class TestRetryBudget:
    """Retries stay within 20% of the window's requests (plus a small floor), and the window rolls over."""

    def test_floor_then_share_of_requests(self) -> None:
        from proxy.outcomes import RetryBudget

        budget = RetryBudget(ratio=0.2, window=10.0, minimum=3)
        assert [budget.allow(0.0) for _ in range(4)] == [True, True, True, False]  # the floor alone
        for _ in range(50):
            budget.record_request(1.0)
        granted = sum(budget.allow(2.0) for _ in range(100))
        assert granted == 10  # 3 + 0.2 * 50 = 13 in the window, 3 already used

    def test_new_window_starts_afresh(self) -> None:
        from proxy.outcomes import RetryBudget

        budget = RetryBudget(ratio=0.2, window=10.0, minimum=1)
        assert budget.allow(0.0) and not budget.allow(5.0)
        assert budget.allow(10.0)


class TestOutliers:
    """Consecutive failures eject an instance for a doubling time; at most half a pool; panic mode beyond."""

    def test_ejected_after_consecutive_failures_and_readmitted(self) -> None:
        from proxy.outcomes import Outliers

        outliers = Outliers(after=3, base=10.0, max_share=0.5)
        assert [outliers.failure("a", 0.0, 4) for _ in range(3)] == [None, None, 10.0]
        assert set(outliers.ejected) == {"a"}
        assert outliers.readmit_expired(9.9) == [] and outliers.readmit_expired(10.0) == ["a"]
        # ejected again in a row: twice as long
        assert [outliers.failure("a", 11.0, 4) for _ in range(3)] == [None, None, 20.0]

    def test_a_success_resets_the_count(self) -> None:
        from proxy.outcomes import Outliers

        outliers = Outliers(after=3)
        outliers.failure("a", 0.0, 4)
        outliers.failure("a", 0.0, 4)
        outliers.success("a")
        assert outliers.failure("a", 0.0, 4) is None
        assert not outliers.ejected

    def test_never_more_than_the_share(self) -> None:
        from proxy.outcomes import Outliers

        outliers = Outliers(after=1, max_share=0.5)
        ejected = [outliers.failure(key, 0.0, 4) is not None for key in "abcd"]
        assert ejected == [True, True, False, False]

    def test_pool_skips_ejected_and_panics_when_only_they_are_left(self) -> None:
        pools = Pools()
        pools.reconcile(snapshot(web=(A, B)))
        web = pools.get("web")
        assert web is not None
        web.policy = replace(DEFAULTS.health, eject_after=1)
        assert web.failed(A, 0.0) is not None
        assert {web.pick() for _ in range(4)} == {B}
        assert web.pick(exclude={B.key}) == A  # only the ejected one is left: try it rather than 503


class TestSticky:
    """A sticky cookie names an instance by a digest; it pins while the instance is in, usable and untried."""

    def test_pinned_instance_and_its_fallbacks(self) -> None:
        from proxy.pool import sticky_value

        pools = Pools()
        pools.reconcile(snapshot((parse_route_tag("urlprefix-/ sticky=srv"),), web=(A, B)))
        web = pools.get("web")
        assert web is not None and web.sticky == "srv"
        assert web.pinned(sticky_value(B)) == B
        assert web.pinned(sticky_value(B), exclude={B.key}) is None  # tried already: pick another
        assert web.pinned("not-a-known-value") is None
        assert web.pinned(None) is None
        pools.reconcile(snapshot((parse_route_tag("urlprefix-/ sticky=srv"),), web=(A,)))
        assert web.pinned(sticky_value(B)) is None  # left the pool
        assert sticky_value(A) != sticky_value(B) and "127.0.0.1" not in sticky_value(A)


class TestSlowStart:
    """A newly added instance gets a share growing with its time in the pool, the full share at the end."""

    def test_ramp(self) -> None:
        import random


        pools = Pools(policy=replace(DEFAULTS.health, slow_start=10.0))
        pools.reconcile(snapshot(web=(A, B)), now=0.0)
        web = pools.get("web")
        assert web is not None
        web.rng = random.Random(7)
        pools.reconcile(snapshot(web=(A, B, C)), now=100.0)  # C joins at t=100
        early = [web.pick(now=101.0) for _ in range(3000)].count(C) / 3000
        late = [web.pick(now=110.0) for _ in range(3000)].count(C) / 3000
        assert early < 0.12  # about a tenth of its third
        assert 0.28 < late < 0.39  # ramped: its full third
        assert not web.ramping(C.key)


class TestReviewRegressions:
    """Ejection counts reset after a success; active-check state follows the health path's presence."""

    def test_ejections_in_a_row_reset_by_a_success_after_readmission(self) -> None:
        from proxy.outcomes import Outliers

        outliers = Outliers(after=1, base=10.0)
        assert outliers.failure("a", 0.0, 4) == 10.0
        outliers.readmit_expired(10.0)
        outliers.success("a")
        assert outliers.failure("a", 100.0, 4) == 10.0  # not 20: the earlier ejection was not "in a row"

    def test_down_cleared_when_checks_are_switched_off_and_path_from_config(self) -> None:
        from discovery.model import ServiceRoutes

        pools = Pools(overrides={"web": ServiceSettings(health_path="/healthz")})
        routes = (parse_route_tag("urlprefix-/ proto=https tlsskipverify=true"),)
        pools.reconcile(Snapshot((ServiceRoutes("web", routes, (A, B)),)))
        web = pools.get("web")
        assert web is not None
        assert (web.health_path, web.check_scheme, web.check_skip_verify) == ("/healthz", "https", True)

        web.mark_down(A.key, True)
        Pools.reconcile(pools, Snapshot((ServiceRoutes("web", routes, (A, B), settings=ServiceSettings()),)))
        assert web.is_down(A.key)  # still checked (config), still out
        pools._overrides = {}
        pools.reconcile(Snapshot((ServiceRoutes("web", routes, (A, B)),)))
        assert web.health_path is None and not web.is_down(A.key)


class TestSlowStartSwitchedOff:
    """Regression: a reload that sets slow_start = 0 while an instance ramps up (it divided by zero, and every
    request picking that instance had its connection dropped and logged as 499)."""

    def test_ramping_instance_gets_its_full_share_at_once(self) -> None:
        import random

        pools = Pools(policy=replace(DEFAULTS.health, slow_start=30.0))
        pools.reconcile(snapshot(web=(A, B)), now=0.0)
        pools.reconcile(snapshot(web=(A, B, C)), now=10.0)  # C starts ramping at t=10
        web = pools.get("web")
        assert web is not None and web.ramping(C.key)
        web.rng = random.Random(3)
        pools.configure({}, replace(DEFAULTS.health, slow_start=0.0))  # SIGHUP
        picks = [web.pick(now=11.0) for _ in range(3000)]
        assert 0.28 < picks.count(C) / 3000 < 0.39
        assert not web.ramping(C.key)
