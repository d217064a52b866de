"""Prometheus metrics on a registry the app owns (never the global one), so tests and workers stay isolated.

Three kinds:
- Request metrics (requests, request and upstream durations, body bytes) are counted in plain dicts as requests
  happen; `flush()` adds those counts to running totals of our own, and `RequestCollector` turns the totals
  into counter and histogram families at scrape time. No private field of prometheus-client is touched, so an
  upgrade of the library cannot corrupt a histogram. With several workers, each worker's `flush()` (every
  second) also writes its totals to a file in the multiprocess directory, and the supervisor's
  `WorkersRequestCollector` adds up those files (a dead worker's file stays, so counters never go back, as in
  prometheus-client's own multiprocess mode).
- The other counters and histograms (discovery, Consul, retries, ejections) are prometheus-client objects
  updated through its public API; with several workers its multiprocess mode adds up the workers' files.
- Gauges of the proxy's state (instances and their health, in-flight requests, open connections, discovery
  freshness, the routing table) are not kept as prometheus-client Gauges at all: `StateCollector` reads them
  from a state report at scrape time. A series exists only while what it describes exists, so an instance
  that leaves Consul leaves /metrics with nothing to remove, and churn cannot grow the series count (the
  multiprocess mode keeps every gauge value a worker ever wrote until the worker dies).

Labels are bounded: service names ("none" for requests no route matched), route ids (never raw paths), a
fixed set of methods (anything else is "OTHER"), status codes, instance ids of current instances.
"""

from __future__ import annotations

import os
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Final, TypeVar

import orjson
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from discovery.consul import ERROR_REASONS

from . import __version__
from .state import INSTANCE_STATES, Report

NO_SERVICE: Final = "none"
NO_ROUTE: Final = "none"
KNOWN_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"})
# A proxy adds milliseconds; its users care from 1 ms to the longest request timeout.
DURATION_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Blocking queries to Consul last up to their wait (30 s by default, plus up to 1/16 of jitter).
CONSUL_BUCKETS: Final = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 40.0, 60.0, 120.0)
# The `le` label values as prometheus-client's Histogram writes them (Go's float format: "1.0", "+Inf").
_DURATION_LE: Final = (*(repr(float(bound)) for bound in DURATION_BUCKETS), "+Inf")
# Where prometheus-client's multiprocess mode keeps its files; set by the supervisor for its workers.
MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
_WORKER_FILE: Final = "requests-{pid}.json"
_WORKER_GLOB: Final = "requests-*.json"

_K = TypeVar("_K")

# gRPC status codes by number (grpc/doc/statuscodes.md), as the grpc-status field carries them.
_GRPC_CODES: Final = {str(number).encode(): name for number, name in enumerate((
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED",
    "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
))}

