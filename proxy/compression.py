"""Response compression (Fabio's `proxy.gzip.contenttype`): which answers are compressed, and how they stream.

Decided once per response head by `choose`, a pure function of the request's method and header fields, the
response's status and header fields, and the `Compression` policy in force (the `gzip_content_type` setting,
or a route's `gzip=on`). An answer is compressed only when the client asked (Accept-Encoding with a q above
0: a client that did not ask never gets a compressed body), its Content-Type matches the pattern (searched,
not anchored, as Fabio's Go `MatchString`), it has a body, is not encoded already, is not a range, its
Content-Length (when known) is at least `min_length`, and no side said `Cache-Control: no-transform`
(RFC 9111 §5.2.1.6, §5.2.2.6). gzip by default; brotli only when the client rates `br` above gzip.

`Encoder` then stands between the exchange and the client connection for that one response: each body chunk
is compressed as it arrives, and at the end of each upstream read the compressor is sync-flushed
(Z_SYNC_FLUSH; brotli's flush), so what one read brought reaches the client at once, whole: a Server-Sent
Events stream or a long poll is never held back waiting for more input, and nothing beyond one read is ever
buffered. The cost is a few bytes per read (an empty stored block), nothing for a body that arrives in a few
large reads. The answer goes out chunked (HTTP/1.1) or close-delimited (HTTP/1.0): its length is not known
before its end. When compression is off for a response, the exchange never builds an Encoder: no cost per
chunk.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Protocol

if TYPE_CHECKING:
    from .metrics import Metrics

try:  # Google's brotli bindings, a declared dependency; an install without them serves gzip only
    import brotli as _brotli
except ImportError:  # pragma: no cover - the dependency is declared
    _brotli = None

BROTLI_AVAILABLE: Final = _brotli is not None

# Fabio's documented example for proxy.gzip.contenttype: what `gzip=on` compresses on a route when the
# gzip_content_type setting is empty.
DEFAULT_CONTENT_TYPES: Final = r"^(text/.*|application/(javascript|json|font-woff|xml)|.*\+(json|xml))(;.*)?$"
GZIP_WBITS: Final = 16 + zlib.MAX_WBITS  # the gzip wrapper (RFC 1952), not a raw zlib stream
BROTLI_QUALITY: Final = 4  # about gzip -6's ratio at gzip -1's cost: the usual choice for dynamic content

Header = tuple[bytes, bytes]
# RFC 9110 §12.4.2: qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] )
_QVALUE: Final = re.compile(rb"(0(\.[0-9]{0,3})?|1(\.0{0,3})?)\Z")


@dataclass(frozen=True, slots=True)
class Compression:
    """What is compressed and how: the Content-Type pattern, gzip's level, the smallest declared length."""

    content_types: re.Pattern[str] = field(default_factory=lambda: re.compile(DEFAULT_CONTENT_TYPES))
    level: int = 1  # zlib's 1..9; nginx's gzip_comp_level defaults to 1 too
    min_length: int = 1024  # nginx's gzip_min_length: smaller declared bodies gain nothing worth the CPU
    brotli: bool = BROTLI_AVAILABLE


@dataclass(frozen=True, slots=True)
class Decision:
    """How one response goes out: `encoding` ("gzip", "br") or None, and whether it names Accept-Encoding in
    Vary (the answer would be compressed for another client: caches must keep the two apart)."""

    encoding: str | None
    vary: bool


UNTOUCHED: Final = Decision(None, False)
VARIES: Final = Decision(None, True)


def choose(
    method: str, request_headers: Sequence[Header], status: int, response_headers: Sequence[Header],
    policy: Compression,
) -> Decision:
    """Whether and how this response is compressed for this request (see the module's docstring)."""
    # HEAD, 1xx, 204 and 304 carry no body; 206 is a part of a representation, not one to re-encode.
    if method == "HEAD" or status < 200 or status == 204 or status == 206 or status == 304:
        return UNTOUCHED
    content_type = b""
    length = -1
    for name, value in response_headers:
        lower = name.lower()
        if lower == b"content-encoding" or lower == b"content-range":
            return UNTOUCHED  # encoded already (whatever the coding, identity included), or a part
        if lower == b"content-type":
            content_type = value
        elif lower == b"content-length":
            length = int(value) if value.strip().isdigit() else -1
        elif lower == b"cache-control" and b"no-transform" in value.lower():
            return UNTOUCHED
    if 0 <= length < policy.min_length:
        return UNTOUCHED
    if policy.content_types.search(content_type.decode("latin-1")) is None:
        return UNTOUCHED
    # Compressible: from here the answer depends on the request, so every outcome carries Vary.
    accept: bytes | None = None
    for name, value in request_headers:
        lower = name.lower()
        if lower == b"accept-encoding":
            accept = value if accept is None else accept + b"," + value  # RFC 9110 §5.3: one list
        elif lower == b"range" or (lower == b"cache-control" and b"no-transform" in value.lower()):
            return VARIES
    encoding = preferred_encoding(accept, brotli=policy.brotli)
    return VARIES if encoding is None else Decision(encoding, True)


