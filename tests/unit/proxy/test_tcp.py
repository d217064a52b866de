"""TCP and TLS pass-through, the pure parts: the ClientHello reader, the TCP route index, the PROXY headers."""

from __future__ import annotations

import ssl
import struct

import pytest

from discovery.model import Endpoint, RouteOptions, RouteSpec, ServiceRoutes, Snapshot, SnapshotDelta
from proxy.proxyproto import V2_SIGNATURE, encode_v1, encode_v2
from proxy.table import RoutingTable
from proxy.tcp.routes import RouteCache, TcpListening, TcpRoutes
from proxy.tcp.sni import MAX_HELLO, Hello, NotHello, read_hello


def _vector(data: bytes, size: int) -> bytes:
    return len(data).to_bytes(size, "big") + data


def sni_extension(name: bytes, name_type: int = 0) -> bytes:
    entry = bytes([name_type]) + _vector(name, 2)
    return struct.pack("!H", 0) + _vector(_vector(entry, 2), 2)


def client_hello(extensions: bytes | None, record_size: int = 2**14) -> bytes:
    """A ClientHello carrying `extensions` (None: no extensions block at all), in records of `record_size`."""
    body = b"\x03\x03" + bytes(32) + _vector(b"", 1) + _vector(b"\x13\x01", 2) + _vector(b"\x00", 1)
    if extensions is not None:
        body += _vector(extensions, 2)
    handshake = b"\x01" + _vector(body, 3)
    records = b""
    for at in range(0, len(handshake), record_size):
        records += b"\x16\x03\x01" + _vector(handshake[at:at + record_size], 2)
    return records


def real_hello(name: str | None) -> bytes:
    """The ClientHello Python's own TLS client sends (OpenSSL's), asking for `name`."""
    context = ssl.create_default_context()
    context.check_hostname = False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


ALPN = struct.pack("!H", 16) + _vector(_vector(_vector(b"h2", 1), 2), 2)


