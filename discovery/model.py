"""Value types that cross from discovery into the proxy.

Everything here is frozen and slotted: a Snapshot is built once and then only read; a change arrives as a
SnapshotDelta (the services that changed, whole) and `Snapshot.apply` makes the next snapshot from it. Tuples,
never lists or dicts, so equality and hashing are cheap and nothing downstream can mutate what discovery handed
over.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field, fields, replace
from typing import Any, Final, Literal

from .matchers import Condition


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One healthy instance of a service: where to send requests."""

    service: str
    instance_id: str
    address: str
    port: int
    node: str = ""
    weight: int = 1
    # The datacenter it was read from when several are followed (`consul_dc = "dc1,dc2"`); "" with one.
    dc: str = ""
    # Derived once, read on every request: the identity across snapshots (Consul service IDs are unique per
    # node, node names per datacenter: dc/node/id with several, node/id with one) and host:port for the wire,
    # IPv6 literals in brackets (RFC 3986 §3.2.2).
    key: str = field(init=False, compare=False, repr=False)
    authority: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        key = f"{self.node}/{self.instance_id}"
        object.__setattr__(self, "key", f"{self.dc}/{key}" if self.dc else key)
        host = f"[{self.address}]" if ":" in self.address else self.address
        object.__setattr__(self, "authority", f"{host}:{self.port}")


# grpc / grpcs: HTTP/2 to the instances, without / with TLS (proxy/h2/upstream.py); tcp: a byte stream relayed to
# the instances (TCP and TLS pass-through routes, proxy/tcp/).
Proto = Literal["http", "https", "grpc", "grpcs", "tcp"]


@dataclass(frozen=True, slots=True)
class RouteOptions:
    """A route tag's options, parsed once (discovery.tags): one typed field per option Ferryman knows, each at
    its default when the tag does not set it. Adding an option means a field here, a branch in the tag parser
    and the one place that reads it."""

    strip: str | None = None  # strip=: prefix removed from the path sent upstream
    proto: Proto = "http"  # proto=: how the instances are reached
    tls_skip_verify: bool = False  # tlsskipverify=true
    lb: str | None = None  # lb=: the service's balancing algorithm (when nothing else sets it)
    hash_on: tuple[str, str] | None = None  # hash_key=: ("ip", ""), ("header", lower-case name), ("cookie", name)
    sticky: str | None = None  # sticky=: session cookie name
    max_body: int = 0  # maxbody=: request body limit in bytes; 0: the service's or the global one
    sni: str | None = None  # sni=: TLS server name for proto=https and proto=grpcs
    methods: frozenset[str] = frozenset()  # method=GET|HEAD; empty: any method
    conditions: tuple[Condition, ...] = ()  # header=, cookie=, query=, in that order
    exact: bool = False  # exact=true: the path must be the whole request path
    priority: int = 0  # priority=: order among routes with the same path and as many conditions
    redirect: tuple[int, str] | None = None  # redirect=CODE,URL: answered by the proxy itself
    prepend: str | None = None  # prepend=: prefix added to the path sent upstream
    host: str | None = None  # host=: the Host header sent upstream; "dst": the instance's address (Fabio's)
    # allow= / deny= (Fabio's access rules): ("allow" or "deny", networks as CIDR text), checked against the
    # client's address; None: everyone.
    access: tuple[str, tuple[str, ...]] | None = None
    weight: float = 0.0  # weight=: the service's fixed share of a route it shares (0: by instance count)
    read_timeout: float | None = None  # read_timeout=: the service's upstream read timeout in seconds
    connect_timeout: float | None = None  # connect_timeout=: the service's connect timeout in seconds
    # How the path matches (Fabio's proxy.matcher): "prefix" (on a segment boundary), "iprefix" (the same,
    # ignoring case) or "glob" (the whole path, gobwas syntax); the tag's matcher= or the global path_matcher.
    matcher: str = "prefix"
    auth: str | None = None  # auth=: the basic-authentication realm (the config file's [auth.NAME]) guarding it
    # gzip=on|off (Ferryman's; Fabio compresses by its global setting only): compress this route's answers
    # even when gzip_content_type is empty / never; None: as the setting says.
    gzip: bool | None = None
    proxy_protocol: int = 0  # pxyproto=v1|v2 on a TCP route: the PROXY header version sent to instances; 0: none

    def order_key(self) -> tuple[tuple[Any, ...], ...]:
        """A total order over options (sets and conditions made comparable), so routes that share host and path
        sort the same in every process whatever order they were declared in."""
        return tuple(_orderable(getattr(self, f.name)) for f in fields(self))


def _orderable(value: object) -> tuple[Any, ...]:
    if value is None:
        return ()  # unset sorts first
    if isinstance(value, frozenset):
        return tuple(sorted(value))
    if isinstance(value, tuple) and value and isinstance(value[0], Condition):
        return tuple((c.kind, c.name, c.op, c.value) for c in value)
    return (value,)


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """What one route tag declares: host (lower case, no port; "" = any host), path prefix, options, and the
    listener port the route is restricted to (`host:80/`, `*:80/`; 0: any listener). A TCP route (proto=tcp)
    has the path "": `:6379` (host "", the TCP listener's port) or `db.example.com/` (by TLS server name)."""

    host: str
    path: str
    options: RouteOptions = RouteOptions()
    port: int = 0

    def order_key(self) -> tuple[str, str, int, tuple[tuple[Any, ...], ...]]:
        return self.host, self.path, self.port, self.options.order_key()


