"""The PROXY protocol (HAProxy's, versions 1 and 2): the header a TCP load balancer puts in front of a
connection to say whose connection it is. Pure: bytes in, a `ProxyHeader` (or bytes) out.

`parse(data)` reads a header from the first bytes of a connection: a `ProxyHeader` once the header is complete
(its `length` says how many bytes it took; what follows is the client's own), None while more bytes are needed,
ProxyProtocolError as soon as the bytes cannot be one, so a reader knows after each read whether to wait, go on
or close. Sizes are bounded: a version 1 line is at most 107 bytes with its CRLF (the specification's maximum),
a version 2 header at most 16 + `MAX_V2_LENGTH` bytes. Version 1: `PROXY TCP4|TCP6 src dst sport dport\\r\\n`
or `PROXY UNKNOWN ...\\r\\n`; version 2: a 12-byte signature, version and command (LOCAL or PROXY), family and
transport, length, the addresses, then TLVs, which are skipped. LOCAL, UNKNOWN, UDP, UNIX and unspecified
families carry no usable client address (`source` None): the connection's own peer stands.

`encode_v1` and `encode_v2` write headers, for sending them to instances.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

V1_PREFIX: Final = b"PROXY "
V1_MAX: Final = 107  # "PROXY TCP6 " + two full IPv6 addresses + two ports + CRLF, as the specification counts
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED: Final = 16  # signature, version/command, family/transport, length
MAX_V2_LENGTH: Final = 4096  # addresses (216 bytes at most, for UNIX) and TLVs; larger is refused
MAX_HEADER: Final = V2_FIXED + MAX_V2_LENGTH

_V2_LOCAL, _V2_PROXY = 0x20, 0x21
_TCP4, _TCP6 = 0x11, 0x21
# Families that carry no address this proxy can use for a TCP client: unspecified, UDP over IP, UNIX sockets.
_NO_ADDRESS: Final = frozenset({0x00, 0x01, 0x02, 0x12, 0x22, 0x30, 0x31, 0x32, 0x10, 0x20})

Address = tuple[str, int]


class ProxyProtocolError(ValueError):
    """Bytes that are not a valid PROXY protocol header; the message says why."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    length: int  # bytes the header took at the start of the stream
    version: int  # 1 or 2
    source: Address | None  # the client's address and port; None: keep the connection's own peer
    destination: Address | None = None
    local: bool = False  # version 2 LOCAL: the balancer's own connection (a health check)


def parse(data: bytes) -> ProxyHeader | None:
    """A complete header from the start of `data`, None if it may still become one, or ProxyProtocolError."""
    if data[:1] == V2_SIGNATURE[:1]:
        return _parse_v2(data)
    return _parse_v1(data)


def _parse_v1(data: bytes) -> ProxyHeader | None:
    head = data[: len(V1_PREFIX)]
    if not V1_PREFIX.startswith(head):
        raise ProxyProtocolError("not a PROXY protocol header")
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyProtocolError(f"version 1 header longer than {V1_MAX} bytes")
        if b"\n" in data or b"\r" in data[:-1]:
            raise ProxyProtocolError("version 1 header not ended by CRLF")
        return None
    words = data[:end].split(b" ")
    if words[1:2] == [b"UNKNOWN"]:  # the balancer does not know the addresses; the rest of the line is ignored
        return ProxyHeader(end + 2, 1, None)
    if len(words) != 6 or words[1] not in (b"TCP4", b"TCP6"):
        raise ProxyProtocolError("version 1 header is not PROXY TCP4|TCP6 src dst sport dport, nor UNKNOWN")
    version = 4 if words[1] == b"TCP4" else 6
    source = (_v1_address(words[2], version), _v1_port(words[4]))
    destination = (_v1_address(words[3], version), _v1_port(words[5]))
    return ProxyHeader(end + 2, 1, source, destination)


