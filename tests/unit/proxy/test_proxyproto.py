"""PROXY protocol headers: bytes in, the client they name (or "more bytes", or why they are refused) out; and
headers written for instances, read back."""

from __future__ import annotations

import pytest

from proxy.proxyproto import (
    ENCODED_V1_UNKNOWN,
    ENCODED_V2_LOCAL,
    MAX_V2_LENGTH,
    V1_MAX,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyProtocolError,
    encode_v1,
    encode_v2,
    parse,
)


def v2(command: int, family: int, body: bytes) -> bytes:
    return V2_SIGNATURE + bytes((command, family)) + len(body).to_bytes(2, "big") + body


V4_BODY = bytes([192, 0, 2, 1, 198, 51, 100, 7]) + (51000).to_bytes(2, "big") + (443).to_bytes(2, "big")
V6_BODY = (bytes.fromhex("20010db8000000000000000000000001") + bytes.fromhex("20010db8000000000000000000000002")
           + (1234).to_bytes(2, "big") + (80).to_bytes(2, "big"))
TLVS = b"\x04\x00\x03abc" + b"\x20\x00\x05\x01\x00\x00\x00\x00"  # a NOOP and an SSL TLV: skipped

COMPLETE = [
    (b"PROXY TCP4 192.0.2.1 198.51.100.7 51000 443\r\n",
     ProxyHeader(45, 1, ("192.0.2.1", 51000), ("198.51.100.7", 443)), "v1-tcp4"),
    (b"PROXY TCP6 2001:db8::1 2001:db8::2 1234 80\r\nGET / HTTP/1.1\r\n",
     ProxyHeader(44, 1, ("2001:db8::1", 1234), ("2001:db8::2", 80)), "v1-tcp6-then-request"),
    (b"PROXY UNKNOWN\r\n", ProxyHeader(15, 1, None), "v1-unknown"),
    (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", ProxyHeader(35, 1, None), "v1-unknown-with-addresses"),
    (b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
     ProxyHeader(104, 1, ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
                 ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535)), "v1-longest-addresses"),
    (v2(0x21, 0x11, V4_BODY), ProxyHeader(28, 2, ("192.0.2.1", 51000), ("198.51.100.7", 443)), "v2-tcp4"),
    (v2(0x21, 0x21, V6_BODY) + b"\x16\x03\x01", ProxyHeader(52, 2, ("2001:db8::1", 1234), ("2001:db8::2", 80)),
     "v2-tcp6-then-tls"),
    (v2(0x21, 0x11, V4_BODY + TLVS), ProxyHeader(28 + len(TLVS), 2, ("192.0.2.1", 51000), ("198.51.100.7", 443)),
     "v2-tlvs-skipped"),
    (v2(0x20, 0x00, b""), ProxyHeader(16, 2, None, local=True), "v2-local"),
    (v2(0x20, 0x11, V4_BODY), ProxyHeader(28, 2, None, local=True), "v2-local-with-addresses"),
    (v2(0x21, 0x00, b""), ProxyHeader(16, 2, None), "v2-unspec"),
    (v2(0x21, 0x12, V4_BODY), ProxyHeader(28, 2, None), "v2-udp4"),
    (v2(0x21, 0x31, bytes(216)), ProxyHeader(232, 2, None), "v2-unix"),
    (b"PROXY TCP6 ::ffff:192.0.2.1 ::1 1 2\r\n", ProxyHeader(37, 1, ("192.0.2.1", 1), ("::1", 2)),
     "v1-ipv4-mapped-read-as-ipv4"),
]


@pytest.mark.parametrize(("data", "expected"), [(d, e) for d, e, _ in COMPLETE], ids=[i for *_, i in COMPLETE])
def test_complete_header(data: bytes, expected: ProxyHeader) -> None:
    """A whole header gives the client it names and how many bytes it took."""
    assert parse(data) == expected


@pytest.mark.parametrize(("data", "expected"), [(d, e) for d, e, _ in COMPLETE], ids=[i for *_, i in COMPLETE])
def test_every_prefix_asks_for_more(data: bytes, expected: ProxyHeader) -> None:
    """Any cut before the end of the header (a truncated one) is neither accepted nor refused: more is needed."""
    for cut in range(expected.length):
        assert parse(data[:cut]) is None, cut


