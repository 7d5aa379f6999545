"""The scheduler, fed events with no I/O: every decision it makes, checked."""
from collections import Counter

from hypothesis import given, settings, strategies as st

from master.scheduler import Scheduler


def test_fifo_and_slots():
    s = Scheduler()
    s.add_slave("a", ["python"], 2)
    for j in (1, 2, 3):
        s.enqueue(j, "python")
    assert s.assign() == [(1, "a"), (2, "a")]
    assert list(s.queue) == [3]
    s.finished(1)
    assert s.assign() == [(3, "a")]


def test_least_loaded_relative_to_slots():
    s = Scheduler()
    s.add_slave("big", ["python"], 4)
    s.add_slave("small", ["python"], 1)
    for j in range(1, 6):
        s.enqueue(j, "python")
    placed = dict(s.assign())
    # small takes one (load 1/1); big takes four (load 4/4): never small twice.
    assert sorted(placed.values()).count("small") == 1
    assert sorted(placed.values()).count("big") == 4


def test_ties_go_to_the_slave_idle_longest():
    s = Scheduler()
    s.add_slave("a", ["python"], 1)
    s.add_slave("b", ["python"], 1)
    s.enqueue(1, "python")
    first = s.assign()[0][1]
    s.finished(1)
    s.enqueue(2, "python")
    # Both are idle now; the other one has been idle longer.
    assert s.assign()[0][1] != first


def test_global_cap():
    s = Scheduler(max_jobs=3)
    s.add_slave("a", ["python"], 8)
    s.add_slave("b", ["python"], 8)
    for j in range(10):
        s.enqueue(j, "python")
    assert len(s.assign()) == 3
    assert s.assign() == []
    s.finished(0)
    assert len(s.assign()) == 1


def test_language_routing_and_no_head_of_line_blocking():
    s = Scheduler()
    s.add_slave("py", ["python"], 1)
    s.add_slave("c", ["c", "python"], 1)
    s.enqueue(1, "c")
    s.enqueue(2, "c")      # must wait for the one C slave
    s.enqueue(3, "python")  # must not wait behind job 2
    out = dict(s.assign())
    assert out == {1: "c", 3: "py"}
    assert list(s.queue) == [2]


def test_unknown_language_waits_and_can_run():
    s = Scheduler()
    s.add_slave("a", ["python"], 1)
    assert s.can_run("python") and not s.can_run("c")
    assert s.languages() == {"python": 1}


def test_cancel_queued_job():
    s = Scheduler()
    s.enqueue(1, "python")
    assert s.dequeue(1) is True
    assert s.dequeue(1) is False
    s.add_slave("a", ["python"], 1)
    assert s.assign() == []


def test_lost_slave_jobs_still_count_until_settled():
    s = Scheduler(max_jobs=1)
    s.add_slave("a", ["python"], 1)
    s.add_slave("b", ["python"], 1)
    s.enqueue(1, "python")
    s.enqueue(2, "python")
    assert s.assign() == [(1, "a")]
    assert s.remove_slave("a") == [1]
    # Job 1 is not settled yet: the cap still holds job 2 back.
    assert s.assign() == []
    s.finished(1)
    assert s.assign() == [(2, "b")]


def test_requeue_goes_to_the_front():
    s = Scheduler()
    s.add_slave("a", ["python"], 1)
    s.enqueue(1, "python")
    s.enqueue(2, "python")
    assert s.assign() == [(1, "a")]
    s.remove_slave("a")
    s.requeue_front(1, "python")
    s.add_slave("b", ["python"], 1)
    assert s.assign() == [(1, "b")]


def test_draining_slave_gets_nothing_new():
    s = Scheduler()
    s.add_slave("a", ["python"], 2)
    s.add_slave("b", ["python"], 2)
    s.set_accepting("a", False)
    for j in range(3):
        s.enqueue(j, "python")
    assert {uid for _, uid in s.assign()} == {"b"}


def test_reregistered_slave_keeps_its_running_jobs():
    s = Scheduler()
    s.add_slave("a", ["python"], 1)
    s.enqueue(1, "python")
    s.assign()
    s.remove_slave("a")
    s.add_slave("a", ["python"], 1, running=[1])
    s.enqueue(2, "python")
    assert s.assign() == []  # its one slot is still taken by job 1
    s.finished(1)
    assert s.assign() == [(2, "a")]


events = st.lists(st.one_of(
    st.tuples(st.just("enqueue"), st.sampled_from(["python", "c"])),
    st.tuples(st.just("enqueue_for"), st.sampled_from(["alice", "bob"])),
    st.tuples(st.just("retry"), st.integers(0, 50)),
    st.tuples(st.just("finish"), st.integers(0, 50)),
    st.tuples(st.just("cancel"), st.integers(0, 50)),
    st.tuples(st.just("leave"), st.sampled_from(["a", "b", "c"])),
    st.tuples(st.just("join"), st.sampled_from(["a", "b", "c"])),
    st.tuples(st.just("drain"), st.sampled_from(["a", "b", "c"])),
    st.tuples(st.just("rejoin"), st.sampled_from(["a", "b", "c"])),
), max_size=120)


