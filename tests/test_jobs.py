"""The job lifecycle (master/jobs.py), fed events with no sockets, store or loop: every decision checked."""
from __future__ import annotations

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from distexec_kernel import protocol as P
from master import jobs as J
from master.scheduler import Scheduler


def new(job_id: int, retries: int = 0, user: str | None = None, **extra) -> dict:
    sub = P.check_submission({"source": "print(1)", "language": "python", "retries": retries, **extra})
    return P.new_job(job_id, sub, client_id=None, user=user)


class World:
    """A lifecycle with a scheduler, and helpers that feed it as the master does."""

    def __init__(self, slots: int = 1):
        self.scheduler = Scheduler()
        self.jobs = J.Lifecycle(self.scheduler)
        self.slots = slots

    def connect(self, uid: str = "a", instance: str = "i1", running=(), reported=()) -> list:
        return self.jobs.slave_back(uid, instance, ["python"], self.slots, False, set(running), set(reported))

    def submit(self, job_id: int, retries: int = 0) -> list:
        return self.jobs.submitted([new(job_id, retries)])

    def place(self) -> list[J.Load]:
        """Dispatch what the scheduler places; returns the Loads the master would carry out."""
        loads = []
        for job_id, uid in self.scheduler.assign():
            loads += [d for d in self.jobs.dispatched(job_id, uid) if isinstance(d, J.Load)]
        return loads

    def run(self, job_id: int) -> list:
        """Place and send the job; returns the decisions of its start."""
        [load] = [d for d in self.place() if d.job_id == job_id]
        return self.jobs.started(job_id, load.dispatch, '{"source": "print(1)"}')

    def finish(self, uid: str, job_id: int, err=None, stdout="out\n") -> list:
        return self.jobs.finished(uid, job_id, 0 if err is None else None, err, stdout, "")


def one_running() -> World:
    """A world with job 1 sent to slave a."""
    w = World()
    w.connect()
    w.submit(1)
    w.run(1)
    return w


def saved(decisions) -> list[dict]:
    return [dict(job) for d in decisions if isinstance(d, J.Save) for job in d.jobs]


def sent(decisions, kind: str | None = None) -> list[dict]:
    msgs = [P.decode(d.msg) if isinstance(d.msg, str) else d.msg for d in decisions if isinstance(d, J.Send)]
    return [m for m in msgs if kind is None or m["type"] == kind]


def statuses(decisions) -> list[str]:
    return [job["status"] for job in saved(decisions)]


def of_type(decisions, cls) -> list:
    return [d for d in decisions if isinstance(d, cls)]


def test_submission_is_saved_then_announced_and_queued():
    w = World()
    out = w.submit(1)
    assert isinstance(out[0], J.Save) and out[0].jobs[0]["source"] == "print(1)"  # inputs go to the store
    assert [d.msg["job"]["status"] for d in of_type(out, J.Announce)] == [P.QUEUED]
    assert "source" not in w.jobs.job(1) and list(w.scheduler.queue) == [1]


def test_dispatch_saves_running_before_it_sends_and_announces():
    w = World()
    w.connect()
    w.submit(1)
    [(job_id, uid)] = w.scheduler.assign()
    out = w.jobs.dispatched(job_id, uid, note="session lost")
    # The slave first: the job waits for its job_run, nobody for the announcement.
    assert [type(d) for d in out] == [J.Save, J.Load, J.Announce]
    assert statuses(out) == [P.RUNNING] and saved(out)[0]["attempts"] == 1
    [run] = sent(w.jobs.started(1, out[1].dispatch, '{"source": "print(2)"}'), "job_run")
    assert run["job"]["source"] == "print(2)" and run["job"]["session_note"] == "session lost"
    # A second start of the same dispatch sends nothing more.
    assert w.jobs.started(1, out[1].dispatch, '{"source": "print(2)"}') == []


def test_a_submission_and_its_start_are_one_commit_before_anything_is_told():
    w = World()
    w.connect()
    out = w.submit(1) + [d for job_id, uid in w.scheduler.assign() for d in w.jobs.dispatched(job_id, uid)]
    merged = J.merged(out)
    assert [type(d) for d in merged] == [J.Save, J.Load, J.Announce]
    # Written once: as it was last (running), with the inputs only the submitted record had;
    # announced once, as written (its queued state was never committed).
    assert [(job["status"], job["source"]) for job in merged[0].jobs] == [(P.RUNNING, "print(1)")]
    assert merged[2].msg["job"]["status"] == P.RUNNING


