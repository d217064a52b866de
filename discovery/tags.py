"""Route tags in Fabio's syntax, so services move from Fabio to Ferryman untouched.

    urlprefix-/api                       any host, path prefix /api
    urlprefix-api.example.com/           one host, every path
    urlprefix-*.example.com/v1 strip=/v1 wildcard host, prefix stripped before forwarding

The part after the prefix is `[host[:port]]/path`, then options separated by blanks, each `key=value`; blanks
around the whole tag are trimmed, as Fabio does. A port in the host (`host:80/`, `*:80/`) restricts the route to
requests that arrived on that listener port, which is how Fabio users write an HTTP-to-HTTPS redirect.
As in Fabio, `$DC` (or `${DC}`) in the host and path is the declaring instance's datacenter; any other name is
refused (Fabio would put "" there). The path matches as a prefix, a case-insensitive prefix or a glob
(discovery.globs): the tag's `matcher=`, else the global `path_matcher` the caller passes.
Options are parsed here, once, into the RouteSpec's typed RouteOptions (one branch per option in
`_route_option`), so a typo is reported at the tag rather than misbehaving at request time and nothing
downstream reads option text again. An option Ferryman does not implement makes the whole tag invalid: a
Fabio tag either means the same here or is refused loudly, never a route that quietly behaves otherwise.
A TCP route (`proto=tcp`, Fabio's syntax) has no path: `urlprefix-:6379 proto=tcp` takes every connection to the
TCP listener on port 6379, `urlprefix-db.example.com/ proto=tcp` the TLS connections whose ClientHello names
db.example.com on an SNI listener; it takes only the options that mean something to a byte stream
(TCP_OPTIONS), `pxyproto=v1|v2` among them.
Per-service settings (`lb`, `hash_key`, `sticky`, `health_path`, `max_body_size`, `max_concurrent`,
`read_timeout`, `connect_timeout`)
from service meta or a config file's `[services.NAME]` table are parsed by `with_service_setting` into a
ServiceSettings, with the same checks as the tag options of the same name. Parsing is pure: a string in, a
value out, or TagError saying what is wrong.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, Final, TypeVar

from .globs import GlobError, compile_glob
from .matchers import KINDS, parse_conditions, parse_methods
from .model import RouteOptions, RouteSpec, ServiceSettings

DEFAULT_PREFIX: Final = "urlprefix-"

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
_GLOB_PATH_RE: Final = re.compile(r"^/[^\s#]*$")  # '?' is the glob's one character
_OPTION_KEY_RE: Final = re.compile(r"^[a-z][a-z0-9_]*$")
# An auth= realm name, as a config file's [auth.NAME] table may be named.
REALM_NAME_RE: Final = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class TagError(ValueError):
    """A route tag that cannot be used; the message says why."""


# Fabio route options Ferryman does not implement, with what to use instead: the tag is refused with this.
NOT_IMPLEMENTED: Final = {
    "register": "Ferryman does not register itself in Consul; register the host name's service yourself",
}


def is_route_tag(tag: str, prefix: str = DEFAULT_PREFIX) -> bool:
    """Whether a tag declares routes; blanks around it do not count (Fabio trims them)."""
    return tag.strip().startswith(prefix)


def parse_route_tag(
    tag: str, prefix: str = DEFAULT_PREFIX, *, matcher: str = "prefix", env: Mapping[str, str] | None = None,
) -> RouteSpec:
    """Parse one `urlprefix-` tag into a RouteSpec; raise TagError for a malformed one. `matcher`: the global
    `path_matcher`, for routes without `matcher=`; `env`: the variables of the instance declaring the route
    (`{"DC": "dc1"}`), None where there is no instance (the config file, Consul KV, the static file)."""
    tag = tag.strip()
    if not tag.startswith(prefix):
        raise TagError(f"not a route tag (does not start with {prefix!r})")
    words = tag[len(prefix) :].split()
    if not words:
        raise TagError("empty route: expected [host]/path after the prefix")
    target, option_words = words[0], words[1:]
    if "proto=tcp" in option_words:
        return _tcp_route(expand_variables(target, env), option_words)

    slash = target.find("/")
    if slash < 0:
        if target.startswith(":"):
            raise TagError(f"route {target!r}: a TCP route needs proto=tcp (urlprefix-{target} proto=tcp)")
        raise TagError(f"route {target!r} has no path: write {target}/ for every path of the host")
    # As Fabio: host and path are expanded apart ($DC, ${DC}), then the host is lower-cased.
    raw_host, path = expand_variables(target[:slash], env), expand_variables(target[slash:], env)
    host, port = _host_port(raw_host)
    matcher = _matcher(option_words, matcher)
    if not (_GLOB_PATH_RE if matcher == "glob" else _PATH_RE).match(path):
        raise TagError(f"invalid path {path!r}: no blanks, '?' or '#' allowed" if matcher != "glob"
                       else f"invalid path {path!r}: no blanks or '#' allowed")
    if "/../" in path + "/" or "/./" in path + "/":
        raise TagError(f"invalid path {path!r}: dot-segments are not allowed in a route")
    if matcher == "glob":
        try:
            compile_glob(path)
        except GlobError as exc:
            said = "matcher=glob" if any(w.startswith("matcher=") for w in option_words) else "path_matcher = glob"
            raise TagError(f"path {path!r} is not a glob ({said}): {exc}") from exc
    else:  # a glob is matched whole, so its trailing '/' means something; a prefix's does not
        path = normalize_prefix(path)

    found = _typed_options(option_words, path)
    found["matcher"] = matcher
    if "proxy_protocol" in found:
        raise TagError("option pxyproto= is not supported here: the PROXY header is for TCP routes (proto=tcp)")
    return RouteSpec(host=host, path=path, options=_options(found), port=port)


# Options a TCP route may carry; the others shape HTTP requests and mean nothing to a byte stream.
TCP_OPTIONS: Final = ("proto", "lb", "hash_key", "connect_timeout", "allow", "deny", "weight", "pxyproto")


def _tcp_route(target: str, option_words: list[str]) -> RouteSpec:
    """`:PORT` (every connection to the TCP listener on PORT) or `HOST/` (TLS connections whose ClientHello
    names HOST, `*.suffix` for any name under suffix, on an SNI listener), with TCP_OPTIONS only."""
    if target.startswith(":"):
        host, port = _host_port("*" + target)
        if not port:
            raise TagError(f"TCP route {target!r}: write :PORT, the port of a TCP listener")
    else:
        if not target.endswith("/") or target.count("/") != 1:
            raise TagError(f"TCP route {target!r}: write :PORT (a TCP listener) or HOST/ (by TLS server name); "
                           "a byte stream has no path")
        host, port = _host_port(target[:-1])
        if not host or port:
            raise TagError(f"TCP route {target!r}: write :PORT (a TCP listener) or HOST/ (by TLS server name)")
    for word in option_words:
        key = word.partition("=")[0]
        if key not in TCP_OPTIONS and _OPTION_KEY_RE.match(key):
            raise TagError(f"option {key}= has no meaning on a TCP route (proto=tcp); it takes "
                           f"{', '.join(o + '=' for o in TCP_OPTIONS)}")
    found = _typed_options(option_words, "")
    if found.get("hash_on", ("ip", "")) != ("ip", ""):
        raise TagError("hash_key= on a TCP route can only be ip: a byte stream has no header or cookie")
    return RouteSpec(host=host, path="", options=_options(found), port=port)


def _typed_options(option_words: list[str], path: str) -> dict[str, Any]:
    """RouteOptions field (or condition kind) -> typed value, for one tag's options."""
    found: dict[str, Any] = {}
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
        typed = _route_option(key, value, path)
        if typed[0] == "access" and "access" in found:
            # Fabio refuses both on one route too: which one wins would be a guess.
            raise TagError("allow= and deny= on the same route: use one of them")
        found[typed[0]] = typed[1]
    return found