@settings(max_examples=200, deadline=None)
@given(events, st.integers(1, 5), st.one_of(st.none(), st.integers(1, 3)))
def test_invariants_hold_under_any_event_order(evts, cap, per_user):
    s = Scheduler(max_jobs=cap, max_running_per_user=per_user)
    slots = {"a": 1, "b": 2, "c": 3}
    langs = {"a": ["python"], "b": ["python", "c"], "c": ["c"]}
    next_id = 0
    assigned_once = set()
    for kind, arg in evts:
        if kind == "enqueue":
            s.enqueue(next_id, arg)
            next_id += 1
        elif kind == "enqueue_for":
            s.enqueue(next_id, "python", user=arg)
            next_id += 1
        elif kind == "retry" and arg in s.running:  # its slave was lost: back at the head, as jobs.py does
            user = s.job_user.get(arg)
            s.finished(arg)
            s.requeue_front(arg, "python", user=user)
            assigned_once.discard(arg)
        elif kind == "finish" and arg in s.running:
            s.finished(arg)
        elif kind == "cancel":
            s.dequeue(arg)
        elif kind == "leave":
            for j in s.remove_slave(arg):
                s.finished(j)
        elif kind == "join" and arg not in s.slaves:
            s.add_slave(arg, langs[arg], slots[arg])
        elif kind == "drain" and arg in s.slaves:
            s.set_accepting(arg, not s.slaves[arg].accepting)
        elif kind == "rejoin" and arg in s.slaves:  # registered again before its old connection closed
            s.add_slave(arg, langs[arg], slots[arg], running=list(s.slaves[arg].running))
        before = s.running_by()
        for job_id, uid in s.assign():
            assert job_id not in assigned_once, "a job was placed twice"
            assigned_once.add(job_id)
            assert uid in s.slaves and s.slaves[uid].accepting
            user = s.job_user.get(job_id)
            assert per_user is None or before[user] < per_user, "a user past the cap was given a slot"
            before[user] += 1
        assert len(s.running) <= cap
        for uid, state in s.slaves.items():
            assert len(state.running) <= state.slots
            assert all(s.running[j] == uid for j in state.running)
        assert not set(s.queue) & set(s.running)
        assert s.running_by() == Counter(s.job_user.get(j) for j in s.running)  # kept in step, not counted
        # Nothing left queued that an accepting slave with a free slot could run (but a user's at the cap).
        if len(s.running) < cap:
            free = [st_ for st_ in s.slaves.values() if st_.accepting and st_.free > 0]
            runnable = [lang for j, lang in s.queue.items()
                        if per_user is None or s.running_by()[s.job_user.get(j)] < per_user]
            assert not any(lang in st_.languages for lang in runnable for st_ in free)


# -- fair share across users ---------------------------------------------------

def test_the_next_slot_goes_to_the_user_with_the_fewest_running_jobs():
    s = Scheduler()
    s.add_slave("a", ["python"], 2)
    for j in range(1, 11):
        s.enqueue(j, "python", user="alice")  # a long queue of alice's
    s.enqueue(11, "python", user="bob")
    s.enqueue(12, "python", user="bob")
    # Both at 0 running: alice's head was queued first; then bob has fewer.
    assert s.assign() == [(1, "a"), (11, "a")]
    s.finished(1)
    # alice 0 running, bob 1: alice's turn.
    assert s.assign() == [(2, "a")]
    s.finished(2)
    # alice 0, bob 1: alice again, though bob's 12 was queued before her 3.
    assert s.assign() == [(3, "a")]
    s.finished(11)
    # alice 1, bob 0: bob.
    assert s.assign() == [(12, "a")]
    assert s.queued_by("alice") == 7 and s.queued_by("bob") == 0
    assert s.running_by() == {"alice": 1, "bob": 1}


def test_at_equal_share_turns_go_round_the_users_in_queue_order():
    s = Scheduler()
    s.add_slave("a", ["python"], 1)
    for job, user in ((1, "bob"), (2, "alice"), (3, "bob"), (4, "carol"), (5, "alice"), (6, "alice")):
        s.enqueue(job, "python", user=user)
    order = []
    while s.queue:
        [(job, _)] = s.assign()
        order.append(job)
        s.finished(job)
    # One slot: every turn is a tie at zero running.  Users not served yet come
    # first, in queue order; then whoever was served least recently; within
    # a user, first in, first out.
    assert order == [1, 2, 4, 3, 5, 6]


