"""A map sent in parts (``POST /api/jobs?group=G&part=K``): a part sent again is taken once.

A client whose request timed out cannot tell whether the master took it (a
frozen or restarting master may read it later). It sends the same part again
with the same key, ``K``, the part's first position in its group; each job of
a keyed part keeps ``G:K+i`` as its ``ref``, so the second request finds the
first one's jobs and answers with them instead of queueing them twice.
"""
from __future__ import annotations

from distexec_kernel import protocol as P


def refs(group: str | None, part: int | None, count: int) -> list[str] | None:
    """The refs of a keyed part's jobs, or None (not a keyed part)."""
    if group is None or part is None:
        return None
    return [f"{group}:{part + i}" for i in range(count)]


async def taken(master, owner: str | None, keys: list[str]) -> list[dict] | None:
    """The jobs a part with these refs already made, or None: then nothing of it was made.

    Committed jobs are found in the store; one made by a request still on
    its way to its commit, in memory, read with no await after it: a second
    request coming in meanwhile either finds it there or goes first.
    """
    first = await master.store.id_of_ref(owner, keys[0])
    if first is None:
        first = next((j["id"] for j in master.jobs.jobs() if j.get("ref") == keys[0] and j.get("user") == owner),
                     None)
    if first is None:
        return None
    jobs = [await master.get_job(first + i) for i in range(len(keys))]
    if [(job or {}).get("ref") for job in jobs] != keys:
        raise P.ProtocolError("conflict", f"part {keys[0]} was sent before with other jobs")
    return jobs
