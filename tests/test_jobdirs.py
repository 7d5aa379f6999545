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


def test_a_sandbox_view_drops_other_jobs_and_covered_mounts_and_keeps_what_it_binds():
    """slave/mountview.py: what bwrap only covers, and any job folder's mount but the step's own, is
    unmounted before bwrap copies the table; what holds or is held by a bound path stays."""
    from slave.jobdirs import FOLDER_PREFIX
    from slave.mountview import View

    mine = "/tmp/distexec-slave-a/qmine"
    view = View(covered=("/tmp", "/dev/shm", "/sys/fs/cgroup"),
                shown=(f"{mine}/work", f"{mine}/tmp", "/sys/fs/cgroup/memory/distexec/job-1"),
                folder_prefix=FOLDER_PREFIX)
    points = ["/", "/proc", "/tmp", mine, "/tmp/distexec-slave-a/qother", "/tmp/distexec-slave-b/q1",
              "/var/tmp/distexec-slave-c/q2", "/var/tmp/distexec-slave-c", "/dev/shm", "/dev/shm",
              "/sys/fs/cgroup", "/sys/fs/cgroup/memory", "/sys/fs/cgroup/cpuset", "/home/someone"]
    # Deepest first; a point listed twice (two mounts stacked there) is unmounted twice.
    assert view.hidden(points) == ["/tmp/distexec-slave-a/qother", "/var/tmp/distexec-slave-c/q2",
                                   "/tmp/distexec-slave-b/q1", "/sys/fs/cgroup/cpuset", "/dev/shm", "/dev/shm"]
