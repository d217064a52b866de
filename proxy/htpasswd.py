"""htpasswd files and HTTP Basic credentials, pure: bytes in, a verdict out.

An htpasswd file (Apache's format, which Fabio reads too) holds one `user:hash` per line; blank lines and `#`
comments are skipped. The hashes understood are bcrypt (`$2y$`, `$2a$`, `$2b$`: the `bcrypt` package, which
compares in constant time), SHA-1 (`{SHA}` then base64, Apache's `htpasswd -s`) and MD5-crypt (`$apr1$`,
Apache's default, and `$1$`, the same algorithm under another magic word). Other formats (DES crypt, SHA-crypt,
plain text) are reported per line and that user cannot log in: never compared as plain text.

MD5-crypt is written here over hashlib.md5 (Poul-Henning Kamp's algorithm as Apache's apr_md5.c implements
it): no maintained small library provides it (passlib, which did, is unmaintained and breaks with current
bcrypt), and it is 40 lines. The tests check it against `openssl passwd -apr1` and `-1`.

Credentials (RFC 7617) are `Basic base64(user-id ":" password)`: the scheme is case-insensitive, the user id ends
at the first colon (the password may hold colons, or be empty), and both are compared as bytes (the challenge
says `charset="UTF-8"`, so a non-ASCII user name arrives as UTF-8, as the file stores it).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import bcrypt

_ITOA64: Final = b"./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_BCRYPT: Final = (b"$2y$", b"$2a$", b"$2b$")
_MD5_MAGIC: Final = (b"$apr1$", b"$1$")
# bcrypt reads at most 72 bytes of a password (Apache's htpasswd truncates there too); bcrypt 5 refuses longer.
_BCRYPT_MAX: Final = 72
KINDS: Final = ("bcrypt", "sha1", "apr1")


@dataclass(frozen=True, slots=True)
class Htpasswd:
    """A parsed htpasswd file: the hash of each user, and a message per line that was left out."""

    users: Mapping[bytes, bytes]
    problems: tuple[str, ...] = ()


def hash_kind(stored: bytes) -> str | None:
    """Which supported kind a stored hash is, or None."""
    if stored.startswith(_BCRYPT):
        return "bcrypt"
    if stored.startswith(b"{SHA}"):
        return "sha1"
    if stored.startswith(_MD5_MAGIC):
        return "apr1"
    return None


def parse(data: bytes) -> Htpasswd:
    """The users of an htpasswd file's bytes. A line without `user:` or with an unsupported hash is left out
    and reported by line number (never with its content: it holds a hash)."""
    users: dict[bytes, bytes] = {}
    problems: list[str] = []
    for number, raw in enumerate(data.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        user, colon, stored = line.partition(b":")
        if not colon or not user:
            problems.append(f"line {number}: not user:hash")
            continue
        if hash_kind(stored) is None:
            problems.append(f"line {number}: unsupported hash for this user (use bcrypt, {{SHA}} or $apr1$)")
            continue
        if user in users:
            problems.append(f"line {number}: user given twice; the first line counts")
            continue
        users[user] = stored
    return Htpasswd(users, tuple(problems))


def verify(password: bytes, stored: bytes) -> bool:
    """Whether `password` matches a stored hash; compared in constant time."""
    kind = hash_kind(stored)
    if kind == "bcrypt":
        try:
            return bcrypt.checkpw(password[:_BCRYPT_MAX], stored)
        except ValueError:  # a malformed bcrypt hash
            return False
    if kind == "sha1":
        digest = base64.b64encode(hashlib.sha1(password).digest())
        return hmac.compare_digest(digest, stored[5:])
    if kind == "apr1":
        magic = b"$apr1$" if stored.startswith(b"$apr1$") else b"$1$"
        salt = stored[len(magic):].partition(b"$")[0]
        return hmac.compare_digest(md5_crypt(password, salt, magic), stored)
    return False


def md5_crypt(password: bytes, salt: bytes, magic: bytes = b"$apr1$") -> bytes:
    """MD5-crypt: `$apr1$salt$hash` (or `$1$...`), as `openssl passwd -apr1` and Apache's htpasswd write it."""
    salt = salt[:8]
    ctx = hashlib.md5(password + magic + salt)
    alternate = hashlib.md5(password + salt + password).digest()
    for left in range(len(password), 0, -16):
        ctx.update(alternate[: min(16, left)])
    bits = len(password)
    while bits:
        ctx.update(b"\0" if bits & 1 else password[:1])
        bits >>= 1
    final = ctx.digest()
    for i in range(1000):  # the algorithm's deliberate slowdown
        step = hashlib.md5(password if i & 1 else final)
        if i % 3:
            step.update(salt)
        if i % 7:
            step.update(password)
        step.update(final if i & 1 else password)
        final = step.digest()
    out = bytearray()
    for a, b, c in ((0, 6, 12), (1, 7, 13), (2, 8, 14), (3, 9, 15), (4, 10, 5)):
        out += _to64((final[a] << 16) | (final[b] << 8) | final[c], 4)
    out += _to64(final[11], 2)
    return magic + salt + b"$" + bytes(out)


def _to64(value: int, count: int) -> bytes:
    out = bytearray()
    for _ in range(count):
        out.append(_ITOA64[value & 0x3F])
        value >>= 6
    return bytes(out)


def basic_credentials(value: bytes) -> tuple[bytes, bytes] | None:
    """(user, password) from an Authorization value `Basic <base64>`; None when it is another scheme, not
    base64, or has no colon."""
    scheme, _, token = value.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, colon, password = decoded.partition(b":")
    if not colon:
        return None
    return user, password
