"""A submission's answer with and without its inputs echoed back, in turns, in one run.

    .venv/bin/python benchmarks/answer_echo.py [--jobs 800] [--kb 10] [--big-mib 1] [--turns 5]

The master answers a submission with the job; until 2026-12-02 that carried
the job's inputs (source, files, stdin) back to the sender, which has them.
``?echo=0`` (HTTP) and ``"echo": false`` (WebSocket) leave them out; the
client always asks so.  Two loads, each way in turns, on one cluster whose
one slot is held so that every job stays queued: a batch of ``--jobs`` jobs
of one ``--kb`` KB program over HTTP (a map's part), and single submissions
of a ``--big-mib`` MiB program on the WebSocket.  Prints the medians of the
client's wall time and the master's CPU (psutil) per request.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import sys
import tempfile
import time

import psutil
import requests
import tornado.httpclient
import tornado.websocket

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distexec_kernel import Cluster, config, protocol as P  # noqa: E402
from distexec_kernel.local import LocalCluster  # noqa: E402


REFS = itertools.count()


def program(kb: int) -> str:
    return ("# " + "x" * 97 + "\n") * (kb * 10) + "print(1)\n"


def cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def batch_turn(url: str, headers: dict, body: list, echo: bool, master: psutil.Process) -> tuple[float, float, int]:
    c0, t0 = cpu(master), time.perf_counter()
    resp = requests.post(url + "/api/jobs" + ("" if echo else "?echo=0"), json=body, headers=headers, timeout=300)
    wall, used = time.perf_counter() - t0, cpu(master) - c0
    assert resp.status_code == 201, resp.text
    requests.post(url + f"/api/groups/{resp.json()['group']}/cancel", headers=headers, timeout=300)
    return wall, used, len(resp.content)


async def ws_turns(url: str, headers: dict, body: dict, echo: bool, n: int, master: psutil.Process) -> list:
    """``n`` submissions one after another on one channel: (wall, master CPU, bytes received) each, the
    CPU as the average over all ``n`` (psutil counts in ticks of 10 ms)."""
    req = tornado.httpclient.HTTPRequest(config.ws_url(url) + "/ws/client", headers=headers)
    conn = await tornado.websocket.websocket_connect(req, max_message_size=256 << 20)
    out, ids, c0 = [], [], cpu(master)
    for i in range(n):
        t0, size, job = time.perf_counter(), 0, None
        conn.write_message(P.encode(P.make("submit", request=body, ref=f"r{next(REFS)}",
                                           **({} if echo else {"echo": False}))))
        while job is None:
            text = await conn.read_message()
            size += len(text)
            job = next((m["job"] for m in P.decode_batch(text)
                        if isinstance(m, dict) and m["type"] == "submit_reply"), None)
        assert job["status"] == "queued", job["status"]  # (a ref sent again is answered with its first job)
        out.append([time.perf_counter() - t0, 0.0, size])
        ids.append(job["id"])
    used = (cpu(master) - c0) / n
    conn.close()
    for row in out:
        row[1] = used
    for job_id in ids:
        requests.post(url + f"/api/jobs/{job_id}/cancel", headers=headers, timeout=60)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--jobs", type=int, default=800, help="jobs in a batch (a map's part of 8 MiB at 10 KB each)")
    p.add_argument("--kb", type=int, default=10, help="KB of the batch's program")
    p.add_argument("--big-mib", type=float, default=1.0, help="MiB of the program submitted alone")
    p.add_argument("--turns", type=int, default=5)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="distexec-echo-") as home:
        lc = LocalCluster(1, slots=1, home=home, log_dir=home + "/logs", languages="python",
                          master_args=["--max-queued-per-user", "0", "--max-queue", "0", "--read-rate", "0"])
        with lc, Cluster(lc.url, token=lc.token) as c:
            hold = c.submit("import time\ntime.sleep(3600)")  # the one slot: all else stays queued
            deadline = time.monotonic() + 60
            while hold.status != "running" and time.monotonic() < deadline:
                time.sleep(0.05)
            master = psutil.Process(lc.master.pid)
            headers = {"Authorization": f"Bearer {lc.token}"}
            batch = [{"source": program(args.kb), "language": "python", "args": [str(i)]} for i in range(args.jobs)]
            big = {"source": program(int(args.big_mib * 1024)), "language": "python"}
            rows = {}
            for _ in range(args.turns):
                for echo in (True, False):
                    rows.setdefault(("batch", echo), []).append(batch_turn(lc.url, headers, batch, echo, master))
                    rows.setdefault(("ws", echo), []).extend(
                        asyncio.run(ws_turns(lc.url, headers, big, echo, 20, master)))
            hold.cancel()
    print(f"{'load':<44} {'echo':>5} {'wall ms':>9} {'master CPU ms':>14} {'answer KB':>10}")
    for (load, echo), vals in rows.items():
        what = (f"batch of {args.jobs} x {args.kb} KB program (HTTP)" if load == "batch"
                else f"one {args.big_mib:g} MiB program (WebSocket)")
        wall, used, size = (statistics.median(v[k] for v in vals) for k in range(3))
        print(f"{what:<44} {'yes' if echo else 'no':>5} {wall * 1000:>9.1f} {used * 1000:>14.1f} {size / 1024:>10.0f}")


if __name__ == "__main__":
    main()