def preferred_encoding(accept: bytes | None, *, brotli: bool) -> str | None:
    """The coding to use for an Accept-Encoding value (RFC 9110 §12.5.3): gzip if its q is above 0, brotli
    instead when its q is higher still; None when the field is absent (the client did not ask), empty, or
    refuses both. `*` stands for codings not named; `x-gzip` is gzip (§8.4.1.3); a malformed q counts as 0."""
    if accept is None:
        return None
    named: dict[bytes, float] = {}
    star = 0.0
    for item in accept.split(b","):
        coding, _, params = item.partition(b";")
        coding = coding.strip().lower()
        if not coding:
            continue
        q = 1.0
        for param in params.split(b";") if params else ():
            key, _, value = param.partition(b"=")
            if key.strip().lower() == b"q":
                value = value.strip()
                q = float(value) if _QVALUE.match(value) else 0.0
        if coding == b"x-gzip":
            coding = b"gzip"
        if coding == b"*":
            star = q
        else:
            named.setdefault(coding, q)  # a coding named twice: its first rating
    gzip_q = named.get(b"gzip", star)
    br_q = named.get(b"br", star) if brotli else 0.0
    if br_q > gzip_q:
        return "br"
    return "gzip" if gzip_q > 0 else None


def with_vary(headers: list[Header]) -> list[Header]:
    """The headers with Accept-Encoding in Vary: added to the last Vary field, or a field of its own; kept as
    they are when Vary already names it or is `*` (RFC 9110 §12.5.5)."""
    last = -1
    for index, (name, value) in enumerate(headers):
        if name.lower() == b"vary":
            tokens = {token.strip().lower() for token in value.split(b",")}
            if b"*" in tokens or b"accept-encoding" in tokens:
                return headers
            last = index
    out = list(headers)
    if last < 0:
        out.append((b"Vary", b"Accept-Encoding"))
    else:
        name, value = out[last]
        out[last] = (name, value + b", Accept-Encoding" if value.strip() else b"Accept-Encoding")
    return out


def encoded_head(headers: list[Header], encoding: str) -> list[Header]:
    """The response's headers once its body is encoded: Content-Encoding added, Content-Length dropped (the
    length is known only at the end), Accept-Ranges dropped (ranges of the identity body would not fit the
    encoded one, as nginx does), a strong ETag weakened (W/, as nginx: the bytes differ, the content does
    not), Accept-Encoding in Vary."""
    out: list[Header] = []
    for name, value in headers:
        lower = name.lower()
        if lower == b"content-length" or lower == b"accept-ranges":
            continue
        if lower == b"etag" and value.lstrip()[:1] == b'"':
            value = b"W/" + value.lstrip()
        out.append((name, value))
    out.append((b"Content-Encoding", encoding.encode()))
    return with_vary(out)


class BodyOut(Protocol):
    """Where an answer's body goes: the client connection (a `Downstream`), or an Encoder in front of it."""

    def send_body(self, data: bytes) -> None: ...
    def flush(self) -> None: ...
    def end(self) -> None: ...


class Counted(Protocol):
    """The exchange whose access line counts the bytes the client got."""

    bytes_out: int


def _codec(encoding: str, level: int) -> tuple[Callable[[bytes], bytes], Callable[[], bytes], Callable[[], bytes]]:
    """(compress, sync flush, finish) of a new streaming compressor."""
    if encoding == "br":
        assert _brotli is not None
        compressor = _brotli.Compressor(mode=_brotli.MODE_TEXT, quality=BROTLI_QUALITY)
        return compressor.process, compressor.flush, compressor.finish
    deflate = zlib.compressobj(level, zlib.DEFLATED, GZIP_WBITS)
    return deflate.compress, lambda: deflate.flush(zlib.Z_SYNC_FLUSH), deflate.flush


class Encoder:
    """One response body, compressed on its way to the client: each chunk as it arrives, sync-flushed at the
    end of each upstream read, finished at the end. Counts bytes in and out for the metrics and the access
    line (which then says what the client got)."""

    __slots__ = ("_compress", "_down", "_exchange", "_fed", "_finish", "_metrics", "_sync", "bytes_in",
                 "bytes_out", "encoding")

    def __init__(self, down: BodyOut, encoding: str, level: int, exchange: Counted, metrics: Metrics) -> None:
        self._down, self._exchange, self._metrics, self.encoding = down, exchange, metrics, encoding
        self._compress, self._sync, self._finish = _codec(encoding, level)
        self._fed = False  # bytes went in since the last flush (a flush of nothing would send an empty block)
        self.bytes_in = self.bytes_out = 0

    def send_body(self, data: bytes) -> None:
        self.bytes_in += len(data)
        self._fed = True
        out = self._compress(data)
        if out:
            self.bytes_out += len(out)
            self._down.send_body(out)

    def flush(self) -> None:
        """The end of one upstream read: what it brought goes out now, decodable (SSE events stay prompt)."""
        if self._fed:
            self._fed = False
            out = self._sync()
            if out:
                self.bytes_out += len(out)
                self._down.send_body(out)
        self._down.flush()

    def end(self) -> None:
        out = self._finish()
        if out:
            self.bytes_out += len(out)
            self._down.send_body(out)
        self._down.end()
        self._exchange.bytes_out = self.bytes_out
        self._metrics.observe_compression(self.encoding, self.bytes_in, self.bytes_out)