def test_merged_sends_to_slaves_first_and_announces_each_job_once_as_committed():
    """A result and the start its slot allows, plus a submission queued behind: one save,
    the job_run first, then every job's last state in the order decided."""
    w = one_running()
    out = w.finish("a", 1) + w.submit(2)
    out += [d for job_id, uid in w.scheduler.assign() for d in w.jobs.dispatched(job_id, uid)]
    merged = J.merged(out)
    # (The ClearTimer: job 1's end has come, its backstop goes.)
    assert [type(d) for d in merged] == [J.ClearTimer, J.Discard, J.Save, J.Load, J.Announce, J.Ack, J.Announce]
    assert [job["id"] for job in merged[2].jobs] == [1, 2] and merged[3].job_id == 2
    assert [(d.msg["job"]["id"], d.msg["job"]["status"]) for d in merged if isinstance(d, J.Announce)] == [
        (1, P.SUCCEEDED), (2, P.RUNNING)]
    # Nothing saved: nothing moves.
    assert J.merged(merged[4:]) == merged[4:]


def test_cancel_of_a_queued_job():
    w = World()
    w.submit(1)
    out = w.jobs.cancel(1)
    assert statuses(out) == [P.CANCELLED] and not sent(out)
    assert not w.scheduler.queue and w.jobs.job(1) is None
    assert w.jobs.cancel(1) == []  # settled: a second cancel changes nothing


def test_cancel_during_dispatch_settles_at_once_and_the_job_is_never_sent():
    w = World()
    w.connect()
    w.submit(1)
    [load] = w.place()
    out = w.jobs.cancel(1)
    assert statuses(out) == [P.CANCELLED] and not sent(out)  # the slave never had it: nothing to tell
    assert w.jobs.started(1, load.dispatch, "{}") == []
    assert not w.scheduler.running


def test_cancel_of_a_sent_job_waits_for_the_slave():
    w = one_running()
    out = w.jobs.cancel(1)
    assert sent(out, "job_cancel") == [P.make("job_cancel", job_id=1)]
    [job] = saved(out)  # still running, the request kept for a master that restarts
    assert job["status"] == P.RUNNING and job["cancel_requested"] is True
    assert w.jobs.cancel(1) == []  # told once
    out = w.finish("a", 1, err=J.cancelled())
    assert statuses(out) == [P.CANCELLED] and out[-1] == J.Ack("a", 1)
    assert "cancel_requested" not in saved(out)[0]


def test_finish_after_cancel_keeps_the_result_the_slave_reached_first():
    w = one_running()
    w.jobs.cancel(1)
    out = w.finish("a", 1, stdout="done\n")
    [job] = saved(out)
    assert job["status"] == P.SUCCEEDED and job["stdout"] == "done\n"


def test_duplicate_finished_is_only_acknowledged():
    w = one_running()
    first = w.finish("a", 1, stdout="first\n")
    assert statuses(first) == [P.SUCCEEDED]
    again = w.finish("a", 1, err=P.error(P.NONZERO_EXIT, "exit 3"), stdout="second\n")
    assert again == [J.Discard(1), J.Ack("a", 1)]
    # A result from a slave the job does not run on is not applied either.
    w.submit(2)
    w.run(2)
    assert not saved(w.finish("b", 2))


def test_slave_lost_then_back_within_grace_keeps_the_job():
    w = one_running()
    lost = w.jobs.slave_lost("a", leaving=False, grace=3.0)
    [timer] = of_type(lost, J.SetTimer)
    assert timer.job_id == 1 and timer.delay == 3.0 and not saved(lost)
    back = w.connect(running=[1])
    # The wait for the slave is over; the backstop for the job's end is armed again (from its start).
    [deadline] = of_type(back, J.SetTimer)
    assert len(back) == 1 and deadline.token != timer.token and 380 < deadline.delay <= 390
    assert w.jobs.timer_fired(1, timer.token) == []  # a late timer is stale
    assert w.scheduler.running == {1: "a"}
    assert statuses(w.finish("a", 1)) == [P.SUCCEEDED]


