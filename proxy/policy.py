"""A service's policy: how its requests are balanced, limited and actively checked, resolved in one place.

Each setting comes from, in order of precedence:
1. the config file's `[services.NAME]` table (an operator's word wins),
2. the instances' service meta (`ferryman-lb`, `ferryman-hash-key`, `ferryman-sticky`, `ferryman-health-path`,
   `ferryman-read-timeout`, `ferryman-connect-timeout`),
3. the route tags (`lb=`, `hash_key=`, `sticky=`, `read_timeout=`, `connect_timeout=`): the first route, in
   table order, that has the option,
4. the default: the global settings (`service_max_concurrent`; a max_body of 0 means the global
   `max_body_size`; a timeout of 0 means the global `read_timeout` / `connect_timeout`) or the built-in one
   (the `p2c` algorithm, hashing on the client address).

`health_path` comes from the config file or service meta only, `max_concurrent` and `max_body` from the
config file only; active checks reach the instances the way the service's first route does (`proto=`,
`tlsskipverify=`). Pure: values in, a frozen ServicePolicy out.
"""

from __future__ import annotations

from dataclasses import dataclass

from discovery.model import ServiceRoutes, ServiceSettings

from .balancer import DEFAULT_BALANCER


@dataclass(frozen=True, slots=True)
class ServicePolicy:
    """What one service's pool follows."""

    algorithm: str = DEFAULT_BALANCER
    # What the `hash` algorithm hashes: ("ip", ""), ("header", name) or ("cookie", name); None otherwise.
    hash_on: tuple[str, str] | None = None
    sticky: str | None = None  # name of the session cookie pinning a client to an instance
    max_concurrent: int = 0  # requests in progress beyond which the proxy answers 503 (0: no limit)
    max_body: int = 0  # request body limit in bytes (0: the global one)
    health_path: str | None = None  # checked by Ferryman itself; None: no active checks
    check_scheme: str = "http"  # how active checks reach the instances: as the service's routes do
    check_skip_verify: bool = False
    read_timeout: float = 0.0  # seconds an upstream may stay silent (0: the global read_timeout)
    connect_timeout: float = 0.0  # seconds to connect to an instance (0: the global connect_timeout)


@dataclass(frozen=True, slots=True)
class ServiceDefaults:
    """The global settings a service falls back to when no source sets its own."""

    max_concurrent: int = 0  # service_max_concurrent


def service_policy(
    service: ServiceRoutes, override: ServiceSettings | None, defaults: ServiceDefaults
) -> ServicePolicy:
    """The policy of `service`: `override` (its `[services.NAME]` table) over its service meta over its route
    tags over `defaults`, setting by setting."""
    from_tags = ServiceSettings()
    for spec in service.routes:
        options = spec.options
        from_tags = from_tags.over(ServiceSettings(
            lb=options.lb, hash_on=options.hash_on, sticky=options.sticky, read_timeout=options.read_timeout,
            connect_timeout=options.connect_timeout,
        ))
    declared = (override or ServiceSettings()).over(service.settings)
    balancing = declared.over(from_tags)
    algorithm = balancing.lb or DEFAULT_BALANCER
    first = service.routes[0].options if service.routes else None
    return ServicePolicy(
        algorithm=algorithm,
        hash_on=(balancing.hash_on or ("ip", "")) if algorithm == "hash" else None,
        sticky=balancing.sticky,
        max_concurrent=override.max_concurrent if override and override.max_concurrent is not None
        else defaults.max_concurrent,
        max_body=(override.max_body or 0) if override else 0,
        health_path=declared.health_path,
        check_scheme="https" if first and first.proto == "https" else "http",  # a TCP service: plain HTTP checks
        check_skip_verify=bool(first and first.tls_skip_verify),
        read_timeout=balancing.read_timeout or 0.0,
        connect_timeout=balancing.connect_timeout or 0.0,
    )