_REQUESTS: Final = ("ferryman_requests", "Requests answered, by service, route, method and status code.")
_REQUEST_DURATION: Final = (
    "ferryman_request_duration_seconds",
    "Time from the request's head received to the response's last byte sent, by service and route.",
)
_UPSTREAM_DURATION: Final = (
    "ferryman_upstream_duration_seconds",
    "Time from the request sent to an instance to its response head received, by service.",
)
_REQUEST_BYTES: Final = ("ferryman_request_bytes", "Request body bytes sent to instances, by service.")
_RESPONSE_BYTES: Final = ("ferryman_response_bytes", "Response body bytes sent to clients, by service.")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # Per request, counts add up in plain dicts and lists; flush() adds them to `totals` (at every scrape,
        # and every second in workers). A prometheus-client counter increment or histogram observation costs a
        # lock and a value object each (several µs a request in all); a dict update costs a tenth of that.
        self._requests: dict[tuple[str, str, str, int], int] = {}
        self._durations: dict[tuple[str, str], Buckets] = {}
        self._upstream: dict[str, Buckets] = {}
        self._bytes: dict[str, list[int]] = {}
        self.totals = RequestTotals()
        self._flushed_services = -1  # services in the totals at the last flush (-1: none yet: write once)
        # A worker shares its totals with the supervisor through this directory (None: a single process).
        self._share_dir = os.environ.get(MULTIPROC_ENV) or None
        # Registered first, so the request metrics lead the exposition as they always did.
        r.register(RequestCollector(self._collect_totals))
        self.discovery_updates = Counter(
            "ferryman_discovery_updates", "Routing tables built from a changed discovery snapshot.", registry=r,
        )
        self.discovery_errors = Counter(
            "ferryman_discovery_errors", "Failed requests to Consul, by reason.", ["reason"], registry=r,
        )
        self.consul_duration = Histogram(
            "ferryman_consul_request_duration_seconds",
            "Requests to Consul's HTTP API that succeeded, by query (catalog, health); blocking queries "
            "last until a change or their wait.",
            ["query"], buckets=CONSUL_BUCKETS, registry=r,
        )
        self.retries = Counter(
            "ferryman_upstream_retries", "Requests sent again after a failed attempt, by service.", ["service"],
            registry=r,
        )
        self.ejections = Counter(
            "ferryman_upstream_ejections", "Instances taken out of a pool by passive health checks, by service.",
            ["service"], registry=r,
        )
        # Response compression (gzip_content_type, gzip=on): counted once per compressed answer, never per chunk.
        self.compressed = Counter(
            "ferryman_compressed_responses", "Responses compressed on the way to the client, by encoding.",
            ["encoding"], registry=r,
        )
        self.compression_in = Counter(
            "ferryman_compression_input_bytes", "Response body bytes before compression, by encoding.",
            ["encoding"], registry=r,
        )
        self.compression_out = Counter(
            "ferryman_compression_output_bytes", "Response body bytes after compression, by encoding.",
            ["encoding"], registry=r,
        )
        # TCP and TLS pass-through (proxy/tcp/); the open connections are a state gauge (StateCollector).
        self.tcp_connections = Counter(
            "ferryman_tcp_connections", "TCP and TLS pass-through connections ended, by service and how they "
            "ended (client_closed, upstream_closed, idle, shutdown, no_route, no_instance, connect_failed, not_tls, "
            "hello_timeout, limited, denied).",
            ["service", "result"], registry=r,
        )
        self.tcp_bytes = Counter(
            "ferryman_tcp_bytes", "Bytes relayed by TCP and TLS pass-through connections, by service and direction "
            "(in: from clients to instances, out: from instances to clients).", ["service", "direction"], registry=r,
        )
        self.tcp_connect_duration = Histogram(
            "ferryman_tcp_connect_duration_seconds", "Time to connect to an instance for a TCP or TLS "
            "pass-through connection, by service (successful connects).", ["service"], buckets=DURATION_BUCKETS,
            registry=r,
        )
        # gRPC calls (HTTP/2 streams with a grpc-status): counted by the status's name, from a fixed set.
        self.grpc_responses = Counter(
            "ferryman_grpc_responses", "gRPC calls answered, by service and gRPC status (OK, UNAVAILABLE, ...): the "
            "instance's grpc-status or the proxy's own.", ["service", "code"], registry=r,
        )
        self._grpc: dict[tuple[str, bytes], Any] = {}  # (service, grpc-status as sent) -> its counter child
        # Known label values start at 0, so the first error shows in rate() and dashboards show 0, not "no data".
        for reason in ERROR_REASONS:
            self.discovery_errors.labels(reason)

    def observe_request(
        self, service: str, route: str, method: str, status: int, seconds: float,
        upstream_seconds: float | None = None, request_bytes: int = 0, response_bytes: int = 0,
    ) -> None:
        key = (service, route, method, status)
        self._requests[key] = self._requests.get(key, 0) + 1
        pending = self._durations.get((service, route))
        if pending is None:
            pending = self._durations[(service, route)] = Buckets()
        pending.counts[bisect_left(DURATION_BUCKETS, seconds)] += 1
        pending.total += seconds
        if upstream_seconds is not None:
            upstream = self._upstream.get(service)
            if upstream is None:
                upstream = self._upstream[service] = Buckets()
            upstream.counts[bisect_left(DURATION_BUCKETS, upstream_seconds)] += 1
            upstream.total += upstream_seconds
        if request_bytes or response_bytes:
            sums = self._bytes.get(service)
            if sums is None:
                sums = self._bytes[service] = [0, 0]
            sums[0] += request_bytes
            sums[1] += response_bytes

    def observe_grpc(self, service: str, code: bytes) -> None:
        """One gRPC call answered with grpc-status `code` (any other value than gRPC's 17 counts as UNKNOWN)."""
        key = (service, code if code in _GRPC_CODES else b"2")
        child = self._grpc.get(key)
        if child is None:
            child = self._grpc[key] = self.grpc_responses.labels(service, _GRPC_CODES[key[1]])
        child.inc()

    def new_service(self, service: str) -> None:
        """A routed service appeared: its retry, ejection and body-byte counters start at 0 (a service that
        only gets GETs still has a request-bytes series, so its dashboard panel shows 0, not "No data")."""
        self.retries.labels(service)
        self.ejections.labels(service)
        self.totals.request_bytes.setdefault(service, 0)
        self.totals.response_bytes.setdefault(service, 0)

    def flush(self) -> None:
        """Add what was counted since the last flush to the totals; a worker also writes them for the
        supervisor. Every count passes through `_requests`: while it stays empty and no service was added, there is
        nothing to add or write (an idle worker with 10,000 services would otherwise walk and write them all every
        second: a third of a per cent of a core each)."""
        if not self._requests and len(self.totals.request_bytes) == self._flushed_services:
            return
        self._collect_totals()
        self._flushed_services = len(self.totals.request_bytes)
        if self._share_dir is not None:
            self.totals.write(Path(self._share_dir) / _WORKER_FILE.format(pid=os.getpid()))

    def _collect_totals(self) -> RequestTotals:
        totals = self.totals
        requests, self._requests = self._requests, {}
        for (service, route, method, status), count in requests.items():
            key = (service, route, method if method in KNOWN_METHODS else "OTHER", str(status))
            totals.requests[key] = totals.requests.get(key, 0) + count
        for route_key, pending in self._durations.items():
            pending.move_into(totals.durations, route_key)
        for service, pending in self._upstream.items():
            pending.move_into(totals.upstream, service)
        for service, sums in self._bytes.items():
            if sums[0]:
                totals.request_bytes[service] = totals.request_bytes.get(service, 0) + sums[0]
            if sums[1]:
                totals.response_bytes[service] = totals.response_bytes.get(service, 0) + sums[1]
            sums[0] = sums[1] = 0
        return totals

    def observe_compression(self, encoding: str, bytes_in: int, bytes_out: int) -> None:
        """One compressed answer finished: its body's size before and after."""
        self.compressed.labels(encoding).inc()
        self.compression_in.labels(encoding).inc(bytes_in)
        self.compression_out.labels(encoding).inc(bytes_out)

    def observe_consul(self, query: str, seconds: float) -> None:
        self.consul_duration.labels(query).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class Buckets:
    """A histogram's observations: a count per bucket of DURATION_BUCKETS (not cumulative; the last one past
    every bound) and the sum."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(DURATION_BUCKETS) + 1)
        self.total = 0.0

    def move_into(self, totals: dict[_K, Buckets], key: _K) -> None:
        """Add these observations to `totals[key]` (created on first use, as a series appears with its first
        request) and start again from zero."""
        target = totals.get(key)
        if target is None:
            target = totals[key] = Buckets()
        target.add(self.counts, self.total)
        counts = self.counts
        for index in range(len(counts)):
            counts[index] = 0
        self.total = 0.0

    def add(self, counts: list[int], total: float) -> None:
        mine = self.counts
        for index, count in enumerate(counts):
            mine[index] += count
        self.total += total

    def cumulative(self) -> list[tuple[str, float]]:
        """(le, observations at or below le) per bound, +Inf last: the exposition's buckets."""
        out = []
        running = 0
        for le, count in zip(_DURATION_LE, self.counts, strict=True):
            running += count
            out.append((le, float(running)))
        return out