def test_grace_expiry_loses_the_job_and_retries_up_to_the_asked_number():
    w = World()
    w.connect()
    w.submit(1, retries=1)
    for attempt in (1, 2):
        w.run(1)
        [timer] = of_type(w.jobs.slave_lost("a", leaving=False, grace=3.0), J.SetTimer)
        out = w.jobs.timer_fired(1, timer.token)
        w.connect(instance=f"restarted{attempt}")
        if attempt == 1:
            [job] = saved(out)
            assert job["status"] == P.QUEUED and job["attempts"] == 1 and job["slave_uid"] is None
            assert J.Discard(1) in out and list(w.scheduler.queue) == [1]
        else:
            [job] = saved(out)
            assert job["status"] == P.FAILED and job["error"]["code"] == P.SLAVE_LOST
            assert job["attempts"] == 2 and "did not come back within 3 s" in job["error"]["message"]
    assert w.jobs.job(1) is None and not w.scheduler.queue and not w.scheduler.running


def test_a_leaving_slave_loses_its_jobs_at_once():
    w = one_running()
    out = w.jobs.slave_lost("a", leaving=True, grace=3.0)
    assert statuses(out) == [P.FAILED] and "stopped while it ran" in saved(out)[0]["error"]["message"]


def test_a_job_never_sent_runs_again_without_using_a_retry():
    w = World()
    w.connect()
    w.submit(1, retries=0)
    w.place()  # dispatched, not sent yet
    w.jobs.slave_lost("a", leaving=False, grace=3.0)
    out = w.connect(running=[])  # the same process came back without it
    [job] = saved(out)
    assert job["status"] == P.QUEUED and job["attempts"] == 0


def test_the_same_slave_process_back_without_a_sent_job_never_got_it():
    w = World()
    w.connect(instance="first")
    w.submit(1, retries=0)
    w.run(1)
    w.jobs.slave_lost("a", leaving=False, grace=3.0)
    assert statuses(w.connect(instance="first")) == [P.QUEUED]
    w.run(1)
    w.jobs.slave_lost("a", leaving=False, grace=3.0)
    out = w.connect(instance="second")  # a new process may have run it: the one try is used
    assert statuses(out) == [P.FAILED] and saved(out)[0]["attempts"] == 1


def test_a_slave_back_with_a_job_settled_meanwhile_is_told_to_stop_it():
    w = one_running()
    [timer] = of_type(w.jobs.slave_lost("a", leaving=False, grace=3.0), J.SetTimer)
    w.jobs.timer_fired(1, timer.token)  # lost: failed
    assert sent(w.connect(running=[1]), "job_cancel") == [P.make("job_cancel", job_id=1)]


def test_a_cancel_sent_into_a_dead_connection_is_sent_again_when_the_slave_is_back():
    w = one_running()
    # Written to a connection that had died, the master not knowing yet: the slave never gets it.
    assert sent(w.jobs.cancel(1), "job_cancel") == [P.make("job_cancel", job_id=1)]
    w.jobs.slave_lost("a", leaving=False, grace=3.0)
    back = w.connect(running=[1])  # back within the grace, still running it
    assert sent(back, "job_cancel") == [P.make("job_cancel", job_id=1)]
    assert statuses(w.finish("a", 1, err=J.cancelled())) == [P.CANCELLED]


def test_a_cancel_the_slave_never_got_outlives_a_master_restart():
    w = one_running()
    # Into a dead connection, then the master restarts before the slave is back.
    [job] = saved(w.jobs.cancel(1))
    after = World()
    after.jobs.resume([dict(job)], grace=30.0)
    back = after.connect(running=[1])
    assert sent(back, "job_cancel") == [P.make("job_cancel", job_id=1)]
    # Had it ended meanwhile, its report still settles it as the slave saw it.
    assert statuses(after.finish("a", 1, err=J.cancelled())) == [P.CANCELLED]
    # And a slave that never comes back: the job ends cancelled, not lost.
    again = World()
    timer = next(d for d in again.jobs.resume([dict(job)], grace=30.0) if isinstance(d, J.SetTimer))
    assert statuses(again.jobs.timer_fired(1, timer.token)) == [P.CANCELLED]


