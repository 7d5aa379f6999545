"""One trivial job's path hop by hop, in microseconds, from clock stamps in a patched copy of the tree.

    .venv/bin/python benchmarks/hop_trace.py [--jobs 100] [--pause 0] [--tree .]

Copies the tree (``--tree``) to a temporary folder, adds a stamp
(``CLOCK_MONOTONIC``, one clock for every process of the machine, appended
to one file) at each hop of a job's path in the client, the master and the
slave, and runs ``--jobs`` trivial Python jobs one after another through a
local cluster of 2 slaves x 2 slots of that copy, ``--pause`` seconds apart.
Prints the median of each stage.  Nothing of it is in the product: the
stamps live only in the copy.  The pool's own stages are
``warm_timeline.py``'s; here the pool is one stage (handed to it -> its
"exit" read), the sandboxed child being unable to write the trace.

The stamps cost a write each (a few microseconds).  Compare trees with
``--tree`` in turns: the machines are shared and noisy.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STAMP = '''import os, time
_fd = os.open(os.environ["HOPTRACE_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
def T(tag):
    os.write(_fd, f"{time.monotonic_ns()} {tag}\\n".encode())
'''

# (file, anchor, line to add, where): before the anchor's line, before the try: that holds it, after its first
# line, or inside the block it opens.
PATCHES = [
    ("distexec_kernel/cluster.py", "body = _submission(source, language, files", "T('C0')", "before"),
    ("distexec_kernel/events.py", "            try:\n                conn.write_message(text)", "T('C1')", "before"),
    ("distexec_kernel/cluster.py", 'elif msg["type"] == "job_update":',
     "T('C2 ' + str(msg['job'].get('status')))", "inside"),
    ("distexec_kernel/job.py", "if raise_on_error and self.status != P.SUCCEEDED:", "T('C3')", "before"),
    ("master/sockets.py", "            msg = P.decode(text)\n", "T('M0 ' + text[:30])", "before-try"),
    ("master/sockets.py", "            self.write_message(text)", "T('M9 ' + text[:30])", "before"),
    ("master/store.py", "        group, self._pending = self._pending, []\n        if not group:", "T('M5')",
     "after-first"),
    ("master/store.py", "        self._run(self._conn, group, inline=True)", "T('M6')", "after"),
    ("slave/agent.py", "    def on_job_run(self, msg: dict) -> None:", "T('S0')", "inside"),
    ("slave/warm_pool.py", "            self.sock.sendmsg([marshal.dumps(msg)], anc)", "T('S1')", "before"),
    ("slave/warm_pool.py", "                data = self.sock.recv(65536)",
     "T('S2 ' + data[:8].decode('ascii', 'replace'))", "after"),
]

# The stages in their order on a job's path: (name, predicate on a stamp's tag).
STAGES = [
    ("client: submit() called", lambda t: t == "C0"),
    ("client: its event thread writes the frame", lambda t: t == "C1"),
    ("master: reads the submission", lambda t: t.startswith('M0 {"type":"submit"')),
    ("master: commit begins (queued + running)", lambda t: t == "M5"),
    ("master: committed", lambda t: t == "M6"),
    ("master: writes job_run", lambda t: t.startswith('M9 {"type":"job_run"')),
    ("slave: reads job_run", lambda t: t == "S0"),
    ("slave: hands it to the pool", lambda t: t == "S1"),
    ("slave: reads the pool's 'exit'", lambda t: t.startswith("S2 exit")),
    ("master: reads job_finished", lambda t: t.startswith('M0 {"type":"job_finished"')),
    ("master: commit begins (the result)", lambda t: t == "M5"),
    ("master: committed ", lambda t: t == "M6"),
    ("master: writes the final job_update", lambda t: t.startswith("M9") and "job_update" in t),
    ("client: reads it", lambda t: t.startswith("C2 ") and t[3:] in ("succeeded", "failed")),
    ("client: wait() returns", lambda t: t == "C3"),
]

DRIVER = '''import sys, tempfile, time
from distexec_kernel import Cluster
from distexec_kernel.local import LocalCluster
jobs, pause = int(sys.argv[1]), float(sys.argv[2])
with tempfile.TemporaryDirectory(prefix="distexec-hops-") as home:
    lc = LocalCluster(2, slots=2, home=home, log_dir=home + "/logs", wait_complete=True)
    with lc, Cluster(lc.url, token=lc.token) as c:
        for _ in range(10):
            c.submit("pass").wait(60)
        print("MARK", flush=True)
        for _ in range(jobs):
            time.sleep(pause)
            assert c.submit("pass").wait(60).status == "succeeded"
'''


def patch(tree: str) -> None:
    with open(os.path.join(tree, "_hoptrace.py"), "w") as f:
        f.write(STAMP)
    for path, anchor, line, where in PATCHES:
        full = os.path.join(tree, path)
        with open(full) as f:
            text = f.read()
        at = text.find(anchor)
        if at < 0:
            raise SystemExit(f"hop_trace: {path} no longer holds {anchor!r}: the code moved, update PATCHES")
        start = text.rfind("\n", 0, at) + 1
        indent = text[start:len(text) - len(text[start:].lstrip(" "))]
        stamp = f"from _hoptrace import T; {line}"
        if where == "before":
            text = text[:start] + indent + stamp + "\n" + text[start:]
        elif where == "before-try":  # ahead of the try: that holds the anchor, at the try's indentation
            try_at = text.rfind("try:", 0, at)
            start = text.rfind("\n", 0, try_at) + 1
            text = text[:start] + text[start:try_at] + stamp + "\n" + text[start:]
        else:  # after the anchor's (first) line; "inside" the block it opens: one level deeper
            end = text.index("\n", at) + 1
            deeper = indent + "    " if where == "inside" else indent
            text = text[:end] + deeper + stamp + "\n" + text[end:]
        with open(full, "w") as f:
            f.write(text)


def stages_of(lines: list[str]) -> list[list[int]]:
    """Per job, the time of each stage (ns), or None for a job whose stamps did not line up."""
    jobs, cur = [], None
    for line in lines:
        t, _, tag = line.partition(" ")
        if tag == "C0":
            cur = []
            jobs.append(cur)
        if cur is not None:
            cur.append((int(t), tag))
    out = []
    for stamps in jobs:
        times, i = [], 0
        for _, pred in STAGES:
            while i < len(stamps) and not pred(stamps[i][1]):
                i += 1
            if i == len(stamps):
                break
            times.append(stamps[i][0])
        if len(times) == len(STAGES):
            out.append(times)
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--jobs", type=int, default=100)
    p.add_argument("--pause", type=float, default=0.0, help="seconds between two jobs")
    p.add_argument("--tree", default=HERE, help="the tree to trace (a checkout)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="distexec-hoptrace-") as tmp:
        tree = os.path.join(tmp, "tree")
        shutil.copytree(args.tree, tree, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "node_modules"))
        patch(tree)
        trace = os.path.join(tmp, "trace")
        env = {**os.environ, "PYTHONPATH": tree, "HOPTRACE_FILE": trace}
        proc = subprocess.run([sys.executable, "-c", DRIVER, str(args.jobs), str(args.pause)], env=env, cwd=tree,
                              stdout=subprocess.PIPE, text=True, check=True)
        assert "MARK" in proc.stdout
        with open(trace) as f:
            lines = f.read().splitlines()
    jobs = stages_of(lines)[10:]  # after the warm-up's
    if not jobs:
        raise SystemExit("hop_trace: no job's stamps lined up")
    print(f"{len(jobs)} trivial Python jobs one after another, {args.pause:g} s apart, 2 slaves x 2 slots; "
          f"medians in microseconds")
    for k in range(1, len(STAGES)):
        step = statistics.median((j[k] - j[k - 1]) / 1000 for j in jobs)
        print(f"  {STAGES[k - 1][0].strip():<45} -> {STAGES[k][0].strip():<45} {step:7.0f}")
    print(f"  {'in all':<94} {statistics.median((j[-1] - j[0]) / 1000 for j in jobs):7.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
