"""WebSocket through Ferryman (both ways, text, binary, ping/pong, close codes, counted in metrics), server-sent
events arriving as they are sent, and the idle timeout of long-lived connections. Real aiohttp peers on both
sides, a real Consul agent."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from .harness import ConsulAgent, FerrymanProcess, fetch, free_port, wait_until

pytestmark = pytest.mark.integration


class WsBackend:
    """Echoes WebSocket messages (text as text, binary as binary), closes with the code a client asks for, and
    streams server-sent events gated by the test."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = free_port()
        self.gate = asyncio.Event()
        self.closed_codes: list[int | None] = []
        self._runner: web.AppRunner | None = None

    async def start(self) -> WsBackend:
        app = web.Application()
        app.router.add_get("/ws/echo", self.echo)
        app.router.add_get("/ws/events", self.events)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def echo(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                if msg.data.startswith("close:"):
                    await ws.close(code=int(msg.data[6:]), message=b"asked")
                    break
                await ws.send_str(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        self.closed_codes.append(ws.close_code)
        return ws

    async def events(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        await resp.write(b"id: 1\ndata: first\n\n")
        await asyncio.wait_for(self.gate.wait(), 10)  # the last event waits until the first came through
        await resp.write(b"id: 2\ndata: last\n\n")
        await resp.write_eof()
        return resp


@pytest.fixture
async def ws_backend(consul: ConsulAgent, ferryman: FerrymanProcess) -> AsyncIterator[WsBackend]:
    backend = await WsBackend("ws-1").start()
    await asyncio.to_thread(consul.register, "ws", "ws-1", backend.port, ["urlprefix-/ws"])
    # The same instance id comes back on a new port in each test: wait for this port, not just the id.
    await asyncio.to_thread(wait_until, lambda: [(i["id"], i["port"]) for r in ferryman.routes()["routes"]
                                                 if r["id"] == "ws@*any*/ws" for i in r["instances"]]
                            == [("ws-1", backend.port)], 10, "ws-1 on its new port")
    yield backend
    await asyncio.to_thread(consul.deregister, "ws-1")
    await backend.stop()


def _gauge(text: str) -> float | None:
    found = re.search(r'ferryman_websocket_connections\{service="ws"\} (\S+)', text)
    return float(found.group(1)) if found else None


class TestWebSocket:
    async def test_a_thousand_messages_each_way_ping_and_close_code(
        self, ferryman: FerrymanProcess, ws_backend: WsBackend, http: aiohttp.ClientSession
    ) -> None:
        async with http.ws_connect(f"{ferryman.url}/ws/echo", autoping=False) as ws:
            # The gauge counts it while it is open.
            _, body, _ = await fetch(http, f"{ferryman.admin_url}/metrics")
            assert _gauge(body.decode()) == 1.0

            for i in range(1000):
                await ws.send_str(f"text {i} " + "é" * (i % 50))
            for i in range(1000):
                msg = await ws.receive(timeout=5)
                assert msg.type == WSMsgType.TEXT and msg.data == f"text {i} " + "é" * (i % 50)
            payloads = [bytes([i % 256]) * (i * 37 % 70_000) for i in range(1000)]  # up to ~68 KiB frames
            sender = asyncio.ensure_future(asyncio.gather(*(ws.send_bytes(p) for p in payloads)))
            for payload in payloads:
                msg = await ws.receive(timeout=5)
                assert msg.type == WSMsgType.BINARY and msg.data == payload
            await sender

            await ws.ping(b"are you there")
            pong = await ws.receive(timeout=5)
            assert pong.type == WSMsgType.PONG and pong.data == b"are you there"

            await ws.send_str("close:4001")
            closing = await ws.receive(timeout=5)
            assert closing.type == WSMsgType.CLOSE and closing.data == 4001 and closing.extra == "asked"
        assert ws.close_code == 4001

        def counted_out() -> bool:
            return _gauge(_metrics(ferryman)) == 0.0

        await asyncio.to_thread(wait_until, counted_out, 5, "the gauge back to 0")
        access = [e for e in ferryman.log_events() if e.get("event") == "access" and e.get("path") == "/ws/echo"]
        assert access and access[-1]["status"] == 101 and access[-1]["service"] == "ws"

    async def test_client_closing_closes_the_upstream_side(
        self, ferryman: FerrymanProcess, ws_backend: WsBackend, http: aiohttp.ClientSession
    ) -> None:
        async with http.ws_connect(f"{ferryman.url}/ws/echo") as ws:
            await ws.send_str("hello")
            assert (await ws.receive(timeout=5)).data == "hello"
            await ws.close(code=1000)
        await asyncio.to_thread(wait_until, lambda: ws_backend.closed_codes, 5, "the backend to see the close")
        assert ws_backend.closed_codes[-1] == 1000

    async def test_a_refused_upgrade_is_an_ordinary_answer(
        self, ferryman: FerrymanProcess, http: aiohttp.ClientSession
    ) -> None:
        # No route: 404, and the WebSocket handshake fails on the client as it should.
        with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
            async with http.ws_connect(f"{ferryman.url}/no-such-ws-route/echo"):
                pass
        assert caught.value.status == 404


def _metrics(ferryman: FerrymanProcess) -> str:
    import urllib.request
    with urllib.request.urlopen(f"{ferryman.admin_url}/metrics", timeout=2) as resp:
        return str(resp.read().decode())


class TestServerSentEvents:
    async def test_the_first_event_arrives_before_the_last_is_sent(
        self, ferryman: FerrymanProcess, ws_backend: WsBackend, http: aiohttp.ClientSession
    ) -> None:
        async with http.get(f"{ferryman.url}/ws/events") as resp:
            assert resp.headers["Content-Type"] == "text/event-stream"
            first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
            assert first == b"id: 1\ndata: first\n\n"
            assert not ws_backend.gate.is_set()  # the backend has not sent the last event yet
            ws_backend.gate.set()
            rest = await asyncio.wait_for(resp.content.read(), 5)
        assert rest == b"id: 2\ndata: last\n\n"


class TestIdleTunnels:
    async def test_a_silent_websocket_is_closed_after_websocket_idle_timeout(
        self, consul: ConsulAgent, workdir: Path, ws_backend: WsBackend,
    ) -> None:
        proxy = FerrymanProcess(consul.addr, workdir, extra=["--websocket-idle-timeout", "1", "--read-timeout", "30"])
        await asyncio.to_thread(proxy.start)
        try:
            await asyncio.to_thread(proxy.wait_instances, "ws@*any*/ws", ["ws-1"])
            async with aiohttp.ClientSession() as http, http.ws_connect(f"{proxy.url}/ws/echo", autoping=False) as ws:
                await ws.send_str("still here")
                assert (await ws.receive(timeout=5)).data == "still here"
                started = time.monotonic()
                msg = await ws.receive(timeout=10)  # nothing more is sent: the proxy closes it
                assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING, WSMsgType.ERROR)
                assert time.monotonic() - started < 4  # 1 s and a sweep tick, with room for a loaded machine
            assert any(e.get("event") == "tunnel_idle_closed" for e in proxy.log_events())
        finally:
            await asyncio.to_thread(proxy.stop)
