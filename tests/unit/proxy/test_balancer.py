"""Balancers: which instance each algorithm picks, with what share, and that none returns an excluded one."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping, Sequence

import pytest

from discovery.model import Endpoint
from proxy.balancer import (
    BALANCERS,
    DEFAULT_BALANCER,
    Balancer,
    ConsistentHash,
    LeastConn,
    PowerOfTwo,
    RandomBalancer,
    RoundRobin,
    SmoothWeightedRoundRobin,
    make_balancer,
)


def ep(name: str, weight: int = 1, node: str = "n1") -> Endpoint:
    return Endpoint("web", name, f"10.0.0.{ord(name[0])}", 80, node=node, weight=weight)


A, B, C, D = ep("a"), ep("b"), ep("c"), ep("d")
TEN = tuple(ep(f"i{n}", node=f"n{n % 3}") for n in range(10))


def picks(balancer: Balancer, endpoints: Sequence[Endpoint], n: int, exclude: set[str] | None = None, *,
          in_flight: Mapping[str, int] | None = None, key: str | None = None) -> list[str]:
    out = []
    for _ in range(n):
        endpoint = balancer.pick(endpoints, exclude or set(), in_flight=in_flight, key=key)
        out.append(endpoint.instance_id if endpoint else "-")
    return out


def shares(names: list[str]) -> dict[str, float]:
    return {name: count / len(names) for name, count in Counter(names).items()}


class TestMakeBalancer:
    """Algorithms are chosen by name; an unknown name is refused with the valid choices."""

    @pytest.mark.parametrize(
        ("name", "cls"),
        [
            ("round_robin", RoundRobin),
            ("weighted", SmoothWeightedRoundRobin),
            ("least_conn", LeastConn),
            ("p2c", PowerOfTwo),
            ("random", RandomBalancer),
            ("hash", ConsistentHash),
        ],
        ids=lambda value: value if isinstance(value, str) else value.__name__,
    )
    def test_names(self, name: str, cls: type) -> None:
        assert isinstance(make_balancer(name, random.Random(1)), cls)
        assert isinstance(make_balancer(name), cls)

    def test_every_name_is_listed_once(self) -> None:
        assert sorted(BALANCERS) == sorted({"round_robin", "weighted", "least_conn", "p2c", "random", "hash"})
        assert len(BALANCERS) == len(set(BALANCERS))

    def test_default_is_p2c(self) -> None:
        assert DEFAULT_BALANCER == "p2c"
        assert DEFAULT_BALANCER in BALANCERS

    @pytest.mark.parametrize("name", ["", "leastconn", "ROUND_ROBIN", "sticky"], ids=["empty", "typo", "case", "other"])
    def test_unknown_name_lists_the_choices(self, name: str) -> None:
        with pytest.raises(ValueError, match="choose one of") as info:
            make_balancer(name)
        for valid in BALANCERS:
            assert valid in str(info.value)

    @pytest.mark.parametrize("name", ["p2c", "random", "hash"])
    def test_randomness_comes_from_the_injected_rng(self, name: str) -> None:
        first = picks(make_balancer(name, random.Random(7)), TEN, 50)
        second = picks(make_balancer(name, random.Random(7)), TEN, 50)
        assert first == second
        assert len(set(first)) > 1


@pytest.mark.parametrize("name", BALANCERS)
class TestEveryBalancer:
    """Every algorithm obeys the contract: never an excluded endpoint, None when nothing is left."""

    @pytest.mark.parametrize(
        ("endpoints", "exclude"),
        [((), set()), ((), {A.key}), ((A,), {A.key}), ((A, B, C), {A.key, B.key, C.key})],
        ids=["empty", "empty-with-exclude", "only-one-excluded", "all-excluded"],
    )
    def test_none_when_nothing_to_pick(self, name: str, endpoints: tuple[Endpoint, ...], exclude: set[str]) -> None:
        balancer = make_balancer(name, random.Random(1))
        for key in (None, "client-1"):
            assert balancer.pick(endpoints, exclude, in_flight={A.key: 1}, key=key) is None

    def test_one_endpoint_left(self, name: str) -> None:
        balancer = make_balancer(name, random.Random(1))
        assert set(picks(balancer, (A, B, C), 20, {A.key, C.key}, in_flight={B.key: 9}, key="k")) == {"b"}

    def test_default_arguments(self, name: str) -> None:
        """Called as the pool calls it today: endpoints and at most an exclude."""
        balancer = make_balancer(name, random.Random(1))
        assert balancer.pick((A, B)) in (A, B)
        assert balancer.pick((A, B), (A.key,)) == B

    def test_never_returns_an_excluded_endpoint(self, name: str) -> None:
        """Random pools, weights, loads, keys and exclude sets (of any container type); a new tuple each time."""
        rng = random.Random(20240604)
        balancer = make_balancer(name, random.Random(3))
        universe = [ep(letter, weight=rng.randint(1, 5)) for letter in "abcdefgh"]
        for _ in range(800):
            endpoints = tuple(rng.sample(universe, rng.randint(0, len(universe))))
            keys = [e.key for e in endpoints]
            tried = set(rng.sample(keys, rng.randint(0, len(keys))))
            if rng.random() < 0.1:
                tried.add("n9/gone")  # an instance that left the pool after it was tried
            exclude = rng.choice([set, frozenset, tuple, list])(tried)
            in_flight = {k: rng.randint(0, 4) for k in keys if rng.random() < 0.7}
            key = rng.choice([None, f"client-{rng.randint(0, 50)}"])
            for _ in range(rng.randint(1, 3)):  # several picks per tuple, so cached precomputations are used
                chosen = balancer.pick(endpoints, exclude, in_flight=in_flight, key=key)
                if set(keys) <= tried:
                    assert chosen is None
                else:
                    assert chosen is not None
                    assert chosen in endpoints
                    assert chosen.key not in tried

    def test_survives_the_pool_changing_between_picks(self, name: str) -> None:
        balancer = make_balancer(name, random.Random(5))
        sequence: list[tuple[Endpoint, ...]] = [(A, B, C), (A, B, C), (B, C, D), (D,), (), (C, A), (A, B, C, D)]
        for endpoints in sequence * 3:
            pool = tuple(list(endpoints))  # a new tuple object, as the pool hands over on every change
            for key in (None, "client"):
                chosen = balancer.pick(pool, key=key, in_flight={C.key: 2})
                assert chosen in pool if pool else chosen is None


class TestRoundRobin:
    """Each instance in turn, whatever the load or key (the pool tests cover rotation and exclusion)."""

    def test_ignores_load_and_key(self) -> None:
        assert picks(RoundRobin(), (A, B, C), 6, in_flight={A.key: 100}, key="k") == ["a", "b", "c"] * 2


class TestSmoothWeightedRoundRobin:
    """nginx's smooth weighted round robin: exact shares, interleaved, state kept by instance key."""

    @pytest.mark.parametrize(
        ("weights", "expected"),
        [
            ((5, 1, 1), list("aabacaa") * 2),  # nginx's documented sequence, then the cycle repeats
            ((1, 1, 1), list("abc") * 2),
            ((2, 1, 0), list("abca") * 2),  # a weight below 1 counts as 1
            ((1, 3, 1), list("babcb") * 2),
        ],
        ids=["5-1-1", "equal", "zero-counts-as-one", "1-3-1"],
    )
    def test_exact_order(self, weights: tuple[int, ...], expected: list[str]) -> None:
        endpoints = tuple(ep(name, w) for name, w in zip("abc", weights, strict=True))
        assert picks(SmoothWeightedRoundRobin(), endpoints, len(expected)) == expected

    @pytest.mark.parametrize(
        ("weights", "exclude"),
        [((3, 2, 1), set()), ((10, 1, 5), set()), ((1, 1, 1), set()), ((4, 7, 9), {"n1/b"})],
        ids=["3-2-1", "10-1-5", "equal", "4-x-9-with-b-excluded"],
    )
    def test_weight_proportions(self, weights: tuple[int, ...], exclude: set[str]) -> None:
        endpoints = tuple(ep(name, w) for name, w in zip("abc", weights, strict=True))
        allowed = {e.instance_id: e.weight for e in endpoints if e.key not in exclude}
        got = shares(picks(SmoothWeightedRoundRobin(), endpoints, 10_000, exclude))
        assert set(got) == set(allowed)
        for name, weight in allowed.items():
            assert got[name] == pytest.approx(weight / sum(allowed.values()), abs=0.002)

    def test_current_weights_survive_a_new_tuple(self) -> None:
        balancer = SmoothWeightedRoundRobin()
        heavy = (ep("a", 5), ep("b"), ep("c"))
        assert picks(balancer, heavy, 3) == list("aab")
        assert picks(balancer, tuple(heavy), 4) == list("acaa")  # continues, does not restart with a a b

    def test_an_instance_that_leaves_restarts_from_zero(self) -> None:
        """b leaves owed a pick; back in the pool it starts afresh, so the tie then goes to its order."""
        balancer = SmoothWeightedRoundRobin()
        assert picks(balancer, (A, B), 1) == ["a"]
        assert picks(balancer, (A,), 1) == ["a"]
        assert picks(balancer, (B, A), 2) == ["b", "a"]  # had b kept its credit: b, b


