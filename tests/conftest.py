"""Fixtures that start real masters and slaves on free loopback ports.

Every fixture stops what it started, even when the test fails; a test that
needs its own cluster shape builds one with ``make_cluster``.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import select
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
import tornado.httpclient
import tornado.websocket

from distexec_kernel import config, protocol as P
from distexec_kernel.local import LocalCluster
from slave.warm_pool import PARENT_FLAGS


async def close_ws(conn, closed_by_peer: bool = False) -> None:
    """Close a tornado WebSocket and wait for the peer's side of the close, so that no socket
    outlives the event loop (``asyncio.run`` ends it: an open one is a ResourceWarning, an error
    here, in whichever later test the collector happens to find it)."""
    conn.close()
    while not closed_by_peer and await asyncio.wait_for(conn.read_message(), 10) is not None:
        pass


def wait_for(predicate, timeout: float = 15.0, what: str = "condition", interval: float = 0.02):
    """Poll ``predicate`` until it returns a truthy value, or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


async def until(predicate, timeout: float = 15.0, what: str = "condition", interval: float = 0.005):
    """``wait_for`` inside a coroutine: polls without holding up the event loop it shares."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)
    return value


@pytest.fixture(scope="session", autouse=True)
def shared_toolchain_cache(tmp_path_factory):
    """One toolchain-detection cache for every slave the tests start: each
    toolchain is asked its version once per run, not once per cluster."""
    path = tmp_path_factory.mktemp("toolchains") / "toolchains.json"
    before = os.environ.get("DISTEXEC_TOOLCHAIN_CACHE")
    os.environ["DISTEXEC_TOOLCHAIN_CACHE"] = str(path)
    yield path
    if before is None:
        os.environ.pop("DISTEXEC_TOOLCHAIN_CACHE", None)
    else:
        os.environ["DISTEXEC_TOOLCHAIN_CACHE"] = before


@pytest.fixture(scope="session", autouse=True)
def no_mounts_left_behind():
    """Tests kill slaves outright; a killed slave leaves its jobs' tmpfs mounts until it
    starts again, which a test's slave (a UID of its own) never does.  At the end of the
    run, the folders of slaves that are gone (their lock is free) are unmounted and removed."""
    yield
    import fcntl
    import glob
    import tempfile

    from slave import jobdirs

    for root in glob.glob(os.path.join(tempfile.gettempdir(), "distexec-slave-*")):
        try:
            lock = os.open(os.path.join(root, jobdirs.LOCK_NAME), os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live slave's, maybe another run's
        finally:
            os.close(lock)
        for mount in sorted(jobdirs._mounts_under(root), key=len, reverse=True):
            jobdirs._LIBC.umount2(mount.encode(), jobdirs._MNT_DETACH)
        jobdirs._remove(root)


def parent_name(p: psutil.Process) -> str:
    """The name of ``p``'s parent; "" once that has gone (psutil then gives None: a parent being replaced
    while a test looks, as a warm pool's after its parent was killed)."""
    parent = p.parent()
    return parent.name() if parent is not None else ""


def warm_parents(slave_pid: int) -> list[psutil.Process]:
    """The warm pool's parent of that slave (slave/warm_zygote.py), the bwrap processes above it and the
    children it forked ahead for free slots (still in "/", waiting for a job): they live as long as the
    slave; the jobs are the other children."""
    try:
        under = psutil.Process(slave_pid).children(recursive=True)
    except psutil.Error:
        return []
    found = []
    for p in under:
        try:
            cmd = p.cmdline()
            # `python3 -u - FD` (its program on stdin, slave/warm_pool.py) right under bwrap.
            if cmd[1:3] == PARENT_FLAGS and len(cmd) == 4 and cmd[3].isdigit() and parent_name(p) == "bwrap":
                found.append(p)
                found += [a for a in p.parents() if a.name() == "bwrap" and a.pid != slave_pid]
                found += [k for k in p.children() if k.cmdline() == cmd and k.cwd() == "/"]
        except (psutil.Error, IndexError):
            pass
    return found


def job_processes_of(slave_pid: int) -> list[psutil.Process]:
    """Everything a slave has started for its jobs (sandboxes and programs): its descendants but the warm
    pool's parent."""
    try:
        under = psutil.Process(slave_pid).children(recursive=True)
    except psutil.Error:
        return []
    pool = {p.pid for p in warm_parents(slave_pid)}
    return [p for p in under if p.pid not in pool]


