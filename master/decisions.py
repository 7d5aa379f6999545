"""What the job lifecycle (``jobs.py``) decides: small frozen dataclasses that
``carry.Carrier`` carries out in order, kept apart so the machine reads as
its events and their state."""
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
