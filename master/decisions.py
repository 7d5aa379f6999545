"""What the job lifecycle (``jobs.py``) decides: small frozen dataclasses that
``carry.Carrier`` carries out in order, and how one turn's decisions become
one commit (``merged``); kept apart so the machine reads as its events and
their state."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union


@dataclass(frozen=True)
class Save:
    """Write these records; nothing after this decision is carried out before they are committed.

    The records are the machine's own dicts: the store copies them when handed
    over, so a decision list is carried out at once, in the event's turn.
    """
    jobs: tuple[dict, ...]


@dataclass(frozen=True)
class Announce:
    """Tell the clients allowed to see ``user``'s jobs (its owner and the admins)."""
    msg: dict
    user: str | None


@dataclass(frozen=True)
class Send:
    """Send ``msg`` to slave ``uid`` on its current connection (dropped if it has none)."""
    uid: str
    msg: dict | str  # a str: encoded already (a job_run, its inputs spliced in as stored)


@dataclass(frozen=True)
class Load:
    """Fetch the job's inputs, then feed them back with ``started(job_id, dispatch, inputs)``."""
    job_id: int
    dispatch: int


@dataclass(frozen=True)
class Ack:
    """Send ``result_ack`` to ``uid`` once every save of the job handed over so far is committed."""
    uid: str
    job_id: int


@dataclass(frozen=True)
class Discard:
    """Drop the collected-file chunks held for the job (a result that will not come, or came)."""
    job_id: int


@dataclass(frozen=True)
class SetTimer:
    """Call ``timer_fired(job_id, token)`` after ``delay`` seconds (replacing the job's timer)."""
    job_id: int
    token: int
    delay: float


@dataclass(frozen=True)
class ClearTimer:
    job_id: int


Decision = Union[Save, Announce, Send, Load, Ack, Discard, SetTimer, ClearTimer]


def merged(decisions: list[Decision]) -> list[Decision]:
    """``decisions`` with their saves made one (where the first was): one commit, before all that follows.

    For decisions taken in one turn (a submission and the starts it allows,
    a result and the start its slot allows): a save only moves earlier, so
    nothing is told before it is durable.  A job saved twice (submitted and
    started in one turn) is written once, as it was last, with the fields only
    its first save had (its inputs); and announced once, as it was last: the
    state it passed through in the turn (queued) was never committed.  After
    the commit, what goes to slaves (``Load``, ``Send``) comes first: a job
    waits for its job_run, nobody for an announcement.
    """
    saves: dict[int, dict] = {}
    last_update: dict[int, int] = {}  # job id -> index of its last job_update
    for i, d in enumerate(decisions):
        if isinstance(d, Save):
            for job in d.jobs:
                saves[job["id"]] = {**saves[job["id"]], **job} if job["id"] in saves else job
        elif _updated(d) is not None:
            last_update[_updated(d)] = i
    if not saves:
        return list(decisions)
    first = next(i for i, d in enumerate(decisions) if isinstance(d, Save))
    to_slaves: list[Decision] = []
    rest: list[Decision] = []
    for i, d in enumerate(decisions[first + 1:], first + 1):
        if isinstance(d, (Load, Send)):
            to_slaves.append(d)
        elif not isinstance(d, Save) and (_updated(d) is None or last_update[_updated(d)] == i):
            rest.append(d)
    return [*decisions[:first], Save(tuple(saves.values())), *to_slaves, *rest]


def _updated(d: Decision) -> int | None:
    """The job a ``job_update`` announcement is of (None: another decision)."""
    if isinstance(d, Announce) and d.msg["type"] == "job_update":
        return d.msg["job"]["id"]
    return None
