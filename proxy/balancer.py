"""Load-balancing strategies: small objects with `pick`, no I/O, deterministic under test.

A balancer chooses one of a pool's endpoints for a request. `pick(endpoints, exclude, in_flight=, key=)`
gets the pool's current tuple, the `Endpoint.key`s already tried for this request (never returned again;
None when nothing is left), the requests in flight per key (missing = 0) and, for `hash`, the request's hash
key. State such as a round-robin cursor lives in the balancer, which lives in the long-lived Pool, so a
routing-table swap does not reset it. Randomness comes only from an injected `random.Random`.

The pool hands over a new tuple whenever its endpoints change, so a balancer precomputes what it needs per
tuple (weights, prefix sums, a hash ring) and checks `endpoints is self._for` on each pick: a pick is O(1) or
O(log n) where the algorithm allows. Weights below 1 count as 1 (the snapshot builder already ensures it).

    round_robin  each endpoint in turn; an ever-growing cursor modulo the current size.
    weighted     nginx's smooth weighted round robin: every pick adds each endpoint's weight to its current
                 weight, takes the highest and subtracts the total from it. Weights 5,1,1 give a a b a c a a,
                 interleaved rather than a burst of five. Current weights are keyed by Endpoint.key, so they
                 survive a pool change; an instance that leaves drops out, one that arrives starts at 0. O(n).
    least_conn   the fewest requests in flight; ties go round robin from after the last pick, so an idle
                 pool still spreads. O(n), stopping early at an idle endpoint.
    p2c          power of two choices: two distinct random endpoints, the one with fewer in flight wins
                 (then the higher weight, then the first drawn). Nearly as good as least_conn without
                 scanning the pool, and no herd onto one idle instance when many pickers see the same counts.
    random       weighted random: a draw in [0, total weight) bisected into prefix sums. O(log n).
    hash         consistent hashing on a ring: each endpoint owns VNODES_PER_WEIGHT points per weight unit,
                 eight per 64-byte blake2b of f"{endpoint.key}#{i}"; a request key maps to the first point
                 clockwise of its own 64-bit blake2b, and excluded endpoints are skipped by walking on, which
                 is where the key would go if they had left. A point depends only on its endpoint, so removing
                 one of N instances moves only that instance's keys, about 1/N of them. No key (the header or
                 cookie is absent) gives a random ring position, so it behaves like weighted random. O(log n).

An excluded endpoint is rare (only retries have one), so the random strategies draw over the whole pool first
and fall back to drawing over the allowed endpoints when a draw lands on an excluded one: either way each
allowed endpoint has its exact share.
"""

from __future__ import annotations

import math
import random
import struct
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Container, Mapping, Sequence
from hashlib import blake2b
from itertools import accumulate
from types import MappingProxyType
from typing import Final, Protocol

from discovery.model import Endpoint
from discovery.tags import LB_CHOICES

DEFAULT_BALANCER: Final = "p2c"

# Ring points per weight unit: 160 (ketama's figure) keeps each instance's share of the ring within a few per
# cent of its weight. The cap bounds the ring's build cost (one blake2b per eight points, about 15 ms at the cap)
# for large pools or large weights; above it every instance gets proportionally fewer points.
VNODES_PER_WEIGHT: Final = 160
MAX_RING_POINTS: Final = 16_384

# Draws over the whole pool before falling back to drawing over the allowed endpoints only.
_DRAWS: Final = 3
_NO_LOAD: Final[Mapping[str, int]] = MappingProxyType({})
_POINTS_PER_DIGEST: Final = 8
_POINTS: Final = struct.Struct(">8Q")


class Balancer(Protocol):
    def pick(
        self,
        endpoints: Sequence[Endpoint],
        exclude: Container[str] = (),
        *,
        in_flight: Mapping[str, int] | None = None,
        key: str | None = None,
    ) -> Endpoint | None: ...


def _weight(endpoint: Endpoint) -> int:
    return endpoint.weight if endpoint.weight > 0 else 1


class RoundRobin:
    """Each endpoint in turn. The cursor is an ever-growing counter taken modulo the current size, so a pool
    that grows or shrinks keeps rotating without restarting at the first instance."""

    __slots__ = ("_cursor",)

    def __init__(self, start: int = 0) -> None:
        self._cursor = start

    def pick(
        self,
        endpoints: Sequence[Endpoint],
        exclude: Container[str] = (),
        *,
        in_flight: Mapping[str, int] | None = None,
        key: str | None = None,
    ) -> Endpoint | None:
        n = len(endpoints)
        if n == 0:
            return None
        for _ in range(n):
            endpoint = endpoints[self._cursor % n]
            self._cursor += 1
            if endpoint.key not in exclude:
                return endpoint
        return None