def test_a_job_its_draining_slave_gave_up_on_runs_again_if_it_has_retries():
    gave_up = P.error(P.SLAVE_LOST, "the slave was stopped (its drain deadline passed) before the job ended")
    w = World()
    w.connect()
    w.submit(1, retries=1)
    w.run(1)
    out = w.finish("a", 1, err=gave_up, stdout="partial\n")
    [job] = saved(out)
    assert job["status"] == P.QUEUED and job["attempts"] == 1 and out[-1] == J.Ack("a", 1)
    w.run(1)  # its one retry used: this time the result stands, with what it printed
    [job] = saved(w.finish("a", 1, err=gave_up, stdout="partial\n"))
    assert job["status"] == P.FAILED and job["error"]["code"] == P.SLAVE_LOST and job["stdout"] == "partial\n"


def test_a_slave_back_after_its_grace_still_running_a_requeued_job_goes_on_running_it():
    w = World()
    w.connect()
    w.submit(1, retries=1)
    w.run(1)
    started = w.jobs.job(1)["started_at"]
    [timer] = of_type(w.jobs.slave_lost("a", leaving=False, grace=3.0), J.SetTimer)
    assert statuses(w.jobs.timer_fired(1, timer.token)) == [P.QUEUED]  # no other slave: it waits
    back = w.connect(running=[1])  # the same slave, cut off longer than the grace, still running it
    assert not sent(back, "job_cancel")  # not cancelled there, nor sent there again to meet itself
    [job] = saved(back)
    assert (job["status"], job["slave_uid"], job["attempts"], job["started_at"]) == (P.RUNNING, "a", 1, started)
    assert w.place() == [] and w.scheduler.running == {1: "a"}
    assert statuses(w.finish("a", 1)) == [P.SUCCEEDED]


def test_a_slave_back_after_its_grace_with_the_result_of_a_requeued_job_settles_it():
    w = World()
    w.connect()
    w.submit(1, retries=1)
    w.run(1)
    [timer] = of_type(w.jobs.slave_lost("a", leaving=False, grace=3.0), J.SetTimer)
    w.jobs.timer_fired(1, timer.token)
    w.connect(running=[], reported=[1])  # it ended there meanwhile: its result comes next
    [job] = saved(w.finish("a", 1, stdout="ran once\n"))
    assert (job["status"], job["stdout"], job["attempts"]) == (P.SUCCEEDED, "ran once\n", 1)
    assert w.place() == [] and not w.scheduler.queue  # not run a second time


def test_a_slave_back_with_a_job_that_runs_elsewhere_now_is_told_to_stop_its_copy():
    w = World()
    w.connect("a")
    w.submit(1, retries=1)
    w.run(1)
    [timer] = of_type(w.jobs.slave_lost("a", leaving=False, grace=3.0), J.SetTimer)
    w.jobs.timer_fired(1, timer.token)
    w.connect("b")
    w.run(1)  # on b now
    back = w.connect("a", running=[1])
    assert sent(back, "job_cancel") == [P.make("job_cancel", job_id=1)] and not saved(back)
    assert not saved(w.finish("a", 1, err=J.cancelled()))  # a's copy's end settles nothing
    assert statuses(w.finish("b", 1)) == [P.SUCCEEDED]


def test_restart_resume():
    w = World()
    # Started 10 minutes ago, with the default timeout of 5: past its end's backstop already.
    running = dict(new(1), status=P.RUNNING, slave_uid="a", attempts=1, stdout="before\n", started_at=P.now(600))
    queued = new(2)
    out = w.jobs.resume([running, queued], grace=30.0)
    [timer] = of_type(out, J.SetTimer)
    assert timer.job_id == 1 and timer.delay == 30.0
    assert w.scheduler.running == {1: "a"} and list(w.scheduler.queue) == [2]
    # Its slave is back and runs it still: the timer goes; live output is not relayed
    # (what it printed before the restart is not in memory), the result brings all.
    # The backstop for its end, from when it started (the history's): past already, so its slave, just
    # back, has CANCEL_CONFIRM to report it.
    [deadline] = w.connect(running=[1])
    assert isinstance(deadline, J.SetTimer) and deadline.token != timer.token and deadline.delay == J.CANCEL_CONFIRM
    assert w.jobs.output("a", 1, "stdout", "more\n") == []
    out = w.finish("a", 1, stdout="before\nmore\n")
    assert saved(out)[0]["stdout"] == "before\nmore\n"
    # The queued one runs after it.
    assert sent(w.run(2), "job_run")


