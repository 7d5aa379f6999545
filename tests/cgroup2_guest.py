"""Run by tests/test_cgroup2.py inside tests/vm.py's machine, where cgroup v2 is the only hierarchy.

The slave's own runners, built as ``distexec slave`` builds them (bubblewrap,
cgroups, seccomp, a disk quota per job), fresh and warm, run jobs that test
each limit the cgroups hold; what each job gave is written as JSON to the
path given, for the test on the host to judge.  Nothing is judged here.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from slave import sessions, toolchains  # noqa: E402
from slave.bwrap import best_sandbox  # noqa: E402
from slave.cgroups import Cgroups  # noqa: E402
from slave.jobdirs import JobDirs  # noqa: E402
from slave.runner import ProcessRunner  # noqa: E402
from slave.sandbox import Limits  # noqa: E402
from slave.warm import WarmRunner  # noqa: E402

MEMORY_MB = 96
PROCS = 40  # the JVM starts ~20 threads

JOBS = {
    # Which cgroup the job is in, as the JVM and Node look it up, and the limit they would read there.
    "where": "import os\npath = open('/proc/self/cgroup').read().strip().partition('::')[2]\nprint(path)\n"
             "try:\n    print(open('/sys/fs/cgroup' + path + '/memory.max').read().strip())\n"
             "except OSError as exc:\n    print('unreadable', exc.errno)",
    "hog": "b = bytearray(400 << 20)\nfor i in range(0, len(b), 4096):\n    b[i] = 1\nprint('survived')",
    "bomb": f"import os, time\nborn = 0\nfor _ in range({2 * PROCS}):\n    try:\n        if os.fork() == 0:\n"
            "            time.sleep(5)\n            os._exit(0)\n        born += 1\n    except OSError:\n        break\n"
            "print(born)",
    # A process that leaves the job's process group and session, and outlives it.
    "daemon": "import os\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
              "        os.execvp('sleep', ['sleep', '600'])\n    os._exit(0)\nprint('left one')",
}


# A slave in a container with a cgroup namespace of its own: the hierarchy's root it sees holds
# processes (its own, and a sleeper of the container's), which have to move before it can pass
# controllers on.
IN_A_CONTAINER = ("mkdir /sys/fs/cgroup/container && echo $$ > /sys/fs/cgroup/container/cgroup.procs && "
                  "exec unshare --cgroup --mount sh -c 'umount /sys/fs/cgroup && mount -t cgroup2 none /sys/fs/cgroup"
                  " && (sleep 600 >/dev/null 2>&1 &) && exec \"$0\" -c \"$1\" \"$2\"' \"$0\" \"$1\" \"$2\"")
CONTAINER_SLAVE = """import json, os, signal, sys
sys.path.insert(0, sys.argv[1])
from slave.cgroups import Cgroups
cgroups = Cgroups()
sleepers = {int(pid): open(f"/proc/{pid}/cgroup").read().strip() for pid in filter(str.isdigit, os.listdir("/proc"))
            if open(f"/proc/{pid}/cmdline", "rb").read() == b"sleep\\0" + b"600\\0"}
print(json.dumps({"missing": cgroups.missing, "unified": sorted(cgroups.unified),
                  "slave": open("/proc/self/cgroup").read().strip(), "sleeper": list(sleepers.values())}))
for pid in sleepers:
    os.kill(pid, signal.SIGKILL)
