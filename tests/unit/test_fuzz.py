"""Property tests: the pure parsers and builders on inputs nobody wrote by hand.

Each parser either gives a value that keeps its documented invariants or raises the one error type it
documents: TagError for route tags, ConfigError (naming where the bad value came from) for settings, a Problem
in the snapshot (never an exception) for what Consul returns. The header builders never raise and always write a
head the next hop parses (read back with llhttp, as the proxy itself reads) with no hop-by-hop field left in it.

Strategies mix free text with fragments of the real syntax, so most examples get past the first check. Inputs
that once broke a property are pinned with @example, so the test keeps failing until the code is fixed.
Bounded: at most a few hundred examples per property, no deadline (a slow CI machine is not a bug).
"""

from __future__ import annotations

import string
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httptools
from hypothesis import example, given, settings
from hypothesis import strategies as st

from discovery.model import Problem, RouteOptions, RouteSpec, ServiceSettings, Snapshot
from discovery.snapshot import build_snapshot
from discovery.tags import (
    _HOST_RE,
    _PATH_RE,
    DEFAULT_PREFIX,
    TagError,
    parse_route_tag,
    with_service_setting,
)
from proxy.config import DEFAULTS, KEYS, ConfigError, Settings, env_name, flag_name, load, load_file, value_of
from proxy.config_table import BY_NAME
from proxy.headers import client_response_head, upstream_request_head

# No example database: an input that broke a property is pinned below with @example instead, for every run.
FUZZ = settings(max_examples=300, deadline=None, database=None)


# --- route tags -----------------------------------------------------------------------------------------------

TAG_FRAGMENTS = st.sampled_from([
    "urlprefix-", "/", "//", "/api", "/v1/", "/a/b", "/.well-known", "/..", "/./", "api.example.com", "*.example.com",
    "*.", "API.Example.COM", "svc_a", "-x", "x-", ":", ":8080", ":0", ":65535", ":65536", ":99999", ":²", ":٣",
    ":+1", ": 1", " ", "  ", "\t", "\n", "\u00a0", "\u2028", "\x1c", "=", "==", "strip=", "strip=/api", "strip=/",
    "strip=api", "lb=", "lb=hash", "lb=round_robin", "lb=p2c", "hash_key=", "hash_key=ip", "hash_key=header:X-A",
    "hash_key=cookie:", "hash_key=cookie:sid", "sticky=", "sticky=sid", "sticky=a b", "proto=", "proto=https",
    "proto=tcp", "tlsskipverify=true", "tlsskipverify=1", "health_path=/h", "auth=basic", "Key=v", "k-=v", "?", "#",
    "é", "İ", "\u212a", "ß", "ﬀ", "_", "-", "0", "a", "urlprefix-/",
])
TAG_TEXT = st.lists(st.one_of(TAG_FRAGMENTS, st.text(max_size=4)), max_size=12).map("".join)
OPTION = st.builds(
    lambda key, value: f"{key}={value}",
    st.sampled_from(["strip", "proto", "tlsskipverify", "lb", "hash_key", "sticky", "health_path", "auth", "x",
                     "maxbody", "sni", "method", "header", "cookie", "query", "exact", "priority", "redirect",
                     "prepend", "host"]),
    st.one_of(TAG_FRAGMENTS, st.text(max_size=6), st.sampled_from([
        "GET|post", "X-A", "X-A:1", "X-A~^v", "a;b:2", "10k", "0", "-5", "1001", "true", "301,/x", "308,https://a/$path",
        "Api.Internal", "/v2/", "b.example.com:81",
    ])),
)
# Shaped like a tag: prefix, host, port, path, options; each part well formed or not.
SHAPED_TAG = st.builds(
    lambda host, port, path, options: DEFAULT_PREFIX + host + port + path + "".join(" " + o for o in options),
    st.one_of(st.sampled_from(["", "api.example.com", "*.example.com", "Svc_A.internal", "a..b", "-a", "é.com"]),
              st.text(max_size=6)),
    st.one_of(st.just(""), st.sampled_from([":", ":80", ":0", ":65536", ":²", ":٣", ":-1"]),
              st.text(max_size=3).map(lambda t: ":" + t)),
    st.one_of(st.sampled_from(["/", "/api", "/api/", "/api/v1", "//", "/a/../b", "/a?b", "/é"]),
              st.text(max_size=6).map(lambda t: "/" + t)),
    st.lists(st.one_of(TAG_FRAGMENTS, OPTION), max_size=3),
)
TAGS = st.one_of(SHAPED_TAG, TAG_TEXT, TAG_TEXT.map(lambda rest: DEFAULT_PREFIX + rest), st.text())


