"""A warm job's path through the pool's parent and its child, stage by stage.

    .venv/bin/python benchmarks/warm_timeline.py [--jobs 200] [--against REV]

Runs trivial Python jobs (``pass``) one after another through the slave's
own ``WarmRunner`` (as ``benchmarks/warm.py`` builds it), with a gap of 5 ms
between jobs (what a job waits for between two of a client's submissions),
and splits each job's time in the pool with ``CLOCK_MONOTONIC`` stamps
(one clock for the parent, its child and this process):

- handoff: the parent is given the job -> its waiting child has it;
- set-up: the child takes its uid, makes its directory, writes the files,
  sets its limits -> the job starts;
- run: the job's code (compile and exec ``pass``, exit handlers);
- exit: the job's end -> its parent woken by it (before 2026-11-30: the child's
  ``os._exit`` -> woken to reap it; since: the child's "done", written just
  before it exits);
- tell: woken -> the end sent to the slave;

and ``Runner.run`` whole (job in, outcome out).  The stamps come from a copy
of ``slave/warm_zygote.py`` with a few lines added (this script adds them,
and fails if the places it adds them to have changed), so nothing of this
is in the pool itself.  ``--against REV`` also runs the parent of that git
revision, the two taking turns of 50 jobs: the machines are shared and
noisy, compare within one run.  Only a parent that speaks this slave's
protocol compares fairly: before 2026-11-30 (the "gone" message) an older
parent makes this slave wait 0.2 s for each slot's release.  Needs root (bubblewrap, cgroups).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import slave.warm_pool as warm_pool  # noqa: E402
from warm import runners  # noqa: E402

TURN = 50
GAP = 0.005

# Each place to stamp, as alternatives (this tree's parent, then older ones, for --against): (where, what
# to add after it, or before it), the stamps written to the parent's stderr (S) or the job's (J, R, X).
AFTER = [
    [("    def run(self, job_id, slot, fds):\n",
      "        import time as _t\n        self.t_run = getattr(self, 't_run', {})\n"
      "        self.t_run[job_id] = _t.monotonic_ns()\n")],
    [("                readable, _, _ = select.select([self.sock, self.wake_r, *self.watched], [], [])\n",
      "                import time as _t; self.t_wake = _t.monotonic_ns()\n"),
     ("            if self.wake_r in readable:\n", "                import time as _t; self.t_wake = _t.monotonic_ns()\n")],
    [('            spec = marshal.loads(_read_all(fds[0]))\n',
      "            import time as _t; spec['_got'] = _t.monotonic_ns()\n")],
    [('int(job.disk), job.error or "")\n',
      "        import time as _t\n"
      "        os.write(2, b'S %d %d %d %d\\n' % (job.id, self.t_run.pop(job.id, 0), self.t_wake, _t.monotonic_ns()))\n"),
     ('int(disk), error or "")\n',
      "            import time as _t\n"
      "            os.write(2, b'S %d %d %d %d\\n' % (job_id, self.t_run.pop(job_id, 0), self.t_wake,"
      " _t.monotonic_ns()))\n")],
]
BEFORE = [
    [("    _done(done, code)\n", "    import time as _t\n    os.write(2, b'X %d\\n' % _t.monotonic_ns())\n"),
     ("    os._exit(code)\n", "    import time as _t\n    os.write(2, b'X %d\\n' % _t.monotonic_ns())\n")],
    [("        exec(compile(spec", "        import time as _t\n"
      "        os.write(2, b'J %d\\nR %d\\n' % (spec['_got'], _t.monotonic_ns()))\n")],
]


def stamped(source: str) -> str:
    for after, places in [(True, AFTER), (False, BEFORE)]:
        for alternatives in places:
            found = [(where, add) for where, add in alternatives if where in source]
            if not found:
                raise SystemExit(f"warm_timeline: the parent's source changed; no {alternatives[0][0].strip()!r}"
                                 " to stamp at")
            where, add = found[0]
            at = source.index(where) + (len(where) if after else 0)
            source = source[:at] + add + source[at:]
    return source


async def turn(warm, ids, n: int, parent_log: str, out: dict) -> None:
    for _ in range(n):
        await asyncio.sleep(GAP)
        job_id = next(ids)
        t0 = time.perf_counter()
        outcome = await warm.run({"id": job_id, "language": "python", "source": "pass", "timeout": 30},
                                 lambda *_: None, asyncio.Event())
        out["run"].append(time.perf_counter() - t0)
        stamps = dict(line.split(" ", 1) for line in outcome.stderr.splitlines() if line[:2] in ("J ", "R ", "X "))
        out["jobs"].append((job_id, {k: int(v) for k, v in stamps.items()}))


def stages(parent_log: str, jobs: list) -> dict[str, list[float]]:
    sent = {}
    with open(parent_log) as f:
        for line in f:
            if line.startswith("S "):
                _, job_id, t_run, t_wake, t_sent = line.split()
                sent[int(job_id)] = (int(t_run), int(t_wake), int(t_sent))
    # The parent numbers the jobs by the slave's order of hand-over (Zygote.run's idents): 1, 2, ...
    out: dict[str, list[float]] = {k: [] for k in ("handoff", "set-up", "run", "exit", "tell")}
    for ident, (_, st) in enumerate(jobs, 1):
        if ident not in sent or not all(k in st for k in ("J", "R", "X")):
            continue
        t_run, t_wake, t_sent = sent[ident]
        for name, a, b in (("handoff", t_run, st["J"]), ("set-up", st["J"], st["R"]), ("run", st["R"], st["X"]),
                           ("exit", st["X"], t_wake), ("tell", t_wake, t_sent)):
            out[name].append((b - a) / 1e3)
    return out


async def bench(n: int, against: str | None) -> None:
    here = os.path.dirname(warm_pool.SOURCES[0])
    sources = {"this tree": "\n".join(open(path).read() for path in warm_pool.SOURCES)}
    if against:
        def show(name: str) -> str:
            return subprocess.run(["git", "show", f"{against}:slave/{name}"], capture_output=True, text=True,
                                  cwd=here).stdout
        # Before 2026-11-30 the parent was one file, warm_zygote.py; before 2026-12-02 it took its program
        # and config on its command line, so an older commit's parent does not start here.
        sources[against] = show("warm_child.py") + "\n" + show("warm_zygote.py")
    tmp = tempfile.mkdtemp(prefix="distexec-timeline-")
    pools = {}
    caches: list[str] = []
    for name, source in sources.items():
        path = os.path.join(tmp, f"{len(pools)}.py")
        with open(path, "w") as f:
            f.write(stamped(source))
        log = os.path.join(tmp, f"{len(pools)}.log")
        warm_pool.SOURCES = [path]
        saved = os.dup(2)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(fd, 2)  # the parent inherits this process's stderr
        try:
            warm, fresh = await runners(2)
        finally:
            os.dup2(saved, 2)
            os.close(fd)
            os.close(saved)
        pools[name] = (warm, log, {"run": [], "jobs": []})
        caches.append(fresh.compile_cache.root)
    try:
        ids = iter(range(1, 1 << 30))
        for warm, log, out in pools.values():
            await turn(warm, ids, 20, log, {"run": [], "jobs": []})  # first forks, page cache
            out["skip"] = 20
        for _ in range(0, n, TURN):
            for warm, log, out in pools.values():
                await turn(warm, ids, TURN, log, out)
    finally:
        for warm, _, _ in pools.values():
            await warm.close()
    print(f"{n} trivial Python jobs per parent, one after another, {GAP * 1000:g} ms apart; "
          f"microseconds, p50 / p90")
    for name, (_, log, out) in pools.items():
        jobs = [(None, {})] * out["skip"] + out["jobs"]
        split = stages(log, jobs)
        cells = [f"{k} {statistics.median(v):.0f} / {sorted(v)[int(len(v) * 0.9)]:.0f}" for k, v in split.items() if v]
        runs = sorted(out["run"])
        print(f"  {name}: " + "; ".join(cells)
              + f"; Runner.run {statistics.median(runs) * 1e6:.0f} / {runs[int(len(runs) * 0.9)] * 1e6:.0f}")
    for path in [tmp, *caches]:
        shutil.rmtree(path, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=200)
    p.add_argument("--against", help="a git revision whose pool parent runs too, in turns")
    args = p.parse_args()
    asyncio.run(bench(args.jobs, args.against))


if __name__ == "__main__":
    main()
