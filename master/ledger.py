"""The answers to recent WebSocket submissions, so a submission sent again after a reconnect is one job."""
from __future__ import annotations

import asyncio
import collections

# Answers to WebSocket submissions kept, per master, so a client that sends a
# submission again after a reconnect (it had no answer) gets the job made the
# first time, not a second one.
LEDGER_SIZE = 20_000


class SubmitLedger:
    """Recent WebSocket submissions by (user, ref), oldest first: the answer still to come (a future),
    then, once answered, only the job's id or the refusal (never the job's inputs: a
    submission may carry megabytes of files).

    Refs are the client's own (random per client object, then a counter);
    keyed by the authenticated user too, so nobody reads another's answer."""

    def __init__(self, size: int = LEDGER_SIZE):
        self.size = size
        self._answers: collections.OrderedDict[tuple, asyncio.Future | dict] = collections.OrderedDict()

    def get(self, key: tuple) -> asyncio.Future | dict | None:
        """The task answering ``key``, or ``{"job_id"}`` / ``{"error"}`` once it has; None if unknown."""
        return self._answers.get(key)

    def put(self, key: tuple, answer: asyncio.Future) -> None:
        self._answers[key] = answer
        answer.add_done_callback(lambda done: self._answered(key, done))
        while len(self._answers) > self.size:
            self._answers.popitem(last=False)

    def _answered(self, key: tuple, done: asyncio.Future) -> None:
        if self._answers.get(key) is done:
            body = done.result()
            self._answers[key] = {"job_id": body["job"]["id"]} if body["job"] is not None else body