# Per-service settings, from a tag option, service meta or a [services.NAME] table.
SERVICE_SETTINGS = ["lb", "hash_key", "sticky", "health_path", "max_body_size", "max_concurrent", "maxbody"]


def parse_or_tag_error(tag: str, prefix: str = DEFAULT_PREFIX) -> RouteSpec | None:
    """The RouteSpec, or None for a TagError; any other exception escapes and fails the property."""
    try:
        return parse_route_tag(tag, prefix)
    except TagError:
        return None


def render(spec: RouteSpec, prefix: str = DEFAULT_PREFIX) -> str:
    """A canonical tag for a RouteSpec (the module has no renderer of its own): options at their default left
    out, the others written back in tag syntax."""
    host = spec.host + (f":{spec.port}" if spec.port else "") if spec.host else (f"*:{spec.port}" if spec.port else "")
    return prefix + host + spec.path + "".join(f" {key}={value}" for key, value in option_words(spec.options))


def option_words(o: RouteOptions) -> list[tuple[str, str]]:
    words = [("strip", o.strip), ("proto", o.proto if o.proto != "http" else None),
             ("tlsskipverify", "true" if o.tls_skip_verify else None), ("lb", o.lb),
             ("hash_key", (o.hash_on[0] + (":" + o.hash_on[1] if o.hash_on[1] else "")) if o.hash_on else None),
             ("sticky", o.sticky), ("maxbody", str(o.max_body) if o.max_body else None), ("sni", o.sni),
             ("method", "|".join(sorted(o.methods)) or None), ("exact", "true" if o.exact else None),
             ("priority", str(o.priority) if o.priority else None),
             ("redirect", f"{o.redirect[0]},{o.redirect[1]}" if o.redirect else None), ("prepend", o.prepend),
             ("host", o.host), ("weight", repr(o.weight) if o.weight else None),
             (o.access[0], ",".join(f"ip:{n}" for n in o.access[1])) if o.access else ("allow", None)]
    for kind in ("header", "cookie", "query"):
        words.append((kind, ";".join(c.text() for c in o.conditions if c.kind == kind) or None))
    return [(key, value) for key, value in words if value is not None]


class TestRouteTags:
    @FUZZ
    @given(TAGS)
    @example("urlprefix-api.example.com:²/")  # str.isdigit() is true for '²', int('²') raises ValueError
    @example("urlprefix-host:\u00b9\u00b2/ strip=/")
    def test_a_tag_parses_to_a_valid_spec_or_raises_TagError(self, tag: str) -> None:
        spec = parse_or_tag_error(tag)
        if spec is None:
            return
        assert spec.host == "" or _HOST_RE.match(spec.host), spec
        assert spec.host == spec.host.lower()
        assert _PATH_RE.match(spec.path), spec
        assert spec.path == "/" or not spec.path.endswith("/"), spec
        keys = [key for key, _ in option_words(spec.options)]
        assert len(keys) == len(set(keys)), spec

    @FUZZ
    @given(TAGS)
    @example("urlprefix-:²/")
    def test_a_parsed_spec_reparses_from_its_canonical_rendering_to_itself(self, tag: str) -> None:
        spec = parse_or_tag_error(tag)
        if spec is None:
            return
        assert parse_route_tag(render(spec)) == spec

    @FUZZ
    @given(st.text(alphabet=st.characters(blacklist_categories=("Cs", "Zs", "Cc")), min_size=1, max_size=12), TAGS)
    @example("0", "urlprefix-:²/")
    def test_any_prefix_parses_or_raises_TagError(self, prefix: str, rest: str) -> None:
        spec = parse_or_tag_error(prefix + rest, prefix)
        if spec is not None:
            assert parse_route_tag(render(spec, prefix), prefix) == spec

    @FUZZ
    @given(st.one_of(st.sampled_from(SERVICE_SETTINGS), st.text(max_size=12)),
           st.one_of(st.sampled_from(["²", "٣", "10", "-1", "10m", "512 KiB", "1g", "hash"]), TAG_TEXT))
    @example("max_concurrent", "²")  # str.isdigit() is true for '²', int('²') raises ValueError
    def test_service_settings_validate_or_raise_TagError(self, key: str, value: str) -> None:
        try:
            assert isinstance(with_service_setting(ServiceSettings(), key, value), ServiceSettings)
        except TagError:
            pass


