"""cgroup v2, the only hierarchy on Debian 12, Ubuntu 22.04 and later: the slave's limits and its warm
pool there, checked in a virtual machine booted with cgroup v2 alone (tests/vm.py; this machine's own
cgroups are v1, held by its init).  The jobs run in the machine (tests/cgroup2_guest.py), through
the slave's real runners, bubblewrap and warm pool; their results are judged here."""
from __future__ import annotations

import json
import os
import sys

import pytest

import vm
from cgroup2_guest import MEMORY_MB, PROCS

pytestmark = pytest.mark.timeout(600)  # the first test waits for the machine: ~15 s here, more under load

GUEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cgroup2_guest.py")

# As on a systemd host: the slave in a cgroup of its own below the root (a login's scope), the
# root's processes none of ours.
SCRIPT = f"""export DISTEXEC_HOME=/run/home/.distexec PYTHONDONTWRITEBYTECODE=1
mkdir /sys/fs/cgroup/session.scope
echo $$ > /sys/fs/cgroup/session.scope/cgroup.procs
{sys.executable} {GUEST} /run/share/result.json
"""


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    why = vm.missing()
    assert why is None, why
    machine = vm.Machine(str(tmp_path_factory.mktemp("vm"))).build()
    share = tmp_path_factory.mktemp("share")
    rc, out, console = machine.run(SCRIPT, str(share), timeout=600)
    assert rc == 0, f"the guest failed ({rc}):\n{out[-4000:]}\n{console[-2000:]}"
    with open(share / "result.json") as f:
        return json.load(f)


def test_the_slave_takes_memory_pids_and_cpu_from_the_unified_hierarchy(guest):
    assert guest["unified"] == ["cpu", "memory", "pids"]
    assert guest["missing"] == {}
    assert f"memory {MEMORY_MB} MiB per job by cgroup v2" in guest["describe"]
    assert f"{PROCS} processes per job by cgroup v2" in guest["describe"]


def test_the_warm_pool_runs_there(guest):
    assert guest["warm_off"] is None
    where = guest["warm"]["where"]
    assert where["error"] is None and where["stdout"].startswith("/distexec/slave-"), where
    assert "/warm-" in where["stdout"].splitlines()[0]


def test_a_fresh_jobs_own_cgroup_and_its_memory_limit_are_shown_to_it(guest):
    # A JVM or Node sizes its heap from memory.max at the path /proc/self/cgroup names.
    path, limit = guest["fresh"]["where"]["stdout"].split()
    assert "/job-" in path
    assert int(limit) == MEMORY_MB << 20


def test_the_jvm_and_node_in_a_fresh_job_read_its_memory_limit(guest):
    jvm, node = guest["runtimes"]["jvm"], guest["runtimes"]["node"]
    assert "cgroupv2" in jvm["stdout"] and f"Memory Limit: {MEMORY_MB}.00M" in jvm["stdout"], jvm
    assert node["stdout"].strip() == str(MEMORY_MB << 20), node


@pytest.mark.parametrize("runner", ["fresh", "warm"])
def test_memory_hog_is_killed_by_the_kernel_and_told_as_memory_limit(guest, runner):
    hog = guest[runner]["hog"]
    assert hog["error"] == "memory_limit", hog
    assert "survived" not in hog["stdout"]


@pytest.mark.parametrize("runner", ["fresh", "warm"])
def test_fork_bomb_is_held_by_the_pids_limit(guest, runner):
    bomb = guest[runner]["bomb"]
    assert bomb["error"] is None, bomb
    # The job's own process and the children it could start: PROCS in all.
    assert int(bomb["stdout"]) == PROCS - 1


@pytest.mark.parametrize("runner", ["fresh", "warm"])
def test_a_daemon_a_job_leaves_is_killed(guest, runner):
    assert guest[runner]["daemon"]["stdout"] == "left one\n"
    assert guest[runner]["daemons_left"] == 0


def test_a_session_keeps_its_state_runs_a_cell_capped_at_a_core_and_ends_past_its_memory(guest):
    cells = guest["session"]
    assert cells["define"]["error"] is None and cells["use"]["stdout"] == "42\n", cells
    path, cap = cells["cap"]["stdout"].split("\n")[:2]
    assert path.startswith("/distexec/slave-") and cap == "100000 100000"  # 1 core (CELL_CPUS)
    assert cells["hog"]["error"] == "memory_limit" and "session was ended" in cells["hog"]["stderr"]


def test_a_cpu_cap_is_written_as_cpu_max(guest):
    assert guest["cpu.max"] == "50000 100000"


def test_a_dead_slaves_job_is_killed_and_its_cgroups_removed_by_the_next_slave(guest):
    dead = guest["dead_slave"]
    assert dead.get("job_alive_before") is True, dead
    assert dead["job_alive_after"] is False
    assert guest["left_cgroups"] == []


def test_in_a_container_the_slave_moves_its_processes_out_of_the_cgroup_root_and_has_its_controllers(guest):
    # As Docker-in-Docker's entry point does: the root a container sees may not pass controllers on
    # while it holds processes.
    seen = json.loads(guest["container"]["stdout"] or "null")
    assert seen is not None, guest["container"]
    assert seen["missing"] == {} and seen["unified"] == ["cpu", "memory", "pids"], seen
    assert seen["slave"] == "0::/init" and seen["sleeper"] == ["0::/init"], seen
