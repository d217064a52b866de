"""gRPC calls that wait or go elsewhere: a stream an instance refused (RST_STREAM REFUSED_STREAM, or above the
last stream its GOAWAY took; RFC 9113 §8.7: never processed) is sent again, body and all, to another instance,
whatever the method; a call that waited for a stream reaches its instance with what is left of its deadline.
Against the real binary, a real Consul agent, grpcio clients and servers, and a refusing HTTP/2 instance made of
the `h2` library on a socket."""

from __future__ import annotations

import itertools
import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import RequestReceived
from h2.exceptions import ProtocolError

from .harness import ConsulAgent, FerrymanProcess
from .test_grpc import GrpcBackend, _handlers, unary

grpc = pytest.importorskip("grpc")  # grpcio, from the test extras

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

_ids = itertools.count(1)


class RefusingInstance:
    """An HTTP/2 server that takes no stream: each is refused with RST_STREAM REFUSED_STREAM, or with a GOAWAY
    whose last stream id is 0 (`how`). Counts the streams it refused."""

    def __init__(self, how: str) -> None:
        self.how = how
        self.refused = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        h2 = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        h2.initiate_connection()
        with conn:
            try:
                conn.sendall(h2.data_to_send())
                while data := conn.recv(65536):
                    for event in h2.receive_data(data):
                        if isinstance(event, RequestReceived):
                            self.refused += 1
                            if self.how == "goaway":
                                h2.close_connection(ErrorCodes.NO_ERROR, last_stream_id=0)
                            else:
                                h2.reset_stream(event.stream_id, ErrorCodes.REFUSED_STREAM)
                    conn.sendall(h2.data_to_send())
            except (OSError, ProtocolError):
                return

    def stop(self) -> None:
        self.listener.close()


@pytest.fixture(scope="module")
def proxy(consul: ConsulAgent, workdir: Path) -> Iterator[FerrymanProcess]:
    # One HTTP/2 connection per instance: a call waits while an instance's streams are all taken.
    proc = FerrymanProcess(consul.addr, workdir, extra=["--read-timeout", "10",
                                                        "--grpc-max-connections-per-instance", "1"])
    proc.start()
    yield proc
    proc.stop()


class TestRefusedStreams:
    """A refused stream is tried on another instance: every call succeeds, the refusing instance saw some."""

    @pytest.mark.parametrize("how", ["rst-stream", "goaway"])
    def test_a_refused_call_goes_to_another_instance(self, consul: ConsulAgent, proxy: FerrymanProcess,
                                                     how: str) -> None:
        """POST (every gRPC call) is not idempotent: only the instance saying it never processed the call lets
        it go elsewhere; a 10 KiB message is sent again whole."""
        service = f"refuse-{how}"
        server, refusing = GrpcBackend("refuse.Service").start(), RefusingInstance(how)
        good, bad = f"{service}-{next(_ids)}", f"{service}-{next(_ids)}"
        tag = ["urlprefix-/refuse.Service proto=grpc"]
        consul.register(service, good, server.port, tag)
        consul.register(service, bad, refusing.port, tag)
        try:
            proxy.wait_instances(f"{service}@*any*/refuse.Service", [good, bad])
            with grpc.insecure_channel(f"127.0.0.1:{proxy.port}") as ch:
                for i in range(12):
                    message = b"%d" % i * (5000 if i % 2 else 1)
                    assert unary(ch, "/refuse.Service/Echo")(message, timeout=10) == message
            assert refusing.refused >= 1
        finally:
            consul.deregister(good)
            consul.deregister(bad)
            server.stop()
            refusing.stop()


class TestDeadlines:
    """What an instance is told of a call's deadline is what is left of it when the call reaches it."""

    def test_a_call_that_waited_for_a_stream_forwards_what_is_left_of_its_deadline(
        self, consul: ConsulAgent, proxy: FerrymanProcess,
    ) -> None:
        """The instance takes one stream at a time (SETTINGS_MAX_CONCURRENT_STREAMS 1) over its one connection:
        a call made while another sleeps 2 s waits for it, then arrives with about 3 s of its 5 s left."""
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=[("grpc.max_concurrent_streams", 1)])
        server.add_generic_rpc_handlers((_handlers("wait.Service"),))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        instance = f"grpc-wait-{next(_ids)}"
        consul.register("grpc-wait", instance, port, ["urlprefix-/wait.Service proto=grpc"])
        try:
            proxy.wait_instances("grpc-wait@*any*/wait.Service", [instance])
            with grpc.insecure_channel(f"127.0.0.1:{proxy.port}") as ch:
                assert unary(ch, "/wait.Service/Echo")(b"warm", timeout=10) == b"warm"  # the connection is up
                sleeping = unary(ch, "/wait.Service/Sleep").future(b"2", timeout=10)
                time.sleep(0.3)  # the sleeping call holds the one stream
                left = float(unary(ch, "/wait.Service/Remaining")(b"", timeout=5))
                assert sleeping.result() == b"late"
            assert 1.0 < left < 3.6  # 5 s less the ~1.7 s waited (grpcio rounds the deadline up a little)
        finally:
            consul.deregister(instance)
            server.stop(0)
