"""The client's live channel: ``/ws/client`` in a background thread.

It owns its own asyncio loop in a daemon thread, so it works the same in a
script, in the CLI and inside a Jupyter kernel (whose own loop it never
touches).  It reconnects with backoff, asking for the same client id, and
hands every event to ``on_event`` *in its own thread*: receivers must only
update state under a lock or set traits, never print or display.
"""
from __future__ import annotations

import asyncio
import logging
import random
import ssl
import threading
from typing import Callable
from urllib.parse import urlencode

import tornado.httpclient
import tornado.websocket

from . import config, protocol as P

log = logging.getLogger("distexec.client.events")


class EventStream:
    def __init__(self, url: str, token: str | None, on_event: Callable[[dict], None], *,
                 user: str | None = None, host: str | None = None, cafile: str | None = None,
                 on_connect: Callable[[bool], None] | None = None):
        self.url = url
        self.token = token
        self.on_event = on_event
        self.on_connect = on_connect
        self.user = user
        self.host = host
        self.cafile = cafile
        self.client_id: str | None = None
        self.connected = threading.Event()
        self.refused: str | None = None
        self._loop = asyncio.new_event_loop()
        # Bound to no loop until first awaited (Python >= 3.10), so it can be made here.
        self._stop = asyncio.Event()
        self._conn = None
        self._thread = threading.Thread(target=self._main, name="distexec-events", daemon=True)
        self._thread.start()

    def _request(self) -> tornado.httpclient.HTTPRequest:
        query = {k: v for k, v in (("client_id", self.client_id), ("user", self.user),
                                   ("host", self.host)) if v}
        url = config.ws_url(self.url) + "/ws/client" + ("?" + urlencode(query) if query else "")
        kwargs = {}
        if url.startswith("wss://"):
            kwargs["ssl_options"] = ssl.create_default_context(cafile=self.cafile)
        self._sent_token = self.token
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return tornado.httpclient.HTTPRequest(url, headers=headers, connect_timeout=10, **kwargs)

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._run())
        finally:
            self._loop.close()

    async def _run(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            try:
                conn = await tornado.websocket.websocket_connect(
                    self._request(), max_message_size=P.MAX_MESSAGE_BYTES, ping_interval=5, ping_timeout=5)
            except tornado.httpclient.HTTPClientError as exc:
                if exc.code == 401 and self.token == self._sent_token:
                    self.refused = "the master refused the token (401)"
                    self.connected.set()  # wake whoever waits for the first connect
                    return
                log.debug("event channel: %s", exc)
            except ssl.SSLCertVerificationError as exc:
                # Not a passing failure: the master's certificate will not verify next time either.
                from .cluster import tls_refusal
                self.refused = tls_refusal(self.url, exc)
                self.connected.set()
                return
            except (OSError, tornado.websocket.WebSocketError, asyncio.TimeoutError, ssl.SSLError) as exc:
                log.debug("event channel: %s", exc)
            else:
                backoff = 0.05
                self._conn = conn
                # Small frames that each wait for an answer: no Nagle delay.
                conn.protocol.set_nodelay(True)
                try:
                    await self._read(conn)
                finally:
                    conn.close()
                self._conn = None
                self.connected.clear()
                if self.on_connect is not None and not self._stop.is_set():
                    self.on_connect(False)
            if self._stop.is_set():
                break
            try:
                await asyncio.wait_for(self._stop.wait(), backoff * (0.5 + random.random()))
            except asyncio.TimeoutError:
                pass
            backoff = min(backoff * 2, 3.0)

    async def _read(self, conn) -> None:
        while True:
            text = await conn.read_message()
            if text is None:
                return
            try:
                msg = P.decode(text)
            except P.ProtocolError as exc:
                log.warning("bad event from the master: %s", exc.message)
                continue
            if msg["type"] == "welcome":
                self.client_id = msg["client_id"]
                self.connected.set()
                if self.on_connect is not None:
                    self.on_connect(True)
                continue
            try:
                self.on_event(msg)
            except Exception:  # a receiver's bug must not end the channel
                log.exception("event handler failed on %s", msg["type"])

    def send(self, msg: dict) -> None:
        def write():
            if self._conn is not None:
                self._conn.write_message(P.encode(msg))
        self._loop.call_soon_threadsafe(write)

    def close(self) -> None:
        if self._loop.is_closed():
            return

        def stop():
            self._stop.set()
            if self._conn is not None:
                self._conn.close()
        try:
            self._loop.call_soon_threadsafe(stop)
        except RuntimeError:
            return
        self._thread.join(timeout=5)
