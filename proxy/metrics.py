"""Prometheus metrics on a registry the app owns (never the global one), so tests and workers stay isolated.

Two kinds:
- Counters and histograms, counted as requests happen (prometheus-client; with several workers its
  multiprocess mode adds up the workers' files).
- Gauges of the proxy's state (instances and their health, in-flight requests, open connections, discovery
  freshness, the routing table) are not kept as prometheus-client Gauges at all: `StateCollector` reads them
  from a state report at scrape time. A series exists only while what it describes exists, so an instance
  that leaves Consul leaves /metrics with nothing to remove, and churn cannot grow the series count (the
  multiprocess mode keeps every gauge value a worker ever wrote until the worker dies).

Labels are bounded: service names ("none" for requests no route matched), route ids (never raw paths), a
fixed set of methods (anything else is "OTHER"), status codes, instance ids of current instances.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
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


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "ferryman_requests", "Requests answered, by service, route, method and status code.",
            ["service", "route", "method", "code"], registry=r,
        )
        self.request_duration = Histogram(
            "ferryman_request_duration_seconds",
            "Time from the request's head received to the response's last byte sent, by service and route.",
            ["service", "route"], buckets=DURATION_BUCKETS, registry=r,
        )
        self.upstream_duration = Histogram(
            "ferryman_upstream_duration_seconds",
            "Time from the request sent to an instance to its response head received, by service.",
            ["service"], buckets=DURATION_BUCKETS, registry=r,
        )
        self.request_bytes = Counter(
            "ferryman_request_bytes", "Request body bytes sent to instances, by service.", ["service"], registry=r,
        )
        self.response_bytes = Counter(
            "ferryman_response_bytes", "Response body bytes sent to clients, by service.", ["service"], registry=r,
        )
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
        # Known label values start at 0, so the first error shows in rate() and dashboards show 0, not "no data".
        for reason in ERROR_REASONS:
            self.discovery_errors.labels(reason)
        # Per request, counts add up in plain dicts and lists; flush() hands them to prometheus-client (at every
        # scrape, and every second in workers). A counter increment or a histogram observation costs a lock and
        # a value object each (several µs a request in all); a dict update costs a tenth of that.
        self._requests: dict[tuple[str, str, str, int], int] = {}
        self._durations: dict[tuple[str, str], _Pending] = {}
        self._upstream: dict[str, _Pending] = {}
        self._bytes: dict[str, list[int]] = {}

    def observe_request(
        self, service: str, route: str, method: str, status: int, seconds: float,
        upstream_seconds: float | None = None, request_bytes: int = 0, response_bytes: int = 0,
    ) -> None:
        key = (service, route, method, status)
        self._requests[key] = self._requests.get(key, 0) + 1
        pending = self._durations.get((service, route))
        if pending is None:
            pending = self._durations[(service, route)] = _Pending()
        pending.counts[bisect_left(DURATION_BUCKETS, seconds)] += 1
        pending.total += seconds
        if upstream_seconds is not None:
            upstream = self._upstream.get(service)
            if upstream is None:
                upstream = self._upstream[service] = _Pending()
            upstream.counts[bisect_left(DURATION_BUCKETS, upstream_seconds)] += 1
            upstream.total += upstream_seconds
        if request_bytes or response_bytes:
            sums = self._bytes.get(service)
            if sums is None:
                sums = self._bytes[service] = [0, 0]
            sums[0] += request_bytes
            sums[1] += response_bytes

    def new_service(self, service: str) -> None:
        """A routed service appeared: its retry and ejection counters start at 0."""
        self.retries.labels(service)
        self.ejections.labels(service)

    def flush(self) -> None:
        """Hand what was counted since the last flush to prometheus-client."""
        requests, self._requests = self._requests, {}
        for (service, route, method, status), count in requests.items():
            label_method = method if method in KNOWN_METHODS else "OTHER"
            self.requests.labels(service, route, label_method, str(status)).inc(count)
        for (service, route), pending in self._durations.items():
            pending.flush_into(self.request_duration.labels(service, route))
        for service, pending in self._upstream.items():
            pending.flush_into(self.upstream_duration.labels(service))
        for service, sums in self._bytes.items():
            if sums[0]:
                self.request_bytes.labels(service).inc(sums[0])
            if sums[1]:
                self.response_bytes.labels(service).inc(sums[1])
            sums[0] = sums[1] = 0

    def observe_consul(self, query: str, seconds: float) -> None:
        self.consul_duration.labels(query).observe(seconds)

    def exposition(self) -> bytes:
        self.flush()
        return generate_latest(self.registry)


class _Pending:
    """Histogram observations not yet handed over: a count per bucket (the last one past every bound) and the
    sum. Handed over through the histogram child's own bucket and sum values, which is what observe() adds to
    (prometheus-client keeps its buckets non-cumulative; tests/unit/test_observability.py checks the result
    against observe())."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(DURATION_BUCKETS) + 1)
        self.total = 0.0

    def flush_into(self, child: Any) -> None:
        if not self.total and not any(self.counts):
            return
        child._sum.inc(self.total)
        for index, count in enumerate(self.counts):
            if count:
                child._buckets[index].inc(count)
                self.counts[index] = 0
        self.total = 0.0


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
        yield instances
        yield up
        yield in_flight
        yield websockets

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
