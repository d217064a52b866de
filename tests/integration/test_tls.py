"""TLS termination and TLS to upstreams, against the real binary: certificates chosen by SNI (exact, one-label
wildcard, default for unknown or missing names; checked with Python's ssl and with `openssl s_client`), TLS 1.2 as
the floor, the X-Forwarded-*/Forwarded headers of a TLS hop, certificates re-read from changed files and on SIGHUP
without dropping open connections (a bad file keeps the last good certificates), a bad file at start refused with
exit code 2, plain-HTTP requests redirected to HTTPS per host, `proto=https` upstreams verified against a CA file
(or not, with `tlsskipverify=true`) with the name given by `sni=`, and certificates kept in Consul KV.

Certificates come from a throwaway CA made at test time (tests/integration/certs.py); a real Consul agent, real
aiohttp backends (one of them serving TLS), everything on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from .certs import Leaf, TestCA, describe, presented_cert, verified_handshake
from .harness import Backend, ConsulAgent, FerrymanProcess, fetch, free_port, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

WAIT = 10.0  # the bound on any wait for something the proxy does in the background


# --- fixtures and helpers --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestCA]:
    authority = TestCA(tmp_path_factory.mktemp("tls-ca"))
    yield authority
    shutil.rmtree(authority.directory, ignore_errors=True)


@pytest.fixture
def certdir(ca: TestCA, tmp_path: Path) -> Path:
    """A directory of its own for each test's certificate files (the CA stays in its own)."""
    path = tmp_path / "certs"
    path.mkdir()
    return path


@dataclass
class TlsFerryman(FerrymanProcess):
    """Ferryman with a TLS listener beside its plain one (the harness waits for the plain one; this for both)."""

    tls_port: int = field(default_factory=free_port)
    more_tls_ports: list[int] = field(default_factory=list)  # further TLS listeners, in the same flag

    def start(self) -> None:
        listeners = ",".join(f"127.0.0.1:{port}" for port in (self.tls_port, *self.more_tls_ports))
        self.extra = ["--tls-listen", listeners, *self.extra]
        super().start()
        try:
            for port in (self.tls_port, *self.more_tls_ports):
                wait_until(functools.partial(self._tls_accepts, port), 10, f"Ferryman's TLS listener on {port}")
            if self.workers > 1:
                # The listeners accept as soon as ONE worker is up; the others load the certificate files a little
                # later, and one that loads them after a test changed them would serve the new ones unasked.
                wait_until(lambda: {e.get("worker") for e in self.events("ferryman_started")}
                           >= set(range(self.workers)), 10, "every worker to start")
        except BaseException:
            self.stop()  # as the harness does: a start that failed leaves no process behind
            raise

    def _tls_accepts(self, port: int) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"ferryman exited with {self.proc.returncode}; see {self.log_path}")
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.log_events() if e.get("event") == name]

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


class LoopbackResolver(AbstractResolver):
    """Resolves every name to 127.0.0.1, so a client can use `https://a.test:PORT/` (SNI and Host a.test)."""

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        return [ResolveResult(hostname=host, host="127.0.0.1", port=port, family=socket.AF_INET, proto=0,
                              flags=socket.AI_NUMERICHOST)]

    async def close(self) -> None:
        return None


def tls_session(ca: TestCA, **connector: Any) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=ca.client_context(), resolver=LoopbackResolver(), **connector),
        timeout=aiohttp.ClientTimeout(total=20), auto_decompress=False,
        skip_auto_headers=("Accept-Encoding", "User-Agent"),
    )


def echoed_headers(body: bytes) -> dict[str, list[str]]:
    headers: dict[str, list[str]] = {}
    for name, value in json.loads(body)["headers"]:
        headers.setdefault(name.lower(), []).append(value)
    return headers


def serial_for(port: int, sni: str | None, ca: TestCA) -> int:
    return presented_cert(port, sni, ca.ca_path).serial


def wait_serial_blocking(port: int, sni: str | None, ca: TestCA, serial: int, what: str,
                         timeout: float = WAIT) -> float:
    """Wait until a NEW connection with `sni` is given the certificate `serial`; returns how long that took."""
    started = time.monotonic()
    wait_until(lambda: serial_for(port, sni, ca) == serial, timeout, what, 0.1)
    return time.monotonic() - started