MATCHERS: Final = ("prefix", "glob", "iprefix")  # Fabio's proxy.matcher values


def _matcher(option_words: list[str], default: str) -> str:
    """The route's path matcher: its `matcher=` option (Ferryman's; Fabio has only the global proxy.matcher),
    else the global `path_matcher`. An `exact=true` route matches its path exactly whatever the global one."""
    chosen = next((w.partition("=")[2] for w in option_words if w.startswith("matcher=")), None)
    exact = "exact=true" in option_words
    if chosen is None:
        return "prefix" if exact else default
    if chosen not in MATCHERS:
        raise TagError(f"matcher={chosen!r} must be one of {', '.join(MATCHERS)}")
    if exact and chosen != "prefix":
        raise TagError(f"exact=true and matcher={chosen} on one route: use one of them")
    return chosen


# Fabio expands these in a route's host and path (os.Expand over an env of the instance's datacenter); a name
# it does not know becomes "" there, which would route somewhere else: here it refuses the tag, naming it.
VARIABLES: Final = ("DC",)
_SPECIAL_VARS: Final = frozenset("*#$@!?-0123456789")


def expand_variables(text: str, env: Mapping[str, str] | None) -> str:
    """`$NAME` and `${NAME}` replaced by `env[NAME]`, with Go's os.Expand syntax (what Fabio uses): a `$` not
    followed by a name stays as it is. TagError for a name `env` lacks and for `${` without its `}`."""
    if "$" not in text:
        return text
    out: list[str] = []
    i = 0
    while (j := text.find("$", i)) >= 0 and j + 1 < len(text):
        out.append(text[i:j])
        rest = text[j + 1 :]
        if rest[0] == "{":
            close = rest.find("}")
            if close <= 1:
                raise TagError(f"{text!r}: '${{' without a name and its '}}'")
            name, width = rest[1:close], close + 1
        elif rest[0] in _SPECIAL_VARS:
            name, width = rest[0], 1
        else:
            width = 0
            while width < len(rest) and (rest[width] == "_" or (rest[width].isascii() and rest[width].isalnum())):
                width += 1
            name = rest[:width]
        if not name:
            out.append("$")  # `$/`: no name, kept (Go's os.Expand keeps it too)
        elif env is not None and name in env:
            out.append(env[name])
        elif name in VARIABLES:
            raise TagError(f"${name} in {text!r}: the value is known only for routes of instances read from "
                           "Consul (service tags and meta)")
        else:
            raise TagError(f"${name} in {text!r} is not a variable Fabio expands (known: "
                           f"{', '.join('$' + v for v in VARIABLES)})")
        i = j + 1 + width
    out.append(text[i:])
    return "".join(out)


