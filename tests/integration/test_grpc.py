"""gRPC through Ferryman to gRPC instances (routes with proto=grpc: h2c; proto=grpcs: TLS with ALPN h2), against
the real binary and a real Consul agent: a Python grpcio server registered with a `urlprefix-/pkg.Service
proto=grpc` tag, grpcio clients on Ferryman's plain listener (h2c) and its TLS listener, and a frame-level h2
client where what goes over the wire is the point (trailers-only answers, Ferryman's own deadline, one slow
stream beside a quick one). No protobuf: generic handlers with bytes in and out."""

from __future__ import annotations

import itertools
import shutil
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived, Event, ResponseReceived, StreamEnded, StreamReset, TrailersReceived

from .certs import TestCA
from .harness import ConsulAgent, FerrymanProcess, free_port, wait_until

grpc = pytest.importorskip("grpc")  # grpcio, from the test extras

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

NAME = "grpc.test"  # the name on Ferryman's TLS listener
BACKEND_NAME = "grpc-backend.test"  # the name on the grpcs instance's certificate
MiB = 1024 * 1024
OPTIONS = [("grpc.max_receive_message_length", 8 * MiB), ("grpc.max_send_message_length", 8 * MiB)]
_ids = itertools.count(1)


# --- the gRPC service: bytes in, bytes out ---------------------------------------------------------------------
def _echo(request: bytes, context: Any) -> bytes:
    return request


def _size(request: bytes, context: Any) -> bytes:
    return b"x" * int(request)


def _sleep(request: bytes, context: Any) -> bytes:
    time.sleep(float(request))
    return b"late"


def _remaining(request: bytes, context: Any) -> bytes:
    """How long the call has left, as this instance sees it (grpc-timeout passed on)."""
    left = context.time_remaining()
    return b"none" if left is None else f"{left:.3f}".encode()


def _fail(request: bytes, context: Any) -> bytes:
    context.set_trailing_metadata((("detail-bin", b"\x00\x01\xfe\xff"), ("why", "because")))
    context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the precondition failed: é")
    raise AssertionError("abort raises")


def _count(request: bytes, context: Any) -> Iterator[bytes]:
    for i in range(int(request)):
        yield b"%d" % i


def _big_stream(request: bytes, context: Any) -> Iterator[bytes]:
    for _ in range(int(request)):
        yield b"y" * (256 * 1024)


def _collect(requests: Iterator[bytes], context: Any) -> bytes:
    return b"|".join(requests)


def _chat(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
    for request in requests:
        yield b"re:" + request


def _handlers(service: str) -> Any:
    return grpc.method_handlers_generic_handler(service, {
        "Echo": grpc.unary_unary_rpc_method_handler(_echo),
        "Size": grpc.unary_unary_rpc_method_handler(_size),
        "Sleep": grpc.unary_unary_rpc_method_handler(_sleep),
        "Remaining": grpc.unary_unary_rpc_method_handler(_remaining),
        "Fail": grpc.unary_unary_rpc_method_handler(_fail),
        "Count": grpc.unary_stream_rpc_method_handler(_count),
        "BigStream": grpc.unary_stream_rpc_method_handler(_big_stream),
        "Collect": grpc.stream_unary_rpc_method_handler(_collect),
        "Chat": grpc.stream_stream_rpc_method_handler(_chat),
    })


@dataclass
class GrpcBackend:
    """A grpcio server on a free loopback port serving `service` (over TLS when given a certificate)."""

    service: str
    tls: tuple[bytes, bytes] | None = None  # (key PEM, certificate PEM)
    port: int = field(default_factory=free_port)
    server: Any = None

    def start(self) -> GrpcBackend:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=OPTIONS)
        self.server.add_generic_rpc_handlers((_handlers(self.service),))
        address = f"127.0.0.1:{self.port}"
        if self.tls is None:
            self.server.add_insecure_port(address)
        else:
            self.server.add_secure_port(address, grpc.ssl_server_credentials([self.tls]))
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop(0)