# --- configuration --------------------------------------------------------------------------------------------

CONFIG_KEYS = st.one_of(st.sampled_from([*BY_NAME, "services", "unknown_key"]), st.text(max_size=8))
TOML_VALUES = st.one_of(
    st.sampled_from([
        "1", "0", "-1", "1.5", "30", "3600", "99999", "1e400", "inf", "-inf", "nan", "true", "false", '"x"', "''",
        '"127.0.0.1:8080"', '":0"', '"[::1]:80"', '"http://127.0.0.1:8500"', '"ftp://x"', '"host:²"', '"json"',
        '"round_robin"', '"hash"', '"ip"', '"cookie:sid"', "[]", "[1, 2]", "{}", '{ lb = "p2c" }', "1979-05-27",
        "1979-05-27T07:32:00Z", "0x1F", "1_000", "9" * 400, "-" + "9" * 400, '"""multi\nline"""', '"²"', '"10m"',
        '"512k"', "10000001",
    ]),
    st.integers().map(str),
    st.floats().map(repr),
    st.text(max_size=10).map(repr),
)
TOML_LINES = st.one_of(
    st.builds(lambda k, v: f"{k} = {v}", CONFIG_KEYS, TOML_VALUES),
    st.builds(lambda name: f"[services.{name}]", st.sampled_from(["api", '"a b"', "x.y", "", "é"])),
    st.builds(lambda k, v: f"{k} = {v}", st.sampled_from([*SERVICE_SETTINGS, "weight"]), TOML_VALUES),
    st.sampled_from(["[services]", "[listen]", "[[services]]", "services = 1", "services.api = 1", "# comment", "",
                     "= 1", "key =", "[", "]"]),
    st.text(max_size=20),
)
TOML_TEXT = st.lists(TOML_LINES, max_size=8).map("\n".join)


def write_config(directory: str, data: str | bytes) -> Path:
    path = Path(directory) / "ferryman.toml"
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8", errors="surrogatepass")
    else:
        path.write_bytes(data)
    return path


def check_file_outcome(path: Path) -> None:
    """load_file gives known keys parsed to the types Settings holds, or a ConfigError that names the file."""
    try:
        values = load_file(path)
    except ConfigError as exc:
        assert str(path) in str(exc), f"the error does not name the file: {exc}"
        return
    for key, value in values.items():
        if key in ("services", "routes"):
            assert isinstance(value, tuple)
        else:
            assert isinstance(value, type(value_of(DEFAULTS, BY_NAME[key]))), (key, value)


class TestConfigFile:
    @FUZZ
    @given(TOML_TEXT)
    @example("read_timeout = " + "9" * 400)  # an integer too large for a float: OverflowError, not ConfigError
    @example("[services.api]\nmax_concurrent = \"²\"")  # ValueError from int('²'), not ConfigError
    def test_any_toml_ish_text_loads_or_raises_ConfigError_naming_the_file(self, text: str) -> None:
        with tempfile.TemporaryDirectory() as directory:
            path = write_config(directory, text)
            check_file_outcome(path)
            try:
                assert isinstance(load(config_file=str(path), environ={}, flags={}), Settings)
            except ConfigError as exc:
                assert str(path) in str(exc), f"the error does not name the file: {exc}"

    @FUZZ
    @given(st.one_of(st.binary(max_size=40), TOML_TEXT.map(lambda text: text.encode("latin-1", "replace"))))
    @example(b"# caf\xe9\n")  # a config saved as Latin-1: UnicodeDecodeError, not ConfigError
    def test_any_bytes_load_or_raise_ConfigError_naming_the_file(self, data: bytes) -> None:
        with tempfile.TemporaryDirectory() as directory:
            check_file_outcome(write_config(directory, data))