async def wait_serial(port: int, sni: str | None, ca: TestCA, serial: int, what: str,
                      timeout: float = WAIT) -> float:
    return await asyncio.to_thread(wait_serial_blocking, port, sni, ca, serial, what, timeout)


class KeptConnection:
    """One TLS connection to the proxy, kept open across requests (HTTP/1.1 keep-alive, spoken by hand so it is
    certain every request goes over this very connection)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, sni: str, ca: TestCA) -> KeptConnection:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=ca.client_context(), server_hostname=sni), 5)
        return cls(reader, writer)

    @property
    def serial(self) -> int:
        der = self.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return describe(der).serial

    async def get(self, path: str, host: str) -> tuple[int, dict[str, str], bytes]:
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: keep-alive\r\n\r\n".encode())
        await self.writer.drain()
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 5)
        start, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        assert "chunked" not in headers.get("transfer-encoding", ""), headers  # the echo sets Content-Length
        body = await asyncio.wait_for(self.reader.readexactly(int(headers.get("content-length", "0"))), 5)
        return int(start.split(" ", 2)[1]), headers, body

    async def close(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 2)
        except (OSError, ssl.SSLError, TimeoutError):
            pass


def ferryman_exit(consul: ConsulAgent, workdir: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """Ferryman (with the flags FerrymanProcess gives it) run until it exits, or killed by the timeout."""
    exe = Path(sys.executable).parent / "ferryman"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRYMAN_")}
    started = time.monotonic()
    result = subprocess.run(
        [str(exe), "--listen", f"127.0.0.1:{free_port()}", "--admin-listen", f"127.0.0.1:{free_port()}",
         "--consul-addr", consul.addr, "--log-format", "json", "--consul-wait", "5", "--workers", "1",
         "--log-flush-interval", "0", *extra],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL, cwd=workdir, env=env,
    )
    return result, time.monotonic() - started


def kv_put(consul: ConsulAgent, values: dict[str, bytes]) -> None:
    """Set several keys in one Consul transaction, so a watcher never sees a new certificate with an old key."""
    ops = [{"KV": {"Verb": "set", "Key": key, "Value": base64.b64encode(value).decode()}}
           for key, value in values.items()]
    req = urllib.request.Request(f"{consul.url}/v1/txn", data=json.dumps(ops).encode(), method="PUT")
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200, resp.read()


def kv_delete_tree(consul: ConsulAgent, prefix: str) -> None:
    req = urllib.request.Request(f"{consul.url}/v1/kv/{prefix}?recurse=true", method="DELETE")
    with urllib.request.urlopen(req, timeout=5):
        pass


# --- 1. the certificate each client gets -----------------------------------------------------------------------


class TestSniSelection:
    def test_exact_wildcard_default_and_no_sni(self, consul: ConsulAgent, workdir: Path, ca: TestCA,
                                               certdir: Path) -> None:
        default, d_cert, d_key = ca.issue_files(certdir, "default", "default.test", key="rsa")
        a, a_cert, a_key = ca.issue_files(certdir, "a", "a.test", "*.wild.test")
        b, b_cert, _ = ca.issue_files(certdir, "b", "b.test", combined=True)  # certificate and key in one file
        proxy = TlsFerryman(consul.addr, workdir, extra=[
            "--tls-certs", f"{d_cert}:{d_key},{a_cert}:{a_key},{b_cert}"])
        try:
            proxy.start()
            port = proxy.tls_port
            expected = {
                "a.test": a, "x.wild.test": a,  # exact, and a wildcard covering one label
                "deeper.x.wild.test": default,  # a wildcard does not cover two labels
                "wild.test": default,  # nor the bare suffix
                "b.test": b, "unknown.test": default, None: default,  # no SNI at all: the first certificate
            }
            got = {sni: serial_for(port, sni, ca) for sni in expected}
            assert got == {sni: leaf.serial for sni, leaf in expected.items()}, {
                sni: [leaf.names for leaf in (default, a, b) if leaf.serial == serial] for sni, serial in got.items()}
            # A strict client (name verified too) is satisfied for every name a certificate serves.
            for sni in ("a.test", "x.wild.test", "b.test", "default.test"):
                assert verified_handshake(port, sni, ca.ca_path).serial == got.get(sni, default.serial)

            loaded = proxy.events("tls_certs_loaded")
            assert loaded, proxy.tail()
            assert {"default.test", "a.test", "*.wild.test", "b.test"} <= set(loaded[-1]["names"]), loaded[-1]

            self._openssl_sees_b(port, ca)
            self._tls_12_is_the_floor(port, ca)
        finally:
            proxy.stop()

    @staticmethod
    def _openssl_sees_b(port: int, ca: TestCA) -> None:
        openssl = shutil.which("openssl")
        assert openssl, "the `openssl` binary is needed for this test (Debian: apt-get install openssl)"
        client = subprocess.run(
            [openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "b.test",
             "-CAfile", str(ca.ca_path), "-verify_hostname", "b.test"],
            capture_output=True, text=True, timeout=15, stdin=subprocess.DEVNULL,
        )
        out = client.stdout
        assert re.search(r"^subject=.*CN\s*=\s*b\.test", out, re.MULTILINE), out[-3000:] + client.stderr[-2000:]
        assert "Verify return code: 0 (ok)" in out, out[-3000:]
        pem = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", out, re.DOTALL)
        assert pem, out[-3000:]
        text = subprocess.run([openssl, "x509", "-noout", "-ext", "subjectAltName"], input=pem.group(0),
                              capture_output=True, text=True, timeout=10).stdout
        assert "DNS:b.test" in text and "wild" not in text, text

    @staticmethod
    def _tls_12_is_the_floor(port: int, ca: TestCA) -> None:
        def loose(maximum: ssl.TLSVersion) -> ssl.SSLContext | None:
            """A client that offers every version from TLS 1.0 up to `maximum` (OpenSSL 3 only offers TLS 1.1 at
            security level 0); None when this OpenSSL cannot build one."""
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                context = ca.client_context()
                try:
                    context.set_ciphers("DEFAULT:@SECLEVEL=0")
                    context.minimum_version = ssl.TLSVersion.TLSv1
                    context.maximum_version = maximum
                except (ValueError, ssl.SSLError):
                    return None
                return context

        def handshake(context: ssl.SSLContext) -> str | None:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                    context.wrap_socket(raw, server_hostname="a.test") as tls:
                return tls.version()

        # TLS 1.2 is accepted (by a strict client, and by the loose one below capped at 1.2) ...
        tls12 = ca.client_context()
        tls12.maximum_version = ssl.TLSVersion.TLSv1_2
        assert handshake(tls12) == "TLSv1.2"
        up_to_12, up_to_11 = loose(ssl.TLSVersion.TLSv1_2), loose(ssl.TLSVersion.TLSv1_1)
        if up_to_12 is None or up_to_11 is None:
            return  # this OpenSSL cannot build a client offering TLS 1.1: that assertion is left out here
        assert handshake(up_to_12) == "TLSv1.2"
        # ... TLS 1.1 (and older) is not: the same client, only capped at 1.1, is refused. The server may say so
        # with a protocol_version alert or just close the connection; either way no session.
        try:
            version = handshake(up_to_11)
        except ssl.SSLError as exc:
            if exc.reason == "NO_PROTOCOLS_AVAILABLE":
                return  # the local OpenSSL would not offer TLS 1.1 after all: it never reached the server
            assert exc.reason in ("TLSV1_ALERT_PROTOCOL_VERSION", "UNSUPPORTED_PROTOCOL", "WRONG_VERSION_NUMBER",
                                  "UNEXPECTED_EOF_WHILE_READING"), repr(exc)
        except (ConnectionResetError, BrokenPipeError):
            pass  # refused by closing the connection
        else:
            pytest.fail(f"a {version} handshake was accepted")


# --- 2. what the upstream learns about a TLS hop ---------------------------------------------------------------


class TestForwardedOverTls:
    async def test_backend_sees_https_and_the_tls_port(self, consul: ConsulAgent, workdir: Path, ca: TestCA,
                                                       certdir: Path, http: aiohttp.ClientSession) -> None:
        _, a_cert, a_key = ca.issue_files(certdir, "a", "a.test")
        backend = await Backend("tls-echo-1").start()
        # Two TLS listeners (one comma-separated flag): each request says which one it came through.
        proxy = TlsFerryman(consul.addr, workdir, more_tls_ports=[free_port()],
                            extra=["--tls-certs", f"{a_cert}:{a_key}"])
        try:
            await asyncio.to_thread(consul.register, "tls-echo", "tls-echo-1", backend.port, ["urlprefix-/tlsecho"])
            await asyncio.to_thread(proxy.start)
            await asyncio.to_thread(proxy.wait_instances, "tls-echo@*any*/tlsecho", ["tls-echo-1"])
            for tls_port in (proxy.tls_port, *proxy.more_tls_ports):
                async with tls_session(ca) as https:
                    # A client cannot claim what the hop was: its own values are replaced.
                    status, body, _ = await fetch(https, f"https://a.test:{tls_port}/tlsecho/hello?x=1",
                                                  headers={"X-Forwarded-Proto": "http", "X-Forwarded-Port": "1"})
                assert status == 200, body[:500]
                seen = echoed_headers(body)
                assert json.loads(body)["path"] == "/tlsecho/hello?x=1"
                assert seen.get("x-forwarded-proto") == ["https"], seen
                assert seen.get("x-forwarded-port") == [str(tls_port)], seen
                assert len(seen.get("forwarded", [])) == 1 and "proto=https" in seen["forwarded"][0], seen

            # The same route over the plain listener, for contrast.
            status, body, _ = await fetch(http, f"{proxy.url}/tlsecho/hello")
            assert status == 200
            plain = echoed_headers(body)
            assert plain.get("x-forwarded-proto") == ["http"], plain
            assert plain.get("x-forwarded-port") == [str(proxy.port)], plain
            assert "proto=http" in plain["forwarded"][0] and "proto=https" not in plain["forwarded"][0], plain
        finally:
            await asyncio.to_thread(proxy.stop)
            await asyncio.to_thread(consul.deregister, "tls-echo-1")
            await backend.stop()


# --- 3. certificates re-read while connections stay open -------------------------------------------------------


class TestReload:
    async def test_changed_files_are_picked_up_bad_files_are_not_and_sighup_reloads(
        self, consul: ConsulAgent, workdir: Path, ca: TestCA, certdir: Path,
    ) -> None:
        _, d_cert, d_key = ca.issue_files(certdir, "default", "default.test")
        first, a_cert, a_key = ca.issue_files(certdir, "a", "a.test")
        backend = await Backend("tls-reload-1").start()
        proxy = TlsFerryman(consul.addr, workdir, extra=[
            "--tls-certs", f"{d_cert}:{d_key},{a_cert}:{a_key}", "--tls-reload-interval", "1"])
        kept: KeptConnection | None = None
        try:
            await asyncio.to_thread(consul.register, "tls-reload", "tls-reload-1", backend.port,
                                    ["urlprefix-/tlsreload"])
            await asyncio.to_thread(proxy.start)
            await asyncio.to_thread(proxy.wait_instances, "tls-reload@*any*/tlsreload", ["tls-reload-1"])
            port = proxy.tls_port

            kept = await KeptConnection.open(port, "a.test", ca)
            assert kept.serial == first.serial
            status, _, _ = await kept.get("/tlsreload/one", "a.test")
            assert status == 200
            loads_before = len(proxy.events("tls_certs_loaded"))

            # New files: new connections get the new certificate, the open one goes on.
            second = ca.issue("a.test")
            second.write(a_cert, a_key)
            took = await wait_serial(port, "a.test", ca, second.serial, "new connections to get the new a.test cert")
            assert took < 5, f"the new certificate took {took:.1f}s with --tls-reload-interval 1"
            status, headers, body = await kept.get("/tlsreload/two", "a.test")
            assert status == 200 and json.loads(body)["path"] == "/tlsreload/two", (status, headers, body[:300])
            assert kept.serial == first.serial  # the same connection, on its original handshake
            assert serial_for(port, None, ca) != second.serial  # the default is still the default
            await asyncio.to_thread(wait_until, lambda: len(proxy.events("tls_certs_loaded")) > loads_before, 5,
                                    "tls_certs_loaded after the reload")

            # A broken file: logged, and the last good certificates stay.
            failures_before = len(proxy.events("tls_reload_failed"))
            a_cert.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n")

            def failure_logged() -> list[dict[str, Any]]:
                return [e for e in proxy.events("tls_reload_failed")[failures_before:]
                        if str(a_cert) in str(e.get("file", "")) and e.get("error")]

            await asyncio.to_thread(wait_until, failure_logged, WAIT, "tls_reload_failed naming the file")
            assert serial_for(port, "a.test", ca) == second.serial
            assert proxy.proc is not None and proxy.proc.poll() is None
            status, _, _ = await kept.get("/tlsreload/three", "a.test")
            assert status == 200

            # Fixed again, and SIGHUP: loaded.
            third = ca.issue("a.test")
            third.write(a_cert, a_key)
            assert proxy.proc is not None
            os.kill(proxy.proc.pid, signal.SIGHUP)
            await wait_serial(port, "a.test", ca, third.serial, "the fixed file to be loaded")
            status, _, _ = await kept.get("/tlsreload/four", "a.test")
            assert status == 200
            assert proxy.proc.poll() is None
        finally:
            if kept is not None:
                await kept.close()
            await asyncio.to_thread(proxy.stop)
            await asyncio.to_thread(consul.deregister, "tls-reload-1")
            await backend.stop()

    @pytest.mark.parametrize("workers", [1, 2])
    async def test_sighup_alone_reloads_in_every_worker(self, consul: ConsulAgent, workdir: Path, ca: TestCA,
                                                        certdir: Path, workers: int) -> None:
        first, a_cert, a_key = ca.issue_files(certdir, "a", "a.test")
        # No polling to speak of: only the signal can make it re-read the files.
        proxy = TlsFerryman(consul.addr, workdir, workers=workers, extra=[
            "--tls-certs", f"{a_cert}:{a_key}", "--tls-reload-interval", "3600"])
        try:
            await asyncio.to_thread(proxy.start)
            port = proxy.tls_port
            assert {serial_for(port, "a.test", ca) for _ in range(4 * workers)} == {first.serial}
            second = ca.issue("a.test")
            second.write(a_cert, a_key)
            await asyncio.sleep(1.5)
            assert serial_for(port, "a.test", ca) == first.serial, "re-read without a signal (interval is 3600 s)"
            assert proxy.proc is not None
            os.kill(proxy.proc.pid, signal.SIGHUP)
            await wait_serial(port, "a.test", ca, second.serial, "SIGHUP to load the new certificate")
            # Every worker took it (new connections land on any of them).
            await asyncio.to_thread(wait_until, lambda: {serial_for(port, "a.test", ca) for _ in range(6 * workers)}
                                    == {second.serial}, 5, "every worker to serve the new certificate", 0.1)
            assert proxy.proc.poll() is None
        finally:
            await asyncio.to_thread(proxy.stop)


# --- 4. a bad certificate at start -----------------------------------------------------------------------------


class TestBadCertificateAtStart:
    @pytest.mark.parametrize("broken", ["cert", "key"])
    def test_exit_2_naming_the_file(self, consul: ConsulAgent, workdir: Path, ca: TestCA, certdir: Path,
                                    broken: str) -> None:
        _, good_cert, good_key = ca.issue_files(certdir, "good", "good.test")
        _, a_cert, a_key = ca.issue_files(certdir, "a", "a.test")
        bad = a_cert if broken == "cert" else a_key
        bad.write_bytes(b"this is not PEM\n")
        result, took = ferryman_exit(consul, workdir, "--tls-listen", f"127.0.0.1:{free_port()}",
                                     "--tls-certs", f"{good_cert}:{good_key},{a_cert}:{a_key}")
        assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
        assert result.stderr.startswith("ferryman: config error: "), result.stderr
        assert str(bad) in result.stderr, result.stderr
        assert took < 10

    def test_a_missing_file_too(self, consul: ConsulAgent, workdir: Path, certdir: Path) -> None:
        missing = certdir / "nowhere.pem"
        result, _ = ferryman_exit(consul, workdir, "--tls-listen", f"127.0.0.1:{free_port()}",
                                  "--tls-certs", str(missing))
        assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
        assert result.stderr.startswith("ferryman: config error: ") and str(missing) in result.stderr, result.stderr


# --- 5. plain HTTP redirected to HTTPS -------------------------------------------------------------------------


class TestHttpsRedirect:
    async def test_listed_hosts_are_redirected_the_rest_proxied(self, consul: ConsulAgent, workdir: Path,
                                                                ca: TestCA, certdir: Path,
                                                                http: aiohttp.ClientSession) -> None:
        _, d_cert, d_key = ca.issue_files(certdir, "default", "default.test")
        _, a_cert, a_key = ca.issue_files(certdir, "a", "a.test", "*.wild.test")
        backend = await Backend("tls-redir-1").start()
        proxy = TlsFerryman(consul.addr, workdir, extra=[
            "--tls-certs", f"{d_cert}:{d_key},{a_cert}:{a_key}", "--https-redirect", "a.test,*.wild.test"])
        try:
            await asyncio.to_thread(consul.register, "tls-redir", "tls-redir-1", backend.port, ["urlprefix-/redir"])
            await asyncio.to_thread(proxy.start)
            await asyncio.to_thread(proxy.wait_instances, "tls-redir@*any*/redir", ["tls-redir-1"])
            target = "/redir/some%20path?q=1&r=a%2Fb"
            url = URL(f"{proxy.url}{target}", encoded=True)
            tls = proxy.tls_port

            async def plain(method: str, host: str, **kwargs: Any) -> tuple[int, Any]:
                status, _, headers = await fetch(http, url, method=method, headers={"Host": host},
                                                 allow_redirects=False, **kwargs)
                return status, headers.get("Location")

            assert await plain("GET", "a.test") == (301, f"https://a.test:{tls}{target}")
            assert await plain("HEAD", "a.test") == (301, f"https://a.test:{tls}{target}")
            assert await plain("POST", "a.test", data=b"form=1") == (308, f"https://a.test:{tls}{target}")
            assert await plain("DELETE", "a.test") == (308, f"https://a.test:{tls}{target}")
            # The port the client used for plain HTTP is not carried over.
            assert await plain("GET", f"a.test:{proxy.port}") == (301, f"https://a.test:{tls}{target}")
            assert await plain("GET", "x.wild.test") == (301, f"https://x.wild.test:{tls}{target}")
            assert backend.hits == []  # none of those reached the backend

            # Another host is proxied as usual.
            status, location = await plain("GET", "other.test")
            assert (status, location) == (200, None)
            assert [h.path for h in backend.hits] == [target]

            # Over TLS the listed host is served, not redirected again.
            async with tls_session(ca) as https:
                status, body, _ = await fetch(https, URL(f"https://a.test:{tls}{target}", encoded=True),
                                              allow_redirects=False)
            assert status == 200 and json.loads(body)["path"] == target
        finally:
            await asyncio.to_thread(proxy.stop)
            await asyncio.to_thread(consul.deregister, "tls-redir-1")
            await backend.stop()


    async def test_star_redirects_every_host(self, consul: ConsulAgent, workdir: Path, ca: TestCA, certdir: Path,
                                             http: aiohttp.ClientSession) -> None:
        _, d_cert, d_key = ca.issue_files(certdir, "default", "default.test")
        proxy = TlsFerryman(consul.addr, workdir, extra=["--tls-certs", f"{d_cert}:{d_key}", "--https-redirect", "*"])
        try:
            await asyncio.to_thread(proxy.start)
            for host in ("other.test", "default.test", "127.0.0.1"):
                status, _, headers = await fetch(http, f"{proxy.url}/anything?x=y", headers={"Host": host},
                                                 allow_redirects=False)
                assert (status, headers.get("Location")) == (
                    301, f"https://{host}:{proxy.tls_port}/anything?x=y"), (host, status, dict(headers))
            async with tls_session(ca) as https:  # over TLS: no route, so 404, and no redirect loop
                status, _, headers = await fetch(https, f"https://default.test:{proxy.tls_port}/anything",
                                                 allow_redirects=False)
            assert status == 404 and "Location" not in headers, (status, dict(headers))
        finally:
            await asyncio.to_thread(proxy.stop)


# --- 6. TLS to upstreams ---------------------------------------------------------------------------------------


class TlsBackend(Backend):
    """The harness's echo backend, served over TLS with the certificate given; records the SNI names it is sent."""

    def __init__(self, instance: str, leaf: Leaf, directory: Path) -> None:
        super().__init__(instance)
        self.sni_seen: list[str | None] = []
        cert, key = directory / f"{instance}.pem", directory / f"{instance}.key"
        leaf.write(cert, key)
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)
        self.context.sni_callback = lambda _sock, name, _ctx: self.sni_seen.append(name)

    async def start(self) -> TlsBackend:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self.context).start()
        return self


