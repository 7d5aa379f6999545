"""The connected slaves as the master sees them: their record, the lists clients read, what a result may carry."""
from __future__ import annotations

from dataclasses import dataclass, field

from distexec_kernel import protocol as P

from .clients import Peer
from .scheduler import Scheduler


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


def rich_outputs(outputs) -> list[dict]:
    """The well-formed nbformat-style outputs of a result: clients display them, so nothing else passes."""
    kept = []
    for out in outputs if isinstance(outputs, list) else ():
        if (isinstance(out, dict) and out.get("output_type") in ("display_data", "execute_result")
                and isinstance(out.get("data"), dict) and all(isinstance(k, str) for k in out["data"])):
            meta = out.get("metadata")
            kept.append({"output_type": out["output_type"], "data": out["data"],
                         "metadata": meta if isinstance(meta, dict) else {}})
    return kept