@dataclass
class GrpcFerryman(FerrymanProcess):
    tls_port: int = field(default_factory=free_port)

    def start(self) -> None:
        self.extra = ["--tls-listen", f"127.0.0.1:{self.tls_port}", *self.extra]
        super().start()


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestCA]:
    authority = TestCA(tmp_path_factory.mktemp("grpc-ca"))
    yield authority
    shutil.rmtree(authority.directory, ignore_errors=True)


@pytest.fixture(scope="module")
def proxy(consul: ConsulAgent, workdir: Path, ca: TestCA) -> Iterator[GrpcFerryman]:
    _, cert, key = ca.issue_files(workdir, "grpc", NAME)
    proc = GrpcFerryman(consul.addr, workdir, extra=[
        "--tls-certs", f"{cert}:{key}", "--upstream-ca-file", str(ca.ca_path), "--read-timeout", "10"])
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def backend(consul: ConsulAgent, proxy: GrpcFerryman) -> Iterator[GrpcBackend]:
    server = GrpcBackend("pkg.Service").start()
    consul.register("grpc-svc", "grpc-svc-1", server.port, ["urlprefix-/pkg.Service proto=grpc"])
    proxy.wait_instances("grpc-svc@*any*/pkg.Service", ["grpc-svc-1"])
    yield server
    consul.deregister("grpc-svc-1")
    server.stop()


@pytest.fixture
def channel(proxy: GrpcFerryman, backend: GrpcBackend) -> Iterator[Any]:
    """A grpcio channel to Ferryman's plain listener: HTTP/2 with prior knowledge (h2c)."""
    with grpc.insecure_channel(f"127.0.0.1:{proxy.port}", options=OPTIONS) as ch:
        yield ch


def unary(ch: Any, path: str) -> Any:
    return ch.unary_unary(path, request_serializer=None, response_deserializer=None)


# --- a frame-level client -------------------------------------------------------------------------------------
def grpc_frame(message: bytes) -> bytes:
    """One length-prefixed gRPC message, uncompressed."""
    return struct.pack(">BI", 0, len(message)) + message