class SmoothWeightedRoundRobin:
    """nginx's smooth weighted round robin; current weights keyed by Endpoint.key survive pool changes."""

    __slots__ = ("_current", "_for", "_weighted")

    def __init__(self) -> None:
        self._for: Sequence[Endpoint] | None = None
        self._weighted: tuple[tuple[Endpoint, str, int], ...] = ()
        self._current: dict[str, int] = {}

    def pick(
        self,
        endpoints: Sequence[Endpoint],
        exclude: Container[str] = (),
        *,
        in_flight: Mapping[str, int] | None = None,
        key: str | None = None,
    ) -> Endpoint | None:
        if endpoints is not self._for:
            self._bind(endpoints)
        current = self._current
        best: Endpoint | None = None
        best_key = ""
        best_weight = 0
        total = 0
        # Excluded endpoints neither gain weight nor count in the total, as nginx skips peers already tried.
        for endpoint, ekey, weight in self._weighted:
            if ekey in exclude:
                continue
            now = current[ekey] + weight
            current[ekey] = now
            total += weight
            if best is None or now > best_weight:
                best, best_key, best_weight = endpoint, ekey, now
        if best is not None:
            current[best_key] = best_weight - total
        return best

    def _bind(self, endpoints: Sequence[Endpoint]) -> None:
        self._for = endpoints
        self._weighted = tuple((e, e.key, _weight(e)) for e in endpoints)
        previous = self._current
        self._current = {e.key: previous.get(e.key, 0) for e in endpoints}


class LeastConn:
    """The fewest requests in flight; ties go round robin so equal load spreads."""

    __slots__ = ("_cursor",)

    def __init__(self) -> None:
        self._cursor = 0

    def pick(
        self,
        endpoints: Sequence[Endpoint],
        exclude: Container[str] = (),
        *,
        in_flight: Mapping[str, int] | None = None,
        key: str | None = None,
    ) -> Endpoint | None:
        n = len(endpoints)
        if n == 0:
            return None
        loads = _NO_LOAD if in_flight is None else in_flight
        start = self._cursor % n
        best: Endpoint | None = None
        best_index = 0
        best_load = 0
        for step in range(n):
            index = start + step
            if index >= n:
                index -= n
            endpoint = endpoints[index]
            if endpoint.key in exclude:
                continue
            load = loads.get(endpoint.key, 0)
            if best is None or load < best_load:
                best, best_index, best_load = endpoint, index, load
                if load <= 0:  # nothing beats an idle endpoint (counts are never negative)
                    break
        if best is not None:
            self._cursor = best_index + 1
        return best


class PowerOfTwo:
    """Power of two random choices on in-flight count; ties go to the higher weight, then the first drawn."""

    __slots__ = ("_rng",)

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng if rng is not None else random.Random()

    def pick(
        self,
        endpoints: Sequence[Endpoint],
        exclude: Container[str] = (),
        *,
        in_flight: Mapping[str, int] | None = None,
        key: str | None = None,
    ) -> Endpoint | None:
        first, second = self._two(endpoints)
        if first is None or first.key in exclude or (second is not None and second.key in exclude):
            # Uniform over allowed pairs either way: an accepted first draw is one of them, and so is this.
            first, second = self._two([e for e in endpoints if e.key not in exclude])
            if first is None:
                return None
        if second is None:
            return first
        loads = _NO_LOAD if in_flight is None else in_flight
        first_load, second_load = loads.get(first.key, 0), loads.get(second.key, 0)
        if first_load != second_load:
            return first if first_load < second_load else second
        # The first drawn wins a full tie: it is random, so no endpoint is favoured by its place in the pool.
        # (_weight inlined: this is every request's pick)
        return second if (second.weight if second.weight > 0 else 1) > (first.weight if first.weight > 0 else 1) \
            else first

    def _two(self, endpoints: Sequence[Endpoint]) -> tuple[Endpoint | None, Endpoint | None]:
        """Two distinct endpoints at random: (only, None) for a pool of one, (None, None) for none."""
        n = len(endpoints)
        if n < 2:
            return (endpoints[0] if n else None), None
        # random() scaled down rather than randrange(): one C call each instead of three Python-level frames.
        random_ = self._rng.random
        i = int(random_() * n)
        j = int(random_() * (n - 1))
        if j >= i:
            j += 1
        return endpoints[i], endpoints[j]


class RandomBalancer:
    """Weighted random: one draw bisected into the prefix sums of the endpoints' weights."""

    __slots__ = ("_cumulative", "_for", "_rng")

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng if rng is not None else random.Random()
        self._for: Sequence[Endpoint] | None = None
        self._cumulative: list[int] = []

    def pick(
        self,
        endpoints: Sequence[Endpoint],
        exclude: Container[str] = (),
        *,
        in_flight: Mapping[str, int] | None = None,
        key: str | None = None,
    ) -> Endpoint | None:
        if not endpoints:
            return None
        if endpoints is not self._for:
            self._for = endpoints
            self._cumulative = list(accumulate(_weight(e) for e in endpoints))
        cumulative = self._cumulative
        for _ in range(_DRAWS):
            endpoint = endpoints[bisect_right(cumulative, self._rng.randrange(cumulative[-1]))]
            if endpoint.key not in exclude:
                return endpoint
        allowed = [e for e in endpoints if e.key not in exclude]
        if not allowed:
            return None
        draw = self._rng.randrange(sum(_weight(e) for e in allowed))
        for endpoint in allowed:
            draw -= _weight(endpoint)
            if draw < 0:
                return endpoint
        raise AssertionError("unreachable: the draw is below the allowed endpoints' total weight")