def test_a_user_at_the_running_cap_waits_with_slots_free_and_others_go_first():
    s = Scheduler(max_running_per_user=2)
    s.add_slave("a", ["python"], 4)
    for j in range(1, 5):  # alice's endless loops, one per slot
        s.enqueue(j, "python", user="alice")
    assert s.assign() == [(1, "a"), (2, "a")]  # two slots stay free for the others
    s.enqueue(5, "python", user="bob")
    s.enqueue(6, "python", user="bob")
    s.enqueue(7, "python", user="bob")
    assert s.assign() == [(5, "a"), (6, "a")]
    s.finished(5)
    assert s.assign() == [(7, "a")]  # bob's own turn: alice is still at her cap
    s.finished(1)
    assert s.assign() == [(3, "a")]
    assert s.running_by() == Counter({"alice": 2, "bob": 2})


def test_a_user_whose_language_is_busy_does_not_block_others():
    s = Scheduler()
    s.add_slave("c", ["c"], 1)
    s.add_slave("py", ["python"], 1)
    s.enqueue(1, "c", user="alice")
    s.enqueue(2, "c", user="alice")
    s.enqueue(3, "python", user="alice")
    s.enqueue(4, "python", user="bob")
    # alice's 2 waits for the C slave; her 3 is her next job that can start, but
    # with 1 running she loses the python slot to bob with none.
    assert dict(s.assign()) == {1: "c", 4: "py"}
    assert list(s.queue) == [2, 3]


def test_a_retried_job_keeps_its_user():
    s = Scheduler()
    s.add_slave("a", ["python"], 1)
    s.enqueue(1, "python", user="alice")
    s.enqueue(2, "python", user="bob")
    assert s.assign() == [(1, "a")]
    s.remove_slave("a")
    s.requeue_front(1, "python", user="alice")
    assert s.queued_by("alice") == 1 and s.running_by() == {}
    s.add_slave("b", ["python"], 1)
    # At the head of the queue, but alice had her turn: bob, not served yet, goes first.
    assert s.assign() == [(2, "b")]
    s.finished(2)
    assert s.assign() == [(1, "b")]
    assert s.running_by() == {"alice": 1} and s.queued_by("bob") == 0


def test_restored_running_jobs_count_for_their_user():
    s = Scheduler()
    s.mark_running(1, "a", user="alice")
    s.add_slave("a", ["python"], 3, running=[1])
    s.enqueue(2, "python", user="alice")
    s.enqueue(3, "python", user="bob")
    # alice already has one running (from before a restart): bob goes first.
    assert s.assign() == [(3, "a"), (2, "a")]


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 4), st.integers(0, 40),
       st.lists(st.one_of(st.just("finish"), st.just("bob"), st.just("alice")), max_size=80),
       st.randoms(use_true_random=False))
def test_the_second_user_never_waits_more_than_one_slot_turn(slots, backlog, evts, rnd):
    """With two users, bob's job waits at most one slot turn behind alice's queue.

    alice keeps a queue of any length; bob submits one job at a time, whenever
    he has nothing queued or running.  Slots free in any order.  From bob's
    submission to his job's start, at most one job of alice's starts.
    """
    s = Scheduler()
    s.add_slave("a", ["python"], slots)
    next_id = 0

    def add(user):
        nonlocal next_id
        s.enqueue(next_id, "python", user=user)
        next_id += 1
        return next_id - 1

    for _ in range(backlog):
        add("alice")
    bob_job = None
    alice_turns_while_bob_waits = 0
    for kind in evts:
        if kind == "finish" and s.running:
            s.finished(rnd.choice(sorted(s.running)))
        elif kind == "bob" and bob_job is None and not s.running_by().get("bob"):
            bob_job = add("bob")
            alice_turns_while_bob_waits = 0
        elif kind == "alice":
            add("alice")
        for job_id, _ in s.assign():
            if job_id == bob_job:
                bob_job = None
            elif bob_job is not None:
                alice_turns_while_bob_waits += 1
                assert alice_turns_while_bob_waits <= 1, "bob waited behind two of alice's jobs"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["enqueue", "finish"]), st.sampled_from(["u1", "u2", "u3"]),
                          st.integers(0, 50)), max_size=120),
       st.integers(1, 6))
def test_no_user_gets_a_slot_while_a_user_with_fewer_running_waits(evts, slots):
    s = Scheduler()
    s.add_slave("a", ["python"], slots)
    next_id = 0
    for kind, user, pick in evts:
        if kind == "enqueue":
            s.enqueue(next_id, "python", user=user)
            next_id += 1
        elif s.running:
            s.finished(sorted(s.running)[pick % len(s.running)])
        before = s.running_by()
        waiting = {s.job_user[j] for j in s.queue}
        for job_id, _ in s.assign():
            user = s.job_user[job_id]
            assert all(before[user] <= before[other] for other in waiting), (user, before, waiting)
            before[user] += 1
            waiting = {s.job_user[j] for j in s.queue}
        # FIFO within a user.
        for user in ("u1", "u2", "u3"):
            mine = [j for j in s.queue if s.job_user[j] == user]
            assert mine == sorted(mine)
            started = [j for j in s.running if s.job_user[j] == user]
            assert not mine or not started or max(started) < min(mine)
