"""PROXY protocol headers (HAProxy's `send-proxy`, version 1 text and version 2 binary) that tell an instance
the client's address and the address it connected to, written before the first byte of the connection.

Addresses come as (host, port) of the client and of the proxy's listening side; an IPv4-mapped IPv6 address
(`::ffff:10.1.2.3`, from a dual-stack socket) is written as the IPv4 address it is, and when the two are of
different families both are written as IPv6. Pure: values in, bytes out.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Final

V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_PROXY: Final = 0x21  # version 2, command PROXY
_V2_TCP4: Final = 0x11
_V2_TCP6: Final = 0x21

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _address(host: str) -> _Address:
    ip = ipaddress.ip_address(host.split("%", 1)[0])  # a zone (fe80::1%eth0) is local to this host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _pair(client: tuple[str, int], server: tuple[str, int]) -> tuple[_Address, _Address]:
    source, destination = _address(client[0]), _address(server[0])
    if source.version != destination.version:
        source, destination = (ipaddress.IPv6Address(f"::ffff:{a}") if a.version == 4 else a
                               for a in (source, destination))
    return source, destination


def encode_v1(client: tuple[str, int], server: tuple[str, int]) -> bytes:
    """`PROXY TCP4 src dst sport dport\\r\\n` (TCP6 for IPv6), the version 1 header."""
    source, destination = _pair(client, server)
    family = "TCP4" if source.version == 4 else "TCP6"
    return f"PROXY {family} {source} {destination} {client[1]} {server[1]}\r\n".encode("ascii")


def encode_v2(client: tuple[str, int], server: tuple[str, int]) -> bytes:
    """The version 2 header: signature, PROXY command, TCP over IPv4 or IPv6, both addresses and ports."""
    source, destination = _pair(client, server)
    family = _V2_TCP4 if source.version == 4 else _V2_TCP6
    addresses = source.packed + destination.packed + struct.pack("!HH", client[1], server[1])
    return V2_SIGNATURE + struct.pack("!BBH", _V2_PROXY, family, len(addresses)) + addresses
