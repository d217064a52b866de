"""Prometheus metrics on a registry the app owns (never the global one), so tests and workers stay isolated.

Labels are bounded: service names (plus "none" for requests no route matched), a fixed set of methods
(anything else is "OTHER"), status codes. Never a raw path or an instance address. Gauges of services that
left the table are removed, so churn cannot grow the series count.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

NO_SERVICE: Final = "none"
KNOWN_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"})
# A proxy adds milliseconds; its users care from 1 ms to the longest request timeout.
DURATION_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "ferryman_requests", "Requests answered, by service, method and status code.",
            ["service", "method", "code"], registry=r,
        )
        self.request_duration = Histogram(
            "ferryman_request_duration_seconds", "Time from request received to response finished.",
            ["service"], buckets=DURATION_BUCKETS, registry=r,
        )
        # With several workers every one reports the same pool: "livemax" shows it once, from live workers.
        self.upstream_instances = Gauge(
            "ferryman_upstream_instances", "Healthy instances in the service's pool.", ["service"], registry=r,
            multiprocess_mode="livemax",
        )
        self.discovery_updates = Counter(
            "ferryman_discovery_updates", "Routing tables built from a changed discovery snapshot.", registry=r,
        )
        self.discovery_errors = Counter(
            "ferryman_discovery_errors", "Failed requests to Consul, by reason.", ["reason"], registry=r,
        )
        self.retries = Counter(
            "ferryman_upstream_retries", "Requests sent again after a failed attempt, by service.", ["service"],
            registry=r,
        )
        self.ejections = Counter(
            "ferryman_upstream_ejections", "Instances taken out of a pool by passive health checks, by service.",
            ["service"], registry=r,
        )
        self.routes = Gauge(
            "ferryman_routing_table_routes", "Routes in the current table.", registry=r, multiprocess_mode="livemax",
        )
        self._services: set[str] = set()
        # Label children looked up once per label set, not per request (labels() costs a lock and a tuple).
        self._request_children: dict[tuple[str, str, int], Any] = {}
        self._duration_children: dict[str, Any] = {}

    def observe_request(self, service: str, method: str, status: int, seconds: float) -> None:
        key = (service, method, status)
        counter = self._request_children.get(key)
        if counter is None:
            label_method = method if method in KNOWN_METHODS else "OTHER"
            counter = self._request_children[key] = self.requests.labels(service, label_method, str(status))
        counter.inc()
        histogram = self._duration_children.get(service)
        if histogram is None:
            histogram = self._duration_children[service] = self.request_duration.labels(service)
        histogram.observe(seconds)

    def set_pools(self, sizes: Iterable[tuple[str, int]]) -> None:
        current: set[str] = set()
        for service, size in sizes:
            current.add(service)
            self.upstream_instances.labels(service).set(size)
        for gone in self._services - current:
            self.upstream_instances.remove(gone)
        self._services = current

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
