"""The master's bookkeeping of connected clients (notebooks, panels, the CLI).

A client is shown as the server sees it: its ``host`` is the peer address of
its connection; what it says its host is becomes a ``label``.  Client ids
are tied to the account they were issued to, so nobody can take another's
id on reconnecting or name it on a request.  A user sees their own clients
only.  An object ``Master`` holds; the master sends job events through
``broadcast``.
"""
from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, field
from typing import Protocol

from distexec_kernel import __version__, protocol as P

ISSUED_IDS_KEPT = 10_000  # client ids remembered, so a reconnecting client gets its own back
LABEL_CHARS = 64
CLIENTS_EVENT_DELAY = 0.1  # seconds client-list changes are gathered before clients hear of them
# Event channels one account may hold open (a notebook, panel or kernel holds one each).  Each
# costs the master memory and a descriptor, and every change of the list goes to each of them:
# one login holding 3,000 took the master from 48 to 410 MiB, at a cost growing as their square.
DEFAULT_MAX_CLIENTS_PER_USER = 64


class Peer(Protocol):
    """What the master needs of a connection (a client's or a slave's): send one message."""

    def send(self, msg: dict | str) -> None:
        """Send ``msg``: a message, or the text ``protocol.encode`` made of one."""


ALL = object()  # broadcast's ``user`` for an event every client may see


class Coalesced:
    """Call ``fn`` once, ``delay`` seconds after the first of any number of ``__call__``s.

    For lists sent to every client when they change: a burst of 500
    submissions (or finished jobs) then costs a few lists, not 500.
    """

    def __init__(self, delay: float, fn):
        self.delay = delay
        self.fn = fn
        self._handle: asyncio.TimerHandle | None = None

    def __call__(self) -> None:
        if self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(self.delay, self._fire)

    def _fire(self) -> None:
        self._handle = None
        self.fn()


@dataclass
class ClientInfo:
    id: str
    user: str | None
    host: str  # the peer address the master sees, never what the client says
    peer: Peer
    connected_at: str = field(default_factory=P.now)
    jobs_submitted: int = 0
    # The user whose job events this client may receive; None for an admin (all).
    owner: str | None = None
    # Who authenticated (the admin token: auth.ADMIN): ids are tied to them.
    account: str | None = None
    label: str | None = None  # what the client calls its host: shown, never trusted


class ClientBook:
    def __init__(self, max_per_user: int | None = DEFAULT_MAX_CLIENTS_PER_USER):
        self.max_per_user = max_per_user  # None: no cap
        self.by_id: dict[str, ClientInfo] = {}
        # Client id -> the account it was issued to, newest last: only that
        # account may take the id again (reconnecting) or name it on a request.
        self._issued: dict[str, str | None] = {}
        self._next_client = 1
        self._held: collections.Counter = collections.Counter()  # account -> its event channels open
        # The clients' "jobs submitted" counts change with every submission.
        self.changed = Coalesced(CLIENTS_EVENT_DELAY, self._send_changed)

    def get(self, cid: str | None) -> ClientInfo | None:
        return self.by_id.get(cid) if cid else None

    def broadcast(self, msg: dict, user=ALL) -> None:
        """Send to every client; an event about a job of ``user`` only to its owner and the admins."""
        text = None  # encoded once, on first use: a burst of events goes to every client
        for client in list(self.by_id.values()):
            if user is ALL or client.owner is None or client.owner == user:
                if text is None:
                    text = P.encode(msg)
                client.peer.send(text)

    def room_for(self, account: str | None) -> str | None:
        """Why ``account`` may not open another event channel now (None: it may)."""
        if self.max_per_user is None:
            return None
        held = self._held[account]
        if held < self.max_per_user:
            return None
        return (f"{account!r} holds {held} event channels, the most one user may "
                f"(--max-clients-per-user {self.max_per_user}): close a notebook, panel or kernel")

    def client_connected(self, peer: Peer, user: str | None, host: str,
                         wanted_id: str | None = None, owner: str | None = None,
                         account: str | None = None, label: str | None = None) -> ClientInfo:
        """A client's event channel opened from ``host`` (the address the server sees).

        ``wanted_id``: the id it had before a reconnection; it gets it back
        only if the master issued it to the same ``account`` and it is free.
        ``label``: what the client calls its host, kept as a label only.
        """
        if (wanted_id and wanted_id not in self.by_id and wanted_id in self._issued
                and self._issued[wanted_id] == account):
            cid = wanted_id
        else:
            cid = f"c{self._next_client}"
            while cid in self.by_id or cid in self._issued:
                self._next_client += 1
                cid = f"c{self._next_client}"
            self._next_client += 1
        self._issued.pop(cid, None)
        self._issued[cid] = account  # newest last: the oldest are forgotten first
        while len(self._issued) > ISSUED_IDS_KEPT:
            del self._issued[next(iter(self._issued))]
        info = ClientInfo(cid, user, host, peer, owner=owner, account=account, label=_label(label))
        self.by_id[cid] = info
        self._held[account] += 1
        peer.send(P.make("welcome", client_id=cid, version=__version__))
        self.changed()
        return info

    def client_disconnected(self, cid: str) -> None:
        info = self.by_id.pop(cid, None)
        if info is not None:
            self._held[info.account] -= 1
            if not self._held[info.account]:
                del self._held[info.account]
            self.changed()

    def held_by(self, account: str | None) -> int:
        """How many event channels ``account`` has open."""
        return self._held[account]

    def of_account(self, account: str | None) -> list[ClientInfo]:
        """The clients ``account`` has connected (a pass over all: for what is rare)."""
        return [c for c in self.by_id.values() if c.account == account]

    def client_of(self, cid: str | None, account: str | None) -> str | None:
        """``cid`` if it was issued to ``account`` (a request naming its client), else None."""
        return cid if cid and cid in self._issued and self._issued[cid] == account else None

    def client_list(self, owner: str | None = None) -> list[dict]:
        """Connected clients; ``owner`` limits them to that user's (None: an admin's view, all)."""
        return [{"id": c.id, "user": c.user, "host": c.host, "label": c.label, "connected_at": c.connected_at,
                 "jobs_submitted": c.jobs_submitted}
                for c in self.by_id.values() if owner is None or c.owner == owner]

    def _send_changed(self) -> None:
        """Each client gets the list as far as it may see it (a user: their own clients)."""
        views: dict[str | None, str] = {}
        for client in list(self.by_id.values()):
            if client.owner not in views:
                views[client.owner] = P.encode(P.make("clients_changed", clients=self.client_list(client.owner)))
            client.peer.send(views[client.owner])


def _label(text: str | None) -> str | None:
    if not text:
        return None
    return "".join(ch for ch in text if ch.isprintable())[:LABEL_CHARS] or None