def normalize_prefix(path: str) -> str:
    """`/api/` and `/api` are the same segment-boundary prefix; `/` stays `/`."""
    stripped = path.rstrip("/")
    return stripped or "/"


def _host_port(raw: str) -> tuple[str, int]:
    """`Shop.example.com:80` -> ("shop.example.com", 80); `*` (any host, Fabio's glob for every name) -> "";
    no port: 0."""
    if not raw:
        return "", 0
    host = raw.lower()
    name, colon, port = host.rpartition(":") if ":" in host else (host, "", "")
    number = 0
    if colon:
        if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
            raise TagError(f"invalid port in host {raw!r}")
        host, number = name, int(port)
    if host == "*":
        return "", number
    if not _HOST_RE.match(host):
        raise TagError(f"invalid host {raw!r}")
    return host, number


def _parse_host(raw: str) -> str:
    return _host_port(raw)[0]


def _access(key: str, value: str) -> tuple[str, tuple[str, ...]]:
    """Fabio's `allow=ip:10.0.0.0/8,ip:fe80::/10`: networks as CIDR text, a bare address meaning /32 or /128.
    The `ip:` kind may be left out (Fabio's own documentation does so); it is the only kind there is."""
    networks: list[str] = []
    for item in value.split(","):
        item = item.strip()
        address = item[3:] if item[:3].lower() == "ip:" else item
        try:
            networks.append(str(ipaddress.ip_network(address.strip(), strict=False)))
        except ValueError as exc:
            raise TagError(f"{key}={value!r}: {item!r} is not ip:ADDRESS or ip:CIDR (the only kind of item)") from exc
    return key, tuple(networks)


# What service meta and a config file's [services.NAME] table may set.
SERVICE_OPTIONS: Final = (
    "lb", "hash_key", "sticky", "health_path", "max_body_size", "max_concurrent", "read_timeout", "connect_timeout",
)
# Per-service timeouts, in seconds: above zero, at most a day (a long poll held five minutes needs 300 and more).
_MAX_TIMEOUT_S: Final = 86_400.0
_SIZE_RE: Final = re.compile(r"^(\d{1,15})\s*([kmg]?)i?b?$", re.IGNORECASE)
_SIZE_UNITS: Final = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_T = TypeVar("_T")


def parse_size(text: str) -> int:
    """`1048576`, `512k`, `10m`, `1g` (binary units, an optional `b`/`ib`) -> bytes; TagError otherwise."""
    match = _SIZE_RE.match(text.strip())
    if not match:
        raise TagError(f"{text!r} is not a size such as 1048576, 512k, 10m or 1g")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