def test_a_job_queued_under_a_name_that_is_now_an_alias_runs_under_its_main_name():
    # A history from before ``sh`` became bash's alias: after the restart, bash slaves take it.
    w = World()
    w.jobs.resume([dict(new(1), language="sh")], grace=30.0)
    assert w.jobs.slave_back("b", "i1", ["bash"], 1, False, set(), set()) == []
    [load] = w.place()
    [run] = sent(w.jobs.started(1, load.dispatch, '{"source": "echo hi"}'), "job_run")
    assert run["job"]["language"] == "bash" and w.scheduler.running == {1: "b"}


def test_a_slave_back_sends_its_jobs_output_so_far_and_the_relay_goes_on_from_it():
    # After a restart the master holds none of a running job's output: the slave's copy replaces it,
    # sent whole to the clients (placed by offset, so what they have is not repeated).
    w = World()
    w.jobs.resume([dict(new(1), status=P.RUNNING, slave_uid="a", attempts=1)], grace=30.0)
    w.connect(running=[1])
    assert w.jobs.output("a", 1, "stdout", "lost?") == []  # not placeable before the copy comes
    out = w.jobs.output_so_far("a", 1, "started\n", "")
    assert [d.msg for d in of_type(out, J.Announce)] == [
        P.make("job_output", job_id=1, stream="stdout", offset=0, data="started\n")]
    assert w.jobs.job(1)["stdout"] == "started\n"
    [more] = w.jobs.output("a", 1, "stdout", "more\n")
    assert (more.msg["offset"], more.msg["data"]) == (8, "more\n")
    # A reconnect to the same master: what it holds is the copy's start, so only the rest goes out
    # (chunks sent into the dead connection were lost).
    w.connect(running=[1])
    [rest] = w.jobs.output_so_far("a", 1, "started\nmore\nlost\n", "oops\n")[:1]
    assert (rest.msg["offset"], rest.msg["data"]) == (13, "lost\n")
    assert w.jobs.job(1)["stderr"] == "oops\n"
    # Another slave's copy, or a settled job's, changes nothing.
    assert w.jobs.output_so_far("b", 1, "x", "y") == [] and w.jobs.output_so_far("a", 9, "x", "y") == []


def test_a_late_result_keeps_its_end_but_never_before_its_start():
    w = one_running()
    started = P.parse_time(w.jobs.job(1)["started_at"])
    # The slave says it ended an hour ago (a clock or a bug): not before the job started.
    [job] = saved(w.jobs.finished("a", 1, 0, None, "", "", ended_ago=3600.0))
    assert started <= P.parse_time(job["finished_at"]) <= P.parse_time(P.now())
    # A slave that does not say (an older one): when the result came.
    before = P.parse_time(P.now())
    w = one_running()
    [job] = saved(w.jobs.finished("a", 1, 0, None, "", ""))
    assert P.parse_time(job["finished_at"]) >= before


def test_resumed_job_whose_slave_never_returns_is_lost():
    w = World()
    out = w.jobs.resume([dict(new(1), status=P.RUNNING, slave_uid="a", attempts=1)], grace=30.0)
    [timer] = of_type(out, J.SetTimer)
    lost = w.jobs.timer_fired(1, timer.token)
    assert statuses(lost) == [P.FAILED] and saved(lost)[0]["error"]["code"] == P.SLAVE_LOST


def test_output_is_relayed_with_offsets_up_to_the_cap():
    w = World()
    w.jobs.live_output_cap = 8
    w.connect()
    w.submit(1)
    w.run(1)
    [a] = w.jobs.output("a", 1, "stdout", "hello ")
    [b] = w.jobs.output("a", 1, "stdout", "world")
    assert (a.msg["offset"], b.msg["offset"]) == (0, 6)
    assert w.jobs.output("a", 1, "stdout", "more") == []  # past the cap: the result brings it
    assert w.jobs.output("b", 1, "stdout", "other") == []  # not its slave