class ConsistentHash:
    """A hash ring with virtual nodes: a key goes to the first point clockwise; excluded owners are skipped."""

    __slots__ = ("_distinct", "_for", "_owners", "_points", "_rng", "_vnodes")

    def __init__(self, rng: random.Random | None = None, vnodes_per_weight: int = VNODES_PER_WEIGHT) -> None:
        self._rng = rng if rng is not None else random.Random()
        self._vnodes = max(1, vnodes_per_weight)
        self._for: Sequence[Endpoint] | None = None
        self._points: list[int] = []
        self._owners: list[Endpoint] = []
        self._distinct = 0

    def pick(
        self,
        endpoints: Sequence[Endpoint],
        exclude: Container[str] = (),
        *,
        in_flight: Mapping[str, int] | None = None,
        key: str | None = None,
    ) -> Endpoint | None:
        if not endpoints:
            return None
        if endpoints is not self._for:
            self._build(endpoints)
        points, owners = self._points, self._owners
        size = len(points)
        position = self._rng.getrandbits(64) if key is None else _hash(key)
        index = bisect_left(points, position)
        if index == size:
            index = 0
        owner = owners[index]
        if owner.key not in exclude:
            return owner
        # Walk on clockwise to the next point owned by an allowed endpoint, which is where this key would live
        # if the excluded owners left; stop once every endpoint has been seen excluded.
        excluded = {owner.key}
        for step in range(1, size):
            owner = owners[(index + step) % size]
            if owner.key in excluded:
                continue
            if owner.key not in exclude:
                return owner
            excluded.add(owner.key)
            if len(excluded) == self._distinct:
                return None
        return None

    def _build(self, endpoints: Sequence[Endpoint]) -> None:
        # Weights 10,20,30 and 1,2,3 give the same ring; the cap scales every endpoint down alike.
        unit = math.gcd(*(_weight(e) for e in endpoints))
        per_unit = min(float(self._vnodes), MAX_RING_POINTS * unit / sum(_weight(e) for e in endpoints))
        # A point is packed with its owner's rank by key into one int, which sorts fast; the rank also breaks
        # a tie (a 64-bit collision), so the ring does not depend on the pool's order.
        by_key = sorted(endpoints, key=lambda e: e.key)
        n = len(by_key)
        packed: list[int] = []
        for rank, endpoint in enumerate(by_key):
            wanted = max(1, round(_weight(endpoint) // unit * per_unit))
            # One 64-byte blake2b digest gives eight 64-bit points (ketama takes four from one MD5).
            for block in range((wanted + _POINTS_PER_DIGEST - 1) // _POINTS_PER_DIGEST):
                digest = blake2b(f"{endpoint.key}#{block}".encode(), digest_size=64).digest()
                points = _POINTS.unpack(digest)[: wanted - block * _POINTS_PER_DIGEST]
                packed.extend(point * n + rank for point in points)
        packed.sort()
        self._for = endpoints
        self._points = [entry // n for entry in packed]
        self._owners = [by_key[entry % n] for entry in packed]
        self._distinct = len({e.key for e in endpoints})


def _hash(text: str) -> int:
    """A stable 64-bit hash (Python's hash() is salted per process, so workers would disagree)."""
    return int.from_bytes(blake2b(text.encode(), digest_size=8).digest(), "big")


_FACTORIES: Final[Mapping[str, Callable[[random.Random | None], Balancer]]] = MappingProxyType(
    {
        "round_robin": lambda rng: RoundRobin(),
        "weighted": lambda rng: SmoothWeightedRoundRobin(),
        "least_conn": lambda rng: LeastConn(),
        "p2c": PowerOfTwo,
        "random": RandomBalancer,
        "hash": ConsistentHash,
    }
)

BALANCERS: Final[tuple[str, ...]] = tuple(_FACTORIES)
assert set(BALANCERS) == set(LB_CHOICES), "discovery.tags.LB_CHOICES must name exactly these algorithms"


def make_balancer(name: str, rng: random.Random | None = None) -> Balancer:
    """A new balancer for the algorithm `name` (one of BALANCERS); ValueError naming the choices otherwise."""
    factory = _FACTORIES.get(name)
    if factory is None:
        raise ValueError(f"unknown load-balancing algorithm {name!r}: choose one of {', '.join(BALANCERS)}")
    return factory(rng)
