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
