"""Several proxy processes on one listener: a supervisor and N workers (`--workers N`, 0 = one per CPU).

Each worker is a whole Ferryman proxy (own event loop, own table, pools and upstream connections) bound to the
same address with SO_REUSEPORT, so the kernel spreads connections over them. Only the supervisor follows Consul
(one discovery per host, proxy/channel.py): workers get its state over a Unix socket, the whole of it when they
connect and every change after, so a host's load on Consul does not grow with its workers. The supervisor
serves the admin listener: /metrics adds up the workers'
metrics from files in a private directory (request metrics from each worker's totals file, the others through
prometheus-client's multiprocess mode), and /api/routes comes from the supervisor's own watcher. SIGTERM or
SIGINT to the supervisor drains the workers beside itself (for drain_delay every answer says Connection: close
while /ready says 503), then stops them (each finishes its in-flight requests within shutdown_timeout) and
then itself. A worker that dies after running a while is restarted; one that dies at start (a port in use)
stops everything.
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING, Final

import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from . import logs
from .channel import Broadcaster, socket_path
from .config import ConfigError, Settings, Source
from .metrics import StateCollector, WorkersRequestCollector
from .state import Report, merge, read_reports, remove_report

if TYPE_CHECKING:
    from .app import Ferryman

log = structlog.get_logger("ferryman.supervisor")

_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_MIN_HEALTHY_RUN_S = 5.0
# A worker's state report older than this counts as missing (the worker hangs): /ready says not ready.
_REPORT_MAX_AGE_S = 5.0


# Metric families only the supervisor has (it alone follows Consul), by prometheus-client's family names.
_DISCOVERY_FAMILIES: Final = frozenset({"ferryman_discovery_errors", "ferryman_consul_request_duration_seconds"})


class _Families(Collector):
    """Some families of another registry: those named in `include`, or all but those in `exclude`."""

    def __init__(self, registry: CollectorRegistry, *, include: frozenset[str] | None = None,
                 exclude: frozenset[str] = frozenset()) -> None:
        self.registry, self.include, self.exclude = registry, include, exclude

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():
            if (self.include is None or family.name in self.include) and family.name not in self.exclude:
                yield family


def effective_workers(settings: Settings) -> int:
    return settings.workers or os.cpu_count() or 1


def run_event_loop(main: object) -> None:
    """Run a coroutine on uvloop when it is installed, else on asyncio's default loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)  # type: ignore[arg-type]
        return
    uvloop.run(main)  # type: ignore[arg-type]


async def serve(
    settings: Settings, *, drain: bool = True, source: Source | None = None,
    reloads: tuple[str, int] | None = None, **kwargs: object,
) -> None:
    """Run one Ferryman until SIGTERM or SIGINT; then drain (when `drain`) and stop. SIGHUP reloads the
    configuration from `source`."""
    from .app import Ferryman

    _settle_gc()  # the first table of a large cluster is 100,000s of objects: built without the collector's churn
    app = Ferryman(settings, **kwargs)  # type: ignore[arg-type]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: reload_from(app, source))
    if reloads is not None and _reloads_now(reloads[0]) != reloads[1]:
        # A SIGHUP reached this worker before its handler was in place (it was starting): take it now.
        reload_from(app, source)
    await app.start()
    _settle_gc()
    flusher = logs.start_flushing(settings.logs.flush_interval)
    try:
        await stop.wait()
        if drain:
            await app.drain()
    finally:
        await app.stop()
        if flusher is not None:
            flusher.cancel()
        logs.flush()


def reload_from(app: Ferryman, source: Source | None) -> None:
    """SIGHUP: read the configuration again; a bad one keeps the running configuration and says why."""
    if source is None:
        return
    try:
        new = source.load(os.environ)
    except ConfigError as exc:
        log.error("config_reload_failed", error=str(exc), detail="the running configuration stays")
        return
    app.reload(new)