class RawH2:
    """An HTTP/2 client on a socket, frame by frame (h2c prior knowledge), that sees what Ferryman sends."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.h2.initiate_connection()
        # The connection's window wide open, as real clients keep it: a stream not read holds only its own.
        self.h2.increment_flow_control_window(2**30)
        self.events: list[Event] = []
        self.acknowledge: set[int] = set()  # streams whose DATA is acknowledged (the others' windows stay shut)
        self.sock.sendall(self.h2.data_to_send())

    def call(self, path: str, message: bytes, *extra: tuple[bytes, bytes], read: bool = True) -> int:
        sid = self.h2.get_next_available_stream_id()
        self.h2.send_headers(sid, [
            (b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"grpc.test"), (b":path", path.encode()),
            (b"content-type", b"application/grpc"), (b"te", b"trailers"), *extra])
        self.h2.send_data(sid, grpc_frame(message), end_stream=True)
        self.sock.sendall(self.h2.data_to_send())
        if read:
            self.acknowledge.add(sid)
        return sid

    def until_ended(self, sid: int, timeout: float = 10) -> list[Event]:
        """Read until stream `sid` ends (or is reset); its events."""
        deadline = time.monotonic() + timeout
        while not any(isinstance(e, StreamEnded | StreamReset) and e.stream_id == sid for e in self.events):
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = self.sock.recv(65536)
            assert data, "Ferryman closed the connection"
            for event in self.h2.receive_data(data):
                self.events.append(event)
                if isinstance(event, DataReceived) and event.stream_id in self.acknowledge:
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            self.sock.sendall(self.h2.data_to_send())
        return [e for e in self.events if getattr(e, "stream_id", None) == sid]

    def close(self) -> None:
        self.sock.close()


def metric(proxy: FerrymanProcess, name: str, **labels: str) -> float:
    """One series' value on the admin port's /metrics (0 when absent), whatever order its labels come in."""
    with urllib.request.urlopen(f"{proxy.admin_url}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    want = {f'{k}="{v}"' for k, v in labels.items()}
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        if series.startswith(name + "{") and set(series[len(name) + 1:-1].split(",")) == want:
            return float(value)
    return 0.0


# --- the four kinds of call --------------------------------------------------------------------------------------
class TestCalls:
    """Unary, server-streaming, client-streaming and bidirectional calls pass through, on h2c and over TLS."""

    def test_unary(self, channel: Any) -> None:
        """A unary call's answer comes back as the instance gave it."""
        assert unary(channel, "/pkg.Service/Echo")(b"hello", timeout=10) == b"hello"

    def test_unary_over_the_tls_listener(self, proxy: GrpcFerryman, backend: GrpcBackend, ca: TestCA) -> None:
        """A client on the TLS listener (ALPN h2) reaches the same h2c instance."""
        credentials = grpc.ssl_channel_credentials(root_certificates=ca.ca_path.read_bytes())
        with grpc.secure_channel(f"127.0.0.1:{proxy.tls_port}", credentials,
                                 options=[("grpc.ssl_target_name_override", NAME), *OPTIONS]) as ch:
            assert unary(ch, "/pkg.Service/Echo")(b"over tls", timeout=10) == b"over tls"

    def test_server_streaming(self, channel: Any) -> None:
        """Every message of a server stream arrives, in order."""
        call = channel.unary_stream("/pkg.Service/Count", request_serializer=None, response_deserializer=None)
        assert list(call(b"50", timeout=10)) == [b"%d" % i for i in range(50)]

    def test_client_streaming(self, channel: Any) -> None:
        """Every message of a client stream reaches the instance, in order."""
        call = channel.stream_unary("/pkg.Service/Collect", request_serializer=None, response_deserializer=None)
        assert call(iter([b"a", b"b", b"c" * 100_000]), timeout=10) == b"a|b|" + b"c" * 100_000

    def test_bidirectional_ping_pong(self, channel: Any) -> None:
        """Each message is answered before the next is sent: the streams flow both ways at once."""
        call = channel.stream_stream("/pkg.Service/Chat", request_serializer=None, response_deserializer=None)
        outbox: list[bytes] = []
        ready = threading.Semaphore(0)

        def requests() -> Iterator[bytes]:
            for i in range(20):
                outbox.append(b"m%d" % i)
                yield outbox[-1]
                assert ready.acquire(timeout=10), "no answer to the last message"

        answers = []
        for answer in call(requests(), timeout=20):
            answers.append(answer)
            ready.release()
        assert answers == [b"re:m%d" % i for i in range(20)]

    def test_a_4_mib_message_each_way(self, channel: Any) -> None:
        """A 4 MiB request and its 4 MiB echo pass whole (flow control across both windows)."""
        payload = bytes(range(256)) * (4 * MiB // 256)
        assert unary(channel, "/pkg.Service/Echo")(payload, timeout=30) == payload

    def test_many_concurrent_calls(self, channel: Any) -> None:
        """Calls in parallel share the few connections to the instance, each with its own answer."""
        call = unary(channel, "/pkg.Service/Echo")
        with futures.ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda i: call(b"n%d" % i, timeout=20), range(300)))
        assert answers == [b"n%d" % i for i in range(300)]


