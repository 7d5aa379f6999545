"""Load: 50 clients at once, each with its own connection, submitting and waiting concurrently.

Nothing may be lost or refused: every submission gets its job, every job
ends succeeded with the output its input calls for, and the master counts
every client while they are connected.
"""
from __future__ import annotations

import statistics
import threading
import time

import pytest

from distexec_kernel import Cluster, protocol as P

CLIENTS = 50
JOBS_PER_CLIENT = 5

PROGRAM = "import sys\nprint(int(sys.argv[1]) * int(sys.argv[2]))"


@pytest.mark.timeout(300)
def test_fifty_clients_at_once(make_cluster):
    lc = make_cluster(2, slots=2)
    ready = threading.Barrier(CLIENTS + 1, timeout=120)
    go = threading.Event()
    results: dict[int, list] = {}
    latencies: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        try:
            with Cluster(lc.url, token=lc.token) as c:
                ready.wait()
                go.wait(60)
                jobs = []
                for i in range(JOBS_PER_CLIENT):
                    t = time.monotonic()
                    jobs.append(c.submit(PROGRAM, args=[str(n), str(i)], name=f"load {n}-{i}"))
                    with lock:
                        latencies.append(time.monotonic() - t)
                for job in jobs:
                    job.wait(240)
                results[n] = [(job.id, job.status, job.stdout, job.client_id) for job in jobs]
                assert all(job.client_id == c.client_id for job in jobs)
                ready.wait()  # stay connected until every client is done
        except BaseException as exc:  # reported below
            errors.append(exc)
            ready.abort()

    threads = [threading.Thread(target=client, args=(n,), name=f"load-{n}") for n in range(CLIENTS)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    with Cluster(lc.url, token=lc.token) as observer:
        ready.wait()
        # All fifty are connected at once, each under its own id.
        ids = [x["id"] for x in observer.clients()]
        assert len(ids) == len(set(ids)) == CLIENTS + 1
        go.set()
        try:
            ready.wait()
        except threading.BrokenBarrierError:
            pass
        for t in threads:
            t.join(240)
        assert not errors, errors
        assert not any(t.is_alive() for t in threads)
        elapsed = time.monotonic() - t0
        history = {j["name"]: j for j in observer.jobs_page(limit=1000)[0]}

    assert sorted(results) == list(range(CLIENTS))
    seen_ids = set()
    for n, jobs in results.items():
        for i, (job_id, status, stdout, _) in enumerate(jobs):
            rec = history[f"load {n}-{i}"]
            assert status == P.SUCCEEDED, (rec["error"], rec["stderr"][-2000:])
            assert stdout == f"{n * i}\n"
            assert history[f"load {n}-{i}"]["id"] == job_id
            assert history[f"load {n}-{i}"]["attempts"] == 1
            seen_ids.add(job_id)
    assert len(seen_ids) == CLIENTS * JOBS_PER_CLIENT == len(history)
    lat = sorted(latencies)
    print(f"load: {len(seen_ids)} jobs from {CLIENTS} clients in {elapsed:.1f} s; submit latency "
          f"p50 {statistics.median(lat) * 1000:.0f} ms, p95 {lat[int(len(lat) * 0.95)] * 1000:.0f} ms")