# A job that waits for its test to release it (release_jobs), not a fixed time its test must fit its steps
# into: no slower than the steps, and no race on a loaded machine.  SIGUSR1 is blocked first, so a release
# sent before the job waits is kept for it; the 300 s are only the job's own deadline.
HOLD = "import signal\nsignal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})\n"
UNTIL_RELEASED = "signal.sigtimedwait({signal.SIGUSR1}, 300)\n"


def held_jobs(slave_pid: int) -> list[psutil.Process]:
    """That slave's job processes waiting in UNTIL_RELEASED (the kernel function they sleep in)."""
    held = []
    for p in job_processes_of(slave_pid):
        try:
            with open(f"/proc/{p.pid}/wchan") as f:
                if "sigtimedwait" in f.read():
                    held.append(p)
        except OSError:
            pass
    return held


def release_jobs(*slave_pids: int, timeout: float = 30.0) -> None:
    """Once a job of those slaves waits in UNTIL_RELEASED, let every such job go on."""
    held = wait_for(lambda: held_by(*slave_pids), timeout, "a held job to wait for its release")
    for p in held:
        p.send_signal(signal.SIGUSR1)


def held_by(*slave_pids: int) -> list[psutil.Process]:
    """The held jobs (UNTIL_RELEASED) of all those slaves."""
    return [p for pid in slave_pids for p in held_jobs(pid)]


def release_until_done(jobs, *slave_pids: int, timeout: float = 60.0) -> None:
    """Let every held job of those slaves go on, again as the next ones start held, until all of ``jobs``
    (client Jobs) have ended."""
    def ended() -> bool:
        for p in held_by(*slave_pids):
            try:
                p.send_signal(signal.SIGUSR1)
            except psutil.NoSuchProcess:
                pass
        return all(job.done for job in jobs)
    wait_for(ended, timeout, "the held jobs to be let go and end")


def assert_gone(procs: list[psutil.Process], what: str = "processes", timeout: float = 15.0) -> None:
    """Every process in ``procs`` ends within ``timeout`` s; any left is killed, and the test fails."""
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        p.kill()
    assert not alive, f"{what} left running: {alive}"


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A private $DISTEXEC_HOME, so tests never touch ~/.distexec or each other."""
    path = tmp_path / "home"
    path.mkdir()
    monkeypatch.setenv("DISTEXEC_HOME", str(path))
    for var in ("DISTEXEC_URL", "DISTEXEC_TOKEN", "DISTEXEC_SLAVE_SECRET"):
        monkeypatch.delenv(var, raising=False)
    return path


@contextlib.contextmanager
def shared_cluster(tmp_path_factory, name: str, slaves: int = 2, *, start_timeout: float = 30.0, **kwargs):
    """A LocalCluster for a whole module's tests (a start costs seconds), stopped at the end.

    Its $DISTEXEC_HOME and logs live in a temporary folder named ``name``, and
    the environment points at that home only while the module runs.  Tests
    sharing it must break nothing and depend on no history.
    """
    base = tmp_path_factory.mktemp(name)
    home = base / "home"
    home.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DISTEXEC_HOME", str(home))
        for var in ("DISTEXEC_URL", "DISTEXEC_TOKEN", "DISTEXEC_SLAVE_SECRET"):
            mp.delenv(var, raising=False)
        kwargs.setdefault("home", str(home))
        kwargs.setdefault("log_dir", str(base / "logs"))
        kwargs.setdefault("wait_complete", True)
        lc = LocalCluster(slaves, **kwargs)
        try:
            lc.start(timeout=start_timeout)
            yield lc
        finally:
            lc.stop()


def module_cluster(name: str, slaves: int = 2, **kwargs):
    """A module-wide cluster fixture, ``lc = module_cluster("magic", 2, slots=2)``: one
    ``shared_cluster`` for all the module's tests, the fixture named as it is assigned."""
    @pytest.fixture(scope="module")
    def fixture(tmp_path_factory):
        with shared_cluster(tmp_path_factory, name, slaves, **kwargs) as lc:
            yield lc
    return fixture


@contextlib.contextmanager
def magic_shell():
    """IPython's shell with ``%load_ext distexec_kernel``, unloaded at the end: the magics
    find the cluster as a notebook would (the connection file of $DISTEXEC_HOME)."""
    from IPython.core.interactiveshell import InteractiveShell

    sh = InteractiveShell.instance()
    sh.run_line_magic("load_ext", "distexec_kernel")
    try:
        yield sh
    finally:
        sh.run_line_magic("unload_ext", "distexec_kernel")


