"""The connected slaves as the master sees them: their record, the lists clients read, the results a register brings."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from distexec_kernel import protocol as P

from .clients import Peer
from .scheduler import Scheduler

log = logging.getLogger("distexec.master")


@dataclass
class SlaveInfo:
    uid: str
    host: str
    languages: list[dict]
    slots: int
    peer: Peer
    connected_at: str = field(default_factory=P.now)
    last_seen: str = field(default_factory=P.now)
    completed: int = 0
    draining: bool = False
    instance: str | None = None  # the slave process's id, new at each slave start
    detecting: bool = False  # still asking toolchains: its languages may grow


def slave_list(slaves: dict[str, SlaveInfo], scheduler: Scheduler) -> list[dict]:
    """``GET /api/slaves`` and the ``slaves_changed`` event."""
    return [{
        "uid": s.uid, "host": s.host, "languages": [lang["name"] for lang in s.languages],
        "versions": {lang["name"]: lang.get("version") for lang in s.languages},
        "slots": s.slots,
        "running": len(scheduler.slaves[s.uid].running) if s.uid in scheduler.slaves else 0,
        "completed": s.completed, "connected_at": s.connected_at, "last_seen": s.last_seen,
        "draining": s.draining, "detecting": s.detecting,
    } for s in slaves.values()]


def language_list(slaves: dict[str, SlaveInfo]) -> list[dict]:
    """``GET /api/languages``: each language and how many connected slaves run it."""
    seen: dict[str, dict] = {}
    for s in slaves.values():
        for lang in s.languages:
            entry = seen.setdefault(lang["name"], {"name": lang["name"], "version": lang.get("version"), "slaves": 0})
            entry["slaves"] += 1
    return sorted(seen.values(), key=lambda e: e["name"])


def results_of(uid: str, items: list) -> list[dict]:
    """The results a slave's ``register`` brings, each a well-formed ``job_finished``, to be settled.

    One that is not is refused alone, with a log line, and the slave registers all the same: a register
    refused for one bad result was refused again at every reconnect.  When it names its job, a failed
    result saying why stands in for it, so the job ends (``internal_error``) and the slave, acknowledged,
    stops sending it; one that names none is left out.
    """
    out = []
    for item in items:
        try:
            P.validate(item)
            if item["type"] != "job_finished":
                raise P.ProtocolError("bad_message", f"a {item['type']!r} message where a job_finished belongs")
            out.append(item)
            continue
        except P.ProtocolError as exc:
            why = exc.message
        job_id = item.get("job_id") if isinstance(item, dict) else None
        job_id = job_id if type(job_id) is int else None  # (not a string of MiB into the log)
        log.warning("slave %s: a result it brought at register (job %s) was refused: %s", uid, job_id, why)
        try:
            out.append(P.failed_result(job_id, f"the master could not take this job's result from slave {uid}: {why}"))
        except P.ProtocolError:
            pass  # no job to settle: job_id is not one
    return out