class TestReadHello:
    """read_hello: None while incomplete, the server name once complete, NotHello for anything else."""

    @pytest.mark.parametrize(
        ("data", "name"),
        [
            (client_hello(sni_extension(b"db.example.com")), "db.example.com"),
            (client_hello(sni_extension(b"DB.Example.COM.")), "db.example.com"),
            (client_hello(ALPN + sni_extension(b"after.alpn.test")), "after.alpn.test"),
            (client_hello(ALPN), ""),
            (client_hello(None), ""),
            (client_hello(sni_extension(b"x", name_type=1)), ""),
            (client_hello(sni_extension(b"split.example.com"), record_size=7), "split.example.com"),
            (real_hello("real.example.com"), "real.example.com"),
            (real_hello(None), ""),
        ],
        ids=["plain", "lower-cased-no-trailing-dot", "after-another-extension", "no-sni", "no-extensions",
             "other-name-type", "spread-over-records", "openssl-client", "openssl-without-sni"],
    )
    def test_server_name(self, data: bytes, name: str) -> None:
        """A complete ClientHello gives its server name ("" when it names none), and its size."""
        assert read_hello(data) == Hello(name, len(data))

    @pytest.mark.parametrize("data", [client_hello(sni_extension(b"a.example.com")), real_hello("b.example.com")],
                             ids=["built", "openssl"])
    def test_every_prefix_is_incomplete(self, data: bytes) -> None:
        """Every proper prefix (one byte at a time) asks for more; bytes after it do not matter."""
        assert all(read_hello(data[:end]) is None for end in range(len(data)))
        assert read_hello(data + b"\x17\x03\x03") is not None

    @pytest.mark.parametrize(
        ("data", "reason"),
        [
            (b"G", "not a TLS handshake record"),
            (b"GET / HTTP/1.1\r\n\r\n", "not a TLS handshake record"),
            (b"\x16\x07", "not a TLS record version"),
            (b"\x16\x03\x01\x00\x00", "a TLS record of 0 bytes"),
            (b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00", "not a ClientHello"),
            (b"\x16\x03\x01\x00\x09\x01\x00\x00\x05\x03\x03\x00\x00\x00", "truncated ClientHello"),
            (client_hello(sni_extension(b"bad name!")), "not a host name"),
            (client_hello(sni_extension("é.example".encode())), "not ASCII"),
            (client_hello(sni_extension(b"x" * 300)), "not a host name"),
            (b"\x16\x03\x01\x3e\x80\x01\x00\x9c\x40" + bytes(15_996), f"larger than {MAX_HELLO}"),
            (client_hello(ALPN * 2000), f"larger than {MAX_HELLO}"),
        ],
        ids=["one-plain-byte", "http", "bad-version", "empty-record", "server-hello", "truncated", "bad-name",
             "non-ascii-name", "name-too-long", "oversized-handshake", "oversized-records"],
    )
    def test_refused(self, data: bytes, reason: str) -> None:
        """Anything but a routable ClientHello is refused, saying why, as soon as the bytes show it."""
        with pytest.raises(NotHello, match=reason):
            read_hello(data)


def tcp_service(name: str, target: str, port: int = 0) -> ServiceRoutes:
    host = "" if target.startswith(":") else target
    return ServiceRoutes(name, (RouteSpec(host, "", RouteOptions(proto="tcp"), port),),
                         (Endpoint(name, f"{name}-0", "127.0.0.1", 7000),))


WORLD = Snapshot((
    tcp_service("redis", ":6379", 6379),
    tcp_service("exact", "db.example.com"),
    tcp_service("wild", "*.example.com"),
    tcp_service("deep", "*.eu.example.com"),
    ServiceRoutes("web", (RouteSpec("db.example.com", "/"),), (Endpoint("web", "web-0", "127.0.0.1", 7001),)),
))


class TestTcpRoutes:
    """TCP routes by listener port and by server name; HTTP requests never match them."""

    @pytest.mark.parametrize(
        ("name", "service"),
        [("db.example.com", "exact"), ("a.example.com", "wild"), ("a.b.example.com", "wild"),
         ("x.eu.example.com", "deep"), ("example.com", None), ("other.test", None)],
        ids=["exact-first", "wildcard", "wildcard-deeper-name", "longest-suffix", "suffix-itself", "unknown"],
    )
    def test_by_name(self, name: str, service: str | None) -> None:
        """Exact, then `*.` wildcards from the longest suffix down."""
        route = TcpRoutes.of(RoutingTable.from_snapshot(WORLD)).for_name(name)
        assert (route.service if route else None) == service

    def test_by_port(self) -> None:
        """`:6379` is the route of the TCP listener on port 6379, and of no other."""
        routes = TcpRoutes.of(RoutingTable.from_snapshot(WORLD))
        route = routes.for_port(6379)
        assert route is not None and route.service == "redis" and route.id == "redis@*any*:6379"
        assert routes.for_port(6380) is None

    def test_listed_but_never_matched_by_http(self) -> None:
        """The table lists TCP routes (/api/routes) while HTTP lookups find only the HTTP route."""
        table = RoutingTable.from_snapshot(WORLD)
        assert {r.scheme for r in table.routes} == {"tcp", "http"}
        found = table.lookup("db.example.com", "/")
        assert found is not None and found.service == "web"
        assert table.lookup("a.example.com", "/") is None

    def test_incremental_update_keeps_tcp_routes_out_of_http_slots(self) -> None:
        """A delta adding a TCP service updates the index (listed) without an HTTP slot."""
        table = RoutingTable.from_snapshot(WORLD, 1)
        before = WORLD
        delta = SnapshotDelta((tcp_service("pg", ":5432", 5432),))
        updated = table.updated(before, delta, 2)
        assert TcpRoutes.of(updated).for_port(5432) is not None
        assert updated.lookup("anything", "/") is None

    def test_cache_rebuilds_once_per_table(self) -> None:
        """The cache answers from the same index until the table is replaced."""
        cache = RouteCache()
        table = RoutingTable.from_snapshot(WORLD)
        first = cache.of(table)
        assert cache.of(table) is first
        assert cache.of(RoutingTable.from_snapshot(WORLD)) is not first


class TestTcpListening:
    """Which TCP routes no configured listener takes, and why; HTTP routes never count."""

    @pytest.mark.parametrize(
        ("listening", "expected"),
        [
            (TcpListening(frozenset({6379}), names=True), {}),
            (TcpListening(frozenset(), names=True),
             {"redis@*any*:6379": "no TCP listener on port 6379 (tcp_listen)"}),
            (TcpListening(frozenset({6379}), names=False),
             {f"{s}@{h}": "no listener routes by server name (sni_listen, tls_passthrough)"
              for s, h in (("exact", "db.example.com"), ("wild", "*.example.com"), ("deep", "*.eu.example.com"))}),
        ],
        ids=["all-taken", "port-without-listener", "names-without-sni-listener"],
    )
    def test_unlistened(self, listening: TcpListening, expected: dict[str, str]) -> None:
        assert listening.unlistened(RoutingTable.from_snapshot(WORLD)) == expected


class TestProxyHeaders:
    """PROXY protocol headers (HAProxy's spec): version 1 text, version 2 binary."""

    @pytest.mark.parametrize(
        ("client", "server", "line"),
        [
            (("10.1.2.3", 51000), ("10.0.0.1", 6379), b"PROXY TCP4 10.1.2.3 10.0.0.1 51000 6379\r\n"),
            (("2001:db8::1", 4000), ("2001:db8::2", 443), b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 443\r\n"),
            (("::ffff:10.1.2.3", 5), ("10.0.0.1", 6), b"PROXY TCP4 10.1.2.3 10.0.0.1 5 6\r\n"),
            (("10.1.2.3", 5), ("2001:db8::2", 6), b"PROXY TCP6 ::ffff:a01:203 2001:db8::2 5 6\r\n"),
        ],
        ids=["ipv4", "ipv6", "ipv4-mapped", "mixed-families"],
    )
    def test_v1(self, client: tuple[str, int], server: tuple[str, int], line: bytes) -> None:
        """One text line: family, source and destination addresses, then ports."""
        assert encode_v1(client, server) == line

    @pytest.mark.parametrize(
        ("client", "server", "family", "addresses"),
        [
            (("10.1.2.3", 51000), ("10.0.0.1", 6379), 0x11,
             bytes([10, 1, 2, 3, 10, 0, 0, 1]) + struct.pack("!HH", 51000, 6379)),
            (("::1", 1), ("::2", 2), 0x21, bytes(15) + b"\x01" + bytes(15) + b"\x02" + struct.pack("!HH", 1, 2)),
        ],
        ids=["ipv4", "ipv6"],
    )
    def test_v2(self, client: tuple[str, int], server: tuple[str, int], family: int, addresses: bytes) -> None:
        """Signature, version 2 PROXY command, TCP over the family, the address block's length, the block."""
        header = encode_v2(client, server)
        assert header == V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(addresses)) + addresses
