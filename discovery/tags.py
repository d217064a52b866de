"""Route tags in Fabio's syntax, so services move from Fabio to Ferryman untouched.

    urlprefix-/api                       any host, path prefix /api
    urlprefix-api.example.com/           one host, every path
    urlprefix-*.example.com/v1 strip=/v1 wildcard host, prefix stripped before forwarding

The part after the prefix is `[host[:port]]/path`, then options separated by blanks, each `key=value`.
Options are kept in the RouteSpec in tag order; the ones Ferryman knows are validated here so a typo is
reported at the tag rather than misbehaving at request time. Parsing is pure: a string in, a RouteSpec out,
or TagError saying what is wrong.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final

from .matchers import parse_conditions, parse_methods
from .model import RouteSpec

DEFAULT_PREFIX: Final = "urlprefix-"

# Options understood by the proxy. Others are kept and reported as ignored (Fabio has options Ferryman does
# not implement, such as auth=; silently routing without them would surprise, so they are surfaced).
KNOWN_OPTIONS: Final = frozenset({
    "strip", "proto", "tlsskipverify", "lb", "hash_key", "sticky", "maxbody", "sni",
    "method", "header", "cookie", "query", "exact", "priority", "redirect", "prepend", "host",
})
REDIRECT_CODES: Final = (301, 302, 303, 307, 308)
# RFC 6265 cookie-name: an RFC 9110 token.
_COOKIE_NAME_RE: Final = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# Load-balancing algorithms a route may ask for with lb= (implemented in proxy.balancer, which checks that
# both lists agree); hash_key= says what `hash` hashes: the client address, a header or a cookie.
LB_CHOICES: Final = ("round_robin", "weighted", "least_conn", "p2c", "random", "hash")

# RFC 1123 labels (underscore allowed: it appears in real service host names), optionally "*." in front.
_LABEL: Final = r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?"
_HOST_RE: Final = re.compile(rf"^(\*\.)?{_LABEL}(\.{_LABEL})*$")
_PATH_RE: Final = re.compile(r"^/[^\s?#]*$")
_OPTION_KEY_RE: Final = re.compile(r"^[a-z][a-z0-9_]*$")


class TagError(ValueError):
    """A route tag that cannot be used; the message says why."""


def is_route_tag(tag: str, prefix: str = DEFAULT_PREFIX) -> bool:
    return tag.startswith(prefix)


def parse_route_tag(tag: str, prefix: str = DEFAULT_PREFIX) -> RouteSpec:
    """Parse one `urlprefix-` tag into a RouteSpec; raise TagError for a malformed one."""
    if not tag.startswith(prefix):
        raise TagError(f"not a route tag (does not start with {prefix!r})")
    words = tag[len(prefix) :].split()
    if not words:
        raise TagError("empty route: expected [host]/path after the prefix")
    target, option_words = words[0], words[1:]

    slash = target.find("/")
    if slash < 0:
        if target.startswith(":"):
            raise TagError("TCP routes (urlprefix-:port) are not supported; declare an HTTP path")
        raise TagError(f"route {target!r} has no path: write {target}/ for every path of the host")
    host, path = _parse_host(target[:slash]), target[slash:]
    if not _PATH_RE.match(path):
        raise TagError(f"invalid path {path!r}: no blanks, '?' or '#' allowed")
    if "/../" in path + "/" or "/./" in path + "/":
        raise TagError(f"invalid path {path!r}: dot-segments are not allowed in a route")
    path = normalize_prefix(path)

    options: list[tuple[str, str]] = []
    seen: set[str] = set()
    for word in option_words:
        key, eq, value = word.partition("=")
        if not eq or not key:
            raise TagError(f"option {word!r} is not key=value")
        if not _OPTION_KEY_RE.match(key):
            raise TagError(f"option name {key!r} is invalid")
        if key in seen:
            raise TagError(f"option {key!r} is given twice")
        seen.add(key)
        options.append((key, _validate_option(key, value, path)))
    return RouteSpec(host=host, path=path, options=tuple(options))


def normalize_prefix(path: str) -> str:
    """`/api/` and `/api` are the same segment-boundary prefix; `/` stays `/`."""
    stripped = path.rstrip("/")
    return stripped or "/"


def unknown_options(spec: RouteSpec) -> list[str]:
    return [key for key, _ in spec.options if key not in KNOWN_OPTIONS]


def _parse_host(raw: str) -> str:
    if not raw:
        return ""
    host = raw.lower()
    name, colon, port = host.rpartition(":") if ":" in host else (host, "", "")
    if colon:
        if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
            raise TagError(f"invalid port in host {raw!r}")
        host = name
    if not _HOST_RE.match(host):
        raise TagError(f"invalid host {raw!r}")
    return host


BALANCING_OPTIONS: Final = ("lb", "hash_key", "sticky", "health_path")
# What a config file's [services.NAME] table may set: balancing, and the service's limits.
SERVICE_OPTIONS: Final = (*BALANCING_OPTIONS, "max_body_size", "max_concurrent")
_SIZE_RE: Final = re.compile(r"^(\d{1,15})\s*([kmg]?)i?b?$", re.IGNORECASE)
_SIZE_UNITS: Final = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_size(text: str) -> int:
    """`1048576`, `512k`, `10m`, `1g` (binary units, an optional `b`/`ib`) -> bytes; TagError otherwise."""
    match = _SIZE_RE.match(text.strip())
    if not match:
        raise TagError(f"{text!r} is not a size such as 1048576, 512k, 10m or 1g")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


def _as_tag_error(check: Callable[[], object]) -> None:
    try:
        check()
    except ValueError as exc:
        raise TagError(str(exc)) from exc


def validate_balancing(key: str, value: str) -> str:
    """Check one per-service setting (lb, hash_key, sticky, health_path, max_body_size, max_concurrent)
    wherever it comes from: a tag option, service meta or the config file; TagError saying what is wrong."""
    if key not in SERVICE_OPTIONS:
        raise TagError(f"unknown service setting {key!r}: one of {', '.join(SERVICE_OPTIONS)}")
    return _validate_option(key, value, "/")


def _validate_option(key: str, value: str, path: str) -> str:
    if key == "strip":
        if not value.startswith("/"):
            raise TagError(f"strip={value!r} must start with '/'")
        value = normalize_prefix(value)
        if value == "/":
            raise TagError("strip=/ strips nothing")
        if not (path == value or path.startswith(value + "/")):
            raise TagError(f"strip={value!r} is not a prefix of the route path {path!r}")
    elif key == "proto":
        if value == "tcp" or value == "grpc" or value == "grpcs":
            raise TagError(f"proto={value} is not supported; Ferryman proxies HTTP")
        if value not in ("http", "https"):
            raise TagError(f"proto={value!r} must be http or https")
    elif key == "tlsskipverify" and value not in ("true", "false"):
        raise TagError(f"tlsskipverify={value!r} must be true or false")
    elif key == "lb" and value not in LB_CHOICES:
        raise TagError(f"lb={value!r} must be one of {', '.join(LB_CHOICES)}")
    elif key == "hash_key" and not (
        value == "ip" or (value.partition(":")[0] in ("header", "cookie") and value.partition(":")[2])
    ):
        raise TagError(f"hash_key={value!r} must be ip, header:NAME or cookie:NAME")
    elif key == "sticky" and not _COOKIE_NAME_RE.match(value):
        raise TagError(f"sticky={value!r} must be a cookie name")
    elif key == "health_path" and not _PATH_RE.match(value.partition("?")[0]):
        raise TagError(f"health_path={value!r} must be a path starting with '/'")
    elif key == "sni" and (value.startswith("*") or not _HOST_RE.match(value.lower())):
        raise TagError(f"sni={value!r} must be a host name")
    elif key == "method":
        _as_tag_error(lambda: parse_methods(value))
    elif key in ("header", "cookie", "query"):
        _as_tag_error(lambda: parse_conditions(key, value))
    elif key == "redirect":
        code, comma, url = value.partition(",")
        if not comma or not code.isascii() or not code.isdigit() or int(code) not in REDIRECT_CODES:
            codes = ", ".join(map(str, REDIRECT_CODES))
            raise TagError(f"redirect={value!r} must be CODE,URL with CODE one of {codes}")
        if not (url.startswith(("http://", "https://", "/")) and len(url) > 1):
            raise TagError(f"redirect={value!r}: the target must be an http(s) URL or a path")
    elif key == "prepend" and not (_PATH_RE.match(value) and "/../" not in value + "/" and "/./" not in value + "/"):
        raise TagError(f"prepend={value!r} must be a path starting with '/'")
    elif key == "host":
        _parse_host(value)  # a host name, with a port if it needs one: the Host the upstream gets
        if not value or value.startswith("*"):
            raise TagError(f"host={value!r} must be a host name")
    elif key == "exact" and value not in ("true", "false"):
        raise TagError(f"exact={value!r} must be true or false")
    elif key == "priority" and not (value.lstrip("-").isascii() and value.lstrip("-").isdigit()
                                    and -1000 <= int(value) <= 1000):
        raise TagError(f"priority={value!r} must be a whole number from -1000 to 1000")
    elif key in ("maxbody", "max_body_size"):
        parse_size(value)
    elif key == "max_concurrent" and not (value.isascii() and value.isdigit() and 0 <= int(value) <= 10_000_000):
        raise TagError(f"max_concurrent={value!r} must be a whole number (0: no limit)")
    return value
