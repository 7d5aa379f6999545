"""Users share the master: fair dispatch on a real cluster, and queued jobs that cost it no memory."""
from __future__ import annotations

import psutil
import pytest
import requests

from distexec_kernel import Cluster, protocol as P

from conftest import users_json, wait_for

SLEEPER = "import time\ntime.sleep(60)\n"


def test_one_users_long_queue_does_not_hold_anothers_job_behind_it(two_users):
    lc, alice, bob = two_users
    busy = alice.submit(SLEEPER, timeout=60, name="alice's sleeper")
    wait_for(lambda: alice.job(busy.id).status == P.RUNNING, 20, "alice's job to take the one slot")
    backlog = [alice.submit(f"print({i})", name=f"alice {i}") for i in range(6)]
    mine = bob.submit("print('bob')", name="bob's")
    assert mine.status == P.QUEUED
    alice.cancel(busy.id)  # the slot frees
    assert mine.wait(60).status == P.SUCCEEDED
    done = [j.wait(60) for j in backlog]
    assert [j.stdout for j in done] == [f"{i}\n" for i in range(6)]  # FIFO within alice's queue
    # With one slot, jobs start one after the other: bob's came first, though
    # all of alice's were queued before it (first in, first out would put it last).
    starts = sorted([(P.parse_time(j.started_at), j.user, j.id) for j in done + [mine]])
    assert starts[0][1:] == ("bob", mine.id), starts
    assert [s[2] for s in starts[1:]] == [j.id for j in backlog]


def test_a_user_at_the_running_cap_leaves_free_slots_to_the_others(make_cluster, tmp_path):
    """A class on 2 x 2 slots: four endless loops from one student took every slot, and fair share only
    acts when one frees.  With --max-running-per-user 1 the others' jobs start at once."""
    path = users_json(tmp_path, "alice", "bob")
    lc = make_cluster(1, slots=3, languages="python", master_args=["--users", path, "--max-running-per-user", "1"])
    with Cluster(lc.url, user="alice", password="alice-pw") as alice, \
            Cluster(lc.url, user="bob", password="bob-pw") as bob:
        loops = [alice.submit("while True: pass", timeout=60, name=f"loop {i}") for i in range(3)]
        wait_for(lambda: alice.job(loops[0].id).status == P.RUNNING, 20, "alice's first loop to start")
        mine = bob.submit("print('bob')")
        assert mine.wait(30).stdout == "bob\n"  # a slot of the three was hers to take no more
        assert [alice.job(j.id).status for j in loops] == [P.RUNNING, P.QUEUED, P.QUEUED]
        wait_for(lambda: bob.slaves()[0]["running"] == 1, 10, "two of the three slots to be free")
        alice.cancel(loops[0].id)  # hers ends: her next one takes its turn
        wait_for(lambda: alice.job(loops[1].id).status == P.RUNNING, 20, "alice's second loop to start")
        assert alice.job(loops[2].id).status == P.QUEUED
        for job in loops[1:]:
            alice.cancel(job.id)


def test_queued_jobs_keep_their_inputs_in_the_store_not_in_master_memory(make_cluster):
    lc = make_cluster(1, slots=1, languages="python")
    master = psutil.Process(lc.master.pid)
    count, size = 16, P.MAX_STDIN_BYTES  # 128 MiB of inputs in all
    with Cluster(lc.url, token=lc.token) as c:
        busy = c.submit(SLEEPER, timeout=60)
        wait_for(lambda: c.job(busy.id).status == P.RUNNING, 20, "the slot to be taken")
        program = "import sys\nprint(len(sys.stdin.read()))\n"
        # Warm up the master's buffers for a body this size before the baseline.
        first = c.submit(program, stdin="x" * size)
        before = master.memory_info().rss
        body = P.encode({"source": program, "language": "python", "stdin": "y" * size})
        with requests.Session() as http:
            queued = [http.post(lc.url + "/api/jobs", data=body, timeout=60,
                                headers={"Authorization": f"Bearer {lc.token}"}).json() for _ in range(count)]
        assert all(j["status"] == P.QUEUED for j in queued)
        grown = master.memory_info().rss - before
        # Holding them whole would cost 128 MiB; what is left is allocator slack.
        assert grown < count * size / 3, f"the master grew by {grown >> 20} MiB with {count} queued jobs"
        # A queued job still shows its inputs, read from the store.
        shown = c.job(queued[0]["id"])
        assert shown.status == P.QUEUED and len(shown.record["stdin"]) == size
        assert shown.source == program
        # And runs with them, once a slot frees.
        for j in queued[2:]:
            c.cancel(j["id"])
        c.cancel(busy.id)
        assert first.wait(60).stdout == f"{size}\n"
        assert [c.job(j["id"]).wait(60).stdout for j in queued[:2]] == [f"{size}\n"] * 2


def test_a_large_batch_does_not_hold_back_another_users_single_job(two_users):
    """Issue 14: 900 jobs of one map (under the per-user cap), one slot; another user's one job runs next."""
    lc, alice, bob = two_users
    busy = alice.submit(SLEEPER, timeout=60, name="alice's sleeper")
    wait_for(lambda: alice.job(busy.id).status == P.RUNNING, 20, "alice's job to take the one slot")
    sweep = alice.map("print(1)", range(900), name="sweep")
    assert sweep.refresh().counts() == {P.QUEUED: 900}
    mine = bob.submit("print('bob')", name="bob's")
    alice.cancel(busy.id)  # the slot frees
    assert mine.wait(60).status == P.SUCCEEDED
    # At most one of the sweep's jobs went before bob's (the one that took the slot as it freed).
    # Read from the start times: the slave gets its next job before the client hears that bob's
    # ended, so how many left the queue by the time we look says nothing of the order.
    went_before = [j.id for j in sweep.refresh() if j.started_at is not None and j.started_at < mine.started_at]
    assert len(went_before) <= 1, (went_before, mine.started_at)
    # Warm jobs finish in milliseconds: some ran while we looked.  Every job
    # not ended when the cancel arrived ends cancelled, but for one a slot
    # may finish in the same instant.
    not_ended = alice.cancel_group(sweep.id)
    counts = sweep.wait(60, progress=False).counts()
    assert sum(counts.values()) == 900 and set(counts) <= {P.SUCCEEDED, P.CANCELLED}, counts
    assert counts.get(P.CANCELLED, 0) >= not_ended - 1 and not_ended > 0, (not_ended, counts)