class TestTlsUpstreams:
    async def test_verified_against_the_ca_file_by_the_sni_name_or_not_at_all(
        self, consul: ConsulAgent, workdir: Path, ca: TestCA, certdir: Path, http: aiohttp.ClientSession,
    ) -> None:
        backend = await TlsBackend("tls-up-1", ca.issue("up.test"), certdir).start()
        routes = {
            "tls-up": "urlprefix-/tlsup proto=https sni=up.test",
            "tls-skip": "urlprefix-/tlsskip proto=https tlsskipverify=true",
            "tls-wrongname": "urlprefix-/tlswrong proto=https sni=wrong.test",
        }
        with_ca = FerrymanProcess(consul.addr, workdir, extra=["--upstream-ca-file", str(ca.ca_path)])
        without_ca = FerrymanProcess(consul.addr, workdir)
        try:
            for service, tag in routes.items():
                await asyncio.to_thread(consul.register, service, f"{service}-1", backend.port, [tag])
            await asyncio.gather(asyncio.to_thread(with_ca.start), asyncio.to_thread(without_ca.start))
            for proxy in (with_ca, without_ca):
                for service, tag in routes.items():
                    route = f"{service}@*any*{tag.split()[0].removeprefix('urlprefix-')}"
                    await asyncio.to_thread(proxy.wait_instances, route, [f"{service}-1"])

            status, body, _ = await fetch(http, f"{with_ca.url}/tlsup/x")
            assert status == 200, body[:500]
            assert json.loads(body)["instance"] == "tls-up-1" and json.loads(body)["path"] == "/tlsup/x"
            assert "up.test" in backend.sni_seen, backend.sni_seen
            status, body, _ = await fetch(http, f"{with_ca.url}/tlsskip/x")
            assert status == 200, body[:500]
            # The CA is right but the name verified is sni=wrong.test: refused.
            hits = len(backend.hits)
            status, body, _ = await fetch(http, f"{with_ca.url}/tlswrong/x")
            assert status == 502, (status, body[:500])

            # Without the CA file the system store does not know the test CA.
            status, body, _ = await fetch(http, f"{without_ca.url}/tlsup/x")
            assert status == 502, (status, body[:500])
            assert len(backend.hits) == hits  # neither refused handshake let a request through
            status, body, _ = await fetch(http, f"{without_ca.url}/tlsskip/x")
            assert status == 200, body[:500]
            assert json.loads(body)["path"] == "/tlsskip/x"
        finally:
            await asyncio.gather(asyncio.to_thread(with_ca.stop), asyncio.to_thread(without_ca.stop))
            for service in routes:
                await asyncio.to_thread(consul.deregister, f"{service}-1")
            await backend.stop()