def _as_tag_error(parse: Callable[[], _T]) -> _T:
    try:
        return parse()
    except ValueError as exc:
        raise TagError(str(exc)) from exc


def with_service_setting(settings: ServiceSettings, key: str, value: str) -> ServiceSettings:
    """`settings` with one more per-service setting (lb, hash_key, sticky, health_path, max_body_size,
    max_concurrent, read_timeout, connect_timeout) parsed, wherever it comes from: service meta or the config
    file; TagError saying what is wrong. The tag options of the same names are checked by the same functions."""
    if key == "lb":
        return replace(settings, lb=_lb(value))
    if key == "hash_key":
        return replace(settings, hash_on=_hash_on(value))
    if key == "sticky":
        return replace(settings, sticky=_sticky(value))
    if key == "health_path":
        if not _PATH_RE.match(value.partition("?")[0]):
            raise TagError(f"health_path={value!r} must be a path starting with '/'")
        return replace(settings, health_path=value)
    if key == "max_body_size":
        return replace(settings, max_body=parse_size(value))
    if key == "max_concurrent":
        if not (value.isascii() and value.isdigit() and 0 <= int(value) <= 10_000_000):
            raise TagError(f"max_concurrent={value!r} must be a whole number (0: no limit)")
        return replace(settings, max_concurrent=int(value))
    if key == "read_timeout":
        return replace(settings, read_timeout=_seconds(key, value))
    if key == "connect_timeout":
        return replace(settings, connect_timeout=_seconds(key, value))
    raise TagError(f"unknown service setting {key!r}: one of {', '.join(SERVICE_OPTIONS)}")


def _seconds(key: str, value: str) -> float:
    """A timeout in seconds (`360`, `2.5`): above zero and at most a day."""
    try:
        seconds = float(value) if value.strip() == value and value.isascii() else math.nan
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= _MAX_TIMEOUT_S:  # NaN and inf fail here too
        raise TagError(f"{key}={value!r} must be a number of seconds above 0 and at most {_MAX_TIMEOUT_S:g}")
    return seconds


def _lb(value: str) -> str:
    if value not in LB_CHOICES:
        raise TagError(f"lb={value!r} must be one of {', '.join(LB_CHOICES)}")
    return value


def _hash_on(value: str) -> tuple[str, str]:
    """`ip`, `header:NAME` (header names are case-insensitive: lower-cased) or `cookie:NAME`."""
    kind, _, name = value.partition(":")
    if not (value == "ip" or (kind in ("header", "cookie") and name)):
        raise TagError(f"hash_key={value!r} must be ip, header:NAME or cookie:NAME")
    return kind, name.lower() if kind == "header" else name


def _sticky(value: str) -> str:
    if not _COOKIE_NAME_RE.match(value):
        raise TagError(f"sticky={value!r} must be a cookie name")
    return value


def _options(found: dict[str, Any]) -> RouteOptions:
    """RouteOptions from one tag's typed options; the conditions of every kind in one tuple, in KINDS order."""
    fields = {name: value for name, value in found.items() if name not in KINDS}
    conditions = tuple(c for kind in KINDS for c in found.get(kind, ()))
    if not conditions and fields.keys() <= {"matcher"}:
        # One value for every tag without options (most tags): memory, and one object in a worker's pickle.
        matcher = fields.get("matcher", "prefix")
        plain = _PLAIN_OPTIONS.get(matcher)
        if plain is None:
            plain = _PLAIN_OPTIONS[matcher] = RouteOptions(matcher=matcher)
        return plain
    return RouteOptions(**fields, conditions=conditions)


_PLAIN_OPTIONS: dict[str, RouteOptions] = {}  # by matcher (three at most)


def _weight(value: str) -> float:
    """Fabio's route weight: a share of the route's traffic, 0.25 for 25%; 0 means no fixed share."""
    try:
        weight = float(value)
    except ValueError:
        weight = math.nan
    if not (0 <= weight <= 1):  # also NaN
        raise TagError(f"weight={value!r} must be a share from 0 to 1 (0.25 for 25%)")
    return weight


