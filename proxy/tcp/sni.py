"""The server name of a TLS ClientHello, read from a connection's first bytes; nothing is decrypted.

`read_hello(data)` looks at what a client has sent so far and returns None while the ClientHello is not complete
(it may come in segments as small as one byte), a `Hello` once it is (`name`: the server_name extension's
host_name, lower case, without a trailing dot; "" when there is none), or raises `NotHello` saying why the
bytes are no ClientHello: not a TLS handshake record, malformed, truncated inside, or larger than `limit`.
A first byte that is not 22 (handshake) is refused at once, so a plain-text client does not wait for a timeout.

The layout (RFC 8446 §5.1, §4.1.2; RFC 6066 §3): records of a 5-byte header (type 22, version 3.x, a length of
at most 2^14) carry the handshake message, which may span several records: type 1 (ClientHello) and a 3-byte
length, then version, random (32), session_id<0..32>, cipher_suites<2..2^16-2>, compression_methods<1..2^8-1>
and extensions<0..2^16-1>; extension 0 (server_name) holds a list of (name_type, host_name<1..2^16-1>), of which
name_type 0 is a DNS host name. Pure: bytes in, a value out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

MAX_HELLO: Final = 16 * 1024
_HANDSHAKE: Final = 22
_CLIENT_HELLO: Final = 1
_SERVER_NAME: Final = 0
_HOST_NAME: Final = 0
_MAX_RECORD: Final = 2**14
# RFC 1123 labels; underscores are seen in the wild, and a name is at most 253 characters.
_NAME_RE: Final = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*$")


class NotHello(ValueError):
    """The bytes are not a TLS ClientHello this proxy can route; the message says why."""


@dataclass(frozen=True, slots=True)
class Hello:
    name: str  # "" when the ClientHello names no server
    size: int  # bytes of the records that carried it


def read_hello(data: bytes, limit: int = MAX_HELLO) -> Hello | None:
    """The ClientHello at the start of `data`, None while incomplete; NotHello for anything else."""
    if data and data[0] != _HANDSHAKE:
        raise NotHello("not a TLS handshake record")
    if len(data) > 1 and data[1] != 3:
        raise NotHello("not a TLS record version")
    handshake = b""
    pos = 0
    while True:
        if len(data) - pos < 5:
            if len(data) > limit:
                raise NotHello(f"ClientHello larger than {limit} bytes")
            return None
        if data[pos] != _HANDSHAKE or data[pos + 1] != 3:
            raise NotHello("a record inside the ClientHello is not a TLS handshake record")
        length = int.from_bytes(data[pos + 3:pos + 5], "big")
        if not 0 < length <= _MAX_RECORD:
            raise NotHello(f"a TLS record of {length} bytes")
        end = pos + 5 + length
        if end > limit:
            raise NotHello(f"ClientHello larger than {limit} bytes")
        if len(data) < end:
            return None
        handshake += data[pos + 5:end]
        pos = end
        if len(handshake) >= 4:
            if handshake[0] != _CLIENT_HELLO:
                raise NotHello("the first handshake message is not a ClientHello")
            need = 4 + int.from_bytes(handshake[1:4], "big")
            if need + 5 * (need // _MAX_RECORD + 1) > limit:
                raise NotHello(f"ClientHello larger than {limit} bytes")
            if len(handshake) >= need:
                return Hello(_server_name(handshake[4:need]), pos)


class _Reader:
    """Reads a ClientHello body; running past its end is a truncated message."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise NotHello("truncated ClientHello")
        out = self.data[self.pos:end]
        self.pos = end
        return out

    def number(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def vector(self, size: int) -> bytes:
        """A vector with a `size`-byte length in front."""
        return self.take(self.number(size))


def _server_name(body: bytes) -> str:
    """The host_name of the server_name extension of a ClientHello body, "" when there is none."""
    reader = _Reader(body)
    reader.take(2 + 32)  # legacy_version, random
    reader.vector(1)  # legacy_session_id
    reader.vector(2)  # cipher_suites
    reader.vector(1)  # legacy_compression_methods
    if reader.pos == len(body):
        return ""  # no extensions at all (SSL 3.0 style): no name
    extensions = _Reader(reader.vector(2))
    while extensions.pos < len(extensions.data):
        kind = extensions.number(2)
        payload = extensions.vector(2)
        if kind == _SERVER_NAME:
            return _host_name(payload)
    return ""


def _host_name(payload: bytes) -> str:
    names = _Reader(_Reader(payload).vector(2))
    while names.pos < len(names.data):
        name_type = names.number(1)
        name = names.vector(2)
        if name_type == _HOST_NAME:
            try:
                text = name.decode("ascii").lower().removesuffix(".")
            except UnicodeDecodeError:
                raise NotHello("the server name is not ASCII") from None
            if len(text) > 253 or not _NAME_RE.match(text):
                raise NotHello("the server name is not a host name")
            return text
    return ""