@dataclass(frozen=True, slots=True)
class ServiceSettings:
    """Per-service settings one source declares (the instances' service meta, a config file's
    `[services.NAME]` table), parsed and validated (discovery.tags.with_service_setting); None: not set here."""

    lb: str | None = None
    hash_on: tuple[str, str] | None = None  # as RouteOptions.hash_on
    sticky: str | None = None
    health_path: str | None = None  # checked by Ferryman itself
    max_body: int | None = None  # request body limit in bytes (0: none beyond the global one)
    max_concurrent: int | None = None  # requests in progress (0: no limit)
    read_timeout: float | None = None  # seconds an upstream may stay silent (long polls, streams)
    connect_timeout: float | None = None  # seconds to connect to an instance

    def over(self, fallback: ServiceSettings) -> ServiceSettings:
        """These settings, each one not set here taken from `fallback`."""
        # Most services set nothing anywhere: the common cases skip `fields` and `replace` (they were most of the
        # pools' work for 10,000 services at a worker's start).
        if fallback == _NO_SETTINGS:
            return self
        if self == _NO_SETTINGS:
            return fallback
        set_here = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        return replace(fallback, **set_here)


_NO_SETTINGS: Final = ServiceSettings()


@dataclass(frozen=True, slots=True)
class ServiceRoutes:
    """A routed service: the routes its instances declare and its instances that pass every check."""

    name: str
    routes: tuple[RouteSpec, ...]
    endpoints: tuple[Endpoint, ...]
    # Settings from the instances' service meta (`ferryman-lb`, ...), already validated.
    settings: ServiceSettings = ServiceSettings()
    # Routes that only some of the healthy instances declare (Fabio builds routes per instance): the keys of
    # the instances that may take the route's traffic. A route not listed here is declared by every one.
    members: tuple[tuple[RouteSpec, frozenset[str]], ...] = ()

    def members_of(self, spec: RouteSpec) -> frozenset[str] | None:
        """The instances a route is limited to, or None when every healthy instance declares it."""
        for route, keys in self.members:
            if route == spec:
                return keys
        return None


@dataclass(frozen=True, slots=True)
class Problem:
    """A bad item that was skipped while building a snapshot (logged, never fatal)."""

    kind: str
    service: str
    detail: str
    item: str = ""


@dataclass(frozen=True, slots=True)
class SnapshotDelta:
    """What changed from one snapshot to the next: services added or changed (each whole), services gone.
    Discovery hands these over instead of whole snapshots, so a change to one service of 10,000 costs work
    for one service downstream."""

    changed: tuple[ServiceRoutes, ...] = ()
    removed: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.changed or self.removed)

    def then(self, later: SnapshotDelta) -> SnapshotDelta:
        """This delta followed by `later`, as one (coalescing a burst)."""
        changed = {s.name: s for s in self.changed}
        removed = dict.fromkeys(self.removed)
        for name in later.removed:
            changed.pop(name, None)
            removed[name] = None
        for svc in later.changed:
            removed.pop(svc.name, None)
            changed[svc.name] = svc
        return SnapshotDelta(tuple(changed.values()), tuple(removed))


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The whole routed world at one moment, sorted by service name so equal worlds compare equal."""

    services: tuple[ServiceRoutes, ...] = ()
    problems: tuple[Problem, ...] = field(default=(), compare=False)
    # The services' names in order, kept beside them so `apply` and `service` find a name by bisection.
    _names: tuple[str, ...] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self._names is None and any(a.name > b.name for a, b in zip(self.services, self.services[1:], strict=False)):
            object.__setattr__(self, "services", tuple(sorted(self.services, key=lambda s: s.name)))

    @property
    def names(self) -> tuple[str, ...]:
        names = self._names
        if names is None:
            names = tuple(s.name for s in self.services)
            object.__setattr__(self, "_names", names)
        return names

    def service(self, name: str) -> ServiceRoutes | None:
        names = self.names
        at = bisect.bisect_left(names, name)
        return self.services[at] if at < len(names) and names[at] == name else None

    def apply(self, delta: SnapshotDelta) -> Snapshot:
        """The snapshot after `delta`. Copies two arrays of references and edits them in place: cheap even
        with 10,000 services, and no service is rebuilt."""
        names, services = list(self.names), list(self.services)
        for name in delta.removed:
            at = bisect.bisect_left(names, name)
            if at < len(names) and names[at] == name:
                del names[at], services[at]
        for svc in delta.changed:
            at = bisect.bisect_left(names, svc.name)
            if at < len(names) and names[at] == svc.name:
                services[at] = svc
            else:
                names.insert(at, svc.name)
                services.insert(at, svc)
        return Snapshot(tuple(services), self.problems, tuple(names))

    def delta_to(self, after: Snapshot) -> SnapshotDelta:
        """What `apply` needs to turn this snapshot into `after`."""
        before = {s.name: s for s in self.services}
        changed = tuple(s for s in after.services if before.get(s.name) != s)
        kept = set(after.names)
        return SnapshotDelta(changed, tuple(name for name in self.names if name not in kept))


def _quick_pickling(cls: type) -> None:
    """Pickle a frozen slotted dataclass as a plain tuple of its fields: a worker unpickles the first snapshot of
    a large cluster (70,000 of these values at 10,000 services), and the dataclass default walks `fields()` for
    each value it restores (two thirds of the unpickling time)."""
    names = tuple(f.name for f in fields(cls))
    setter = object.__setattr__

    def getstate(self: object) -> tuple[Any, ...]:
        return tuple([getattr(self, name) for name in names])

    def setstate(self: object, state: tuple[Any, ...]) -> None:
        for name, value in zip(names, state, strict=True):
            setter(self, name, value)

    setattr(cls, "__getstate__", getstate)  # noqa: B010  (replacing the methods @dataclass gave the class)
    setattr(cls, "__setstate__", setstate)  # noqa: B010


for _cls in (Endpoint, RouteOptions, RouteSpec, ServiceSettings, ServiceRoutes):
    _quick_pickling(_cls)