# --- 7. certificates from Consul KV ----------------------------------------------------------------------------


class TestCertificatesFromKv:
    def test_kv_certificates_served_and_updated_by_blocking_queries(self, consul: ConsulAgent, workdir: Path,
                                                                    ca: TestCA) -> None:
        prefix = f"ferryman/certs-{uuid.uuid4().hex[:8]}/"
        first = ca.issue("kv.test")
        kv_put(consul, {f"{prefix}kvsite/cert": first.cert_pem, f"{prefix}kvsite/key": first.key_pem})
        proxy = TlsFerryman(consul.addr, workdir, extra=["--tls-kv-prefix", prefix, "--consul-wait", "2"])
        try:
            proxy.start()
            port = proxy.tls_port
            assert serial_for(port, "kv.test", ca) == first.serial
            assert serial_for(port, None, ca) == first.serial  # the only certificate is the default

            second = ca.issue("kv.test")
            kv_put(consul, {f"{prefix}kvsite/cert": second.cert_pem, f"{prefix}kvsite/key": second.key_pem})
            took = (wait_serial_blocking(port, "kv.test", ca, second.serial, "the KV certificate update", 8))
            assert took < 5, f"the KV update took {took:.1f}s"

            # Another certificate appears; its name sorts first, so it becomes the default.
            other = ca.issue("aaa.test")
            kv_put(consul, {f"{prefix}aaa/cert": other.cert_pem, f"{prefix}aaa/key": other.key_pem})
            (wait_serial_blocking(port, "aaa.test", ca, other.serial, "the new KV certificate", 8))
            assert serial_for(port, "kv.test", ca) == second.serial
            assert serial_for(port, "unknown.test", ca) == other.serial
            assert serial_for(port, None, ca) == other.serial
            assert proxy.proc is not None and proxy.proc.poll() is None
        finally:
            proxy.stop()
            kv_delete_tree(consul, prefix)

    def test_a_rotation_in_two_puts_serves_the_old_pair_until_the_new_halves_match(
        self, consul: ConsulAgent, workdir: Path, ca: TestCA,
    ) -> None:
        """The README's two `consul kv put`s (a new certificate with a new key): between them, the name keeps
        the pair it had; no handshake gets another name's certificate (the default, here `aaa.test`)."""
        prefix = f"ferryman/certs-{uuid.uuid4().hex[:8]}/"
        default = ca.issue("aaa.test")  # sorts first: the certificate a name without a pair would fall back to
        first = ca.issue("kv.test")
        kv_put(consul, {f"{prefix}aaa/cert": default.cert_pem, f"{prefix}aaa/key": default.key_pem,
                        f"{prefix}kvsite/cert": first.cert_pem, f"{prefix}kvsite/key": first.key_pem})
        proxy = TlsFerryman(consul.addr, workdir, extra=["--tls-kv-prefix", prefix, "--consul-wait", "2"])
        try:
            proxy.start()
            port = proxy.tls_port
            wait_serial_blocking(port, "kv.test", ca, first.serial, "the first KV certificate", 8)

            second = ca.issue("kv.test")  # a new key too
            for half in ("cert", "key"):  # in either order the pair is mismatched between the two puts
                kv_put(consul, {f"{prefix}kvsite/{half}": getattr(second, f"{half}_pem")})
                if half == "cert":
                    wait_until(lambda: [e for e in proxy.log_events() if e.get("event") == "tls_kv_certificate_invalid"
                                        and "kvsite" in e.get("error", "")], 8, "the mismatched pair to be seen")
                    served = [serial_for(port, "kv.test", ca) for _ in range(30)]
                    assert set(served) == {first.serial}
            wait_serial_blocking(port, "kv.test", ca, second.serial, "the new pair once both halves match", 8)
            assert serial_for(port, "aaa.test", ca) == default.serial
        finally:
            proxy.stop()
            kv_delete_tree(consul, prefix)

    def test_file_certificates_come_first(self, consul: ConsulAgent, workdir: Path, ca: TestCA,
                                          certdir: Path) -> None:
        prefix = f"ferryman/certs-{uuid.uuid4().hex[:8]}/"
        from_kv = ca.issue("kv.test")
        kv_put(consul, {f"{prefix}aaa/cert": from_kv.cert_pem, f"{prefix}aaa/key": from_kv.key_pem})
        from_file, f_cert, f_key = ca.issue_files(certdir, "zzz", "file.test")
        proxy = TlsFerryman(consul.addr, workdir, extra=[
            "--tls-certs", f"{f_cert}:{f_key}", "--tls-kv-prefix", prefix, "--consul-wait", "2"])
        try:
            proxy.start()
            port = proxy.tls_port
            wait_serial_blocking(port, "kv.test", ca, from_kv.serial, "the KV certificate")
            assert serial_for(port, "file.test", ca) == from_file.serial
            assert serial_for(port, None, ca) == from_file.serial  # the default is the first FILE certificate
            assert serial_for(port, "unknown.test", ca) == from_file.serial
        finally:
            proxy.stop()
            kv_delete_tree(consul, prefix)