ENV_VALUES = st.one_of(
    st.sampled_from([
        "1", "0", "-1", "1.5", "1e400", "-1e400", "inf", "nan", "NaN", "true", "yes", "off", "maybe", "", " ",
        "127.0.0.1:8080", ":0", "[::1]:80", "host:²", "host:٣", "http://127.0.0.1:8500", "https://[::1]", "ftp://x",
        "http://x/path", "http://[x", "json", "console", "debug", "common", "²", "٣", "1_000", "0x10", "9" * 5000,
    ]),
    st.text(max_size=12),
)


def names_its_source(message: str, environ: Mapping[str, str], flags: Mapping[str, str | None]) -> bool:
    return any(f"environment variable {name}" in message for name in environ if name.startswith("FERRYMAN_")) or any(
        f"flag {flag_name(key)}" in message for key, text in flags.items() if text is not None
    )


class TestConfigEnvironmentAndFlags:
    @FUZZ
    @given(
        st.dictionaries(
            st.one_of(st.sampled_from([env_name(key.name) for key in KEYS]), st.text(max_size=8).map(
                lambda text: "FERRYMAN_" + text), st.sampled_from(["PATH", "HOME", "ferryman_listen"])),
            ENV_VALUES, max_size=4,
        ),
        st.dictionaries(st.sampled_from(sorted(BY_NAME)), st.one_of(st.none(), ENV_VALUES), max_size=4),
    )
    @example({"FERRYMAN_CONSUL_WAIT": "600"}, {})  # breaks a rule between keys: named at the variable
    def test_load_gives_settings_or_a_ConfigError_naming_the_variable_or_flag(
        self, environ: dict[str, str], flags: dict[str, str | None]
    ) -> None:
        try:
            got = load(config_file=None, environ=environ, flags=flags)
        except ConfigError as exc:
            assert names_its_source(str(exc), environ, flags), f"names no variable or flag given: {exc}"
            return
        for key in KEYS:
            default = value_of(DEFAULTS, key)
            if default is None:  # an optional setting, off by default (gzip_content_type): a pattern when set
                continue
            assert isinstance(value_of(got, key), type(default)), key.name


# --- header rules ---------------------------------------------------------------------------------------------

HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade"}
THIS_HOP = {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-port", b"x-real-ip",
            b"forwarded", b"x-request-id"}
NEVER_NAMED = {b"content-length", b"host"}

NAMES = [
    b"Connection", b"connection", b"CONNECTION", b"Keep-Alive", b"Proxy-Connection", b"TE", b"Trailer",
    b"Transfer-Encoding", b"Upgrade", b"Host", b"host", b"X-Forwarded-For", b"x-forwarded-for", b"X-Forwarded-Proto",
    b"X-Forwarded-Host", b"X-Forwarded-Port", b"X-Real-IP", b"Forwarded", b"X-Request-ID", b"Expect", b"Set-Cookie",
    b"Cookie", b"X-A", b"x-a", b"X-B", b"Close", b"Content-Type", b"Content-Length",
]
TOKEN = st.text(alphabet="!#$%&'*+-.^_`|~" + string.ascii_letters + string.digits, min_size=1, max_size=10).map(
    str.encode
)
# What llhttp lets through in a field value: HTAB, SP, VCHAR, obs-text; it strips leading blanks itself.
VALUE_BYTES = [9, *range(0x20, 0x7F), *range(0x80, 0x100)]
FREE_VALUE = st.lists(st.sampled_from(VALUE_BYTES), max_size=16).map(bytes)
CONNECTION_TOKENS = st.sampled_from([n.lower() for n in NAMES] + [b"close", b"keep-alive", b"Keep-Alive"])
CONNECTION_VALUE = st.lists(
    st.one_of(CONNECTION_TOKENS, TOKEN, FREE_VALUE),
    max_size=4,
).flatmap(lambda tokens: st.sampled_from([b",", b", ", b" ,\t", b",,"]).map(lambda sep: sep.join(tokens)))
VALUE = st.one_of(FREE_VALUE, CONNECTION_VALUE, st.sampled_from([b"", b"close", b"keep-alive", b"chunked", b","]))
RAW_HEADERS = st.lists(st.tuples(st.one_of(st.sampled_from(NAMES), TOKEN), VALUE.map(lambda v: v.lstrip(b" \t"))),
                       max_size=12)
CLIENT_IP = st.sampled_from([b"192.0.2.7", b"127.0.0.1", b"::1", b"2001:db8::1"])


