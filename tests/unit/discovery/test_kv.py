"""The KV follower: every key under a prefix, raw, handed over when the set changes; failures logged once per
outage while the last values stay."""

from __future__ import annotations

import random

import pytest
from structlog.testing import capture_logs

from discovery.consul import ConsulError
from discovery.follow import Backoff, RateLimit
from discovery.kv import KvFollower


class _Done(Exception):
    """Ends the follower once the script is played."""


class ScriptedKv:
    """A KvReader that plays answers in turn (raising the errors) and records each query's prefix and index."""

    def __init__(self, answers: list[tuple[int, dict[str, bytes]] | ConsulError]) -> None:
        self.answers = answers
        self.asked: list[tuple[str, int]] = []

    async def kv(self, prefix: str, index: int, dc: str = "") -> tuple[int, dict[str, bytes]]:
        self.asked.append((prefix, index))
        if not self.answers:
            raise _Done
        answer = self.answers.pop(0)
        if isinstance(answer, ConsulError):
            raise answer
        return answer


class _Lowest(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return a


async def follow(reader: ScriptedKv) -> tuple[list[dict[str, bytes]], list[str]]:
    handed: list[dict[str, bytes]] = []
    follower = KvFollower(reader, "ferryman/routes/", handed.append, unreadable="routes_kv_unreadable",
                          recovered="routes_kv_recovered", limit=RateLimit.unlimited(), backoff=Backoff(rng=_Lowest()))
    with capture_logs() as logs, pytest.raises(_Done):
        await follower.run()
    return handed, [e["event"] for e in logs]


class TestKvFollower:
    """Changes are handed over whole and once; an outage keeps the last values and is logged once."""

    async def test_hands_over_changes_only(self) -> None:
        a, b = {"ferryman/routes/a": b"x"}, {"ferryman/routes/a": b"x", "ferryman/routes/b": b"y"}
        reader = ScriptedKv([(5, a), (5, a), (6, b), (7, {})])
        handed, _ = await follow(reader)
        assert handed == [a, b, {}]
        assert [index for _, index in reader.asked] == [0, 5, 5, 6, 7]
        assert {prefix for prefix, _ in reader.asked} == {"ferryman/routes/"}

    async def test_outage_logged_once_and_last_values_stay(self) -> None:
        a = {"ferryman/routes/a": b"x"}
        down = ConsulError("forbidden", "ACL not found")
        handed, events = await follow(ScriptedKv([(5, a), down, down, (5, a)]))
        assert handed == [a]  # nothing emptied meanwhile, nothing handed over twice
        assert events == ["routes_kv_unreadable", "routes_kv_recovered"]