class TestLeastConn:
    """The fewest requests in flight wins; equal loads take turns."""

    @pytest.mark.parametrize(
        ("in_flight", "exclude", "expected"),
        [
            ({A.key: 3, B.key: 1, C.key: 2}, set(), ["b", "b", "b"]),
            ({A.key: 3, B.key: 1, C.key: 2}, {B.key}, ["c", "c"]),
            ({A.key: 0, B.key: 0, C.key: 5}, set(), ["a", "b", "a", "b"]),
            ({A.key: 2, B.key: 2, C.key: 2}, set(), ["a", "b", "c", "a"]),
            ({A.key: 1}, set(), ["b", "c", "b", "c"]),
            ({}, set(), ["a", "b", "c", "a"]),
            (None, set(), ["a", "b", "c", "a"]),
        ],
        ids=["least", "least-excluded", "idle-pair", "all-equal", "missing-is-zero", "empty-map", "no-map"],
    )
    def test_picks(self, in_flight: dict[str, int] | None, exclude: set[str], expected: list[str]) -> None:
        assert picks(LeastConn(), (A, B, C), len(expected), exclude, in_flight=in_flight) == expected

    def test_evens_out_uneven_load(self) -> None:
        """The pool counts each pick as in flight: the loaded instance gets nothing until the others catch up."""
        in_flight = {A.key: 5, B.key: 0, C.key: 0}
        balancer = LeastConn()
        chosen = []
        for _ in range(16):
            endpoint = balancer.pick((A, B, C), in_flight=in_flight)
            assert endpoint is not None
            in_flight[endpoint.key] += 1
            chosen.append(endpoint.instance_id)
        assert chosen[:10] == list("bc") * 5
        assert in_flight == {A.key: 7, B.key: 7, C.key: 7}


