"""Persistent Python sessions (``session=NAME``): placement, then real clusters."""
from __future__ import annotations

from master.scheduler import Scheduler


# --- the scheduler, fed events ------------------------------------------------

def _two_slaves(slots: int = 2) -> Scheduler:
    s = Scheduler()
    s.add_slave("a", ["python"], slots)
    s.add_slave("b", ["python"], slots)
    return s


def test_session_binds_to_its_first_slave():
    s = _two_slaves()
    s.enqueue(1, "python", "x")
    [(job, home)] = s.assign()
    assert job == 1
    s.finished(1)
    # The other slave is idle longer, which would win a plain job; the session stays.
    for j in range(2, 8):
        s.enqueue(j, "python", "x")
        assert s.assign() == [(j, home)]
        s.finished(j)
    assert s.session_slave == {"x": home}


def test_session_jobs_run_one_at_a_time_in_order():
    s = _two_slaves(slots=4)
    for j in (1, 2, 3):
        s.enqueue(j, "python", "x")
    s.enqueue(4, "python")
    first = s.assign()
    # Job 1 of the session starts; 2 and 3 wait for it, but do not hold back job 4.
    assert [j for j, _ in first] == [1, 4]
    assert list(s.queue) == [2, 3]
    assert s.assign() == []
    s.finished(1)
    [(job, uid)] = s.assign()
    assert job == 2 and uid == s.session_slave["x"]
    s.finished(2)
    assert [j for j, _ in s.assign()] == [3]


def test_two_sessions_are_independent():
    s = _two_slaves()
    s.enqueue(1, "python", "x")
    s.enqueue(2, "python", "y")
    placed = dict(s.assign())
    assert set(placed) == {1, 2}
    # Least loaded first: the two sessions land on different slaves.
    assert placed[1] != placed[2]
    assert s.session_slave == {"x": placed[1], "y": placed[2]}


def test_session_waits_for_its_full_slave_without_blocking_others():
    s = _two_slaves(slots=1)
    s.enqueue(1, "python", "x")
    [(_, home)] = s.assign()
    s.finished(1)
    s.enqueue(2, "python")  # a plain job takes the session's slave? either is free
    s.enqueue(3, "python")
    s.assign()
    assert not s.queue
    s.enqueue(4, "python", "x")
    s.enqueue(5, "python")
    # Both slots are taken: nothing starts.
    assert s.assign() == []
    other = "b" if home == "a" else "a"
    job_on_other = next(j for j, owner in s.running.items() if owner == other)
    s.finished(job_on_other)
    # A slot frees on the other slave: the plain job takes it, the session job waits.
    assert s.assign() == [(5, other)]
    job_on_home = next(j for j, owner in s.running.items() if owner == home)
    s.finished(job_on_home)
    assert s.assign() == [(4, home)]


def test_lost_slave_drops_its_sessions_and_hands_back_their_queued_jobs():
    s = _two_slaves()
    s.enqueue(1, "python", "x")
    [(_, home)] = s.assign()
    s.enqueue(2, "python", "x")
    s.enqueue(3, "python", "x")
    s.enqueue(4, "python")
    assert s.remove_slave(home) == [1]
    names, queued = s.drop_sessions(home)
    assert names == ["x"] and queued == [2, 3]
    assert list(s.queue) == [4]
    s.finished(1)
    # The next job of the name starts a new session on a slave still here.
    s.enqueue(5, "python", "x")
    placed = dict(s.assign())
    assert placed[5] != home and s.session_slave["x"] == placed[5]


def test_cancelled_queued_session_job_does_not_hold_the_session():
    s = _two_slaves()
    s.enqueue(1, "python", "x")
    s.enqueue(2, "python", "x")
    s.enqueue(3, "python", "x")
    s.assign()
    assert s.dequeue(2)
    s.finished(1)
    assert [j for j, _ in s.assign()] == [3]


def test_reported_session_binds_and_a_second_owner_is_refused():
    s = _two_slaves()
    assert s.bind_session("x", "b")
    assert not s.bind_session("x", "a")
    s.enqueue(1, "python", "x")
    assert s.assign() == [(1, "b")]
    s.finished(1)
    assert s.unbind_session("x") == "b"
    assert "x" not in s.session_slave


def test_restored_running_session_job_keeps_the_session_busy():
    s = Scheduler()
    s.mark_running(7, "a", session="x")
    s.add_slave("a", ["python"], 2, running=[7])
    s.bind_session("x", "a")
    s.enqueue(8, "python", "x")
    assert s.assign() == []
    s.finished(7)
    assert s.assign() == [(8, "a")]


def test_requeued_session_job_keeps_its_session():
    s = _two_slaves()
    s.enqueue(1, "python", "x")
    s.enqueue(2, "python", "x")
    s.assign()
    s.finished(1)
    s.requeue_front(1, "python", "x")
    # Job 1 goes first again, and job 2 still waits behind it.
    assert [j for j, _ in s.assign()] == [1]
    assert list(s.queue) == [2]