class RequestTotals:
    """The request metrics since start, keyed by their label values (code as its string)."""

    __slots__ = ("durations", "request_bytes", "requests", "response_bytes", "upstream")

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str, str], int] = {}
        self.durations: dict[tuple[str, str], Buckets] = {}
        self.upstream: dict[str, Buckets] = {}
        self.request_bytes: dict[str, int] = {}
        self.response_bytes: dict[str, int] = {}

    def write(self, path: Path) -> None:
        """Replace the file at `path` atomically (the supervisor never reads half a file)."""
        data = {
            "requests": [[*key, count] for key, count in self.requests.items()],
            "durations": [[*key, b.counts, b.total] for key, b in self.durations.items()],
            "upstream": [[key, b.counts, b.total] for key, b in self.upstream.items()],
            "request_bytes": self.request_bytes,
            "response_bytes": self.response_bytes,
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps(data))
        os.replace(tmp, path)

    def add_file(self, path: Path) -> None:
        """Add the totals a worker wrote to `path` (as written by `write`)."""
        data: dict[str, Any] = orjson.loads(path.read_bytes())
        for service, route, method, code, count in data["requests"]:
            key = (service, route, method, code)
            self.requests[key] = self.requests.get(key, 0) + count
        for service, route, counts, total in data["durations"]:
            self.durations.setdefault((service, route), Buckets()).add(counts, total)
        for service, counts, total in data["upstream"]:
            self.upstream.setdefault(service, Buckets()).add(counts, total)
        for service, count in data["request_bytes"].items():
            self.request_bytes[service] = self.request_bytes.get(service, 0) + count
        for service, count in data["response_bytes"].items():
            self.response_bytes[service] = self.response_bytes.get(service, 0) + count