def _route_option(key: str, value: str, path: str) -> tuple[str, Any]:
    """One tag option: (the RouteOptions field it sets, its typed value), a condition kind for header=, cookie=
    and query=; TagError for an option Ferryman does not implement, naming it."""
    if key == "strip":
        if not value.startswith("/"):
            raise TagError(f"strip={value!r} must start with '/'")
        value = normalize_prefix(value)
        if value == "/":
            raise TagError("strip=/ strips nothing")
        if not (path == value or path.startswith(value + "/")):
            raise TagError(f"strip={value!r} is not a prefix of the route path {path!r}")
        return "strip", value
    if key == "proto":
        # grpc: HTTP/2 without TLS (h2c) to the instances; grpcs: HTTP/2 over TLS (ALPN h2), as Fabio's.
        if value not in ("http", "https", "grpc", "grpcs", "tcp"):
            raise TagError(f"proto={value!r} must be http, https, grpc, grpcs or tcp")
        return "proto", value
    if key == "pxyproto":
        # Fabio's pxyproto=true sends version 1, the text form.
        versions = {"v1": 1, "true": 1, "v2": 2, "false": 0}
        if value not in versions:
            raise TagError(f"pxyproto={value!r} must be v1 or v2 (true: v1)")
        return "proxy_protocol", versions[value]
    if key in ("tlsskipverify", "exact"):
        if value not in ("true", "false"):
            raise TagError(f"{key}={value!r} must be true or false")
        return "tls_skip_verify" if key == "tlsskipverify" else "exact", value == "true"
    if key == "lb":
        return "lb", _lb(value)
    if key == "hash_key":
        return "hash_on", _hash_on(value)
    if key == "sticky":
        return "sticky", _sticky(value)
    if key == "sni":
        if value.startswith("*") or not _HOST_RE.match(value.lower()):
            raise TagError(f"sni={value!r} must be a host name")
        return "sni", value
    if key == "method":
        return "methods", _as_tag_error(lambda: parse_methods(value))
    if key in KINDS:  # header, cookie, query
        return key, _as_tag_error(lambda: parse_conditions(key, value))
    if key == "redirect":
        code, comma, url = value.partition(",")
        if not comma or not code.isascii() or not code.isdigit() or int(code) not in REDIRECT_CODES:
            codes = ", ".join(map(str, REDIRECT_CODES))
            raise TagError(f"redirect={value!r} must be CODE,URL with CODE one of {codes}")
        if not (url.startswith(("http://", "https://", "/")) and len(url) > 1):
            raise TagError(f"redirect={value!r}: the target must be an http(s) URL or a path")
        return "redirect", (int(code), url)
    if key == "prepend":
        if not (_PATH_RE.match(value) and "/../" not in value + "/" and "/./" not in value + "/"):
            raise TagError(f"prepend={value!r} must be a path starting with '/'")
        return "prepend", value
    if key == "host":
        if value == "dst":  # Fabio's word for "the instance's address"
            return "host", value
        if not value or value.startswith("*"):
            raise TagError(f"host={value!r} must be a host name")
        _parse_host(value)  # a host name, with a port if it needs one: the Host the upstream gets
        return "host", value
    if key in ("allow", "deny"):
        return "access", _access(key, value)
    if key == "weight":
        return "weight", _weight(value)
    if key == "matcher":  # chosen (and checked) by _matcher before the path is read
        return "matcher", value
    if key == "auth":  # Fabio's basic authentication: a realm of the config file's [auth.NAME] tables
        if not REALM_NAME_RE.match(value):
            raise TagError(f"auth={value!r} must name a realm: letters, digits, '_', '.' or '-'")
        return "auth", value
    if key == "priority":
        digits = value[1:] if value.startswith("-") else value
        if not (digits.isascii() and digits.isdigit() and -1000 <= int(value) <= 1000):
            raise TagError(f"priority={value!r} must be a whole number from -1000 to 1000")
        return "priority", int(value)
    if key == "maxbody":
        return "max_body", parse_size(value)
    if key in ("read_timeout", "connect_timeout"):
        return key, _seconds(key, value)
    if key == "gzip":
        if value not in ("on", "off", "true", "false"):
            raise TagError(f"gzip={value!r} must be on or off")
        return "gzip", value in ("on", "true")
    if key in SERVICE_OPTIONS:  # health_path=, max_body_size=, max_concurrent= are not route options
        raise TagError(f"option {key}= is a service setting, not a route option: set it in service meta "
                       f"(ferryman-{key.replace('_', '-')}) or a [services.NAME] table")
    hint = NOT_IMPLEMENTED.get(key, "Ferryman does not implement it")
    raise TagError(f"option {key}= is not supported: {hint}")
