"""The client's live channel: ``/ws/client`` in a background thread.

It owns its own asyncio loop in a daemon thread, so it works the same in a
script, in the CLI and inside a Jupyter kernel (whose own loop it never
touches).  It reconnects with backoff, asking for the same client id, and
hands every event to ``on_event`` *in its own thread*: receivers must only
update state under a lock or set traits, never print or display.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import weakref
from typing import Callable
from urllib.parse import urlencode

import tornado.httpclient
import tornado.websocket

from . import config, protocol as P, wsclient
from .errors import tls_refusal

log = logging.getLogger("distexec.client.events")


class EventStream:
    def __init__(self, url: str, token: str | None, on_event: Callable[[dict], None], *,
                 user: str | None = None, host: str | None = None, cafile: str | None = None,
                 on_connect: Callable[[bool], None] | None = None,
                 on_refused: Callable[[str, int | None], None] | None = None):
        self.url = url
        self.token = token
        self.on_event = on_event
        self.on_connect = on_connect
        self.on_refused = on_refused
        self.user = user
        self.host = host
        self.cafile = cafile
        self.client_id: str | None = None
        self.connections = 0  # how many times the channel has been opened (welcomed): 1 unless it dropped
        self.connected = threading.Event()
        self.refused: str | None = None
        self.refused_status: int | None = None
        self._loop = asyncio.new_event_loop()
        # Bound to no loop until first awaited (Python >= 3.10), so it can be made here.
        self._stop = asyncio.Event()
        self._conn = None
        # Frames waiting for the loop thread: a burst of submissions wakes it once, not once per frame.
        self._outbox: collections.deque[str] = collections.deque()
        self._flushing = False
        self._out_lock = threading.Lock()
        self._thread = threading.Thread(target=self._main, name="distexec-events", daemon=True)
        self._thread.start()

    def _request(self) -> tornado.httpclient.HTTPRequest:
        query = {k: v for k, v in (("client_id", self.client_id), ("user", self.user),
                                   ("host", self.host)) if v}
        query["batch"] = "1"  # read_frames reads batch frames
        url = config.ws_url(self.url) + "/ws/client" + ("?" + urlencode(query) if query else "")
        self._sent_token = self.token
        return wsclient.request(url, self.token, self.cafile)

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._run())
        except Exception:
            if threading.main_thread().is_alive():
                raise
            # The program ended under this (daemon) thread while it reconnected to a master that is gone:
            # its resolver's executor went with it.  Nobody is left to tell: a traceback here was noise.
        finally:
            self._loop.close()

    def _refused_401(self) -> str | None:
        # A token replaced by a new login meanwhile is no refusal: the next attempt carries it.
        return "the master refused the token (401)" if self.token == self._sent_token else None

    def _refused_429(self) -> str | None:
        # Said at once to a client opening its first channel; a reconnecting one waits for a free one.
        return (None if self.connections else
                "the master refuses another event channel for this user (429): it holds as many as the master "
                "allows (--max-clients-per-user); close a notebook, panel or kernel, or Cluster.close() one")

    async def _run(self) -> None:
        try:
            await wsclient.stay_connected(self._request, self._serve, self._stop, log=log,
                                          refused_401=self._refused_401, refused_429=self._refused_429)
        except wsclient.Refused as exc:
            if exc.cause is not None:
                self.refused = tls_refusal(self.url, exc.cause)
            else:
                self.refused = str(exc)
            self.refused_status = exc.status
            self.connected.set()  # wake whoever waits for the first connect
            if self.on_refused is not None:
                self.on_refused(self.refused, exc.status)

    async def _serve(self, conn) -> None:
        self._conn = conn
        try:
            await wsclient.read_frames(conn, self._handle, log=log)
        finally:
            self._conn = None
            self.connected.clear()
            if self.on_connect is not None and not self._stop.is_set():
                self.on_connect(False)

    def _handle(self, msg: dict) -> None:
        if msg["type"] == "welcome":
            self.client_id = msg["client_id"]
            self.connections += 1
            self.connected.set()
            if self.on_connect is not None:
                self.on_connect(True)
            return
        try:
            self.on_event(msg)
        except Exception:  # a receiver's bug must not end the channel
            log.exception("event handler failed on %s", msg["type"])

    def in_event_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def send(self, msg: dict | str) -> bool:
        """Queue ``msg`` (a message, or its ``protocol.encode`` text) for the master; False if the loop has ended.

        A frame queued while the connection is down is dropped: whoever needs
        it delivered (a pipelined submission) sends it again on reconnect.
        """
        text = msg if isinstance(msg, str) else P.encode(msg)
        with self._out_lock:
            self._outbox.append(text)
            if self._flushing:
                return True
            self._flushing = True
        try:
            self._loop.call_soon_threadsafe(self._flush)
        except RuntimeError:  # the loop is closed: the channel is gone for good
            return False
        return True

    def _flush(self) -> None:
        with self._out_lock:
            frames = list(self._outbox)
            self._outbox.clear()
            self._flushing = False
        conn = self._conn
        if conn is None:
            return
        for text in frames:
            try:
                conn.write_message(text)
            except tornado.websocket.WebSocketClosedError:
                return  # the read loop sees the close and reconnects

    def close(self) -> None:
        if self._loop.is_closed():
            return

        def stop():
            self._stop.set()
            if self._conn is not None:
                wsclient.close(self._conn)
        try:
            self._loop.call_soon_threadsafe(stop)
        except RuntimeError:
            return
        if threading.current_thread() is not self._thread:  # its client collected in it: it ends on its own
            self._thread.join(timeout=5)


def weakly(method: Callable) -> Callable:
    """``method``, called through a weak reference to its object (nothing once that is gone): a
    callback that does not keep its client alive from the event thread."""
    ref = weakref.WeakMethod(method)

    def call(*args):
        bound = ref()
        return bound(*args) if bound is not None else None
    return call