def as_parsed(headers: list[tuple[bytes, bytes]], content_length: bytes | None) -> list[tuple[bytes, bytes]]:
    """Headers as the proxy's parser hands them over: at most one Host, at most one Content-Length (digits)."""
    out: list[tuple[bytes, bytes]] = []
    host_seen = False
    for name, value in headers:
        lower = name.lower()
        if lower == b"content-length":
            continue
        if lower == b"host":
            if host_seen:
                continue
            host_seen = True
        out.append((name, value))
    if content_length is not None:
        out.append((b"Content-Length", content_length))
    return out


class Head:
    """A message head read back by llhttp."""

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.complete = True

    def values(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n.lower() == name]


def read_back(raw: bytes, *, response: bool) -> tuple[Head, Any]:
    head = Head()
    parser = httptools.HttpResponseParser(head) if response else httptools.HttpRequestParser(head)
    try:
        parser.feed_data(raw)
    except httptools.HttpParserError as exc:
        # A 101 ends HTTP on the connection: llhttp stops right after the head, and says so with an error.
        upgraded = isinstance(parser, httptools.HttpResponseParser) and parser.get_status_code() == 101
        if not (upgraded and "Upgrade" in str(exc)):
            raise
    assert head.complete, f"llhttp did not see the end of the head: {raw!r}"
    return head, parser