def _settle_gc() -> None:
    """Move start-up objects out of the collector's sight and collect young objects less often: the hot path
    allocates short-lived objects per request, and CPython's default gen-0 threshold (700) ran the cyclic
    collector thousands of times a second under load (6% of CPU in profiles)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def _reloads_now(directory: str) -> int:
    """How many SIGHUPs the supervisor has passed on (a counter file in its directory)."""
    try:
        return int((Path(directory) / "reloads").read_text())
    except (OSError, ValueError):
        return 0


def _worker_main(settings: Settings, index: int, source: Source | None, reloads: int) -> None:
    logs.configure(settings.logs.format, settings.logs.level, buffered=settings.logs.flush_interval > 0)
    structlog.contextvars.bind_contextvars(worker=index)
    # SIGTERM from the supervisor starts the worker's drain (every answer says Connection: close for
    # drain_delay) while the supervisor says not-ready; then the worker stops.
    directory = os.environ[_MULTIPROC_ENV]
    channel = socket_path(directory) if not settings.static_file else None
    run_event_loop(serve(
        settings, drain=True, serve_admin=False, reuse_port=True, report_dir=directory, source=source,
        channel=channel, reloads=(directory, reloads),
    ))


class Supervisor:
    def __init__(self, settings: Settings, source: Source | None = None) -> None:
        self.settings = settings
        self.source = source
        self.count = effective_workers(settings)
        self.metrics_dir = tempfile.mkdtemp(prefix="ferryman-metrics-")
        self._ctx = multiprocessing.get_context("spawn")
        self._workers: dict[int, tuple[BaseProcess, float]] = {}
        self.failed = False
        self._admin: Ferryman | None = None
        self._reloads = 0  # SIGHUPs passed on to the workers (a worker starting meanwhile catches up by it)

    def _spawn(self, index: int) -> None:
        proc = self._ctx.Process(
            target=_worker_main, args=(self.settings, index, self.source, self._reloads),
            name=f"ferryman-worker-{index}",
        )
        # The worker starts with SIGHUP ignored (an ignored signal stays ignored across exec) until its event
        # loop installs its own handler: a reload forwarded during its start-up must not kill it.
        previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
        try:
            proc.start()
        finally:
            signal.signal(signal.SIGHUP, previous)
        self._workers[index] = (proc, time.monotonic())
        log.info("worker_started", worker=index, pid=proc.pid)

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        workers = CollectorRegistry()
        MultiProcessCollector(workers, path=self.metrics_dir)  # type: ignore[no-untyped-call]  # untyped upstream
        registry = CollectorRegistry()
        registry.register(WorkersRequestCollector(self.metrics_dir))  # request metrics: the workers' own files
        # Consul's figures are the supervisor's own (only it talks to Consul); the rest adds the workers' up.
        assert self._admin is not None
        registry.register(_Families(workers, exclude=_DISCOVERY_FAMILIES))
        registry.register(_Families(self._admin.metrics.registry, include=_DISCOVERY_FAMILIES))
        registry.register(StateCollector(self.report))
        return generate_latest(registry)

    def report(self) -> Report:
        """The supervisor's own view of Consul (membership) merged with what every live worker reported."""
        assert self._admin is not None
        pids = [proc.pid for proc, _ in self._workers.values() if proc.pid is not None and proc.is_alive()]
        workers = read_reports(self.metrics_dir, pids, time.time(), max_age=_REPORT_MAX_AGE_S)
        return merge(self._admin.report(), workers, expected=self.count)

    async def run(self) -> None:
        from prometheus_client.multiprocess import mark_process_dead

        from .app import Ferryman

        # Workers are spawned (fresh interpreters), so they see this before importing prometheus-client.
        os.environ[_MULTIPROC_ENV] = self.metrics_dir
        _settle_gc()  # (as in serve: the supervisor builds the first table of a large cluster too)
        # The one discovery of this host: the workers get its state over a Unix socket, never ask Consul.
        share = None if self.settings.static_file else Broadcaster(
            socket_path(self.metrics_dir), lambda: admin.source)
        admin = self._admin = Ferryman(
            self.settings, serve_proxy=False, exposition=self.exposition, report=self.report, share=share,
        )
        if share is not None:
            await share.start()
        # The admin side first: a Consul token Consul refuses (or a taken admin port) stops everything before
        # any worker exists.
        await admin.start()
        for index in range(self.count):
            self._spawn(index)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        flusher = logs.start_flushing(self.settings.logs.flush_interval)
        try:
            while not stop.is_set():
                for index, (proc, started) in list(self._workers.items()):
                    if proc.is_alive():
                        continue
                    mark_process_dead(proc.pid, self.metrics_dir)  # type: ignore[no-untyped-call]  # untyped upstream
                    if proc.pid is not None:
                        remove_report(self.metrics_dir, proc.pid)
                    ran = time.monotonic() - started
                    log.error("worker_exited", worker=index, pid=proc.pid, exitcode=proc.exitcode,
                              ran_s=round(ran, 1))
                    if ran < _MIN_HEALTHY_RUN_S:
                        self.failed = True
                        stop.set()
                        break
                    self._spawn(index)
                try:
                    await asyncio.wait_for(stop.wait(), 0.5)
                except TimeoutError:
                    pass
            self._signal_workers(signal.SIGTERM)  # their drain runs beside the supervisor's
            await admin.drain()
        finally:
            await self._stop_workers()
            await admin.stop()
            if share is not None:
                await share.stop()
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
            if flusher is not None:
                flusher.cancel()
            logs.flush()

    def _reload(self) -> None:
        """SIGHUP: every worker reads the configuration again itself; the supervisor too (for the admin port
        and for workers it starts later). A worker still starting, whose handler is not in place yet, sees the
        counter move and reloads once it is."""
        self._reloads += 1
        (Path(self.metrics_dir) / "reloads").write_text(str(self._reloads))
        for proc, _ in self._workers.values():
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGHUP)
        assert self._admin is not None
        reload_from(self._admin, self.source)
        self.settings = self._admin.settings

    def _signal_workers(self, signum: int) -> None:
        for proc, _ in self._workers.values():
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signum)

    async def _stop_workers(self) -> None:
        self._signal_workers(signal.SIGTERM)  # a second SIGTERM is harmless: the first one set the same event
        timeouts = self.settings.timeouts
        deadline = time.monotonic() + timeouts.shutdown + timeouts.drain_delay + 5
        for index, (proc, _) in self._workers.items():
            await asyncio.to_thread(proc.join, max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                log.warning("worker_killed", worker=index, pid=proc.pid)
                proc.kill()
                await asyncio.to_thread(proc.join, 5)


def run_supervisor(settings: Settings, source: Source | None = None) -> int:
    supervisor = Supervisor(settings, source)
    log.info("supervisor_starting", workers=supervisor.count)
    run_event_loop(supervisor.run())
    return 1 if supervisor.failed else 0