class RequestCollector(Collector):
    """The request metrics as counter and histogram families, built from `totals()` at every scrape, with the
    names, labels, buckets and types they had as prometheus-client Counters and Histograms. `created`: whether
    to add each series' `_created` sample (its first scrape), as prometheus-client does in a single process."""

    def __init__(self, totals: Callable[[], RequestTotals], created: bool = True) -> None:
        self._totals = totals
        # prometheus-client's switch for its own `_created` series, honoured here too.
        disabled = os.environ.get("PROMETHEUS_DISABLE_CREATED_SERIES", "False").lower() in ("true", "1", "t")
        self._created: dict[tuple[str, tuple[str, ...]], float] | None = None if disabled or not created else {}

    def describe(self) -> list[Metric]:
        return []  # the series depend on traffic: registering must not call collect()

    def collect(self) -> Iterator[Metric]:
        totals = self._totals()
        yield self._counter(_REQUESTS, ("service", "route", "method", "code"), totals.requests.items())
        yield self._histogram(_REQUEST_DURATION, ("service", "route"), totals.durations.items())
        yield self._histogram(_UPSTREAM_DURATION, ("service",), (((s,), b) for s, b in totals.upstream.items()))
        yield self._counter(_REQUEST_BYTES, ("service",), (((s,), n) for s, n in totals.request_bytes.items()))
        yield self._counter(_RESPONSE_BYTES, ("service",), (((s,), n) for s, n in totals.response_bytes.items()))

    def _counter(
        self, about: tuple[str, str], label_names: tuple[str, ...], series: Iterable[tuple[tuple[str, ...], int]],
    ) -> CounterMetricFamily:
        name, doc = about
        counter = CounterMetricFamily(name, doc, labels=label_names)
        for labels, count in series:
            counter.add_metric(labels, count, created=self._first_seen(name, labels))
        return counter

    def _histogram(
        self, about: tuple[str, str], label_names: tuple[str, ...],
        series: Iterable[tuple[tuple[str, ...], Buckets]],
    ) -> HistogramMetricFamily:
        name, doc = about
        histogram = HistogramMetricFamily(name, doc, labels=label_names)
        for labels, buckets in series:
            histogram.add_metric(labels, buckets.cumulative(), buckets.total)
            created = self._first_seen(name, labels)
            if created is not None:  # the sample prometheus-client's Histogram adds after each child's sum
                histogram.add_sample(f"{name}_created", dict(zip(label_names, labels, strict=True)), created)
        return histogram

    def _first_seen(self, name: str, labels: tuple[str, ...]) -> float | None:
        if self._created is None:
            return None
        return self._created.setdefault((name, labels), time.time())


