"""The composition root's guards: a background task that crashes is logged (`task_crashed`) and a crashed
discovery makes /ready say not ready; a routed world that fails to build keeps the table in force
(`table_build_failed`) and the next good one applies."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable

import pytest
from structlog.testing import capture_logs

from discovery.model import Endpoint, RouteSpec, ServiceRoutes, Snapshot
from discovery.tags import parse_route_tag
from discovery.tasks import start_task
from proxy.admin import readiness
from proxy.app import Ferryman
from proxy.config import DEFAULTS, parse_route_entry


class FakeSource:
    """A discovery Source the test drives: `hand(snapshot)` hands a snapshot over; `run()` fails with `crash`
    once it is set."""

    def __init__(self, on_snapshot: Callable[[Snapshot], None]) -> None:
        self.on_snapshot = on_snapshot
        self.synced = asyncio.Event()
        self.reachable = True
        self.last_success: float | None = None
        self.last_snapshot: Snapshot | None = None
        self.also: frozenset[str] = frozenset()
        self.crash = asyncio.Event()

    def hand(self, snapshot: Snapshot) -> None:
        self.last_snapshot = snapshot
        self.last_success = 1.0
        self.synced.set()
        self.on_snapshot(snapshot)

    async def run(self) -> None:
        await self.crash.wait()
        raise RuntimeError("a bug in discovery")

    def watch_also(self, services: frozenset[str]) -> None:
        self.also = services

    def reload(self) -> None:
        pass


def snapshot(*routes: tuple[str, RouteSpec]) -> Snapshot:
    return Snapshot(tuple(
        ServiceRoutes(name, (spec,), (Endpoint(name, f"{name}-1", "127.0.0.1", 1),)) for name, spec in routes
    ))


GOOD = snapshot(("web", parse_route_tag("urlprefix-/")))
# A value no tag parser would let through (priority must be a number): stands for a bug in a builder.
# Options of the wrong shape (a bug upstream of the table builder, which then fails on them).
BROKEN = snapshot(("web", RouteSpec("", "/", (("priority", "high"),))))  # type: ignore[arg-type]  # wrong on purpose


@pytest.fixture
async def app() -> AsyncIterator[tuple[Ferryman, FakeSource]]:
    sources: list[FakeSource] = []

    def make(on_snapshot: Callable[[Snapshot], None]) -> FakeSource:
        sources.append(FakeSource(on_snapshot))
        return sources[0]

    ferryman = Ferryman(DEFAULTS, serve_proxy=False, serve_admin=False, make_source=make)
    await ferryman.start()
    try:
        yield ferryman, sources[0]
    finally:
        await ferryman.stop()


async def until(predicate: Callable[[], bool]) -> None:
    """Let the event loop run callbacks until `predicate` holds (a bounded number of turns)."""
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition never held")


class TestTaskCrashed:
    """A background task that ends with an exception is logged with its name; cancellation is not a crash."""

    async def test_crash_is_logged_and_reported(self) -> None:
        async def broken() -> None:
            raise ValueError("boom")

        heard: list[BaseException] = []
        with capture_logs() as logs:
            task = start_task(broken(), "side-loop", heard.append)
            await asyncio.gather(task, return_exceptions=True)
            await until(lambda: bool(heard))
        crashed = [e for e in logs if e["event"] == "task_crashed"]
        assert [(e["task"], e["error"]) for e in crashed] == [("side-loop", "ValueError: boom")]
        assert isinstance(heard[0], ValueError)

    async def test_cancellation_is_not_a_crash(self) -> None:
        heard: list[BaseException] = []
        with capture_logs() as logs:
            task = start_task(asyncio.sleep(60), "sleeper", heard.append)
            await asyncio.sleep(0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await asyncio.sleep(0)
        assert [e for e in logs if e["event"] == "task_crashed"] == [] and heard == []

    async def test_crashed_discovery_is_not_ready(self, app: tuple[Ferryman, FakeSource]) -> None:
        ferryman, source = app
        source.hand(GOOD)
        assert readiness(ferryman.report(), 0.0, 2.0)[0]
        with capture_logs() as logs:
            source.crash.set()
            await until(lambda: not ferryman.report().synced)
        assert [e["task"] for e in logs if e["event"] == "task_crashed"] == ["consul-watcher"]
        report = ferryman.report()
        assert not report.reachable and not readiness(report, 0.0, 2.0)[0]


class TestTableBuildFailed:
    """A routed world that fails to build leaves the table in force and the source running."""

    async def test_failed_build_keeps_the_table(self, app: tuple[Ferryman, FakeSource]) -> None:
        ferryman, source = app
        source.hand(GOOD)
        table = ferryman.router.current
        with capture_logs() as logs:
            source.hand(BROKEN)
        failed = [e for e in logs if e["event"] == "table_build_failed"]
        assert len(failed) == 1 and "AttributeError" in failed[0]["error"]
        assert ferryman.router.current is table and ferryman.generation == table.generation

    async def test_next_good_world_applies(self, app: tuple[Ferryman, FakeSource]) -> None:
        ferryman, source = app
        source.hand(GOOD)
        with capture_logs():
            source.hand(BROKEN)
        source.hand(snapshot(("web", parse_route_tag("urlprefix-/")), ("api", parse_route_tag("urlprefix-/api"))))
        assert ferryman.router.current.lookup("h", "/api") is not None
        assert ferryman.report().synced


class TestRoutesFollowed:
    """Services the config file's routes name are followed by the source, from the merged world."""

    async def test_file_routes_name_their_services(self) -> None:
        entry = parse_route_entry({"route": "/x", "split": {"a": 1, "b": 1}}, "f")
        settings = dataclasses.replace(DEFAULTS, routes=(entry,))
        made: list[FakeSource] = []

        def make(on_snapshot: Callable[[Snapshot], None]) -> FakeSource:
            made.append(FakeSource(on_snapshot))
            return made[0]

        ferryman = Ferryman(settings, serve_proxy=False, serve_admin=False, make_source=make)
        await ferryman.start()
        try:
            assert made[0].also == {"a", "b"}
        finally:
            await ferryman.stop()
