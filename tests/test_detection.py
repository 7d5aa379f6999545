"""A slave on a first start registers before its slow toolchains have answered.

It asks python and bash, registers with them as ``detecting``, asks the
rest and then sends the master its whole list (``languages``).  Meanwhile
the master queues a job for a language no slave offers yet instead of
refusing it; once no slave is detecting, such a job whose language none
offers is refused as it would have been at once.

Each test has a toolchain cache of its own, empty: a first start.  To hold
a detection open until the test lets it go, ``gcc`` and ``pwsh`` on the
slave's PATH are small scripts that wait on a FIFO when asked
``--version``; ``gcc`` then runs the real gcc (a C job compiles with it),
``pwsh`` fails as if it were not there.
"""
from __future__ import annotations

import os
import re
import shutil
import stat

import pytest

from distexec_kernel import Cluster, protocol as P

from conftest import logs, wait_for

C_HELLO = '#include <stdio.h>\nint main(void) { printf("hello from c\\n"); return 0; }\n'


@pytest.fixture
def cold_cache(tmp_path, monkeypatch):
    """No toolchain answer remembered: the slave's first start."""
    monkeypatch.setenv("DISTEXEC_TOOLCHAIN_CACHE", str(tmp_path / "cold" / "toolchains.json"))


def gated(tmp_path, monkeypatch) -> dict[str, str]:
    """``gcc`` and ``pwsh`` first on PATH, each waiting on its FIFO when asked its version."""
    bindir = tmp_path / "gated"
    bindir.mkdir()
    fifos = {}
    real_gcc = shutil.which("gcc")
    assert real_gcc, "the tests need gcc"
    for name, then in (("gcc", f'exec {real_gcc} "$@"'), ("pwsh", "echo 'pwsh: not really here' >&2; exit 1")):
        fifo = str(tmp_path / f"{name}.gate")
        os.mkfifo(fifo)
        fifos[name] = fifo
        script = bindir / name
        script.write_text(f'#!/bin/sh\nif [ "$1" = --version ]; then read _ < {fifo}; fi\n{then}\n')
        script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return fifos


def release(fifo: str) -> None:
    with open(fifo, "w") as f:  # blocks until the probe opens its end: it is asking now
        f.write("go\n")


def slave_entry(client: Cluster) -> dict:
    [entry] = client.slaves()
    return entry


def test_a_first_start_registers_before_detection_ends_and_then_offers_c(make_cluster, cold_cache, tmp_path):
    lc = make_cluster(1, slots=1, languages="python,c", wait_complete=False)
    with Cluster(lc.url, token=lc.token) as c:
        # The master heard the slave first as detecting, with python alone.
        master_log = (tmp_path / "logs" / "master.log").read_text()
        assert "registered from" in master_log and "python, 1 slot(s); still detecting toolchains" in master_log, \
            logs(tmp_path)
        job = c.submit(C_HELLO, language="c").wait(120)
        assert job.status == P.SUCCEEDED, (job.error, logs(tmp_path))
        assert job.stdout == "hello from c\n"
        wait_for(lambda: not slave_entry(c)["detecting"], what="the slave's detection to end")
        assert set(slave_entry(c)["languages"]) == {"python", "c"}
        assert {lang["name"] for lang in c.languages()} == {"python", "c"}


def test_jobs_wait_for_detection_and_an_absent_language_is_refused_after_it(make_cluster, cold_cache, tmp_path,
                                                                            monkeypatch):
    gates = gated(tmp_path, monkeypatch)
    # No sandbox: the gate scripts live under /tmp, which a sandboxed probe does not see.
    lc = make_cluster(1, slots=1, languages="python,c,powershell", slave_args=["--sandbox", "none"],
                      wait_complete=False)
    with Cluster(lc.url, token=lc.token) as c:
        entry = slave_entry(c)
        assert entry["detecting"] and entry["languages"] == ["python"]
        # Neither refused: a slave may yet offer them.
        c_job = c.submit(C_HELLO, language="c")
        ps_job = c.submit("Write-Output hi", language="powershell")
        assert c_job.status == P.QUEUED and ps_job.status == P.QUEUED
        # Python runs meanwhile, as usual.
        assert c.submit("print(6 * 7)").wait(60).stdout == "42\n"
        assert c_job.refresh().status == P.QUEUED and ps_job.refresh().status == P.QUEUED

        release(gates["gcc"])
        release(gates["pwsh"])

        assert c_job.wait(120).status == P.SUCCEEDED, (c_job.error, logs(tmp_path))
        assert c_job.stdout == "hello from c\n"
        ps_job.wait(30)
        assert ps_job.status == P.REJECTED
        assert ps_job.error["code"] == P.UNSUPPORTED_LANGUAGE
        assert "no slave is still detecting" in ps_job.error["message"]
        assert sorted(ps_job.error["available"]) == ["c", "python"]
        entry = slave_entry(c)
        assert not entry["detecting"] and sorted(entry["languages"]) == ["c", "python"]
        # From now on, refused at once, as before.
        late = c.submit("Write-Output hi", language="powershell")
        assert late.status == P.REJECTED and late.error["code"] == P.UNSUPPORTED_LANGUAGE
        assert "detecting" not in late.error["message"]


def test_a_slave_stopped_while_detecting_leaves_no_probe_and_its_queued_job_is_refused(
        make_cluster, cold_cache, tmp_path, monkeypatch):
    import psutil

    gated(tmp_path, monkeypatch)
    lc = make_cluster(1, slots=1, languages="python,c", slave_args=["--sandbox", "none"], wait_complete=False)
    slave_pid = lc.slaves[0].pid
    with Cluster(lc.url, token=lc.token) as c:
        job = c.submit(C_HELLO, language="c")
        assert job.status == P.QUEUED
        # The gcc probe is waiting on its gate: the detection is under way.
        probes = wait_for(lambda: [p for p in psutil.Process(slave_pid).children(recursive=True)
                                   if "gated" in " ".join(p.cmdline())], what="the gcc probe")
        lc.slaves[0].stop()
        # The slave left without finishing: nobody will offer C, so the job is refused, not left waiting.
        job.wait(30)
        assert job.status == P.REJECTED and job.error["code"] == P.UNSUPPORTED_LANGUAGE, job.error
    gone, alive = psutil.wait_procs(probes, timeout=10)
    for p in alive:
        p.kill()
    assert not alive, f"probes left running: {alive}"


def test_slaves_starting_together_ask_each_toolchain_once(make_cluster, cold_cache, tmp_path):
    # They take turns (a lock beside the cache): the second finds the first one's answers.
    lc = make_cluster(2, slots=1, languages="python,c")
    later = []
    for name in ("slave-1.log", "slave-2.log"):
        text = (tmp_path / "logs" / name).read_text()
        assert "still asking: c" in text, logs(tmp_path)
        # Its last detection is the later one (gcc): how many programs it asked.
        later.append(int(re.findall(r"toolchains found in [0-9.]+ s \((\d+) asked", text)[-1]))
    assert sorted(later) == [0, 1], logs(tmp_path)
    with Cluster(lc.url, token=lc.token) as c:
        assert all(sorted(s["languages"]) == ["c", "python"] for s in c.slaves())