# A value whose text (a DataFrame's text table) is not a placeholder: stdout has it, for terminals.
SHOWN_IN_PLACE = ("from IPython.display import display\n"
                  "class Table:\n"
                  "    def _repr_html_(self): return '<b>html table</b>'\n"
                  "    def __repr__(self): return 'TEXT TABLE'\n"
                  "print('before')\ndisplay(Table())\nprint('after')\nTable()\n")


def visible_outputs(messages: list[dict]) -> list[tuple[str, object]]:
    """What a Jupyter frontend shows of a cell's iopub ``messages``: ``(stream name, text)`` (consecutive
    ones joined) and ``(msg_type, data)``, after the ``clear_output`` among them."""
    shown: list[tuple[str, object]] = []
    clear_next = False
    for msg in messages:
        kind, content = msg["msg_type"], msg["content"]
        if kind == "clear_output":
            if content.get("wait"):
                clear_next = True
            else:
                shown = []
            continue
        if kind not in ("stream", "display_data", "execute_result", "error"):
            continue
        if clear_next:
            shown, clear_next = [], False
        if kind == "stream":
            if shown and shown[-1][0] == content["name"]:
                shown[-1] = (content["name"], shown[-1][1] + content["text"])
            else:
                shown.append((content["name"], content["text"]))
        else:
            shown.append((kind, content.get("data") or content.get("ename")))
    return shown


@pytest.fixture
def make_cluster(home, tmp_path):
    """Build and start a LocalCluster; all of them are stopped at the end of the test."""
    made: list[LocalCluster] = []

    def make(slaves: int = 2, **kwargs) -> LocalCluster:
        kwargs.setdefault("log_dir", str(tmp_path / "logs"))
        kwargs.setdefault("home", str(home))
        # Tests expect every language offered and the warm pool up once started.
        kwargs.setdefault("wait_complete", True)
        lc = LocalCluster(slaves, **kwargs)
        made.append(lc)
        return lc.start()

    yield make
    for lc in made:
        lc.stop()


@pytest.fixture
def two_users(make_cluster, tmp_path):
    """A cluster of one one-slot Python slave with logins, and a client each for alice and bob."""
    from distexec_kernel import Cluster

    lc = make_cluster(1, slots=1, languages="python", master_args=["--users", users_json(tmp_path, "alice", "bob")])
    alice = Cluster(lc.url, user="alice", password="alice-pw")
    bob = Cluster(lc.url, user="bob", password="bob-pw")
    yield lc, alice, bob
    alice.close()
    bob.close()


@pytest.fixture
def cluster(make_cluster):
    """A master and two slaves with two slots each."""
    return make_cluster(2, slots=2)


@pytest.fixture
def client(cluster):
    """A Cluster client connected to ``cluster``."""
    from distexec_kernel import Cluster

    c = Cluster(cluster.url, token=cluster.token)
    yield c
    c.close()


class Socket:
    """A blocking WebSocket client on its own event loop thread, for driving the master from a test."""

    BROADCAST = {"job_update", "job_output", "slaves_changed", "clients_changed", "welcome",
                 "job_run", "job_cancel"}

    def __init__(self, url: str, path: str, token: str):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        req = tornado.httpclient.HTTPRequest(config.ws_url(url) + path,
                                             headers={"Authorization": f"Bearer {token}"}, connect_timeout=10)
        self.conn = self._run(lambda: tornado.websocket.websocket_connect(req, max_message_size=P.MAX_MESSAGE_BYTES))
        self.probes = 0

    def _run(self, make, timeout: float = 20.0):
        """Run ``make()`` (which returns an awaitable) on the socket's loop and wait for its result."""
        async def wrap():
            return await make()
        return asyncio.run_coroutine_threadsafe(wrap(), self.loop).result(timeout)

    def send(self, frame) -> None:
        self._run(lambda: self.conn.write_message(frame, binary=isinstance(frame, bytes)))

    def recv(self, timeout: float = 20.0):
        return json.loads(self.recv_text(timeout))

    def recv_text(self, timeout: float = 20.0) -> str:
        """The next frame as it came (a message, or a batch of them for a peer that asked)."""
        text = self._run(lambda: asyncio.wait_for(self.conn.read_message(), timeout), timeout + 5)
        assert text is not None, f"the master closed the connection ({self.conn.close_code} {self.conn.close_reason})"
        return text

    def exchange(self, frame) -> list[dict]:
        """Send ``frame``, then a probe; return the replies that came for ``frame`` (not broadcasts)."""
        self.probes += 1
        probe = f"probe-{self.probes}"
        self.send(frame)
        self.send(json.dumps({"type": probe}))
        replies = []
        while True:
            msg = self.recv()
            if msg["type"] == "error" and repr(probe) in msg["error"]["message"]:
                return replies
            if msg["type"] not in self.BROADCAST:
                replies.append(msg)

    def close(self) -> None:
        if self.loop.is_closed():
            return

        async def shut():
            self.conn.close()
            while await asyncio.wait_for(self.conn.read_message(), 10) is not None:
                pass
        try:
            self._run(shut)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


