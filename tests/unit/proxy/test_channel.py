"""The channel between the host's one discovery (the supervisor) and its workers, over a real Unix socket:
a worker gets the whole state when it connects, then every change; a broken channel keeps the last state."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from discovery.model import Endpoint, ServiceRoutes, Snapshot, SnapshotDelta
from discovery.source import Source
from proxy.channel import Broadcaster, ChannelSource, socket_path

WAIT_S = 5.0  # a bound so a broken channel fails the test instead of hanging it; never asserted on


def svc(name: str, port: int) -> ServiceRoutes:
    return ServiceRoutes(name, (), (Endpoint(name, f"{name}-1", "127.0.0.1", port),))


class Discovery:
    """What the broadcaster asks of the supervisor's source: how current it is."""

    def __init__(self) -> None:
        self.synced = asyncio.Event()
        self.reachable = True
        self.last_success: float | None = 1234.5


class Worker:
    def __init__(self, path: str) -> None:
        self.changes: list[Snapshot | SnapshotDelta] = []
        self.kv: list[dict[str, bytes]] = []
        self.source = ChannelSource(path, self.changes.append, on_kv_routes=self.kv.append)
        self.task = asyncio.get_running_loop().create_task(self.source.run())

    async def until(self, predicate: Callable[[], bool]) -> None:
        async def wait() -> None:
            while not predicate():  # noqa: ASYNC110 - polls state another task sets; bounded by WAIT_S
                await asyncio.sleep(0.01)
        await asyncio.wait_for(wait(), WAIT_S)

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


@pytest.fixture
async def broadcaster(tmp_path: Path) -> AsyncIterator[Broadcaster]:
    discovery = Discovery()
    share = Broadcaster(socket_path(str(tmp_path)), lambda: discovery)  # type: ignore[arg-type, return-value]
    await share.start()
    try:
        yield share
    finally:
        await share.stop()


class TestChannel:
    """What a worker sees of the supervisor's discovery."""

    async def test_a_worker_gets_the_whole_state_then_each_change(self, broadcaster: Broadcaster) -> None:
        first = Snapshot((svc("a", 1), svc("b", 2)))
        broadcaster.changed(first)
        broadcaster.kv_routes({"ferryman/routes/x": b'route = "/x"'})
        worker = Worker(broadcaster.path)
        try:
            await worker.until(lambda: worker.source.last_snapshot is not None and bool(worker.kv))
            assert worker.source.last_snapshot == first and worker.source.synced.is_set()
            assert worker.source.reachable and worker.source.last_success == 1234.5
            delta = SnapshotDelta((svc("b", 3),), ("a",))
            broadcaster.changed(delta)
            await worker.until(lambda: len(worker.changes) == 2)
            assert worker.changes[1] == delta
            assert worker.source.last_snapshot == first.apply(delta)
        finally:
            await worker.stop()

    async def test_a_late_worker_starts_from_the_current_state(self, broadcaster: Broadcaster) -> None:
        broadcaster.changed(Snapshot((svc("a", 1),)))
        broadcaster.changed(SnapshotDelta((svc("c", 5),), ()))
        worker = Worker(broadcaster.path)
        try:
            await worker.until(lambda: worker.source.last_snapshot is not None)
            assert worker.changes == [Snapshot((svc("a", 1), svc("c", 5)))]  # one snapshot, not the history
        finally:
            await worker.stop()

    async def test_a_broken_channel_keeps_the_last_state_and_reconnects(self, tmp_path: Path) -> None:
        discovery: Source = Discovery()  # type: ignore[assignment]
        path = socket_path(str(tmp_path))
        share = Broadcaster(path, lambda: discovery)
        await share.start()
        share.changed(Snapshot((svc("a", 1),)))
        worker = Worker(path)
        try:
            await worker.until(lambda: worker.source.reachable)
            await share.stop()  # the supervisor's discovery goes away
            await worker.until(lambda: not worker.source.reachable)
            assert worker.source.last_snapshot == Snapshot((svc("a", 1),))  # still serving what it had
            again = Broadcaster(path, lambda: discovery)  # and comes back with news
            await again.start()
            again.changed(Snapshot((svc("a", 2),)))
            await worker.until(lambda: worker.source.last_snapshot == Snapshot((svc("a", 2),)))
            await again.stop()
        finally:
            await worker.stop()