# --- statuses, trailers, deadlines -------------------------------------------------------------------------------
class TestStatuses:
    """The instance's statuses and metadata pass through; Ferryman's own errors are gRPC statuses."""

    def test_an_error_keeps_its_message_and_binary_metadata(self, channel: Any) -> None:
        """grpc-status, grpc-message (percent-encoded UTF-8) and -bin trailing metadata arrive intact."""
        with pytest.raises(grpc.RpcError) as caught:
            unary(channel, "/pkg.Service/Fail")(b"", timeout=10)
        error: Any = caught.value
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error.details() == "the precondition failed: é"
        trailing = dict(error.trailing_metadata())
        assert trailing["detail-bin"] == b"\x00\x01\xfe\xff"
        assert trailing["why"] == "because"

    def test_a_trailers_only_answer_stays_one_headers_frame(self, proxy: GrpcFerryman, backend: GrpcBackend) -> None:
        """An error without messages reaches the client as one HEADERS frame with END_STREAM and grpc-status."""
        client = RawH2(proxy.port)
        try:
            events = client.until_ended(client.call("/pkg.Service/Fail", b""))
        finally:
            client.close()
        heads = [e for e in events if isinstance(e, ResponseReceived)]
        assert len(heads) == 1 and heads[0].stream_ended is not None
        assert not [e for e in events if isinstance(e, DataReceived | TrailersReceived)]
        assert (b"grpc-status", b"9") in heads[0].headers

    def test_trailers_follow_the_data(self, proxy: GrpcFerryman, backend: GrpcBackend) -> None:
        """A successful call ends with trailers carrying grpc-status 0, after its message."""
        client = RawH2(proxy.port)
        try:
            events = client.until_ended(client.call("/pkg.Service/Echo", b"abc"))
        finally:
            client.close()
        kinds = [type(e).__name__ for e in events if not isinstance(e, StreamEnded)]
        assert kinds[0] == "ResponseReceived" and kinds[-1] == "TrailersReceived"
        body = b"".join(e.data for e in events if isinstance(e, DataReceived))
        assert body == grpc_frame(b"abc")
        trailers = next(e for e in events if isinstance(e, TrailersReceived))
        assert (b"grpc-status", b"0") in trailers.headers

    def test_grpc_timeout_is_passed_on(self, channel: Any) -> None:
        """The instance sees the caller's deadline (grpc-timeout forwarded)."""
        left = float(unary(channel, "/pkg.Service/Remaining")(b"", timeout=5))
        assert 3 < left <= 6  # grpc-timeout is written with a few digits: grpcio rounds it up a little

    def test_a_deadline_exceeded_at_the_upstream(self, channel: Any) -> None:
        """A call slower than its deadline ends DEADLINE_EXCEEDED."""
        with pytest.raises(grpc.RpcError) as caught:
            unary(channel, "/pkg.Service/Sleep")(b"3", timeout=0.5)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    def test_ferryman_answers_deadline_exceeded_itself(self, proxy: GrpcFerryman, backend: GrpcBackend) -> None:
        """A client that keeps no deadline of its own still gets DEADLINE_EXCEEDED when grpc-timeout passes,
        from Ferryman, long before the instance would answer."""
        client = RawH2(proxy.port)
        started = time.monotonic()
        try:
            events = client.until_ended(client.call("/pkg.Service/Sleep", b"4", (b"grpc-timeout", b"300m")))
        finally:
            client.close()
        assert time.monotonic() - started < 3
        heads = [e for e in events if isinstance(e, ResponseReceived)]
        assert heads and (b"grpc-status", b"4") in heads[0].headers

    def test_statuses_are_counted(self, proxy: GrpcFerryman, channel: Any) -> None:
        """ferryman_grpc_responses_total counts calls by service and status name."""
        before = metric(proxy, "ferryman_grpc_responses_total", service="grpc-svc", code="OK")
        unary(channel, "/pkg.Service/Echo")(b"x", timeout=10)
        with pytest.raises(grpc.RpcError):
            unary(channel, "/pkg.Service/Fail")(b"", timeout=10)
        wait_until(lambda: metric(proxy, "ferryman_grpc_responses_total", service="grpc-svc", code="OK") > before,
                   10, "the OK call counted")
        assert metric(proxy, "ferryman_grpc_responses_total", service="grpc-svc", code="FAILED_PRECONDITION") >= 1

    def test_an_http1_client_is_told_to_use_http2(self, proxy: GrpcFerryman, backend: GrpcBackend) -> None:
        """HTTP/1.1 on a gRPC route: 505, saying HTTP/2 is needed (never a half-working call)."""
        request = urllib.request.Request(f"{proxy.url}/pkg.Service/Echo", data=b"x", method="POST",
                                         headers={"Content-Type": "application/grpc"})
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=10)
        assert caught.value.code == 505
        assert b"HTTP/2" in caught.value.read()


