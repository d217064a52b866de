"""htpasswd entries and Basic credentials: every hash kind checked against an independent maker of it."""

from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess

import bcrypt
import pytest

from proxy.htpasswd import basic_credentials, md5_crypt, parse, verify

PASSWORDS = ["secret", "", "pa:ss:word", "pässwörd", "x" * 40]
PASSWORD_IDS = ["plain", "empty", "colons", "non-ascii", "longer-than-a-digest"]


def _openssl(flag: str, password: str, salt: str) -> bytes:
    # -stdin reads one line (an empty input reads nothing), so the password goes as an argument: test data.
    out = subprocess.run(["openssl", "passwd", flag, "-salt", salt, password], capture_output=True, check=True)
    return out.stdout.strip()


needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")


@needs_openssl
class TestMd5CryptAgainstOpenssl:
    """MD5-crypt, written by hand, gives what `openssl passwd -apr1` / `-1` give, byte for byte."""

    @pytest.mark.parametrize("password", PASSWORDS, ids=PASSWORD_IDS)
    @pytest.mark.parametrize(("flag", "magic", "salt"), [("-apr1", b"$apr1$", "Qx7.bcde"), ("-1", b"$1$", "ab")],
                             ids=["apr1", "md5"])
    def test_same_hash(self, password: str, flag: str, magic: bytes, salt: str) -> None:
        expected = _openssl(flag, password, salt)
        assert md5_crypt(password.encode(), salt.encode(), magic) == expected
        assert verify(password.encode(), expected)
        assert not verify(password.encode() + b"!", expected)


def _bcrypt(password: bytes, prefix: bytes) -> bytes:
    made = bcrypt.hashpw(password, bcrypt.gensalt(4))  # the lowest cost: the test is about format, not strength
    return prefix + made[4:]


@pytest.mark.parametrize("password", PASSWORDS, ids=PASSWORD_IDS)
@pytest.mark.parametrize("kind", ["bcrypt-2y", "bcrypt-2a", "bcrypt-2b", "sha1"])
def test_every_kind_accepts_its_password_only(password: str, kind: str) -> None:
    """Each supported kind accepts the password it was made from and refuses another."""
    pw = password.encode()
    if kind == "sha1":  # Apache's `htpasswd -s`: {SHA} and the base64 of the SHA-1 digest
        stored = b"{SHA}" + base64.b64encode(hashlib.sha1(pw).digest())
    else:
        stored = _bcrypt(pw, b"$" + kind[-2:].encode() + b"$")
    assert verify(pw, stored)
    assert not verify(pw + b"x", stored)


def test_bcrypt_reads_72_bytes_as_htpasswd_does() -> None:
    """bcrypt hashes the first 72 bytes: a longer password still verifies (bcrypt 5 would refuse it)."""
    stored = _bcrypt(b"a" * 72, b"$2y$")
    assert verify(b"a" * 100, stored)


class TestParse:
    """Lines of an htpasswd file: users kept, the rest reported by line number, never compared as text."""

    def test_users_and_problems(self) -> None:
        data = (b"# comment\n\nalice:{SHA}x\nbob:plaintext\n:$apr1$a$b\nnocolon\nalice:$apr1$a$b\n"
                + "jos\u00e9:$2y$04$abc\n".encode())
        parsed = parse(data)
        assert dict(parsed.users) == {b"alice": b"{SHA}x", "jos\u00e9".encode(): b"$2y$04$abc"}
        assert parsed.problems == (
            "line 4: unsupported hash for this user (use bcrypt, {SHA} or $apr1$)",
            "line 5: not user:hash", "line 6: not user:hash", "line 7: user given twice; the first line counts",
        )

    def test_plain_text_entry_never_matches(self) -> None:
        """Fabio's library accepts plain-text passwords; here such a line is left out."""
        assert not verify(b"plaintext", b"plaintext")


def _basic(raw: bytes) -> bytes:
    return b"Basic " + base64.b64encode(raw)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (_basic(b"alice:secret"), (b"alice", b"secret")),
        (_basic(b"alice:pa:ss"), (b"alice", b"pa:ss")),
        (_basic(b"alice:"), (b"alice", b"")),
        (_basic("jos\u00e9:x".encode()), ("jos\u00e9".encode(), b"x")),
        (b"basic " + base64.b64encode(b"a:b"), (b"a", b"b")),
        (b"BASIC  " + base64.b64encode(b"a:b") + b" ", (b"a", b"b")),
        (b"Basic not*base64!", None),
        (b"Basic YWxpY2U6c2VjcmV0", (b"alice", b"secret")),
        (b"Basic YWxpY2U6c2VjcmV", None),
        (_basic(b"no-colon"), None),
        (b"Bearer " + base64.b64encode(b"a:b"), None),
        (b"Basic", None),
        (b"", None),
    ],
    ids=["plain", "colon-in-password", "empty-password", "utf8-user", "scheme-any-case", "blanks",
         "malformed-base64", "unpadded-exact", "bad-padding", "no-colon", "wrong-scheme", "no-token", "empty"],
)
def test_basic_credentials(value: bytes, expected: tuple[bytes, bytes] | None) -> None:
    """RFC 7617: the user id ends at the first colon; anything else than Basic and base64 is no credential."""
    assert basic_credentials(value) == expected
