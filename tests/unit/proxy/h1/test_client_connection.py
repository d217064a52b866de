"""The HTTP/1.1 client connection in process, on a fake transport: what a client is answered when the proxy
itself fails (regression: such a failure dropped the connection and was logged as the client's fault)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import structlog
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from proxy import BUILD
from proxy.h1 import client as client_module
from proxy.h1 import reader as reader_module
from proxy.h1.client import ClientConnection
from proxy.h1.upstream import UpstreamPool
from proxy.listener import ProxyContext, ProxyServer, Router
from proxy.metrics import Metrics
from proxy.pool import Pools


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.closed = False

    def write(self, data: Any) -> None:
        self.out += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("10.0.0.1", 5000) if name == "peername" else default


def connection(metrics: Metrics) -> tuple[ClientConnection, FakeTransport]:
    upstream = UpstreamPool(connect_timeout=1.0, keepalive=1, idle_timeout=1.0)
    ctx = ProxyContext(
        router=Router(), pools=Pools(), upstream=upstream, metrics=metrics, listen_port=8080, proto="http",
        access_log=None, loop=asyncio.get_running_loop(),
    )
    conn = ClientConnection(ctx, ProxyServer(ctx))
    transport = FakeTransport()
    conn.connection_made(transport)
    return conn, transport


def boom(*args: object, **kwargs: object) -> Any:
    raise RuntimeError("a bug")


# The bug is planted by replacing a module's function, which compiled callers do not look up again: this runs
# on the pure build (`make test` runs the unit suite on it too).
@pytest.mark.skipif(BUILD.compiled, reason="compiled modules call each other directly: nothing to monkeypatch")
@pytest.mark.parametrize("where", ["plan", "check_head"], ids=["while-routing", "in-a-parser-callback"])
async def test_internal_error_is_a_500_logged_and_counted(monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    if where == "plan":
        monkeypatch.setattr(client_module, "plan", boom)
    else:
        monkeypatch.setattr(reader_module, "check_head", boom)
    metrics = Metrics(registry=CollectorRegistry())
    conn, transport = connection(metrics)
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        conn.data_received(b"GET / HTTP/1.1\r\nHost: example.com\r\nX-Request-ID: abc\r\n\r\n")
    assert transport.out.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
    assert b"internal proxy error" in transport.out
    events = [e for e in logs if e["event"] == "internal_error"]
    assert len(events) == 1 and events[0]["log_level"] in ("error", "exception")
    if where == "plan":
        assert b"X-Request-ID: abc" in transport.out
        assert events[0]["request_id"] == "abc"
    metrics.flush()
    assert metrics.registry.get_sample_value(
        "ferryman_requests_total", {"service": "none", "route": "none", "method": "GET" if where == "plan" else "OTHER",
                                    "code": "500"},
    ) == 1.0
    assert not [e for e in logs if e["event"] == "client_protocol_error" and e.get("status") == 400]