def _v1_address(text: bytes, version: int) -> str:
    try:
        address = ipaddress.ip_address(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ProxyProtocolError(f"version 1 header: {text[:46]!r} is not an IP address") from None
    if address.version != version:
        raise ProxyProtocolError(f"version 1 header: {address} is not an IPv{version} address")
    return _text(address)


def _text(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """An IPv4 client a balancer wrote IPv4-mapped (beside an IPv6 address) is that IPv4 address."""
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return str(mapped or address)


def _v1_port(text: bytes) -> int:
    if not (text.isdigit() and len(text) <= 5 and int(text) <= 65535) or (text[:1] == b"0" and text != b"0"):
        raise ProxyProtocolError(f"version 1 header: {text[:8]!r} is not a port")
    return int(text)


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if not (data.startswith(V2_SIGNATURE) or V2_SIGNATURE.startswith(data[: len(V2_SIGNATURE)])):
        raise ProxyProtocolError("not a PROXY protocol header")
    if len(data) < V2_FIXED:
        return None
    command, family = data[12], data[13]
    if command not in (_V2_LOCAL, _V2_PROXY):
        raise ProxyProtocolError(f"version 2 header: version/command byte {command:#04x}")
    length = int.from_bytes(data[14:16], "big")
    if length > MAX_V2_LENGTH:
        raise ProxyProtocolError(f"version 2 header of {length} bytes, more than {MAX_V2_LENGTH}")
    total = V2_FIXED + length
    if len(data) < total:
        return None
    if command == _V2_LOCAL:
        return ProxyHeader(total, 2, None, local=True)
    body = data[V2_FIXED:total]
    if family == _TCP4 or family == _TCP6:
        size = 4 if family == _TCP4 else 16
        if length < 2 * size + 4:
            raise ProxyProtocolError(f"version 2 header: {length} bytes cannot hold its addresses")
        make = ipaddress.IPv4Address if family == _TCP4 else ipaddress.IPv6Address
        source = (_text(make(body[:size])), int.from_bytes(body[2 * size : 2 * size + 2], "big"))
        destination = (_text(make(body[size : 2 * size])), int.from_bytes(body[2 * size + 2 : 2 * size + 4], "big"))
        return ProxyHeader(total, 2, source, destination)  # TLVs after the addresses are skipped
    if family in _NO_ADDRESS:
        return ProxyHeader(total, 2, None)
    raise ProxyProtocolError(f"version 2 header: address family byte {family:#04x}")


def _unmapped(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return mapped or address


def _pair(client: Address, server: Address) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]:
    """Both addresses in one family: when one is IPv6, an IPv4 one is written IPv4-mapped (as HAProxy does)."""
    # An IPv4-mapped address (`::ffff:10.1.2.3`, from a dual-stack socket) is the IPv4 address it carries.
    addresses = [_unmapped(ipaddress.ip_address(client[0])), _unmapped(ipaddress.ip_address(server[0]))]
    if any(a.version == 6 for a in addresses):
        addresses = [ipaddress.IPv6Address(f"::ffff:{a}") if a.version == 4 else a for a in addresses]
    for _, port in (client, server):
        if not 0 <= port <= 65535:
            raise ValueError(f"{port} is not a port")
    return tuple(addresses)


def encode_v1(client: tuple[str, int], server: tuple[str, int]) -> bytes:
    """A version 1 header saying the connection is `client`'s, to `server` (address, port); ValueError for an
    address that is not an IP address or a port out of range."""
    source, destination = _pair(client, server)
    family = b"TCP4" if source.version == 4 else b"TCP6"
    return b"PROXY %s %s %s %d %d\r\n" % (
        family, str(source).encode(), str(destination).encode(), client[1], server[1])


def encode_v2(client: tuple[str, int], server: tuple[str, int], tlvs: Sequence[tuple[int, bytes]] = ()) -> bytes:
    """A version 2 PROXY header (TCP over IPv4 or IPv6) for `client` to `server`, with optional TLVs (type,
    value); ValueError as for `encode_v1`, or when the TLVs make the header too long."""
    source, destination = _pair(client, server)
    body = (source.packed + destination.packed + client[1].to_bytes(2, "big") + server[1].to_bytes(2, "big")
            + b"".join(bytes((kind,)) + len(value).to_bytes(2, "big") + value for kind, value in tlvs))
    if len(body) > MAX_V2_LENGTH:
        raise ValueError(f"a PROXY header of {len(body)} bytes is longer than {MAX_V2_LENGTH}")
    family = _TCP4 if source.version == 4 else _TCP6
    return V2_SIGNATURE + bytes((_V2_PROXY, family)) + len(body).to_bytes(2, "big") + body


# The LOCAL command: a connection of the sender's own (a health check), no addresses.
ENCODED_V2_LOCAL: Final = V2_SIGNATURE + bytes((_V2_LOCAL, 0x00)) + b"\x00\x00"
ENCODED_V1_UNKNOWN: Final = b"PROXY UNKNOWN\r\n"