class TestPowerOfTwo:
    """Two distinct random candidates; the less loaded wins, then the heavier, then the first drawn."""

    def test_the_less_loaded_of_two(self) -> None:
        """With two endpoints both are always the candidates, so the idle one always wins."""
        assert picks(PowerOfTwo(random.Random(1)), (A, B), 100, in_flight={A.key: 1}) == ["b"] * 100

    def test_share_falls_with_load(self) -> None:
        """Loads 0..9: the k-th least loaded wins when drawn with a busier one, 2(9-k)/90 of the time."""
        endpoints = TEN
        in_flight = {e.key: load for load, e in enumerate(endpoints)}
        got = shares(picks(PowerOfTwo(random.Random(2)), endpoints, 10_000, in_flight=in_flight))
        for load, endpoint in enumerate(endpoints):
            assert got.get(endpoint.instance_id, 0.0) == pytest.approx(2 * (9 - load) / 90, abs=0.015)
        assert endpoints[-1].instance_id not in got

    def test_tie_goes_to_the_heavier(self) -> None:
        assert picks(PowerOfTwo(random.Random(1)), (A, ep("b", 3)), 50, in_flight={A.key: 2, B.key: 2}) == ["b"] * 50

    def test_full_tie_goes_to_the_first_drawn(self) -> None:
        """Not to the first in the pool, which would favour one instance of an idle pool."""
        got = shares(picks(PowerOfTwo(random.Random(1)), (A, B), 2_000))
        assert got["a"] == pytest.approx(0.5, abs=0.05)

    def test_idle_pool_spreads_evenly(self) -> None:
        got = shares(picks(PowerOfTwo(random.Random(4)), TEN, 10_000))
        assert all(share == pytest.approx(0.1, abs=0.015) for share in got.values())
        assert len(got) == 10

    def test_never_the_excluded_even_when_least_loaded(self) -> None:
        got = picks(PowerOfTwo(random.Random(1)), (A, B, C), 1_000, {A.key}, in_flight={B.key: 3, C.key: 3})
        assert set(got) == {"b", "c"}


class TestRandomBalancer:
    """Weighted random: each endpoint's share is its weight over the total of the allowed endpoints."""

    @pytest.mark.parametrize(
        ("weights", "exclude"),
        [((1, 2, 3, 4), set()), ((1, 1, 1, 1), set()), ((1, 2, 3, 4), {"n1/d"}), ((10, 1, 1, 8), {"n1/a"})],
        ids=["1-2-3-4", "equal", "heaviest-excluded", "10-1-1-8-first-excluded"],
    )
    def test_weight_proportions(self, weights: tuple[int, ...], exclude: set[str]) -> None:
        endpoints = tuple(ep(name, w) for name, w in zip("abcd", weights, strict=True))
        allowed = {e.instance_id: e.weight for e in endpoints if e.key not in exclude}
        got = shares(picks(RandomBalancer(random.Random(11)), endpoints, 10_000, exclude))
        assert set(got) == set(allowed)
        for name, weight in allowed.items():
            assert got[name] == pytest.approx(weight / sum(allowed.values()), abs=0.015)