REFUSED = [
    (b"GET / HTTP/1.1\r\n", "not a PROXY protocol header", "http-request"),
    (b"\x16\x03\x01\x02\x00", "not a PROXY protocol header", "tls-hello"),
    (b"PROXY TCP4 192.0.2.1 198.51.100.7 51000 443\n", "not ended by CRLF", "v1-bare-lf"),
    (b"PROXY TCP4 " + b"1" * 100, f"longer than {V1_MAX} bytes", "v1-oversized-no-end"),
    (b"PROXY UNKNOWN " + b"x" * 100 + b"\r\n", f"longer than {V1_MAX} bytes", "v1-oversized-with-end"),
    (b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n", "is not PROXY TCP4|TCP6", "v1-bad-family"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 1\r\n", "is not PROXY TCP4|TCP6", "v1-missing-port"),
    (b"PROXY TCP4  1.2.3.4 1.2.3.4 1 2\r\n", "is not PROXY TCP4|TCP6", "v1-double-blank"),
    (b"PROXY TCP4 2001:db8::1 1.2.3.4 1 2\r\n", "is not an IPv4 address", "v1-v6-in-tcp4"),
    (b"PROXY TCP4 1.2.3.999 1.2.3.4 1 2\r\n", "is not an IP address", "v1-bad-address"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 65536 2\r\n", "is not a port", "v1-port-too-big"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 -1 2\r\n", "is not a port", "v1-negative-port"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 01 2\r\n", "is not a port", "v1-leading-zero"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 \xd9\xa1 2\r\n", "is not a port", "v1-non-ascii-digit"),
    (b"\r\n\r\n\x00\r\nQUIX\n", "not a PROXY protocol header", "v2-bad-signature"),
    (v2(0x11, 0x11, V4_BODY), "version/command", "v2-version-1"),
    (v2(0x22, 0x11, V4_BODY), "version/command", "v2-unknown-command"),
    (V2_SIGNATURE + b"\x21\x11" + (MAX_V2_LENGTH + 1).to_bytes(2, "big"), "more than", "v2-oversized"),
    (v2(0x21, 0x11, V4_BODY[:8]), "cannot hold its addresses", "v2-short-addresses"),
    (v2(0x21, 0x41, V4_BODY), "address family", "v2-unknown-family"),
]


@pytest.mark.parametrize(("data", "message"), [(d, m) for d, m, _ in REFUSED], ids=[i for *_, i in REFUSED])
def test_refused(data: bytes, message: str) -> None:
    """Bytes that cannot be a header are refused as soon as that is certain, saying why."""
    with pytest.raises(ProxyProtocolError, match=message):
        parse(data)


class TestEncode:
    """Headers written for instances read back as the client and server they were given."""

    @pytest.mark.parametrize(
        ("client", "server", "family"),
        [(("192.0.2.1", 5000), ("10.0.0.1", 80), b"TCP4"),
         (("2001:db8::1", 5000), ("2001:db8::2", 80), b"TCP6"),
         (("2001:db8::1", 5000), ("10.0.0.1", 80), b"TCP6")],
        ids=["ipv4", "ipv6", "mixed-mapped"],
    )
    def test_round_trip(self, client: tuple[str, int], server: tuple[str, int], family: bytes) -> None:
        one, two = encode_v1(client, server), encode_v2(client, server, [(0x04, b"pad")])
        assert one.split(b" ")[1] == family
        for data in (one, two):
            header = parse(data + b"GET /")
            assert header is not None and header.length == len(data)
            assert (header.source, header.destination) == (client, server)  # IPv4-mapped reads back as IPv4

    def test_v1_exact_bytes(self) -> None:
        assert encode_v1(("192.0.2.1", 51000), ("198.51.100.7", 443)) == (
            b"PROXY TCP4 192.0.2.1 198.51.100.7 51000 443\r\n")

    def test_v2_exact_bytes(self) -> None:
        assert encode_v2(("192.0.2.1", 51000), ("198.51.100.7", 443)) == v2(0x21, 0x11, V4_BODY)

    def test_local_and_unknown(self) -> None:
        assert parse(ENCODED_V2_LOCAL) == ProxyHeader(16, 2, None, local=True)
        assert parse(ENCODED_V1_UNKNOWN) == ProxyHeader(15, 1, None)

    @pytest.mark.parametrize("bad", [("not-an-ip", 1), ("1.2.3.4", 70000)], ids=["name", "port"])
    def test_bad_input_refused(self, bad: tuple[str, int]) -> None:
        with pytest.raises(ValueError):
            encode_v1(bad, ("1.2.3.4", 80))
        with pytest.raises(ValueError):
            encode_v2(bad, ("1.2.3.4", 80))
