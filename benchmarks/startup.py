"""Where ``distexec up`` spends its time before the first result (issue 12: <= 1 s).

    .venv/bin/python benchmarks/startup.py [--runs 5] [--slaves 2] [--slots 2]

Each run starts a master and slaves as ``distexec up`` does
(``LocalCluster``), with a fresh ``$DISTEXEC_HOME`` (no toolchain answers
kept from before, as on a first start), then submits one trivial Python job
as ``benchmarks/vs_peers.py`` does.  Printed, medians over the runs:

- master ready: its process started -> it printed its ready line;
- slaves registered: the slaves' processes started -> the last one printed
  its registered line (they start with the master, in parallel);
- client connected, first job: ``Cluster(...)`` connected, then
  ``submit("pass").wait()``;
- total: ``LocalCluster(...).start()`` -> first result (issue 12's figure);
- every language offered: -> the master lists no slave as still detecting
  (a slave on a first start registers before its slow toolchains answer).

Two baselines run in the same turns, so figures from a busy machine compare:
a bare ``python3 -c pass`` and ``python3 -c "import tornado.web"``.

It also says whether distexec's own modules start from cached bytecode: with
PYTHONDONTWRITEBYTECODE=1 and no ``__pycache__`` in the checkout, every
process compiles them again at each start (about a quarter of the master's
start); an installed package (pip compiles at install) never does.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distexec_kernel import Cluster  # noqa: E402
from distexec_kernel.local import MASTER_READY, SLAVE_REGISTERED, LocalCluster  # noqa: E402


def interpreter(code: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - t0


def one_run(slaves: int, slots: int, keep: bool, languages: str | None = None) -> dict:
    home = tempfile.mkdtemp(prefix="distexec-startup-")
    env_cache = os.environ.pop("DISTEXEC_TOOLCHAIN_CACHE", None)  # a first start knows nothing
    logs = os.path.join(home, "logs")
    times: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        lc = LocalCluster(slaves, slots=slots, home=home, log_dir=logs, languages=languages)

        # Each child's line is waited for in its own thread, so each time is
        # when that child printed it, not when the one before it was read.
        def wait(name, child, prefix):
            child.wait_line(prefix, 60)
            times[name] = time.perf_counter() - t0

        try:
            lc.spawn_master()
            children = [lc.spawn_slave() for _ in range(slaves)]
            spawned = time.perf_counter() - t0
            threads = [threading.Thread(target=wait, args=("master", lc.master, MASTER_READY))]
            threads += [threading.Thread(target=wait, args=(f"slave{i}", c, SLAVE_REGISTERED))
                        for i, c in enumerate(children)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            missing = {"master", *(f"slave{i}" for i in range(slaves))} - set(times)
            if missing:
                raise RuntimeError(f"not ready: {sorted(missing)}; see {logs}")
            ready = time.perf_counter() - t0
            with Cluster(lc.url, token=lc.token) as c:
                connected = time.perf_counter() - t0
                job = c.submit("pass")
                job.wait(60)
                assert job.status == "succeeded", job.status
                done = time.perf_counter() - t0
                # Until the master sees every slave's whole list (a slave that registers
                # before its slow toolchains answer says "detecting" until then).
                deadline = time.monotonic() + 60
                while any(s.get("detecting") for s in c.slaves()) and time.monotonic() < deadline:
                    time.sleep(0.02)
                languages = time.perf_counter() - t0
        finally:
            lc.stop()
        return {
            "spawn": spawned,
            "master ready": times["master"],
            "slaves registered": max(v for k, v in times.items() if k.startswith("slave")),
            "client connected": connected - ready,
            "first job": done - connected,
            "total": done,
            "every language offered": max(ready, languages),
        }
    finally:
        if env_cache is not None:
            os.environ["DISTEXEC_TOOLCHAIN_CACHE"] = env_cache
        if not keep:
            shutil.rmtree(home, ignore_errors=True)


def bytecode_state() -> str:
    import master.core
    cached = os.path.exists(importlib.util.cache_from_source(master.core.__file__))
    if cached:
        return "cached (__pycache__ present)"
    if sys.flags.dont_write_bytecode:
        return "compiled at every start (PYTHONDONTWRITEBYTECODE set, no __pycache__)"
    return "compiled at the first start, cached after"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--slaves", type=int, default=2)
    p.add_argument("--slots", type=int, default=2)
    p.add_argument("--keep", action="store_true", help="keep each run's home (logs under <home>/logs)")
    p.add_argument("--languages", default=None, help="the slaves' --languages (default: all found)")
    args = p.parse_args()
    rows: dict[str, list[float]] = {}
    for i in range(args.runs):
        # Baselines in the same turn as the run they stand beside.
        rows.setdefault("python3 -c pass", []).append(interpreter("pass"))
        rows.setdefault("python3 -c 'import tornado.web'", []).append(interpreter("import tornado.web"))
        for k, v in one_run(args.slaves, args.slots, args.keep, args.languages).items():
            rows.setdefault(k, []).append(v)
        print(f"run {i + 1}: total {rows['total'][-1]:.3f} s", file=sys.stderr, flush=True)
    print(f"\n{args.slaves} slave(s) x {args.slots} slot(s), fresh home each run, medians of {args.runs}"
          f" (from LocalCluster.start() unless said); distexec's bytecode: {bytecode_state()}")
    for k, v in rows.items():
        print(f"  {k:<34} {statistics.median(v) * 1000:8.0f} ms   (min {min(v) * 1000:.0f}, max {max(v) * 1000:.0f})")


if __name__ == "__main__":
    main()