class TestUnavailable:
    """No instance, or one that refuses: UNAVAILABLE."""

    def test_no_healthy_instance(self, consul: ConsulAgent, proxy: GrpcFerryman) -> None:
        """A route whose only instance fails its check answers UNAVAILABLE."""
        instance = f"grpc-sick-{next(_ids)}"
        consul.register("grpc-sick", instance, free_port(), ["urlprefix-/sick.Service proto=grpc"])
        proxy.wait_instances("grpc-sick@*any*/sick.Service", [instance])
        consul.ttl(instance, "critical")
        try:
            proxy.wait_instances("grpc-sick@*any*/sick.Service", [])
            with grpc.insecure_channel(f"127.0.0.1:{proxy.port}") as ch, pytest.raises(grpc.RpcError) as caught:
                unary(ch, "/sick.Service/Echo")(b"", timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            consul.deregister(instance)

    def test_an_instance_that_refuses(self, consul: ConsulAgent, proxy: GrpcFerryman) -> None:
        """Nothing listens on the instance's port: UNAVAILABLE (and the call is not left hanging)."""
        instance = f"grpc-gone-{next(_ids)}"
        consul.register("grpc-gone", instance, free_port(), ["urlprefix-/gone.Service proto=grpc"])
        try:
            proxy.wait_instances("grpc-gone@*any*/gone.Service", [instance])
            with grpc.insecure_channel(f"127.0.0.1:{proxy.port}") as ch, pytest.raises(grpc.RpcError) as caught:
                unary(ch, "/gone.Service/Echo")(b"", timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            consul.deregister(instance)

    def test_a_refused_instance_is_retried_on_another(self, consul: ConsulAgent, proxy: GrpcFerryman) -> None:
        """A connection never established is tried on another instance: every call succeeds."""
        server = GrpcBackend("retry.Service").start()
        good, bad = f"grpc-retry-{next(_ids)}", f"grpc-retry-{next(_ids)}"
        consul.register("grpc-retry", good, server.port, ["urlprefix-/retry.Service proto=grpc"])
        consul.register("grpc-retry", bad, free_port(), ["urlprefix-/retry.Service proto=grpc"])
        try:
            proxy.wait_instances("grpc-retry@*any*/retry.Service", [good, bad])
            with grpc.insecure_channel(f"127.0.0.1:{proxy.port}") as ch:
                for i in range(10):
                    assert unary(ch, "/retry.Service/Echo")(b"%d" % i, timeout=10) == b"%d" % i
        finally:
            consul.deregister(good)
            consul.deregister(bad)
            server.stop()


class TestFlowControl:
    """A stream whose client does not read stalls neither the other streams nor Ferryman's memory."""

    def test_a_slow_reader_does_not_stall_a_quick_call(self, proxy: GrpcFerryman, backend: GrpcBackend) -> None:
        """Stream 1 asks for 32 MiB and never opens its window; a unary call on the same connection, and one on
        another connection, still answer at once, and Ferryman's resident memory stays far below 32 MiB more."""
        client = RawH2(proxy.port)
        try:
            rss_before = _rss(proxy)
            slow = client.call("/pkg.Service/BigStream", b"128", read=False)  # 128 x 256 KiB
            time.sleep(1.0)  # the instance fills every window it is given
            quick = client.until_ended(client.call("/pkg.Service/Echo", b"quick"))
            assert any(isinstance(e, TrailersReceived) and (b"grpc-status", b"0") in e.headers for e in quick)
            with grpc.insecure_channel(f"127.0.0.1:{proxy.port}") as ch:
                assert unary(ch, "/pkg.Service/Echo")(b"other", timeout=5) == b"other"
            assert _rss(proxy) - rss_before < 8 * MiB
            received = sum(len(e.data) for e in client.events if isinstance(e, DataReceived) and e.stream_id == slow)
            assert received <= 65535  # the slow stream's client window, never more
        finally:
            client.close()


def _rss(proxy: FerrymanProcess) -> int:
    """Ferryman's resident memory in bytes (one worker: the process itself)."""
    assert proxy.proc is not None
    for line in Path(f"/proc/{proxy.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS line")


class TestDrain:
    """A deregistered instance gets no new calls; a stream open on it goes on to its end."""

    def test_an_open_stream_outlives_its_instance_deregistration(
        self, consul: ConsulAgent, proxy: GrpcFerryman,
    ) -> None:
        """A bidirectional stream keeps exchanging messages after its instance left Consul; new calls get
        UNAVAILABLE (no instance left)."""
        server = GrpcBackend("drain.Service").start()
        instance = f"grpc-drain-{next(_ids)}"
        consul.register("grpc-drain", instance, server.port, ["urlprefix-/drain.Service proto=grpc"])
        try:
            proxy.wait_instances("grpc-drain@*any*/drain.Service", [instance])
            with grpc.insecure_channel(f"127.0.0.1:{proxy.port}") as ch:
                call = ch.stream_stream("/drain.Service/Chat", request_serializer=None, response_deserializer=None)
                step = threading.Semaphore(0)
                deregistered = threading.Event()

                def requests() -> Iterator[bytes]:
                    yield b"before"
                    assert deregistered.wait(20)
                    for i in range(5):
                        yield b"after%d" % i
                        assert step.acquire(timeout=10)

                answers = []
                responses = call(requests(), timeout=30)
                answers.append(next(responses))
                consul.deregister(instance)
                proxy.wait_instances("grpc-drain@*any*/drain.Service", [])
                deregistered.set()
                for answer in responses:
                    answers.append(answer)
                    step.release()
                assert answers == [b"re:before", *(b"re:after%d" % i for i in range(5))]
                with pytest.raises(grpc.RpcError) as caught:
                    unary(ch, "/drain.Service/Echo")(b"", timeout=10)
                assert caught.value.code() in (
                    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNIMPLEMENTED)
        finally:
            consul.deregister(instance)
            server.stop()


class TestGrpcs:
    """proto=grpcs: TLS to the instance with ALPN h2, verified against upstream_ca_file, sni= naming it."""

    def test_unary_and_streaming_over_tls_to_the_instance(
        self, consul: ConsulAgent, proxy: GrpcFerryman, ca: TestCA,
    ) -> None:
        """Calls reach a TLS-only grpcio instance whose certificate the test CA signed for its sni= name."""
        leaf = ca.issue(BACKEND_NAME)
        server = GrpcBackend("secure.Service", tls=(leaf.key_pem, leaf.cert_pem)).start()
        instance = f"grpcs-{next(_ids)}"
        consul.register("grpcs-svc", instance, server.port,
                        [f"urlprefix-/secure.Service proto=grpcs sni={BACKEND_NAME}"])
        try:
            proxy.wait_instances("grpcs-svc@*any*/secure.Service", [instance])
            with grpc.insecure_channel(f"127.0.0.1:{proxy.port}", options=OPTIONS) as ch:
                assert unary(ch, "/secure.Service/Echo")(b"sealed", timeout=10) == b"sealed"
                stream = ch.unary_stream("/secure.Service/Count", request_serializer=None,
                                         response_deserializer=None)
                assert list(stream(b"5", timeout=10)) == [b"0", b"1", b"2", b"3", b"4"]
        finally:
            consul.deregister(instance)
            server.stop()

    def test_an_unverified_instance_is_unavailable(self, consul: ConsulAgent, proxy: GrpcFerryman) -> None:
        """A certificate the configured CA did not sign fails the handshake: UNAVAILABLE, nothing sent."""
        stranger = TestCA(Path(proxy.workdir) / "stranger-ca").issue(BACKEND_NAME)
        server = GrpcBackend("stranger.Service", tls=(stranger.key_pem, stranger.cert_pem)).start()
        instance = f"grpcs-{next(_ids)}"
        consul.register("grpcs-stranger", instance, server.port,
                        [f"urlprefix-/stranger.Service proto=grpcs sni={BACKEND_NAME}"])
        try:
            proxy.wait_instances("grpcs-stranger@*any*/stranger.Service", [instance])
            with grpc.insecure_channel(f"127.0.0.1:{proxy.port}") as ch, pytest.raises(grpc.RpcError) as caught:
                unary(ch, "/stranger.Service/Echo")(b"", timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            consul.deregister(instance)
            server.stop()
