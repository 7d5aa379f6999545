"""Start a slave: ``python -m slave`` or ``distexec slave``."""
from __future__ import annotations

import argparse
import asyncio
import fcntl
import logging
import os
import platform
import re
import signal
import socket
import sys
import uuid

from distexec_kernel import config, protocol as P
from distexec_kernel.config import seconds

from . import toolchains
from .agent import PING_INTERVAL, FatalSlaveError, Slave
from .compile_cache import CompileCache
from .jobdirs import JobDirs
from .runner import ProcessRunner
from .bwrap import BwrapSandbox, sandbox_to_check
from .sandbox import Limits
from .routing import RoutingRunner
from .sessions import DEFAULT_MAX_SESSIONS, DEFAULT_TTL, SessionRunner
from .warm import WarmRunner

log = logging.getLogger("distexec.slave")

REGISTERED = "distexec slave registered:"
# Printed once the slave is registered, knows all its languages and its warm pool is up (or off): fully_started.
COMPLETE = "distexec slave complete:"
# Longest a first start's toolchain detection waits for the first registration, and how
# long after it it starts (see detect_rest).
DETECT_AFTER = 5.0
DETECT_DELAY = 0.5


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--master", default=None, help="master URL (ws://, http://, wss://, https://); "
                   "default: DISTEXEC_URL or the connection file")
    p.add_argument("--ping-interval", type=seconds, default=PING_INTERVAL, metavar="SECONDS",
                   help="seconds between pings to the master; silent for twice that, it is judged gone and the "
                        f"slave connects again (default {PING_INTERVAL:g})")
    p.add_argument("--slots", type=int, default=None, help="most jobs run at once here (default: CPU count)")
    p.add_argument("--uid", default=None, help="this slave's UID (default: one kept under $DISTEXEC_HOME)")
    p.add_argument("--languages", default=None, help="comma-separated languages to offer (default: all found)")
    p.add_argument("--secret", default=None, help="the master's slave secret (better: DISTEXEC_SLAVE_SECRET, "
                   "which `ps` does not show)")
    p.add_argument("--cafile", default=None, metavar="PEM",
                   help="verify a wss/https master with this certificate (default: DISTEXEC_CAFILE or the "
                        "connection file's, else the system's CAs)")
    p.add_argument("--memory-limit", type=int, default=1024, metavar="MiB", help="per job (default 1024)")
    p.add_argument("--output-limit", type=output_mib, default=16, metavar="MiB",
                   help=f"stdout+stderr per job, as sent (default 16, at most {MAX_OUTPUT_MIB})")
    p.add_argument("--max-procs", type=int, default=64, help="processes per job (default 64)")
    p.add_argument("--allow-network", action="store_true", help="let jobs use the network")
    p.add_argument("--drain-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, seconds running jobs get to finish before they are stopped (default 30)")
    p.add_argument("--sandbox", choices=("auto", "bwrap", "none"), default="auto",
                   help="job isolation: auto (bubblewrap where it works, else none, said at start), "
                        "bwrap (refuse to start without it), none (limits only); see docs/sandbox.md")
    p.add_argument("--workdir", default=None, help="where this slave's folder of job directories is made "
                   "(default: system temp)")
    p.add_argument("--disk-limit", type=int, default=1024, metavar="MiB",
                   help="what a job may write in all, its directory and /tmp (default 1024; 0: no limit)")
    p.add_argument("--max-sessions-per-user", type=int, default=DEFAULT_MAX_SESSIONS, metavar="N",
                   help=f"Python sessions one user may have open (default {DEFAULT_MAX_SESSIONS}); see docs/sessions.md")
    p.add_argument("--session-ttl", type=float, default=DEFAULT_TTL, metavar="S",
                   help=f"seconds an idle Python session (--session) lives (default {DEFAULT_TTL:g})")
    p.add_argument("--warm", action=argparse.BooleanOptionalAction, default=None,
                   help="run python, bash, javascript and ruby jobs and cached compiled programs forked from a "
                        "warm parent, each still fresh, isolated and limited (default: on with the bubblewrap "
                        "sandbox); see docs/sandbox.md")
    p.add_argument("--warm-imports", type=module_names, default=[], metavar="MODULES",
                   help="Python modules the warm pool imports once, for every Python job to find imported "
                        "(comma-separated, e.g. numpy,pandas; default none); see docs/sandbox.md")
    p.add_argument("--compile-cache", type=int, default=256, metavar="MiB",
                   help="compiled programs kept under $DISTEXEC_HOME/cache/compile (default 256; 0: none)")


