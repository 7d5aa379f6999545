"""Carrying the job lifecycle's decisions out (``jobs.py`` decides; this does the I/O).

In order, with one rule: nothing that follows a ``Save`` happens before the
store has committed it, so no client hears of a state, and no slave is told
to act on one, that a master crash could lose.
"""
from __future__ import annotations

import asyncio
from typing import Callable, Coroutine

from distexec_kernel import protocol as P

from . import jobs as J
from .clients import ClientBook


class Carrier:
    def __init__(self, store, jobs: J.Lifecycle, slaves: dict, clients: ClientBook,
                 timer_fired: Callable[[int, int], None]):
        self.store = store
        self.jobs = jobs
        self.slaves = slaves  # the master's: uid -> SlaveInfo (its peer)
        self.clients = clients
        self.timer_fired = timer_fired
        self._timers: dict[int, asyncio.TimerHandle] = {}
        # Job id -> its last save handed to the store, until committed: a
        # result is acknowledged, and a read answered, only once it is durable.
        self._saving: dict[int, asyncio.Future] = {}
        # Job id -> futures of those waiting for its end (a cancel answering with the end it caused).
        self._ending: dict[int, list[asyncio.Future]] = {}

    def __call__(self, decisions: list[J.Decision]) -> asyncio.Future | None:
        """Carry ``decisions`` out in order; what follows a save waits for its commit.

        Everything up to the first save (or load, or acknowledgement) happens
        now, and that save is handed to the store now, so it records the state
        of this very turn; the rest runs in a task, returned (None: nothing
        left) to be awaited by whoever must answer only once it is done.
        """
        rest = self._begin(decisions)
        return asyncio.ensure_future(rest) if rest is not None else None

    async def run(self, decisions: list[J.Decision]) -> None:
        """``self(decisions)`` for a caller that waits for all of it, awaited at once.

        The same order and the same turn for the first part; the rest runs in
        the caller's task rather than one of its own, so what the caller does
        next (a submit_reply) happens in the turn that carries out the last
        decision, and goes out in the same frame as its announcement.
        """
        rest = self._begin(decisions)
        if rest is not None:
            await rest

    def _begin(self, decisions: list[J.Decision]) -> Coroutine | None:
        """Carry out what comes before the first save (handing that save over); the rest, to run."""
        for i, d in enumerate(decisions):
            if isinstance(d, J.Save):
                rest = decisions[i + 1:]
                return self._rest(rest, self._save(d.jobs, _loads(rest, {})))
            if isinstance(d, (J.Load, J.Ack)):
                return self._rest(decisions[i:])
            self._do(d)
        return None

    async def durable(self, job_ids: list[int]) -> None:
        """Wait until what memory says of these jobs is committed: a read tells nothing not yet durable."""
        while pending := {self._saving[j] for j in job_ids if j in self._saving}:
            await asyncio.wait(pending)

    async def ended(self, job_id: int, within: float) -> None:
        """Wait until the job's end is announced (so committed), or ``within`` seconds have passed."""
        waiter = asyncio.get_running_loop().create_future()
        self._ending.setdefault(job_id, []).append(waiter)
        try:
            await asyncio.wait([waiter], timeout=within)
        finally:
            waiters = self._ending.get(job_id, [])
            if waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    del self._ending[job_id]

    async def _rest(self, decisions: list[J.Decision], saving: asyncio.Future | None = None) -> None:
        at_hand: dict[int, str] = {}  # job id -> its inputs (JSON text), read with a save or on their own
        if saving is not None:
            at_hand.update(await saving or {})
        for i, d in enumerate(decisions):
            if isinstance(d, J.Save):
                at_hand.update(await self._save(d.jobs, _loads(decisions[i + 1:], at_hand)) or {})
            elif isinstance(d, J.Load):
                if d.job_id not in at_hand:
                    # Saved at submission (that commit came first: one writer, in
                    # order); read back only now, and dropped once sent.  Read with
                    # the save before it, if any (which has them as it wrote them
                    # if it was their first); otherwise in one query for all.
                    at_hand.update(await self.store.inputs_many(_loads(decisions[i:], at_hand)))
                await done(self(self.jobs.started(d.job_id, d.dispatch, at_hand.pop(d.job_id))))
            elif isinstance(d, J.Ack):
                pending = self._saving.get(d.job_id)
                if pending is not None:
                    try:
                        await asyncio.shield(pending)
                    except Exception:
                        return  # not durable: the slave keeps its copy and sends it again
                self._do(J.Send(d.uid, P.make("result_ack", job_id=d.job_id)))
            else:
                self._do(d)

    def _save(self, jobs: tuple[dict, ...], load: list[int]) -> asyncio.Future:
        """Hand ``jobs`` to the store; the future resolves, once committed, to the inputs of ``load`` (or None)."""
        saved = self.store.save_many(list(jobs), load)
        ids = [job["id"] for job in jobs]
        for job_id in ids:
            self._saving[job_id] = saved

        def committed(_):
            for job_id in ids:
                if self._saving.get(job_id) is saved:
                    del self._saving[job_id]
        saved.add_done_callback(committed)
        return saved

    def _do(self, d: J.Decision) -> None:
        if isinstance(d, J.Announce):
            self.clients.broadcast(d.msg, d.user)
            if self._ending and d.msg["type"] == "job_update" and d.msg["job"]["status"] in P.TERMINAL:
                for waiter in self._ending.pop(d.msg["job"]["id"], ()):
                    waiter.set_result(None)
        elif isinstance(d, J.Send):
            slave = self.slaves.get(d.uid)
            if slave is not None:
                slave.peer.send(d.msg)
        elif isinstance(d, J.Discard):
            self.store.artifacts.discard(d.job_id)
        elif isinstance(d, J.SetTimer):
            self._clear_timer(d.job_id)
            self._timers[d.job_id] = asyncio.get_running_loop().call_later(d.delay, self._fire, d.job_id, d.token)
        elif isinstance(d, J.ClearTimer):
            self._clear_timer(d.job_id)
        else:
            raise TypeError(f"no way to carry out {d!r}")

    def _clear_timer(self, job_id: int) -> None:
        handle = self._timers.pop(job_id, None)
        if handle is not None:
            handle.cancel()

    def _fire(self, job_id: int, token: int) -> None:
        self._timers.pop(job_id, None)
        self.timer_fired(job_id, token)


def _loads(decisions: list[J.Decision], at_hand: dict[int, str]) -> list[int]:
    """The jobs whose inputs ``decisions`` load and that are not at hand: read with the save before them."""
    return [d.job_id for d in decisions if isinstance(d, J.Load) and d.job_id not in at_hand]


async def done(carrying: asyncio.Future | None) -> None:
    """Wait for what a ``Carrier`` call left to carry out, if anything."""
    if carrying is not None:
        await carrying