def logs(tmp_path) -> str:
    """Everything the cluster's processes logged, for assertion messages."""
    out = []
    log_dir = tmp_path / "logs"
    if log_dir.exists():
        for name in sorted(os.listdir(log_dir)):
            out.append(f"--- {name}\n{(log_dir / name).read_text()}")
    return "\n".join(out)


def users_json(tmp_path, *names: str) -> str:
    """A ``--users`` file with each of ``names``, whose password is ``<name>-pw``.

    Hashed with argon2's cheapest profile: tests log in often, and the
    production cost would only slow them down."""
    import argon2

    from master import auth

    cheap = argon2.PasswordHasher.from_parameters(argon2.profiles.CHEAPEST)
    path = str(tmp_path / "users.json")
    for name in names:
        auth.add_user(path, name, f"{name}-pw", hasher=cheap)
    return path


# A job that forks sleepers until the system refuses, then prints how many it made:
# what a process limit (pids cgroup) must stop short of its cap.
FORK_UNTIL_REFUSED = """\
import os, time
n = 0
try:
    while n < 500:
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        n += 1
except BlockingIOError:
    pass
print(n)
"""

# A job that leaves a daemon behind (forked twice, in its own session) and says so
# once it runs: what must be gone when the job ends.
DOUBLE_FORKING_DAEMON = """\
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        open("daemon.started", "w").close()
        time.sleep(300)
    os._exit(0)
while not os.path.exists("daemon.started"):
    time.sleep(0.01)
print("daemon up")
"""


# Small limits for the modules that test them (sandbox, warm pool); the disk under the
# memory limit, since a job's files live in a tmpfs that counts against its memory too.
SMALL_MEMORY_MB, SMALL_MAX_PROCS, SMALL_DISK_MB = 128, 32, 64


def small_limits_cluster(box: str, slots: int, *slave_flags: str, **kwargs) -> LocalCluster:
    """One slave under the small limits (1 MiB of output), its job root, home and logs in ``box``
    (which holds ``jobs/`` and ``home/``); not started."""
    kwargs.setdefault("wait_complete", True)
    return LocalCluster(1, slots=slots, home=os.path.join(box, "home"), log_dir=os.path.join(box, "logs"),
                        slave_args=["--memory-limit", str(SMALL_MEMORY_MB), "--output-limit", "1",
                                    "--max-procs", str(SMALL_MAX_PROCS), "--workdir", os.path.join(box, "jobs"),
                                    "--disk-limit", str(SMALL_DISK_MB), *slave_flags], **kwargs)

# A job that tries to read each path it is given and says, per path, what it read or why not.
READ_EACH_ARG = """\
import os, sys
for path in sys.argv[1:]:
    try:
        with open(path) as f:
            print(path, "READ", f.read())
    except OSError as exc:
        print(path, type(exc).__name__)
"""


def on_terminal(cluster, *argv, streams=("stdout", "stderr")) -> tuple[str, subprocess.CompletedProcess]:
    """Run the CLI with ``streams`` on a terminal (a pty) and the others on pipes: what the
    terminal showed (its newlines as the terminal sends them, ``\r\n``) and the process."""
    leader, follower = pty.openpty()
    where = {name: follower if name in streams else subprocess.PIPE for name in ("stdout", "stderr")}
    proc = subprocess.Popen([sys.executable, "-m", "distexec_kernel.cli", *argv, "--url", cluster.url,
                             "--token", cluster.token], stdin=subprocess.DEVNULL, **where)
    os.close(follower)
    seen, deadline = b"", time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            if not select.select([leader], [], [], deadline - time.monotonic())[0]:
                continue
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the child has closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(leader)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    done = subprocess.CompletedProcess(proc.args, proc.returncode, (out or b"").decode(), (err or b"").decode())
    return seen.decode(), done
