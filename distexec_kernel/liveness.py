"""Whether the peer of a WebSocket is still there: anything it sends counts, not only its pong.

A pong comes after everything the peer sent before it.  A side that is slow
to read, say a master working through a burst of thousands of pipelined
submissions in order, hears the pong late through its own slowness; with a
pong-only timeout (tornado's ``ping_timeout``) it dropped a live peer, which
reconnected and sent its unanswered frames again: more work for the side
already behind (measured: 5,000 submissions, 4,300 of them sent twice).

So tornado sends the pings (``ping_interval``) and never closes for a late
pong (``ping_timeout=0``); ``watch`` closes the connection only when nothing
at all (a message, a ping, a pong) has come from the peer for ``limit``
seconds.  A quiet but live peer answers the pings; a frozen or unreachable
one sends nothing.
"""
from __future__ import annotations

import asyncio
import time
from typing import Callable


class Hearing:
    """When the peer was last heard from.  ``heard`` takes any arguments: it is set as
    tornado's ``on_ping``/``on_pong`` and called for each message."""

    def __init__(self) -> None:
        self.at = time.monotonic()

    def heard(self, *_) -> None:
        self.at = time.monotonic()


async def watch(hearing: Hearing, every: float, limit: float, close: Callable[[float], None]) -> None:
    """Every ``every`` seconds, check; once the peer has been silent for more than ``limit``
    seconds, call ``close(silent_for)`` and return.  Cancel it when the connection ends."""
    while True:
        await asyncio.sleep(every)
        silent = time.monotonic() - hearing.at
        if silent > limit:
            close(silent)
            return


def drop(protocol) -> None:
    """End a silent peer's connection now, after the close frame ``close()`` sent (for a peer only
    slow to read).  Tornado's ``close()`` then waits 5 s for the peer's own close frame, which a
    frozen or unreachable peer never sends: it was dropped 5 s after it was judged gone.  Tornado
    has no public call for this; ``_abort`` is what it uses itself when that wait runs out."""
    if protocol is not None:
        protocol._abort()