# A job's output goes to the master in its job_finished, one message of at most P.MAX_MESSAGE_BYTES: half
# of it leaves room for the rest (its rich outputs' bundles are counted in the limit, its files' list not).
MAX_OUTPUT_MIB = P.MAX_MESSAGE_BYTES // 2 >> 20


def output_mib(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of MiB: {text!r}") from None
    if not 0 < value <= MAX_OUTPUT_MIB:
        raise argparse.ArgumentTypeError(f"must be 1 to {MAX_OUTPUT_MIB} MiB: a job's output is sent to the "
                                         f"master in one message of at most {P.MAX_MESSAGE_BYTES >> 20} MiB")
    return value


def module_names(text: str) -> list[str]:
    """``--warm-imports``: comma-separated dotted module names (nothing else reaches an import)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    bad = [name for name in names if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", name, re.ASCII)]
    if bad:
        raise argparse.ArgumentTypeError(f"not a module name: {', '.join(map(repr, bad))}")
    return list(dict.fromkeys(names))


_uid_lock = None  # kept open for the life of the process: the lock is the claim


def stable_uid() -> str:
    """A UID that survives restarts and differs between slaves running on one host.

    Slot files ``slave-<n>.uid`` under $DISTEXEC_HOME; a running slave holds a
    lock on its file, so the next slave started on the host takes the next one.
    """
    global _uid_lock
    n = 0
    while True:
        path = os.path.join(config.home(), f"slave-{n}.uid")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            n += 1
            continue
        text = os.read(fd, 100).decode().strip()
        if not text:
            text = uuid.uuid4().hex[:12]
            os.write(fd, text.encode())
        _uid_lock = fd
        return text


async def start(args: argparse.Namespace) -> Slave:
    endpoint = config.resolve(args.master, None, args.secret)
    if not endpoint.slave_secret:
        unsent = f" ({endpoint.unsent})" if endpoint.unsent else ""
        raise config.ConnectionConfigError(f"no slave secret{unsent}: give --secret or DISTEXEC_SLAVE_SECRET")
    only = [x for x in args.languages.split(",") if x.strip()] if args.languages else None
    # Private before anything is put there (the compile cache holds users' programs), also on a
    # host that runs slaves only: no master made it 0700 there.
    config.ensure_home()
    uid = args.uid or stable_uid()
    # Its own folder, cleared of what an earlier run of this slave left (jobdirs.py).
    jobdirs = JobDirs(uid, args.workdir, args.disk_limit)
    limits = Limits(memory_mb=args.memory_limit, output_mb=args.output_limit,
                    max_procs=args.max_procs, allow_network=args.allow_network)
    if jobdirs.limited:
        # One file may fill the quota, no more: past it SIGXFSZ, classified disk_limit.
        limits.file_size_mb = args.disk_limit
    langs = toolchains.wanted(only)
    sandbox, check = sandbox_to_check(limits, args.sandbox)
    if check is None:
        detector, chains, later = await detect_first(langs, sandbox, limits)
    else:
        # Bubblewrap is probed while the first toolchains are asked through it (their answers
        # kept only if it works); should it not, they are asked through its replacement.
        probed, first = await asyncio.gather(asyncio.to_thread(check),
                                             detect_first(langs, sandbox, limits, keep=False))
        if probed is sandbox:
            detector, chains, later = first
            detector.keep_answers()
        else:
            detector, chains, later = await detect_first(langs, probed, limits)
        sandbox = probed
    # Both shared with the runner and the agent, and completed in place by detect_rest.
    found = {name: tc.version for name, tc in chains.items()}
    programs = {name: tc.programs for name, tc in chains.items()}
    cache = (CompileCache(os.path.join(config.home(), "cache", "compile"), args.compile_cache << 20)
             if args.compile_cache > 0 else None)
    runner = ProcessRunner(sandbox, limits, found, jobdirs=jobdirs, compile_cache=cache, programs=programs)
    slots = args.slots or os.cpu_count() or 1
    warm = None
    if args.warm or (args.warm is None and isinstance(sandbox, BwrapSandbox)):
        # The pool's languages forked from a parent started once; the rest (and all, should it fail) fresh.
        # Started while the slave connects and registers: a job that comes first waits for it.
        runner = warm = WarmRunner(runner, slots, imports=args.warm_imports)
        warm.start_soon()
    elif args.warm_imports:
        log.warning("--warm-imports %s ignored: no warm pool here (%s); each job imports for itself",
                    ",".join(args.warm_imports), "--no-warm" if args.warm is False else "no bubblewrap sandbox")
    if "python" in found:
        # Jobs that name a session run in that session's kernel, the rest as above (warm or fresh).
        runner = RoutingRunner(runner, SessionRunner(sandbox, limits, jobdirs, ttl=args.session_ttl,
                                                     max_per_user=args.max_sessions_per_user))
        jobs_python = programs["python"].get("python3")
        if jobs_python and os.path.realpath(jobs_python) != os.path.realpath(sys.executable):
            # A package a notebook imports in a session cell, then fails to find in its c.map: say why, once.
            log.warning("python sessions run in %s (Python %s: sessions need ipykernel), fresh python jobs in %s "
                        "(Python %s): a module installed for one is not there for the other (docs/sessions.md)",
                        sys.executable, platform.python_version(), jobs_python, found["python"])
    log.info("slave %s: %s%s", uid, ", ".join(f"{n} {v}" for n, v in sorted(found.items())) or "no languages",
             f"; still asking: {', '.join(lang.name for lang in later)}" if later else "")

    registered = asyncio.Event()

    def on_registered(slave: Slave) -> None:
        if not registered.is_set():
            registered.set()
            print(f"{REGISTERED} {slave.uid} {endpoint.url}", flush=True)

    slave = Slave(endpoint.url, endpoint.slave_secret, uid, socket.gethostname(), slots, found, runner,
                  cafile=args.cafile or endpoint.cafile, on_registered=on_registered, detecting=bool(later),
                  ping_interval=args.ping_interval)
    detection = (asyncio.ensure_future(detect_rest(detector, later, found, programs, slave, registered))
                 if later else None)
    slave.tasks += [t for t in (detection, asyncio.ensure_future(fully_started(slave, warm, registered, detection)))
                    if t is not None]
    return slave


async def detect_first(langs: list, sandbox, limits: Limits,
                       keep: bool = True) -> tuple[toolchains.Detector, dict, list]:
    """What the slave registers with: the toolchains the cache settles, and python and
    bash asked now; also the languages left to ask (``detect_rest``) and the detector.

    Asked through the sandbox: a language is offered only if it works for a job.
    """
    detector = toolchains.Detector(cache_path=toolchains.default_cache_path(), sandbox=sandbox, limits=limits,
                                   keep=keep)
    chains, later = {}, []
    for lang in langs:
        settled, tc = detector.remembered(lang)
        if tc is not None:
            chains[lang.name] = tc
        elif not settled:
            later.append(lang)
    now = [lang for lang in later if lang.name in toolchains.FIRST]
    if now:
        chains.update(await detector.detect(now))
    return detector, chains, [lang for lang in later if lang.name not in toolchains.FIRST]


async def fully_started(slave: Slave, warm: WarmRunner | None, registered: asyncio.Event,
                        detection: asyncio.Future | None) -> None:
    """Describe the runner once its warm pool is up (or off), and say when the slave is all there:
    registered, its warm pool up, every language known (``COMPLETE``)."""
    if warm is not None:
        await warm.started()
    log.info("%s", slave.runner.describe())
    await registered.wait()
    if detection is not None:
        await asyncio.wait([detection])
    print(f"{COMPLETE} {slave.uid} {','.join(sorted(slave.toolchains)) or '-'}", flush=True)


async def detect_rest(detector: toolchains.Detector, langs: list, found: dict[str, str],
                      programs: dict[str, dict[str, str]], slave: Slave, registered: asyncio.Event) -> None:
    """Ask the toolchains a first start did not wait for, then offer what answered.

    Until then the slave registers as ``detecting``: the master queues a job
    for a language no slave offers yet instead of refusing it.  The asking
    waits for the first registration (or DETECT_AFTER), so that its JVM and
    compilers do not hold up the slave's and the master's own start, and
    DETECT_DELAY more, for the first jobs.
    """
    try:
        await asyncio.wait_for(registered.wait(), DETECT_AFTER)
    except asyncio.TimeoutError:
        pass  # no master yet: ask anyway, a register then carries it all
    # The jobs sent right after a start (`distexec up`, then a first cell) come first: measured on
    # two cores, probes started at once made a first trivial job take 0.12 s instead of 0.03 s.
    await asyncio.sleep(DETECT_DELAY)
    try:
        chains = await detector.detect(langs, background=True)
    except Exception:  # a bug here must not leave the master waiting on us forever
        log.exception("toolchain detection failed; offering what was found before")
        chains = {}
    # The programs first: a job for a language is sent only once it is offered.
    programs.update({name: tc.programs for name, tc in chains.items()})
    found.update({name: tc.version for name, tc in chains.items()})
    if chains:
        log.info("slave %s now also offers: %s", slave.uid,
                 ", ".join(f"{n} {tc.version}" for n, tc in sorted(chains.items())))
    slave.languages_changed(detecting=False)


def unignore_for_children() -> None:
    """Keep ignoring what this process was started ignoring (nohup's SIGHUP, say), by a handler doing
    nothing: an ignored signal stays ignored through exec, in every job, where a handled one is back
    to its default.  SIGPIPE and SIGXFSZ are Python's own, put back for each child it spawns."""
    for sig in signal.Signals:
        if sig in (signal.SIGKILL, signal.SIGSTOP, signal.SIGPIPE, signal.SIGXFSZ):
            continue
        if signal.getsignal(sig) == signal.SIG_IGN:
            signal.signal(sig, _nothing)


def _nothing(signum, frame) -> None:
    pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="distexec slave", description="Run a distexec slave.")
    add_arguments(p)
    return run(p.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    config.setup_logging()
    unignore_for_children()

    async def runner() -> None:
        slave = await start(args)
        loop = asyncio.get_running_loop()
        # SIGTERM drains (finish what runs, then exit); SIGINT stops now.
        loop.add_signal_handler(signal.SIGTERM,
                                lambda: asyncio.ensure_future(slave.drain(args.drain_timeout)))
        loop.add_signal_handler(signal.SIGINT, slave.stop)
        try:
            await slave.run()
        finally:
            for _, cancel in list(slave.running.values()):
                cancel.set()
            await asyncio.gather(*(t for t, _ in list(slave.running.values())), return_exceptions=True)
            for task in slave.tasks:
                task.cancel()
            await asyncio.gather(*slave.tasks, return_exceptions=True)
            await slave.runner.close()

    try:
        asyncio.run(runner())
    except (FatalSlaveError, config.ConnectionConfigError, ValueError) as exc:
        print(f"distexec slave: {exc}", file=sys.stderr)
        return 2
    return 0