def named_in_connection(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    names: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            names |= {token.strip().lower() for token in value.split(b",")}
    # `close` is a connection option, not a field name (RFC 9110 §7.6.1; the field name Close is reserved).
    return names - {b"", b"close"}


def end_to_end(headers: list[tuple[bytes, bytes]], dropped: set[bytes]) -> list[tuple[bytes, bytes]]:
    named = named_in_connection(headers) - NEVER_NAMED
    return [(n, v) for n, v in headers if n.lower() not in dropped and n.lower() not in named]


class TestUpstreamRequestHead:
    @FUZZ
    @given(RAW_HEADERS, st.one_of(st.none(), st.integers(0, 10**12).map(lambda n: b"%d" % n)), st.booleans(),
           CLIENT_IP, st.sampled_from([b"", b"0123456789abcdef0123456789abcdef", b"req-1"]))
    def test_head_parses_and_keeps_only_end_to_end_fields(
        self, raw_headers: list[tuple[bytes, bytes]], content_length: bytes | None, chunked: bool,
        client_ip: bytes, request_id: bytes,
    ) -> None:
        if chunked:
            content_length = None  # the parser refuses Content-Length with Transfer-Encoding
        headers = as_parsed(raw_headers, content_length)

        raw = upstream_request_head(
            b"POST", b"/a/b?c=d", headers, client_ip=client_ip, proto=b"http", port=b"8080",
            default_host=b"10.0.0.5:8080", chunked=chunked, request_id=request_id,
        )
        head, parser = read_back(raw, response=False)

        assert (parser.get_method(), head.url, parser.get_http_version()) == (b"POST", b"/a/b?c=d", "1.1")
        names = {n.lower() for n, _ in head.headers}
        assert not names & (HOP_BY_HOP - {b"transfer-encoding"}), head.headers
        assert head.values(b"transfer-encoding") == ([b"chunked"] if chunked else [])
        assert not names & {b"expect"}
        assert head.values(b"content-length") == ([content_length] if content_length is not None else [])
        hosts = [v for n, v in headers if n.lower() == b"host"]
        assert head.values(b"host") == (hosts or [b"10.0.0.5:8080"])
        forwarded_for = head.values(b"x-forwarded-for")
        assert len(forwarded_for) == 1, head.headers
        assert forwarded_for[0].split(b",")[-1].strip() == client_ip
        for name in (b"x-forwarded-proto", b"x-forwarded-port", b"x-real-ip", b"forwarded"):
            assert len(head.values(name)) == 1, (name, head.headers)
        assert head.values(b"x-request-id") == ([request_id] if request_id else [])
        # Everything else passes untouched, in order.
        proxy_written = THIS_HOP | NEVER_NAMED | HOP_BY_HOP
        assert [(n, v) for n, v in head.headers if n.lower() not in proxy_written] == end_to_end(
            headers, HOP_BY_HOP | THIS_HOP | NEVER_NAMED | {b"expect"}
        )


class TestClientResponseHead:
    @FUZZ
    @given(RAW_HEADERS, st.one_of(st.none(), st.integers(0, 10**12).map(lambda n: b"%d" % n)),
           st.integers(100, 599), st.binary(max_size=20).map(lambda r: r.replace(b"\r", b"").replace(b"\n", b"")),
           st.booleans(), st.booleans(), st.booleans(), st.sampled_from([b"", b"0123456789abcdef0123456789abcdef"]))
    def test_head_parses_and_keeps_only_end_to_end_fields(
        self, raw_headers: list[tuple[bytes, bytes]], content_length: bytes | None, status: int, reason: bytes,
        chunked: bool, keep_alive: bool, http10: bool, request_id: bytes,
    ) -> None:
        bodiless = status < 200 or status in (204, 304)
        # As the server calls it: chunked only to an HTTP/1.1 client, for a response with a body and no length.
        chunked = chunked and not http10 and not bodiless and content_length is None
        headers = as_parsed(raw_headers, content_length)

        raw = client_response_head(status, reason, headers, chunked=chunked, keep_alive=keep_alive, http10=http10,
                                   request_id=request_id)
        head, parser = read_back(raw, response=True)

        assert parser.get_status_code() == status
        assert parser.get_http_version() == ("1.0" if http10 else "1.1")
        names = {n.lower() for n, _ in head.headers}
        assert not names & (HOP_BY_HOP - {b"transfer-encoding", b"connection"}), head.headers
        assert head.values(b"transfer-encoding") == ([b"chunked"] if chunked else [])
        assert head.values(b"connection") == (
            [b"close"] if not keep_alive else [b"keep-alive"] if http10 else []
        ), head.headers
        assert head.values(b"content-length") == ([content_length] if content_length is not None else [])
        if request_id:
            assert head.values(b"x-request-id") == [request_id]
        dropped = HOP_BY_HOP | ({b"x-request-id"} if request_id else set())
        kept = [(n, v) for n, v in head.headers if n.lower() not in dropped]
        assert kept == end_to_end(headers, dropped)


# --- snapshots from Consul's JSON -----------------------------------------------------------------------------

PROBLEM_KINDS = {"route_tag_invalid", "instance_invalid", "service_meta_invalid"}
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
SERVICE_NAMES = st.sampled_from(["api", "web", "db", "consul", "é", ""])
ADDRESSES = st.one_of(st.sampled_from(["", "10.0.0.5", "127.0.0.1", "::1", "[::1]", "[]", "node.example", None]),
                      st.text(max_size=8))
PORTS: st.SearchStrategy[Any] = st.one_of(
    st.sampled_from([0, 1, 80, 8080, 65535, 65536, -1, True, "8080", None, 8080.0]), st.integers())
META_VALUES = st.one_of(
    st.sampled_from(["1", "5", "0", "10000", "10001", "-1", "abc", "²", "٣", "1.5", "", "least_conn", "hash", "ip",
                     "cookie:sid", "header:", "sid", "/health", "bad path"]),
    st.text(max_size=8),
)
META = st.one_of(st.none(), st.dictionaries(
    st.sampled_from(["ferryman-weight", "ferryman-lb", "ferryman-hash-key", "ferryman-sticky", "ferryman-health-path",
                     "other"]), META_VALUES, max_size=4))
CHECK = st.one_of(
    st.fixed_dictionaries({"CheckID": st.sampled_from(["serfHealth", "service:x", "_node_maintenance"]),
                           "Status": st.sampled_from(["passing", "passing", "warning", "critical", "", None])}),
    JSON,
)
SERVICE = st.fixed_dictionaries({}, optional={
    "ID": st.one_of(st.sampled_from(["api-1", "api-2", ""]), JSON), "Address": ADDRESSES, "Port": PORTS,
    "Weights": st.one_of(st.fixed_dictionaries({"Passing": PORTS, "Warning": PORTS}), JSON), "Meta": META,
    "Tags": st.lists(TAG_TEXT, max_size=2),
})
NODE = st.fixed_dictionaries({}, optional={"Node": st.one_of(st.text(max_size=6), JSON), "Address": ADDRESSES})
PASSING_ENTRY = st.fixed_dictionaries({
    "Node": st.fixed_dictionaries({"Node": st.sampled_from(["n1", "n2"]), "Address": st.just("10.0.0.1")}),
    "Service": st.fixed_dictionaries({"ID": st.sampled_from(["api-1", "api-2"]), "Address": ADDRESSES,
                                      "Port": st.sampled_from([80, 8080]), "Meta": META}, optional={
        "Weights": st.one_of(st.fixed_dictionaries({"Passing": PORTS, "Warning": PORTS}), JSON)}),
    "Checks": st.just([{"CheckID": "serfHealth", "Status": "passing"}]),
})
ENTRY = st.fixed_dictionaries({}, optional={
    "Node": st.one_of(NODE, JSON), "Service": st.one_of(SERVICE, JSON),
    "Checks": st.one_of(st.none(), st.lists(CHECK, max_size=3)),
})
ROUTE_TAGS = st.one_of(SHAPED_TAG, TAG_TEXT.map(lambda rest: DEFAULT_PREFIX + rest), TAG_TEXT,
                       st.sampled_from(["urlprefix-/", "urlprefix-/api strip=/api", "urlprefix-/x lb=nope"]))
# As Consul answers: /v1/catalog/services maps names to tag lists (or null); /v1/health/service is a list.
CATALOG = st.dictionaries(SERVICE_NAMES, st.one_of(st.none(), st.lists(st.one_of(ROUTE_TAGS, JSON), max_size=4)),
                          max_size=4)
HEALTH = st.dictionaries(SERVICE_NAMES, st.lists(st.one_of(PASSING_ENTRY, ENTRY, JSON), max_size=4), max_size=4)


def entry(meta: Mapping[str, str] | None = None, address: str = "10.0.0.5") -> dict[str, Any]:
    return {"Node": {"Node": "n1", "Address": "10.0.0.1"}, "Checks": [],
            "Service": {"ID": "api-1", "Address": address, "Port": 8080, "Meta": meta}}


def check_snapshot(snapshot: Snapshot, catalog: Mapping[str, Any], health: Mapping[str, Any]) -> None:
    assert [s.name for s in snapshot.services] == sorted(s.name for s in snapshot.services)
    for service in snapshot.services:
        assert service.name in catalog and service.name in health
        assert service.routes
        for endpoint in service.endpoints:
            assert 0 < endpoint.port < 65536 and not isinstance(endpoint.port, bool)
            assert endpoint.weight >= 1
    for problem in snapshot.problems:
        assert isinstance(problem, Problem)
        assert problem.kind in PROBLEM_KINDS, problem
        assert problem.service in catalog, problem


class TestBuildSnapshot:
    @FUZZ
    @given(CATALOG, HEALTH)
    @example({"api": ["urlprefix-/"]}, {"api": [entry({"ferryman-weight": "²"})]})  # isdigit() but not int()
    @example({"api": ["urlprefix-api.example.com:²/"]}, {"api": []})  # a tag's port: ValueError, not TagError
    def test_consul_shaped_json_builds_a_snapshot_with_only_documented_problems(
        self, catalog: dict[str, Any], health: dict[str, Any]
    ) -> None:
        check_snapshot(build_snapshot(catalog, health), catalog, health)

    @FUZZ
    @given(st.dictionaries(SERVICE_NAMES, st.one_of(st.lists(ROUTE_TAGS, max_size=2), JSON), max_size=3),
           st.dictionaries(SERVICE_NAMES, st.lists(
               st.one_of(ENTRY, st.fixed_dictionaries({"Checks": JSON, "Service": SERVICE, "Node": NODE})),
               max_size=3), max_size=3))
    @example({"api": 1}, {"api": []})  # a catalog value that is not a list of tags
    @example({"api": ["urlprefix-/"]}, {"api": [{**entry(), "Checks": 1}]})  # Checks that is not a list
    @example({"api": ["urlprefix-/"]}, {"api": [entry(address="[]")]})  # brackets around nothing
    def test_any_json_in_place_of_tag_lists_and_checks_builds_a_snapshot(
        self, catalog: dict[str, Any], health: dict[str, Any]
    ) -> None:
        snapshot = build_snapshot(catalog, health)
        check_snapshot(snapshot, catalog, health)
        for service in snapshot.services:
            for endpoint in service.endpoints:
                assert endpoint.address, f"an endpoint with no address: {endpoint}"
