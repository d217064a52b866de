"""Basic authentication per route (`auth=NAME`, Fabio's), driven with curl against a real Ferryman following a
real Consul: bcrypt, SHA-1 and apr1 entries, the hostile credentials, the header kept from the instance, the
htpasswd file re-read when it changes (and kept when it vanishes), and a missing file refused at start."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import bcrypt
import pytest

from .harness import Backend, ConsulAgent, FerrymanProcess, async_wait_until

pytestmark = pytest.mark.integration


def _sha(password: str) -> str:
    return "{SHA}" + base64.b64encode(hashlib.sha1(password.encode()).digest()).decode()


def _apr1(password: str) -> str:
    """Made by openssl, independently of Ferryman's MD5-crypt."""
    return subprocess.run(["openssl", "passwd", "-apr1", password], capture_output=True, check=True,
                          text=True).stdout.strip()


def _bcrypt_2y(password: str) -> str:
    """`htpasswd -B` writes $2y$ at cost 5."""
    return "$2y$" + bcrypt.hashpw(password.encode(), bcrypt.gensalt(5)).decode()[4:]


def _htpasswd() -> str:
    return "\n".join([
        f"alice:{_bcrypt_2y('secret')}",
        f"bob:{_apr1('pa:ss:word')}",
        f"carol:{_sha('')}",
        "jos\u00e9:" + _apr1("caf\u00e9"),
        "",
    ])


def _curl(url: str, *args: str) -> tuple[int, dict[str, str], bytes]:
    """Status, response headers (lower-case names) and body, as curl got them."""
    out = subprocess.run(["curl", "-s", "-D", "-", "--max-time", "10", *args, url], capture_output=True, check=True)
    head, _, body = out.stdout.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


@pytest.fixture
async def guarded(consul: ConsulAgent, workdir: Path) -> AsyncIterator[tuple[FerrymanProcess, Path, Backend]]:
    passwords = workdir / "auth-users.htpasswd"
    passwords.write_text(_htpasswd(), encoding="utf-8")
    config = workdir / "auth.toml"
    config.write_text(f'[auth.ops]\nfile = "{passwords}"\nrealm = "Ops area"\n\n'
                      f'[auth.fwd]\nfile = "{passwords}"\nforward_authorization = true\n')
    proxy = FerrymanProcess(consul.addr, workdir, extra=["--config", str(config)])
    await asyncio.to_thread(proxy.start)
    backend = await Backend("au-1").start()
    tags = ["urlprefix-/au-ops auth=ops", "urlprefix-/au-fwd auth=fwd", "urlprefix-/au-nope auth=nope",
            "urlprefix-/au-open"]
    await asyncio.to_thread(consul.register, "au", "au-1", backend.port, tags)
    await asyncio.to_thread(proxy.wait_instances, "au@*any*/au-open", ["au-1"])
    try:
        yield proxy, passwords, backend
    finally:
        await asyncio.to_thread(consul.deregister, "au-1")
        await backend.stop()
        await asyncio.to_thread(proxy.stop)


CASES = [
    ("bcrypt-2y", ["-u", "alice:secret"], 200),
    ("apr1-colon-in-password", ["-u", "bob:pa:ss:word"], 200),
    ("apr1-password-cut-at-colon", ["-u", "bob:pa"], 401),
    ("sha1-empty-password", ["-u", "carol:"], 200),
    ("empty-password-for-another", ["-u", "alice:"], 401),
    ("non-ascii-user-utf8", ["-u", "jos\u00e9:caf\u00e9"], 200),
    ("wrong-password", ["-u", "alice:nope"], 401),
    ("unknown-user", ["-u", "mallory:secret"], 401),
    ("malformed-base64", ["-H", "Authorization: Basic %%%not-base64"], 401),
    ("wrong-scheme", ["-H", "Authorization: Bearer " + base64.b64encode(b"alice:secret").decode()], 401),
    ("missing-header", [], 401),
]


async def test_credentials(guarded: tuple[FerrymanProcess, Path, Backend]) -> None:
    """Each case answers as written; a 401 carries the realm's challenge, a 200 reached the instance without
    the Authorization header."""
    proxy, _, _ = guarded
    problems = []
    for case_id, args, expected in CASES:
        status, headers, body = await asyncio.to_thread(_curl, f"{proxy.url}/au-ops/x", *args)
        if status != expected:
            problems.append(f"{case_id}: {status}, expected {expected}")
        if status == 401 and headers.get("www-authenticate") != 'Basic realm="Ops area", charset="UTF-8"':
            problems.append(f"{case_id}: challenge {headers.get('www-authenticate')!r}")
        if status == 200 and any(k.lower() == "authorization" for k, _ in json.loads(body)["headers"]):
            problems.append(f"{case_id}: the instance got the Authorization header")
    assert problems == []


async def test_forwarded_when_the_realm_says_so_and_unknown_realm_never_served(
    guarded: tuple[FerrymanProcess, Path, Backend],
) -> None:
    proxy, _, backend = guarded
    status, _, body = await asyncio.to_thread(_curl, f"{proxy.url}/au-fwd/x", "-u", "alice:secret")
    assert status == 200
    assert ["Authorization", "Basic " + base64.b64encode(b"alice:secret").decode()] in json.loads(body)["headers"]
    hits = len(backend.hits)
    status, _, body = await asyncio.to_thread(_curl, f"{proxy.url}/au-nope/x", "-u", "alice:secret")
    assert status == 503 and b"not configured" in body
    assert len(backend.hits) == hits  # nothing reached the instance


async def test_file_reread_on_change_and_kept_when_it_vanishes(guarded: tuple[FerrymanProcess, Path, Backend]) -> None:
    proxy, passwords, _ = guarded
    url = f"{proxy.url}/au-ops/x"
    assert (await asyncio.to_thread(_curl, url, "-u", "alice:secret"))[0] == 200
    passwords.write_text(f"alice:{_sha('rotated')}\n")

    async def rotated() -> bool:
        return (await asyncio.to_thread(_curl, url, "-u", "alice:rotated"))[0] == 200

    await async_wait_until(rotated, 10, "the new password to be accepted")
    assert (await asyncio.to_thread(_curl, url, "-u", "alice:secret"))[0] == 401  # the cache was emptied
    os.unlink(passwords)

    def reload_failed() -> bool:
        return any(e.get("event") == "auth_reload_failed" for e in proxy.log_events())

    await async_wait_until(lambda: asyncio.to_thread(reload_failed), 10, "auth_reload_failed")
    assert (await asyncio.to_thread(_curl, url, "-u", "alice:rotated"))[0] == 200


def test_missing_file_is_a_config_error_naming_file_line_and_key(workdir: Path) -> None:
    config = workdir / "auth-missing.toml"
    config.write_text(f'listen = ":0"\n[auth.ops]\nfile = "{workdir}/no-such.htpasswd"\n')
    exe = Path(sys.executable).parent / "ferryman"
    out = subprocess.run([str(exe), "--check", "--config", str(config)], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip() == (f"ferryman: config error: {config}:2: key 'auth.ops.file': cannot read htpasswd "
                                  f"file {workdir}/no-such.htpasswd: No such file or directory")