def test_many_small_chunks_after_a_large_output_are_kept_whole_in_order_with_their_offsets():
    w = one_running()
    big = "x" * (1 << 20)
    offsets = [a.msg["offset"] for a in w.jobs.output("a", 1, "stdout", big)]
    tail = [f"{i}," for i in range(2000)]
    for i, chunk in enumerate(tail):
        [a] = w.jobs.output("a", 1, "stdout", chunk)
        offsets.append(a.msg["offset"])
        assert a.msg["data"] == chunk
        if i == 1000:  # a read meanwhile (GET of the running job) sees all of it so far
            assert w.jobs.job(1)["stdout"] == big + "".join(tail[:1001])
    w.jobs.output("a", 1, "stderr", "err")
    expected = big + "".join(tail)
    assert offsets == [0] + [len(big) + len("".join(tail[:i])) for i in range(len(tail))]
    assert w.jobs.job(1)["stdout"] == expected and w.jobs.job(1)["stderr"] == "err"
    [job] = saved(w.jobs.cancel(1))  # a save of the running job has it whole too
    assert job["stdout"] == expected and job["stderr"] == "err"


def test_queued_jobs_of_a_lost_session_fail():
    w = World()
    w.connect()
    for job_id in (1, 2):
        w.jobs.submitted([new(job_id, session="s", user="ann")])
    w.run(1)  # binds the session to slave a; job 2 waits for it
    assert list(w.scheduler.queue) == [2]
    w.jobs.slave_lost("a", leaving=True, grace=3.0)
    _, queued = w.scheduler.drop_sessions("a")
    assert queued == [2]
    err = P.error(P.SLAVE_LOST, "session lost")
    out = w.jobs.dropped(2, err)
    assert saved(out)[0]["error"] == err and w.jobs.job(2) is None
    assert w.jobs.dropped(2, err) == []


def test_stopping_settles_nothing():
    w = one_running()
    [timer] = of_type(w.jobs.slave_lost("a", leaving=False, grace=3.0), J.SetTimer)
    assert w.jobs.stop() == [J.ClearTimer(1)]
    assert w.jobs.timer_fired(1, timer.token) == []
    assert w.jobs.job(1)["status"] == P.RUNNING


# -- any sequence of events ----------------------------------------------------

SLAVES = ("a", "b")


