"""HTTP/2 to clients against the real binary, with real clients: curl over TLS (ALPN h2) and with prior knowledge
on the plain listener, nghttp multiplexing streams on one connection, Python's ssl checking what ALPN chooses
(and that `http2 = false` offers HTTP/1.1 alone). A real Consul agent, real aiohttp backends, all on 127.0.0.1."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import shutil
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .certs import TestCA
from .harness import Backend, ConsulAgent, FerrymanProcess, free_port, pattern_bytes, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

NAME = "h2.test"


@dataclass
class H2Ferryman(FerrymanProcess):
    tls_port: int = field(default_factory=free_port)

    def start(self) -> None:
        self.extra = ["--tls-listen", f"127.0.0.1:{self.tls_port}", *self.extra]
        super().start()
        wait_until(self._tls_port_accepts, 10, "the TLS listener")

    def _tls_port_accepts(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.tls_port), timeout=1):
                return True
        except OSError:
            return False


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestCA]:
    authority = TestCA(tmp_path_factory.mktemp("h2-ca"))
    yield authority
    shutil.rmtree(authority.directory, ignore_errors=True)


@pytest.fixture(scope="module")
def proxy(consul: ConsulAgent, workdir: Path, ca: TestCA) -> Iterator[H2Ferryman]:
    _, cert, key = ca.issue_files(workdir, "h2", NAME)
    access = workdir / "h2-access.log"
    proc = H2Ferryman(consul.addr, workdir, extra=[
        "--tls-certs", f"{cert}:{key}", "--access-log-format", "common", "--access-log-file", str(access)])
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
async def backend(consul: ConsulAgent, proxy: H2Ferryman) -> AsyncIterator[Backend]:
    # An instance id of its own per test: the one before may still be in the table for a moment.
    instance = f"h2-echo-{next(_instances)}"
    server = await Backend(instance).start()
    await asyncio.to_thread(consul.register, "h2-echo", instance, server.port, ["urlprefix-/h2"])
    await asyncio.to_thread(proxy.wait_instances, "h2-echo@*any*/h2", [instance])
    yield server
    await asyncio.to_thread(consul.deregister, instance)
    await server.stop()


_instances = itertools.count(1)


async def run(*args: str, stdin: bytes | None = None) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        *args, stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    assert proc.returncode is not None
    return proc.returncode, out, err


def curl_tls(proxy: H2Ferryman, ca: TestCA, path: str, *more: str) -> list[str]:
    return ["curl", "-sS", "--http2", "--cacert", str(ca.ca_path),
            "--resolve", f"{NAME}:{proxy.tls_port}:127.0.0.1", *more, f"https://{NAME}:{proxy.tls_port}{path}"]


class TestCurl:
    """curl speaks HTTP/2 to Ferryman, which forwards each stream as an HTTP/1.1 request."""

    async def test_tls_alpn_h2(self, proxy: H2Ferryman, ca: TestCA, backend: Backend) -> None:
        code, out, err = await run(*curl_tls(proxy, ca, "/h2/echo?x=1", "-H", "Cookie: a=1", "-H", "Cookie: b=2",
                                             "-w", "\n%{http_version} %{response_code}"))
        assert code == 0, err
        body, _, tail = out.rpartition(b"\n")
        assert tail == b"2 200"
        echoed = json.loads(body)
        headers = {k.lower(): v for k, v in echoed["headers"]}
        assert echoed["path"] == "/h2/echo?x=1" and headers["host"] == f"{NAME}:{proxy.tls_port}"
        assert headers["cookie"] == "a=1; b=2" and headers["x-forwarded-proto"] == "https"
        assert "te" not in headers and "upgrade" not in headers

    async def test_plain_prior_knowledge(self, proxy: H2Ferryman, backend: Backend) -> None:
        code, out, err = await run("curl", "-sS", "--http2-prior-knowledge", "-o", "/dev/null",
                                   "-w", "%{http_version} %{response_code}", f"{proxy.url}/h2/echo")
        assert (code, out) == (0, b"2 200"), err

    async def test_upload_and_download_keep_every_byte(self, proxy: H2Ferryman, ca: TestCA, backend: Backend,
                                                       tmp_path: Path) -> None:
        """8 MiB each way through both flow-control windows."""
        data = pattern_bytes(0, 8 * 1024 * 1024)
        upload = tmp_path / "up.bin"
        upload.write_bytes(data)
        code, out, err = await run(*curl_tls(proxy, ca, "/h2/upload", "--data-binary", f"@{upload}"))
        assert code == 0, err
        assert json.loads(out)["sha256"] == hashlib.sha256(data).hexdigest()
        code, out, err = await run(*curl_tls(proxy, ca, f"/h2/download?size={len(data)}"))
        assert code == 0, err
        assert hashlib.sha256(out).hexdigest() == hashlib.sha256(data).hexdigest()

    async def test_no_route_is_a_404_over_http2(self, proxy: H2Ferryman, ca: TestCA) -> None:
        code, out, _ = await run(*curl_tls(proxy, ca, "/nowhere", "-w", "\n%{http_version} %{response_code}"))
        assert code == 0 and out.endswith(b"\n2 404")

    async def test_access_log_says_http2(self, proxy: H2Ferryman, ca: TestCA, backend: Backend,
                                         workdir: Path) -> None:
        code, _, err = await run(*curl_tls(proxy, ca, "/h2/logged-request", "-o", "/dev/null"))
        assert code == 0, err
        log = workdir / "h2-access.log"
        wait_until(lambda: b"/h2/logged-request HTTP/2.0\" 200" in log.read_bytes(), 5, "the access line")


class TestNghttp:
    """nghttp (Debian's nghttp2-client) multiplexes several streams on one h2c connection."""

    async def test_streams_multiplexed(self, proxy: H2Ferryman, backend: Backend) -> None:
        urls = [f"{proxy.url}/h2/echo?n={i}" for i in range(10)]
        code, out, err = await run(tool("nghttp"), "-n", "-s", *urls)
        assert code == 0, err
        assert out.count(b"/h2/echo?n=") == 10  # one statistics line per stream
        assert sorted(h.path for h in backend.hits) == sorted(f"/h2/echo?n={i}" for i in range(10))


class TestAlpn:
    """What a TLS client is offered: h2 before http/1.1, and only http/1.1 with http2 = false."""

    @pytest.mark.parametrize(("offered", "chosen"), [
        (["h2", "http/1.1"], "h2"), (["http/1.1", "h2"], "h2"), (["http/1.1"], "http/1.1"),
    ], ids=["h2-first", "h2-second", "http11-only"])
    def test_python_ssl_negotiates(self, proxy: H2Ferryman, ca: TestCA, offered: list[str], chosen: str) -> None:
        assert negotiated(proxy.tls_port, ca, offered) == chosen

    def test_http2_off_offers_http11_only(self, consul: ConsulAgent, workdir: Path, ca: TestCA) -> None:
        _, cert, key = ca.issue_files(workdir, "h2off", NAME)
        proc = H2Ferryman(consul.addr, workdir, extra=["--tls-certs", f"{cert}:{key}", "--http2", "false"])
        proc.start()
        try:
            assert negotiated(proc.tls_port, ca, ["h2", "http/1.1"]) == "http/1.1"
        finally:
            proc.stop()


def tool(name: str) -> str:
    """A Debian tool: unpacked into .venv by `make test`, else on PATH."""
    unpacked = Path(sys.executable).parent / name
    return str(unpacked) if unpacked.exists() else name


def negotiated(port: int, ca: TestCA, offered: list[str]) -> str | None:
    ctx = ssl.create_default_context(cafile=str(ca.ca_path))
    ctx.set_alpn_protocols(offered)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname=NAME) as tls:
        return tls.selected_alpn_protocol()


class TestGrpcClient:
    """A grpcio client through Ferryman reads the proxy's own errors as gRPC statuses."""

    def test_no_route_is_unimplemented(self, proxy: H2Ferryman) -> None:
        import grpc  # grpcio, from the test extras

        with grpc.insecure_channel(f"127.0.0.1:{proxy.port}") as channel:
            call = channel.unary_unary("/nowhere.Svc/Call")
            with pytest.raises(grpc.RpcError) as caught:
                call(b"", timeout=10)
        error: Any = caught.value
        assert error.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "no route" in error.details()
