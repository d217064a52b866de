"""Send one request upstream over a shared, keep-alive ClientSession and hand back the streaming response.

One ClientSession for the process, created at start-up with an explicit TCPConnector (pool size, idle
keep-alive) and ClientTimeout (connect, and read between bytes; no total, so a long download is fine while
it moves). Nothing is decompressed, no cookie jar, no redirects followed, no header invented: aiohttp's
default Accept, Accept-Encoding, User-Agent and Content-Type are suppressed so the upstream sees what the
client sent. The request body is relayed as an async iterator of the client's chunks.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from typing import Final

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from .errors import map_client_errors

# Headers aiohttp's client adds when absent; a transparent proxy must not add them.
_NO_AUTO_HEADERS: Final = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")


class RequestBody:
    """The client's request body, relayed chunk by chunk. `started` tells whether any byte was consumed:
    until then the request may still go to another instance."""

    __slots__ = ("_content", "started")

    def __init__(self, request: web.BaseRequest) -> None:
        self._content = request.content
        self.started = False

    async def chunks(self) -> AsyncIterator[bytes]:
        self.started = True
        async for chunk in self._content.iter_any():
            yield chunk


class Forwarder:
    def __init__(
        self,
        *,
        connect_timeout: float,
        read_timeout: float,
        max_connections: int,
        idle_timeout: float,
    ) -> None:
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout, sock_read=read_timeout)
        self._max_connections = max_connections
        self._idle_timeout = idle_timeout
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self._max_connections,
            limit_per_host=0,
            keepalive_timeout=self._idle_timeout,
            ttl_dns_cache=10,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=_NO_AUTO_HEADERS,
            trust_env=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(
        self,
        method: str,
        scheme: str,
        authority: str,
        target: str,
        headers: CIMultiDict[str],
        body: RequestBody | None,
        *,
        tls_skip_verify: bool = False,
    ) -> aiohttp.ClientResponse:
        """Send the request and return once the response head arrived; the body is left to stream."""
        session = self._session
        assert session is not None, "Forwarder.start() was not awaited"
        url = URL(f"{scheme}://{authority}{target}", encoded=True)
        ssl_arg: ssl.SSLContext | bool = not tls_skip_verify
        with map_client_errors(authority):
            return await session.request(
                method,
                url,
                headers=headers,
                data=body.chunks() if body is not None else None,
                allow_redirects=False,
                ssl=ssl_arg,
            )