cgroups.close()
"""


# A slave's cgroups made, a process started in a job cgroup, then the slave gone without cleaning up.
DIES_HOLDING_A_JOB = (
    "import os, subprocess, sys\n"
    f"sys.path.insert(0, {ROOT!r})\n"
    "from slave.cgroups import Cgroups\nfrom slave.sandbox import Limits\n"
    "cg = Cgroups().create(Limits())\n"
    "p = subprocess.Popen(['sleep', '600'], start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
    "open(cg.join_paths()[0], 'w').write(str(p.pid))\n"
    "print(p.pid, flush=True)\nos._exit(0)\n")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# What the JVM and Node make of the cgroup a fresh job is in (a warm job's are told on their command line).
RUNTIMES = {
    # -Xint: no JIT code under the emulator (TCG, -cpu max), where a JVM once aborted; what is checked
    # is read by the JVM's own C++ at start.  Its whole output kept: a failure shows the JVM's report.
    "jvm": "java -Xint -XshowSettings:system -version 2>&1",
    "node": "node -e 'console.log(process.constrainedMemory())'",
}


async def run(runner, job_id: int, source: str, language: str = "python") -> dict:
    return await run_job(runner, {"id": job_id, "language": language, "source": source, "timeout": 120})


async def run_job(runner, job: dict) -> dict:
    out = await runner.run(job, lambda *_: None, asyncio.Event())
    return {"exit_code": out.exit_code, "error": (out.error or {}).get("code"), "stdout": out.stdout,
            "stderr": out.stderr[-2000:]}


def daemons() -> int:
    """The daemon jobs left (``sleep 600``), anywhere in the machine."""
    found = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                found += f.read() == b"sleep\0" + b"600\0"
        except OSError:
            pass
    return found


async def main(result_path: str) -> None:
    r: dict = {}
    limits = Limits(memory_mb=MEMORY_MB, max_procs=PROCS)
    box = best_sandbox(limits, "bwrap")
    cgroups = box.cgroups
    r["unified"] = sorted(getattr(cgroups, "unified", ()))  # (a tree before v2 has none)
    r["missing"] = cgroups.missing
    r["describe"] = box.describe()
    chains = await toolchains.detect_toolchains(["python", "bash"], sandbox=box, limits=limits)
    fresh = ProcessRunner(box, limits, {n: tc.version for n, tc in chains.items()},
                          jobdirs=JobDirs("vm-cgroup2", None, 64),
                          programs={n: tc.programs for n, tc in chains.items()})
    warm = WarmRunner(fresh, 1)
    await warm.start()
    r["warm_off"] = warm.why_off
    ids = iter(range(1, 1000))
    for name, runner in (("fresh", fresh), ("warm", warm)):
        r[name] = {job: await run(runner, next(ids), source) for job, source in JOBS.items()}
        # Killed at the job's end (warm: when its slot is released, just after the outcome is told).
        deadline = time.monotonic() + 30
        while daemons() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        r[name]["daemons_left"] = daemons()
    r["runtimes"] = {name: await run(fresh, next(ids), source, "bash") for name, source in RUNTIMES.items()}
    # A session: its kernel in a cgroup of its own, its state kept from cell to cell, capped at a core
    # while a cell runs; a cell past the memory limit ends it.
    session = sessions.SessionRunner(box, limits, fresh.jobdirs)
    cells = {"define": "x = 41", "use": "print(x + 1)",
             "cap": "path = open('/proc/self/cgroup').read().strip().partition('::')[2]\n"
                    "print(path)\nprint(open('/sys/fs/cgroup' + path + '/cpu.max').read().strip())",
             "hog": JOBS["hog"]}
    r["session"] = {}
    for name, source in cells.items():
        job = {"id": next(ids), "user": "u", "session": "s", "source": source, "timeout": 120, "language": "python"}
        r["session"][name] = await run_job(session, job)
    await session.close()
    # A session kernel's CPU cap, as written.
    capped = cgroups.create(Limits(cpus=0.5))
    r["cpu.max"] = open(os.path.join(capped.paths["cpu"], "cpu.max")).read().strip()
    cgroups.release(capped)
    await warm.close()  # and the fresh runner under it, and its sandbox
    # A slave killed with a job still running leaves its cgroups, the job in one: the next slave
    # kills that job and removes them.
    dead = subprocess.run([sys.executable, "-c", DIES_HOLDING_A_JOB], capture_output=True, text=True, timeout=120)
    r["dead_slave"] = {"stdout": dead.stdout, "stderr": dead.stderr[-2000:]}
    if dead.stdout.strip():
        job = int(dead.stdout.split()[-1])
        r["dead_slave"]["job_alive_before"] = _alive(job)
        Cgroups().close()
        r["dead_slave"]["job_alive_after"] = _alive(job)
    inside = subprocess.run(["sh", "-c", IN_A_CONTAINER, sys.executable, CONTAINER_SLAVE, ROOT],
                            capture_output=True, text=True, timeout=120)
    r["container"] = {"stdout": inside.stdout, "stderr": inside.stderr[-2000:]}
    top = "/sys/fs/cgroup/distexec"
    r["left_cgroups"] = [d for d, _, _ in os.walk(top) if d != top]
    with open(result_path, "w") as f:
        json.dump(r, f, indent=1)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
