"""A master and slaves on this machine, as child processes: ``distexec up`` and the tests.

Master and slaves start at the same time: the slaves retry their connection
with a short backoff until the master listens, so start-up costs one
interpreter start, not three in a row.  Readiness is read from the lines the
children print (``READY`` / ``REGISTERED``), never guessed with sleeps.
"""
from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import requests

from . import config
from .procs import die_with_parent

MASTER_READY = "distexec master ready at"
SLAVE_REGISTERED = "distexec slave registered:"
# A slave registers before its warm pool is up and, on a first start, before its
# slow toolchains have answered; this line says it has all of it (slave/server.py).
SLAVE_COMPLETE = "distexec slave complete:"


def _die_with_parent() -> None:
    # If `distexec up` (or a test run) dies without cleaning up, its children
    # get SIGTERM instead of running on as orphans.
    die_with_parent(signal.SIGTERM)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_port_free(host: str, port: int) -> None:
    """Refuse a port another server holds, before anything starts: slaves started beside a master
    that cannot bind would meet the other server's master (and its refusal of their secret)."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    try:
        # As the master binds (SO_REUSEADDR): a port left in TIME_WAIT by a stopped master is free.
        socket.create_server((host, port), family=family).close()
    except OSError as exc:
        raise RuntimeError(f"cannot listen on {host}:{port}: {os.strerror(exc.errno)} (another master, or another "
                           f"`distexec up`?); choose a port with --port") from None


class Child:
    """A child process whose stdout lines are read in a thread, to wait on."""

    def __init__(self, name: str, argv: list[str], env: dict, stderr) -> None:
        self.name = name
        self.argv = argv
        # A session of its own: Ctrl-C in the terminal reaches `distexec up`
        # alone, which then stops the children in order (slaves, then master).
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, env=env, text=True,
                                     bufsize=1, preexec_fn=_die_with_parent, start_new_session=True)
        # A log file we opened for this child is ours to close.
        self._log = stderr if hasattr(stderr, "close") else None
        self.lines: "queue.Queue[str | None]" = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True, name=f"read-{name}").start()

    def _read(self) -> None:
        with self.proc.stdout:
            for line in self.proc.stdout:
                self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_line(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.name} did not print {prefix!r} within {timeout} s")
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError(f"{self.name} exited with code {self.proc.wait()} before it was ready")
            self.seen.append(line)
            if line.startswith(prefix):
                return line[len(prefix):].strip()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send_signal(self, sig: int) -> None:
        if self.alive():
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        self.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return code


class LocalCluster:
    """A master and ``slaves`` slaves on 127.0.0.1.  ``with LocalCluster() as lc: ...``"""

    def __init__(self, slaves: int = 2, *, slots: int | None = None, max_jobs: int | None = None,
                 port: int = 0, host: str = "127.0.0.1", home: str | None = None,
                 languages: str | None = None, db: str | None = None, master_args: list[str] = (),
                 slave_args: list[str] = (), log_dir: str | None = None, stderr=None,
                 token: str | None = None, secret: str | None = None, tls: bool = False,
                 wait_complete: bool = False):
        self.n_slaves = slaves
        # start() returns only once every slave has all of it: its warm pool up (or off), and
        # the master knowing its whole list of languages.
        self.wait_complete = wait_complete
        self.slots = slots
        self.max_jobs = max_jobs
        self.host = host
        self.port = port or free_port(host)
        self.home = home or config.home()
        self.languages = languages
        self.db = db
        self.master_args = list(master_args)
        self.slave_args = list(slave_args)
        self.log_dir = log_dir
        self.stderr = stderr
        self.token = token or config.new_secret()
        self.secret = secret or config.new_secret()
        self.master: Child | None = None
        self.slaves: list[Child] = []
        self.url = f"http://{host}:{self.port}"
        self._count = 0
        # With tls, the CA file clients and slaves verify the master against.
        self.cafile: str | None = None
        if tls:
            from .tls import ensure_self_signed
            names = ["localhost", "127.0.0.1", "::1", host]
            if host in ("0.0.0.0", "::", ""):
                names.append(socket.gethostname())
            certfile, keyfile = ensure_self_signed([n for n in names if n], os.path.join(self.home, "tls"))
            self.master_args += ["--certfile", certfile, "--keyfile", keyfile]
            self.cafile = certfile
            self.url = f"https://{host}:{self.port}"

    def _env(self) -> dict:
        env = dict(os.environ)
        env["DISTEXEC_HOME"] = self.home
        env.pop("DISTEXEC_URL", None)
        # Through the environment, not argv: any local user can read a command line in ps.
        env["DISTEXEC_TOKEN"] = self.token
        env["DISTEXEC_SLAVE_SECRET"] = self.secret
        # Given to the slaves directly: they may start before the master rewrites the connection file.
        if self.cafile:
            env["DISTEXEC_CAFILE"] = self.cafile
        else:
            env.pop("DISTEXEC_CAFILE", None)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _stderr(self, name: str):
        if self.log_dir:
            os.makedirs(self.log_dir, exist_ok=True)
            return open(os.path.join(self.log_dir, f"{name}.log"), "a")
        return self.stderr

    def spawn_master(self, *extra: str) -> Child:
        argv = [sys.executable, "-m", "master", "--host", self.host, "--port", str(self.port)]
        if self.max_jobs:
            argv += ["--max-jobs", str(self.max_jobs)]
        if self.db:
            argv += ["--db", self.db]
        self.master = Child("master", argv + self.master_args + list(extra), self._env(), self._stderr("master"))
        return self.master

    def start_master(self, *extra: str, timeout: float = 30.0) -> str:
        self.spawn_master(*extra).wait_line(MASTER_READY, timeout)
        return self.url

    def spawn_slave(self, *extra: str) -> Child:
        self._count += 1
        argv = [sys.executable, "-m", "slave", "--master", self.url]
        if self.slots:
            argv += ["--slots", str(self.slots)]
        if self.languages:
            argv += ["--languages", self.languages]
        child = Child(f"slave-{self._count}", argv + self.slave_args + list(extra), self._env(),
                      self._stderr(f"slave-{self._count}"))
        self.slaves.append(child)
        return child

    def start_slave(self, *extra: str, timeout: float = 30.0) -> Child:
        child = self.spawn_slave(*extra)
        child.uid = child.wait_line(SLAVE_REGISTERED, timeout).split()[0]
        if self.wait_complete:
            self._wait_complete([child], timeout)
        return child

    def until_complete(self, timeout: float = 60.0) -> "LocalCluster":
        """Wait until every slave is complete (all its toolchains asked, its warm pool up): what a
        measurement of steady running waits for after a start (``distexec up`` does not)."""
        self._wait_complete(self.slaves, timeout)
        return self

    def _wait_complete(self, children: list[Child], timeout: float) -> None:
        """Until each slave has said it is complete, and the master shows none detecting."""
        if not children:
            return  # no slave to wait for (and no request to a master whose URL may not be ours to guess)
        deadline = time.monotonic() + timeout
        for child in children:
            child.wait_line(SLAVE_COMPLETE, max(0.0, deadline - time.monotonic()))
        # The slave printed its line after sending the list; the master may not have read it yet.
        uids = {child.uid for child in children}
        while True:
            resp = requests.get(self.url + "/api/slaves", timeout=5, verify=self.cafile or True,
                                headers={"Authorization": f"Bearer {self.token}"})
            resp.raise_for_status()
            if not any(s["detecting"] for s in resp.json()["slaves"] if s["uid"] in uids):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the master still sees slaves detecting toolchains after {timeout} s")
            time.sleep(0.01)

    def start(self, timeout: float = 30.0) -> "LocalCluster":
        check_port_free(self.host, self.port)
        self.spawn_master()
        pending = [self.spawn_slave() for _ in range(self.n_slaves)]
        try:
            self.master.wait_line(MASTER_READY, timeout)
            for child in pending:
                child.uid = child.wait_line(SLAVE_REGISTERED, timeout).split()[0]
            if self.wait_complete:
                self._wait_complete(pending, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def restart_master(self, sig: int = signal.SIGKILL, timeout: float = 30.0) -> None:
        self.master.stop(sig)
        self.start_master(timeout=timeout)

    def stop(self) -> None:
        # Slaves first, so none of them sees the master vanish and reconnects.
        for child in self.slaves:
            child.send_signal(signal.SIGINT)
        for child in self.slaves:
            child.stop(signal.SIGINT)
        if self.master is not None:
            if self.slaves and self.master.alive():
                self._wait_slaves_gone()
            self.master.stop(signal.SIGTERM)

    def _wait_slaves_gone(self, timeout: float = 5.0) -> None:
        """Let the master see its slaves leave, so it settles their jobs before it stops."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.master.alive():
            try:
                resp = requests.get(self.url + "/api/slaves", timeout=1, verify=self.cafile or True,
                                    headers={"Authorization": f"Bearer {self.token}"})
                if resp.status_code != 200 or not resp.json()["slaves"]:
                    return
            except (requests.RequestException, ValueError, KeyError):
                return
            time.sleep(0.05)

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def run_local_cluster(args) -> int:
    """``distexec up``: start, report, wait for Ctrl-C, stop in order."""
    t0 = time.monotonic()
    master_args = ["--db", args.db] if args.db else []
    token, secret = config.kept_credentials()  # as a master restarted alone: open notebooks get back in
    lc = LocalCluster(args.slaves, slots=args.slots, max_jobs=args.max_jobs, port=args.port, token=token, secret=secret,
                      host=args.host, languages=args.languages, master_args=master_args, stderr=None,
                      slave_args=["--warm-imports", args.warm_imports] if getattr(args, "warm_imports", None) else [],
                      tls=getattr(args, "tls", False))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        lc.start()
    except (RuntimeError, TimeoutError) as exc:
        print(f"distexec up: {exc}", file=sys.stderr)
        return 1
    uids = ", ".join(getattr(s, "uid", "?") for s in lc.slaves)
    print(f"distexec cluster ready in {time.monotonic() - t0:.2f} s: master {lc.url}, "
          f"{len(lc.slaves)} slave(s) [{uids}]; connection file {config.connection_path()}", flush=True)
    try:
        logins = config.read_logins()
    except config.ConnectionConfigError:
        logins = []
    if logins:
        print(f"note: this account is logged in to {logins[0]['url']} (distexec login): commands, notebooks "
              f"and kernels go there unless given this cluster's URL; `distexec logout` makes this one the "
              f"default", flush=True)
    print("Ctrl-C stops the master and the slaves.", flush=True)
    try:
        while not stop.is_set():
            if not lc.master.alive():
                print("distexec up: the master exited", file=sys.stderr)
                break
            stop.wait(0.5)
    finally:
        print("stopping the slaves and the master…", file=sys.stderr, flush=True)
        lc.stop()
    return 0
