"""What an exchange's silence means when its read timeout runs out; asked by the listener's sweeper.

A tunnel idles out on `websocket_idle_timeout`. Otherwise the limit is the service's `read_timeout` (its
`[services.NAME]` table, service meta `ferryman-read-timeout` or route tag `read_timeout=`) or the global one,
and the clock runs from the last byte either way
(`Exchange.last_activity`), and whose fault the silence is decides the answer: a client that stopped sending
its body (408), an upstream that stopped reading it or stopped answering (504), or a client that stopped
reading its answer (cut, never blamed on the upstream). A client that reads, however slowly, restarts the
clock: its backlog shrinking is progress.
"""

from __future__ import annotations

from .errors import RequestTimeout, UpstreamTimeout
from .exchange import Exchange
from .logs import request_log


def check_timeout(ex: Exchange, now: float) -> None:
    if ex.tunnel is not None:
        ex.tunnel.check_idle(now)
        return
    # The service's own read_timeout (for long polls and streams) when it has one, else the global one.
    limit = ex.pool.read_timeout or ex.ctx.limits.read_timeout
    if not ex.armed or now - ex.last_activity < limit:
        return
    client = ex.client
    if client.writing_paused:
        # Waiting on the client (for this answer, or for earlier ones on the connection while this request's
        # upstream reading stays paused).
        backlog = client.backlog()
        if backlog < ex.client_backlog:
            ex.client_backlog = backlog
            ex.last_activity = now
            return
    authority = ex.endpoint.authority if ex.endpoint else "upstream"
    if not ex.req.body_done and not ex.head_sent:
        ex.req.keep_alive = False
        if client.body_paused:
            ex.timed_out(UpstreamTimeout(f"{authority} stopped reading the request body"))
        else:
            ex.timed_out(RequestTimeout("the client stopped sending the request body"))
    elif client.writing_paused:
        # The client took none of what it was sent for read_timeout (nginx's send_timeout): its fault, not the
        # upstream's, which is neither answered with a 504 nor counted towards ejection. The connection is cut
        # (a reset, so the client cannot take a response for whole).
        request_log(ex.req, "warning", "client_send_timeout", service=ex.service, bytes=ex.bytes_out,
                    timeout_s=limit)
        ex.timed_out(None)
    elif ex.head_sent:
        ex.timed_out(UpstreamTimeout(f"{authority} stalled while sending the body"))
    else:
        ex.timed_out(UpstreamTimeout(f"{authority} did not answer in time"))
