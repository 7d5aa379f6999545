"""One reconnecting WebSocket client, for both ends that dial the master.

The slave (``/ws/slave``) and the client's event channel (``/ws/client``)
want the same thing: connect, serve the connection until it drops, wait a
jittered, doubling backoff, connect again; give up only when the master
refuses for a reason that retrying cannot fix (a 401, a certificate that does
not verify).  This module is that loop, once, and the frame loop that
decodes each message against the protocol table.
"""
from __future__ import annotations

import asyncio
import logging
import random
import ssl
from typing import Awaitable, Callable

import tornado.httpclient
import tornado.websocket

from . import liveness, protocol as P

Connection = tornado.websocket.WebSocketClientConnection
# Seconds a closing client or slave waits for the master to answer its close before it drops the connection.
CLOSE_WAIT = 1.0


def close(conn: Connection, code: int | None = None, reason: str | None = None, wait: float = CLOSE_WAIT) -> None:
    """Close ``conn`` (on its loop's thread), and drop it if the master has not answered in ``wait`` s.

    Tornado waits 5 s for the master's answer to the close; a frozen or unreachable master never
    sends one, and what waited for the connection to end (``Cluster.close()``, a slave stopping,
    a reconnection) waited that long."""
    protocol = conn.protocol
    conn.close(code, reason)
    asyncio.get_running_loop().call_later(wait, liveness.drop, protocol)


class Refused(Exception):
    """The master refused us for good: retrying cannot help.  ``status`` is the HTTP code, if any."""

    def __init__(self, message: str, status: int | None = None, cause: Exception | None = None):
        super().__init__(message)
        self.status = status
        self.cause = cause


def request(url: str, token: str | None, cafile: str | None = None) -> tornado.httpclient.HTTPRequest:
    """The upgrade request: bearer token, and the master's CA for ``wss://``."""
    kwargs = {}
    if url.startswith("wss://"):
        kwargs["ssl_options"] = ssl.create_default_context(cafile=cafile)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return tornado.httpclient.HTTPRequest(url, headers=headers, connect_timeout=10, **kwargs)


async def stay_connected(make_request: Callable[[], tornado.httpclient.HTTPRequest],
                         serve: Callable[[Connection], Awaitable[None]], stopping: asyncio.Event, *,
                         log: logging.Logger, first: float = 0.05, most: float = 3.0,
                         ping_interval: float = 5.0, ping_timeout: float = 5.0,
                         refused_401: Callable[[], str | None] | None = None,
                         refused_429: Callable[[], str | None] | None = None) -> None:
    """Connect, ``serve`` the connection until it closes, and again, until ``stopping`` is set.

    The connection is given up when nothing has come from the master for
    ``ping_interval + ping_timeout`` seconds (``liveness``: not only a late pong).

    Raises ``Refused`` on a 401 (unless ``refused_401`` returns None: the
    credentials changed meanwhile, try again), on a 429 if ``refused_429``
    returns a message (else it is retried: a channel of that user may close),
    and on a certificate that does not verify.  Everything else (refused connection, timeouts, a dropped
    socket) is retried after ``first``, doubling up to ``most`` seconds,
    each wait jittered so that many peers do not come back in step.
    """
    backoff = first
    while not stopping.is_set():
        try:
            # Tornado pings; whether the master is still there is ours to judge, from anything it sends.
            conn = await tornado.websocket.websocket_connect(
                make_request(), max_message_size=P.MAX_MESSAGE_BYTES, ping_interval=ping_interval, ping_timeout=0)
        except tornado.httpclient.HTTPClientError as exc:
            if exc.code == 401:
                message = refused_401() if refused_401 is not None else "the master refused the credentials (401)"
                if message is not None:
                    raise Refused(message, 401) from None
            if exc.code == 429:  # this user holds as many channels as the master allows: one may close
                message = refused_429() if refused_429 is not None else None
                if message is not None:
                    raise Refused(message, 429) from None
                log.warning("the master refuses another event channel for this user (429: too many open); "
                            "retrying in %.2f s", backoff)
            else:
                log.debug("master not reachable (%s); retrying in %.2f s", exc, backoff)
        except ssl.SSLCertVerificationError as exc:
            # Not a passing failure: the certificate will not verify next time either.
            raise Refused(f"cannot verify the master's TLS certificate ({exc.verify_message})", cause=exc) from None
        except (OSError, tornado.websocket.WebSocketError, asyncio.TimeoutError, ssl.SSLError) as exc:
            log.debug("master not reachable (%s); retrying in %.2f s", exc, backoff)
        else:
            backoff = first
            # Small frames that each wait for an answer: with Nagle's algorithm on
            # (tornado's default), each waited up to 40 ms for a delayed ACK.
            conn.protocol.set_nodelay(True)
            conn.hearing = hearing = liveness.Hearing()
            conn.on_ping = conn.on_pong = hearing.heard

            def silent(seconds: float, conn=conn) -> None:
                log.warning("nothing from the master for %.1f s: reconnecting", seconds)
                close(conn, wait=0)  # it was judged gone: no answer to wait for
            watching = asyncio.ensure_future(liveness.watch(hearing, ping_interval, ping_interval + ping_timeout,
                                                            silent))
            try:
                await serve(conn)
            finally:
                watching.cancel()
                conn.close()
            if stopping.is_set():
                break
        try:
            await asyncio.wait_for(stopping.wait(), backoff * (0.5 + random.random()))
        except asyncio.TimeoutError:
            pass
        backoff = min(backoff * 2, most)


async def read_frames(conn: Connection, handle: Callable[[dict], None], *, log: logging.Logger,
                      on_bad: Callable[[P.ProtocolError], None] | None = None) -> None:
    """Hand each well-formed message to ``handle``, in order, until the connection closes.

    A frame may be a batch (an array of messages: the receiver asked for them).
    A malformed message is logged (and passed to ``on_bad``, to answer it) and
    skipped: one bad message never ends the connection.
    """
    hearing = getattr(conn, "hearing", None)
    while True:
        text = await conn.read_message()
        if text is None:
            return
        if hearing is not None:
            hearing.heard()
        for msg in P.decode_batch(text):
            if isinstance(msg, P.ProtocolError):
                log.warning("bad message from the master: %s", msg.message)
                if on_bad is not None:
                    on_bad(msg)
                continue
            handle(msg)