class WorkersRequestCollector(RequestCollector):
    """The supervisor's request metrics: the sum of every worker's totals file in `directory`, including those
    of workers that died (their requests were answered; counters must not go back)."""

    def __init__(self, directory: str) -> None:
        # No `_created`: prometheus-client's multiprocess mode has none either.
        super().__init__(self._read, created=False)
        self._directory = Path(directory)

    def _read(self) -> RequestTotals:
        totals = RequestTotals()
        for path in sorted(self._directory.glob(_WORKER_GLOB)):
            try:
                totals.add_file(path)
            except OSError:
                continue  # removed since the glob (the supervisor stopping); files are replaced atomically
        return totals


class StateCollector(Collector):
    """The state gauges, read from `report()` at every scrape."""

    def __init__(self, report: Callable[[], Report]) -> None:
        self._report = report

    def describe(self) -> list[Any]:
        return []  # no fixed series: registering must not call collect() (there may be no state yet)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        report = self._report()
        build = GaugeMetricFamily("ferryman_build_info", "Ferryman's version; always 1.", labels=["version"])
        build.add_metric([__version__], 1)
        yield build

        instances = GaugeMetricFamily(
            "ferryman_upstream_instances",
            "Instances per service by state: healthy (in rotation), ejected (by passive or active checks), "
            "draining (left Consul, requests still in flight).",
            labels=["service", "state"],
        )
        up = GaugeMetricFamily(
            "ferryman_upstream_up", "1 while an instance is in rotation, 0 while ejected or failing checks.",
            labels=["service", "instance"],
        )
        in_flight = GaugeMetricFamily(
            "ferryman_requests_in_flight", "Requests being forwarded to the service's instances.", labels=["service"],
        )
        for service in report.services:
            counts = dict.fromkeys(INSTANCE_STATES, 0)
            flying = 0
            for instance in service.instances:
                counts["ejected" if instance.state == "down" else instance.state] += 1
                flying += instance.in_flight
                if instance.state != "draining":
                    up.add_metric([service.name, instance.label], 1 if instance.state == "healthy" else 0)
            for state, count in counts.items():
                instances.add_metric([service.name, state], count)
            in_flight.add_metric([service.name], flying)
        websockets = GaugeMetricFamily(
            "ferryman_websocket_connections", "WebSocket connections open, by service.", labels=["service"],
        )
        for service in report.services:
            websockets.add_metric([service.name], service.websockets)
        tcp = GaugeMetricFamily(
            "ferryman_tcp_connections", "TCP and TLS pass-through connections open, by service.", labels=["service"],
        )
        for service in report.services:
            tcp.add_metric([service.name], service.tcp_connections)
        yield instances
        yield up
        yield in_flight
        yield websockets
        yield tcp

        yield GaugeMetricFamily(
            "ferryman_client_connections", "Open client connections.", value=report.connections,
        )
        if report.last_success is not None:
            yield GaugeMetricFamily(
                "ferryman_discovery_last_success_timestamp_seconds",
                "When Consul last answered a query (Unix time; the oldest across workers).",
                value=report.last_success,
            )
        yield GaugeMetricFamily(
            "ferryman_routing_table_routes", "Routes in the current routing table.", value=report.routes,
        )
        yield GaugeMetricFamily(
            "ferryman_routing_table_generation",
            "Routing tables installed since start (the lowest across workers).", value=report.generation,
        )