class Events(RuleBasedStateMachine):
    """Random events, including stale and duplicate ones, against a model of the slaves.

    A slave runs what it was sent, kills on job_cancel, keeps its results while
    away and brings them back; a restart loses everything.
    """

    def __init__(self):
        super().__init__()
        self.w = World(slots=2)
        self.next_id = 1
        self.retries: dict[int, int] = {}
        self.instance = {uid: 0 for uid in SLAVES}
        self.connected: set[str] = set()
        self.running = {uid: set() for uid in SLAVES}  # what each slave process runs
        self.results = {uid: {} for uid in SLAVES}  # results a slave keeps until acknowledged
        self.loads: list[J.Load] = []
        self.timers: dict[int, int] = {}
        self.terminal: dict[int, str] = {}
        self.cancelled: set[int] = set()
        self.received: dict[int, int] = {}  # job_runs a slave process got, per job

    def apply(self, decisions: list) -> None:
        for d in decisions:
            if isinstance(d, J.Save):
                for job in d.jobs:
                    assert job["id"] not in self.terminal, f"job {job['id']} changed after {self.terminal}"
                    assert (job.get("attempts") or 0) <= self.retries[job["id"]] + 1
                    if job["status"] in P.TERMINAL:
                        self.terminal[job["id"]] = job["status"]
                        if job["id"] in self.cancelled:
                            # The slave kills on job_cancel in this model: nothing finishes first.
                            assert job["status"] == P.CANCELLED, job
            elif isinstance(d, J.Send) and d.uid in self.connected:
                [msg] = sent([d])
                job_id = msg["job"]["id"] if msg["type"] == "job_run" else msg["job_id"]
                if msg["type"] == "job_run":
                    assert job_id not in self.cancelled, "a cancel must win over a later start"
                    self.running[d.uid].add(job_id)
                    self.received[job_id] = self.received.get(job_id, 0) + 1
                    assert self.received[job_id] <= self.retries[job_id] + 1
                elif msg["type"] == "job_cancel" and job_id in self.running[d.uid]:
                    self.running[d.uid].discard(job_id)
                    self.results[d.uid][job_id] = J.cancelled()
            elif isinstance(d, J.Load):
                self.loads.append(d)
            elif isinstance(d, J.SetTimer):
                self.timers[d.job_id] = d.token
            elif isinstance(d, J.ClearTimer):
                self.timers.pop(d.job_id, None)
            elif isinstance(d, J.Ack):
                self.results[d.uid].pop(d.job_id, None)

    def report(self, uid: str) -> None:
        for job_id, err in list(self.results[uid].items()):
            self.apply(self.w.finish(uid, job_id, err=err))

    @initialize()
    def slaves_up(self):
        for uid in SLAVES:
            self.connect(uid, restart=False)

    @precondition(lambda self: self.next_id <= 5)  # a few jobs, many events each
    @rule(retries=st.integers(0, 2))
    def submit(self, retries):
        self.retries[self.next_id] = retries
        self.apply(self.w.submit(self.next_id, retries))
        self.next_id += 1

    @rule(uid=st.sampled_from(SLAVES), restart=st.booleans())
    def connect(self, uid, restart):
        if restart:
            self.instance[uid] += 1
            self.running[uid], self.results[uid] = set(), {}
        self.connected.add(uid)
        self.apply(self.w.connect(uid, f"i{self.instance[uid]}", self.running[uid], self.results[uid]))
        self.report(uid)

    @precondition(lambda self: self.connected)
    @rule(data=st.data(), leaving=st.booleans())
    def disconnect(self, data, leaving):
        uid = data.draw(st.sampled_from(sorted(self.connected)))
        self.connected.discard(uid)
        if leaving:  # it stops for good: whatever it ran is gone
            self.instance[uid] += 1
            self.running[uid], self.results[uid] = set(), {}
        self.apply(self.w.jobs.slave_lost(uid, leaving, 3.0))

    @rule(send_now=st.booleans())
    def place(self, send_now):
        """Placements; their job_runs go now, or wait (``start``) and may go stale."""
        for job_id, uid in self.w.scheduler.assign():
            self.apply(self.w.jobs.dispatched(job_id, uid))
        while send_now and self.loads:
            load = self.loads.pop()
            self.apply(self.w.jobs.started(load.job_id, load.dispatch, '{"source": "x"}'))

    @precondition(lambda self: self.loads)
    @rule(data=st.data())
    def start(self, data):
        load = self.loads.pop(data.draw(st.integers(0, len(self.loads) - 1)))
        self.apply(self.w.jobs.started(load.job_id, load.dispatch, '{"source": "x"}'))

    @precondition(lambda self: any(self.running.values()))
    @rule(data=st.data(), ok=st.booleans())
    def finish(self, data, ok):
        uid = data.draw(st.sampled_from([u for u in SLAVES if self.running[u]]))
        job_id = data.draw(st.sampled_from(sorted(self.running[uid])))
        self.running[uid].discard(job_id)
        self.results[uid][job_id] = None if ok else P.error(P.NONZERO_EXIT, "exit 1")
        if uid in self.connected:
            self.report(uid)

    @precondition(lambda self: self.w.jobs.records)
    @rule(data=st.data())
    def cancel(self, data):
        job_id = data.draw(st.sampled_from(sorted(self.w.jobs.records)))
        self.cancelled.add(job_id)
        self.apply(self.w.jobs.cancel(job_id))

    @precondition(lambda self: self.timers)
    @rule(data=st.data())
    def fire(self, data):
        job_id = data.draw(st.sampled_from(sorted(self.timers)))
        self.apply(self.w.jobs.timer_fired(job_id, self.timers.pop(job_id)))

    @invariant()
    def one_state_per_job_and_one_slave(self):
        sched = self.w.scheduler
        for job_id, rec in self.w.jobs.records.items():
            assert job_id not in self.terminal
            if rec.running:
                assert sched.running.get(job_id) == rec.job["slave_uid"] and job_id not in sched.queue
            else:
                assert job_id in sched.queue and job_id not in sched.running
        assert set(sched.running) <= set(self.w.jobs.records)
        for job_id in self.terminal:
            assert job_id not in sched.queue and job_id not in sched.running
        # Never on two slaves at once: a slave the master can reach runs only
        # what the master places there (whatever else it had, it was told to stop).
        for uid in self.connected:
            for job_id in self.running[uid]:
                rec = self.w.jobs.records.get(job_id)
                assert rec is not None and rec.running and rec.job["slave_uid"] == uid, (uid, job_id)


