"""The scheduler, fed events with no I/O: every decision it makes, checked."""
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
    st.tuples(st.just("finish"), st.integers(0, 50)),
    st.tuples(st.just("cancel"), st.integers(0, 50)),
    st.tuples(st.just("leave"), st.sampled_from(["a", "b", "c"])),
    st.tuples(st.just("join"), st.sampled_from(["a", "b", "c"])),
), max_size=120)


@settings(max_examples=200, deadline=None)
@given(events, st.integers(1, 5))
def test_invariants_hold_under_any_event_order(evts, cap):
    s = Scheduler(max_jobs=cap)
    slots = {"a": 1, "b": 2, "c": 3}
    langs = {"a": ["python"], "b": ["python", "c"], "c": ["c"]}
    next_id = 0
    assigned_once = set()
    for kind, arg in evts:
        if kind == "enqueue":
            s.enqueue(next_id, arg)
            next_id += 1
        elif kind == "finish" and arg in s.running:
            s.finished(arg)
        elif kind == "cancel":
            s.dequeue(arg)
        elif kind == "leave":
            for j in s.remove_slave(arg):
                s.finished(j)
        elif kind == "join" and arg not in s.slaves:
            s.add_slave(arg, langs[arg], slots[arg])
        for job_id, uid in s.assign():
            assert job_id not in assigned_once, "a job was placed twice"
            assigned_once.add(job_id)
            assert uid in s.slaves
        assert len(s.running) <= cap
        for uid, state in s.slaves.items():
            assert len(state.running) <= state.slots
            assert all(s.running[j] == uid for j in state.running)
        assert not set(s.queue) & set(s.running)
