"""One discovery per host: the supervisor follows Consul and ships what it learns to its workers.

Only the supervisor talks to Consul (so one host opens a handful of connections to the agent, whatever the
number of workers and services). Its `Broadcaster` listens on a Unix socket in the supervisor's private
directory; each worker's `ChannelSource` connects, gets the whole current state at once (the snapshot, the
routes and certificates held in Consul KV, how current all that is), then every change as it comes: the
SnapshotDelta of the services that changed, new KV values, and a status line once a second. A worker that
starts or restarts is current at once; a worker whose channel breaks keeps serving its last table (its
/ready turns stale after `max_sync_age`, as when Consul is down) and connects again.

Frames are a 4-byte length and a pickle of plain values (frozen dataclasses, tuples, dicts, bytes), between
processes of one user on one host: the socket lives in a directory only that user can enter. A worker that
does not read (its socket buffer and a bounded backlog full) is disconnected rather than let the
supervisor's memory grow; it reconnects and gets the whole state again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import struct
from collections.abc import Callable
from typing import Any, Final

import structlog

from discovery.follow import Backoff
from discovery.model import Snapshot, SnapshotDelta
from discovery.source import Source

log = structlog.get_logger("ferryman.channel")

_HEADER: Final = struct.Struct(">I")
MAX_FRAME: Final = 512 * 1024 * 1024
MAX_BACKLOG: Final = 256 * 1024 * 1024  # bytes queued for one worker before it is disconnected
STATUS_INTERVAL_S: Final = 1.0

OnChange = Callable[[Snapshot | SnapshotDelta], None]
OnValues = Callable[[dict[str, bytes]], None]


def _frame(message: tuple[Any, ...]) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


class Broadcaster:
    """The supervisor's side: the current state, and every connected worker kept up to date."""

    def __init__(self, path: str, source: Callable[[], Source | None]) -> None:
        self.path = path
        self._source = source  # the supervisor's discovery source, asked for how current it is
        self._snapshot: Snapshot | None = None
        self._kv_routes: dict[str, bytes] | None = None
        self._tls_kv: dict[str, bytes] | None = None
        self._status: tuple[bool, float | None, bool] = (False, None, False)
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.AbstractServer | None = None
        self._ticker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._server = await asyncio.start_unix_server(self._connected, path=self.path)
        os.chmod(self.path, 0o600)
        self._ticker = asyncio.get_running_loop().create_task(self._tick(), name="channel-status")

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    # --- what the supervisor's discovery hands over ---
    def changed(self, change: Snapshot | SnapshotDelta) -> None:
        if isinstance(change, Snapshot):
            self._snapshot = change
            self._send(("snapshot", change))
        elif self._snapshot is not None:
            self._snapshot = self._snapshot.apply(change)
            self._send(("delta", change))

    def kv_routes(self, values: dict[str, bytes]) -> None:
        self._kv_routes = values
        self._send(("kv_routes", values))

    def tls_kv(self, values: dict[str, bytes]) -> None:
        self._tls_kv = values
        self._send(("tls_kv", values))

    # --- workers ---
    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A worker: the whole state now, then every change (sent by `_send`) until it goes."""
        writer.write(_frame(("status", *self._current_status())))
        if self._snapshot is not None:
            writer.write(_frame(("snapshot", self._snapshot)))
        if self._kv_routes is not None:
            writer.write(_frame(("kv_routes", self._kv_routes)))
        if self._tls_kv is not None:
            writer.write(_frame(("tls_kv", self._tls_kv)))
        self._writers.add(writer)
        log.info("channel_worker_connected", workers=len(self._writers))
        try:
            await reader.read()  # workers send nothing: this returns when the worker is gone
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    def _send(self, message: tuple[Any, ...]) -> None:
        if not self._writers:
            return
        data = _frame(message)
        for writer in list(self._writers):
            if writer.transport.get_write_buffer_size() > MAX_BACKLOG:
                log.warning("channel_worker_dropped", reason="not reading", backlog=MAX_BACKLOG)
                self._writers.discard(writer)
                writer.transport.abort()
                continue
            writer.write(data)

    def _current_status(self) -> tuple[bool, float | None, bool]:
        source = self._source()
        if source is None:
            return (False, None, False)
        return (source.reachable, source.last_success, source.synced.is_set())

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(STATUS_INTERVAL_S)
            status = self._current_status()
            if status != self._status:
                self._status = status
                self._send(("status", *status))


class ChannelSource:
    """A worker's discovery `Source`: the supervisor's state over the channel, never Consul itself."""

    def __init__(
        self, path: str, on_change: OnChange, *, on_kv_routes: OnValues | None = None,
        on_tls_kv: OnValues | None = None,
    ) -> None:
        self.path = path
        self._on_change = on_change
        self._on_kv_routes = on_kv_routes
        self._on_tls_kv = on_tls_kv
        self.synced = asyncio.Event()
        self._last: Snapshot | None = None
        self._reachable = False
        self._last_success: float | None = None
        self._connected = False

    @property
    def reachable(self) -> bool:
        return self._connected and self._reachable

    @property
    def last_success(self) -> float | None:
        return self._last_success

    @property
    def last_snapshot(self) -> Snapshot | None:
        return self._last

    def watch_also(self, services: frozenset[str]) -> None:
        """The supervisor follows what every route source names (workers take the same configuration)."""

    def reload(self) -> None:
        """Nothing to re-read here: the supervisor re-reads."""

    async def run(self) -> None:
        backoff = Backoff(0.05, 1.0)
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(self.path)
            except OSError:
                await asyncio.sleep(backoff.next_delay())
                continue
            backoff.reset()
            self._connected = True
            try:
                await self._read(reader)
            except (asyncio.IncompleteReadError, ConnectionError, OSError):
                pass
            finally:
                self._connected = False
                writer.close()
            log.warning("channel_lost", detail="serving the last table; connecting again")
            await asyncio.sleep(backoff.next_delay())

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while True:
            (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
            if size > MAX_FRAME:
                raise ConnectionError(f"channel frame of {size} bytes")
            # Only the supervisor that started this worker can write here (a 0600 socket in its 0700 directory).
            message = pickle.loads(await reader.readexactly(size))
            self._handle(message)

    def _handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "snapshot":
            self._last = message[1]
            self.synced.set()
            self._on_change(message[1])
        elif kind == "delta" and self._last is not None:
            self._last = self._last.apply(message[1])
            self._on_change(message[1])
        elif kind == "status":
            self._reachable, self._last_success = message[1], message[2]
        elif kind == "kv_routes" and self._on_kv_routes is not None:
            self._on_kv_routes(message[1])
        elif kind == "tls_kv" and self._on_tls_kv is not None:
            self._on_tls_kv(message[1])


def socket_path(directory: str) -> str:
    return os.path.join(directory, "discovery.sock")