def owners(balancer: Balancer, endpoints: Sequence[Endpoint], keys: Sequence[str],
           exclude: set[str] | None = None) -> list[str]:
    """The instance each key is sent to."""
    out = []
    for key in keys:
        endpoint = balancer.pick(endpoints, exclude or set(), key=key)
        out.append(endpoint.instance_id if endpoint else "-")
    return out


KEYS = [f"10.{n // 65536}.{n // 256 % 256}.{n % 256}" for n in range(10_000)]


class TestConsistentHash:
    """A ring: a key keeps its instance, and a change of pool moves only the keys it must."""

    def test_same_key_same_endpoint(self) -> None:
        """Across picks, balancers, seeds and the order of the pool (the ring depends on keys only)."""
        first = owners(ConsistentHash(random.Random(1)), TEN, KEYS[:1000])
        assert owners(ConsistentHash(random.Random(1)), TEN, KEYS[:1000]) == first
        assert owners(ConsistentHash(random.Random(2)), tuple(reversed(TEN)), KEYS[:1000]) == first
        balancer = ConsistentHash(random.Random(3))
        assert owners(balancer, TEN, ["client"] * 20) == owners(ConsistentHash(), TEN, ["client"]) * 20

    def test_keys_spread_over_the_instances(self) -> None:
        got = shares(owners(ConsistentHash(), TEN, KEYS))
        assert len(got) == 10
        assert all(0.07 <= share <= 0.13 for share in got.values()), got

    def test_share_follows_weight(self) -> None:
        endpoints = (ep("a", 1), ep("b", 2), ep("c", 1))
        got = shares(owners(ConsistentHash(), endpoints, KEYS))
        assert got["b"] == pytest.approx(0.5, abs=0.05)

    @pytest.mark.parametrize("leaver", range(0, 10, 3), ids=lambda i: f"i{i}-leaves")
    def test_one_of_ten_leaving_moves_only_its_keys(self, leaver: int) -> None:
        balancer = ConsistentHash()
        before = owners(balancer, TEN, KEYS)
        after = owners(balancer, TEN[:leaver] + TEN[leaver + 1 :], KEYS)
        moved = [k for k, (old, new) in enumerate(zip(before, after, strict=True)) if old != new]
        assert len(moved) <= 0.15 * len(KEYS)
        assert all(before[k] == TEN[leaver].instance_id for k in moved)
        assert len(moved) == before.count(TEN[leaver].instance_id)

    def test_one_joining_takes_keys_only_for_itself(self) -> None:
        balancer = ConsistentHash()
        before = owners(balancer, TEN[:9], KEYS)
        after = owners(balancer, TEN, KEYS)
        moved = [k for k, (old, new) in enumerate(zip(before, after, strict=True)) if old != new]
        assert 0.05 * len(KEYS) <= len(moved) <= 0.15 * len(KEYS)
        assert all(after[k] == TEN[9].instance_id for k in moved)

    def test_excluded_owner_falls_to_where_the_key_would_go_without_it(self) -> None:
        """Walking on past an excluded instance is the same as that instance having left the ring."""
        balancer = ConsistentHash()
        tried = {TEN[4].key, TEN[7].key}
        without = owners(ConsistentHash(), tuple(e for e in TEN if e.key not in tried), KEYS[:2000])
        assert owners(balancer, TEN, KEYS[:2000], tried) == without

    def test_no_key_behaves_like_random(self) -> None:
        balancer = ConsistentHash(random.Random(8))
        got = shares(picks(balancer, TEN, 10_000, key=None))
        assert len(got) == 10
        assert all(0.07 <= share <= 0.13 for share in got.values()), got

    def test_large_weights_are_capped(self) -> None:
        """Weights 1000 and 3000 give the same ring as 1 and 3 (gcd), within the point cap."""
        heavy = owners(ConsistentHash(), (ep("a", 1000), ep("b", 3000)), KEYS[:2000])
        light = owners(ConsistentHash(), (ep("a", 1), ep("b", 3)), KEYS[:2000])
        assert heavy == light
        odd = owners(ConsistentHash(), (ep("a", 1000), ep("b", 2999)), KEYS[:2000])  # gcd 1: capped ring
        assert shares(odd)["b"] == pytest.approx(0.75, abs=0.05)