TestLifecycle = Events.TestCase
TestLifecycle.settings = settings(max_examples=400, stateful_step_count=50, deadline=None)


# -- the backstop for an end that never comes ------------------------------------

def test_a_job_sent_to_its_slave_has_its_end_due_by_its_timeout_and_a_grace():
    w = World()
    w.jobs.end_grace = 5.0
    w.connect()
    for job_id, timeout, grace in ((1, 3.0, 5.0), (2, 600.0, 60.0)):  # the grace, or 10 % of a long timeout
        w.jobs.submitted([new(job_id, timeout=timeout)])
        [timer] = of_type(w.run(job_id), J.SetTimer)
        assert timer.job_id == job_id and timeout + grace - 1 < timer.delay <= timeout + grace
        w.finish("a", job_id)


def test_a_job_whose_end_never_comes_is_ended_by_the_master_and_its_slot_freed():
    w = World()
    w.connect()
    w.jobs.submitted([new(1, timeout=3.0)])
    [timer] = of_type(w.run(1), J.SetTimer)
    w.jobs.output("a", 1, "stdout", "printed\n")
    w.jobs.submitted([new(2)])  # waits for the one slot
    out = w.jobs.timer_fired(1, timer.token)
    [job] = saved(out)
    assert job["status"] == P.FAILED and job["error"]["code"] == P.SLAVE_LOST and job["stdout"] == "printed\n"
    assert "did not report its end in time" in job["error"]["message"], job["error"]
    assert sent(out) == [P.make("job_cancel", job_id=1)] and out.index(of_type(out, J.Send)[0]) > out.index(
        of_type(out, J.Save)[0])  # told to stop it once the end is durable
    assert w.scheduler.running == {} and w.jobs.job(1) is None
    assert sent(w.run(2), "job_run")  # the slot is free
    # Its late result (or the slave's report of the kill) is only acknowledged.
    assert w.finish("a", 1, stdout="late\n") == [J.Discard(1), J.Ack("a", 1)]
    assert w.jobs.timer_fired(1, timer.token) == []


def test_a_cancel_the_slave_never_confirms_ends_the_job_cancelled_within_a_bounded_time():
    w = one_running()
    [timer] = of_type(w.jobs.cancel(1), J.SetTimer)
    assert timer.delay == J.CANCEL_CONFIRM  # not the default timeout's 390 s
    out = w.jobs.timer_fired(1, timer.token)
    [job] = saved(out)
    assert job["status"] == P.CANCELLED and "did not confirm the kill" in job["error"]["message"]
    assert sent(out) == [P.make("job_cancel", job_id=1)] and not w.scheduler.running


def test_the_backstop_waits_while_its_slave_is_away_and_is_rearmed_from_the_start_when_it_is_back():
    w = World()
    w.connect()
    w.jobs.submitted([new(1, timeout=100.0)])
    [first] = of_type(w.run(1), J.SetTimer)
    [grace] = of_type(w.jobs.slave_lost("a", leaving=False, grace=3.0), J.SetTimer)
    assert grace.delay == 3.0 and w.jobs.timer_fired(1, first.token) == []  # replaced: stale
    [again] = w.connect(running=[1])
    assert again.delay <= first.delay and again.token not in (first.token, grace.token)
    assert statuses(w.jobs.timer_fired(1, again.token)) == [P.FAILED]


def test_a_retry_gets_a_backstop_of_its_own():
    w = World()
    w.connect()
    w.submit(1, retries=1)
    w.run(1)
    [grace] = of_type(w.jobs.slave_lost("a", leaving=False, grace=3.0), J.SetTimer)
    assert statuses(w.jobs.timer_fired(1, grace.token)) == [P.QUEUED]
    w.connect(instance="i2")
    [timer] = of_type(w.run(1), J.SetTimer)
    assert timer.delay > 380 and w.jobs.job(1)["attempts"] == 2
