"""The slave's folder of job directories (slave/jobdirs.py): claimed at start, gone at exit."""
import os

from slave.jobdirs import JobDirs


def test_a_second_slave_with_the_same_uid_works_in_a_folder_of_its_own_and_both_are_removed(tmp_path):
    """The first holds distexec-slave-UID; the second gets a fallback folder beside it (which no later
    run would clean up), and each removes its own at close: nothing is left in the parent."""
    first = JobDirs("same-uid", str(tmp_path), 0)
    second = JobDirs("same-uid", str(tmp_path), 0)
    try:
        assert first.root == str(tmp_path / "distexec-slave-same-uid")
        assert second.root != first.root and os.path.isdir(second.root)
    finally:
        second.close()
        first.close()
    assert os.listdir(tmp_path) == []


def test_a_sandbox_view_drops_every_jobs_mount_and_covered_ones_and_keeps_what_it_binds():
    """slave/mountview.py: what bwrap only covers, and every mount in a job folder (the step's own
    comes back later, cloned), is unmounted in the namespace made for a kind of sandbox; what holds
    or is held by a bound path stays."""
    from slave.jobdirs import FOLDER_PREFIX
    from slave.mountview import View

    view = View(covered=("/tmp", "/dev/shm"), shown=("/tmp/distexec-slave-a", "/tmp/toolchain"),
                folder_prefix=FOLDER_PREFIX)
    points = ["/", "/proc", "/tmp", "/tmp/distexec-slave-a/qmine", "/tmp/distexec-slave-a/qother",
              "/tmp/distexec-slave-b/q1", "/var/tmp/distexec-slave-c/q2", "/var/tmp/distexec-slave-c",
              "/tmp/toolchain/sub", "/tmp/.X11-unix", "/dev/shm", "/dev/shm", "/sys/fs/cgroup/memory",
              "/home/someone"]
    # Deepest first; a point listed twice (two mounts stacked there) is unmounted twice.
    assert view.hidden(points) == ["/tmp/distexec-slave-a/qother", "/var/tmp/distexec-slave-c/q2",
                                   "/tmp/distexec-slave-a/qmine", "/var/tmp/distexec-slave-c",
                                   "/tmp/distexec-slave-b/q1", "/tmp/.X11-unix", "/dev/shm", "/dev/shm"]
    # What a namespace made for this view depends on: the host's mounts but the jobs'.
    table = list(enumerate(points))
    assert view.signature(table) == {0, 1, 2, 8, 9, 10, 11, 12, 13}


def test_every_step_of_a_kind_gets_the_same_view_whatever_its_job():
    """One namespace per kind of sandbox, not one per job: the job's own paths, its cgroups and the
    accounts files are not part of what a step's View is made of."""
    from slave.bwrap import _view

    def options(job: str, cgroup: str) -> list[str]:
        return ["--ro-bind", "/", "/", "--ro-bind", "/var/lib/distexec/passwd", "/etc/passwd",
                "--bind", f"/tmp/distexec-slave-a/{job}/tmp", "/tmp", "--ro-bind", cgroup, cgroup,
                "--ro-bind", "/root/.cargo", "/root/.cargo", "--bind", f"/tmp/distexec-slave-a/{job}/work",
                f"/tmp/distexec-slave-a/{job}/work"]

    covered = ["/tmp", "/dev/shm", "/root", "/sys/fs/cgroup"]
    one = _view(covered, options("q1", "/sys/fs/cgroup/pids/distexec/a"))
    two = _view(covered, options("q2", "/sys/fs/cgroup/pids/distexec/b"))
    assert one == two
    assert one.covered == ("/tmp", "/dev/shm", "/root")
    assert one.shown == ("/root/.cargo", "/tmp/distexec-slave-a")
