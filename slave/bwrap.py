"""The bubblewrap sandbox, and the choice of the strongest sandbox a machine offers.

``BwrapSandbox`` (as Flatpak uses bubblewrap) puts each step in its own
mount, PID, IPC, UTS and (unless ``--allow-network``) network namespace: the
system read-only, /tmp private, only the job's directory writable; the
slave's $DISTEXEC_HOME, its user's home, the other jobs' directories and the
cgroup tree hidden; the program runs as a uid of the job's own (uids.py) with
no capabilities.
``best_sandbox`` probes it once at slave start and falls back to the plain
``Sandbox`` (sandbox.py) where it cannot run, saying why.
"""
from __future__ import annotations

import copy
import logging
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from typing import Callable

import psutil

from distexec_kernel import config
from distexec_kernel.procs import kill_group

from . import accounts, uids
from .cgroups import Cgroups, JobCgroup, _read
from .jobdirs import FOLDER_PREFIX
from . import mountview
from .mountview import SPACES, View, folder_of, under as _under
from .sandbox import BWRAP_PROCS, CGROUP_ROOT, NOBODY, Limits, Sandbox, Spawn
from .seccomp import seccomp_available

log = logging.getLogger("distexec.slave.sandbox")


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in _read(f"/proc/{pid}/task/{pid}/children").split()]
    except (OSError, ValueError):  # a kernel without CONFIG_PROC_CHILDREN
        try:
            return [c.pid for c in psutil.Process(pid).children()]
        except psutil.Error:
            return []


def _outermost(paths: list[str]) -> list[str]:
    return [p for p in paths if not any(_under(p, q) and p != q for q in paths)]


def _view(covered: list[str], options: list[str]) -> View:
    """What a bwrap started with ``options`` must not find in the mount table it copies: the mounts
    under what it ``covered`` with a tmpfs, and the jobs' (mountview.py); kept, whatever holds or is
    held by a host path it binds.  A path bound from a job folder stands as the folder, and one that
    holds or is held by no covered path is left out: every step of a kind gets the same View, so
    they share one namespace."""
    shown = {folder_of(src, FOLDER_PREFIX) or src for i, opt in enumerate(options[:-1]) if opt in ("--bind", "--ro-bind")
             for src in (options[i + 1],) if src != "/"}
    # The cgroup hierarchies stay listed: they name controllers, not jobs, and the JVM sizes its heap
    # to the cgroup only if it finds every controller's mount in mountinfo (without them, 6 GiB
    # under a 128 MiB limit).
    covered = tuple(c for c in covered if c != CGROUP_ROOT)
    shown = {s for s in shown if any(_under(s, c) or _under(c, s) for c in covered)}
    return View(covered, tuple(sorted(shown)), FOLDER_PREFIX)


def _hiding_root(jobroot: str) -> str:
    """Where to mount the tmpfs that hides the other jobs' directories.

    The parent of the job directories, or the topmost directory above it the
    job's uid could not walk through (a 0700 temporary directory): the tmpfs
    and the directories made in it are open to the job, the host's are not.
    """
    path = "/"
    for part in jobroot.strip("/").split("/"):
        path = os.path.join(path, part)
        try:
            if not os.stat(path).st_mode & stat.S_IXOTH:
                return path
        except OSError:
            break
    return jobroot


# The warm pool's parent keeps these and no other capability (bwrap as root keeps all
# unless told): mounts, the switch to a slot's uid, and killing a job.
# CAP_NET_ADMIN: it brings up the loopback of each slot's network namespace (warm_zygote.net_of).
# CAP_SETPCAP: to empty its bounding set once started (warm_child._drop_spare_capabilities).
ZYGOTE_CAPS = ("CAP_SYS_ADMIN", "CAP_SETUID", "CAP_SETGID", "CAP_KILL", "CAP_NET_ADMIN", "CAP_SETPCAP")
# Where each warm child mounts its own tmpfs (inside the parent's private /run).
WARM_ROOT = "/run/distexec"

# Toolchains that install under a user's home: the job may see them (read-only)
# though the home itself is hidden.  rustup's proxies in ~/.cargo/bin need ~/.rustup.
TOOLCHAIN_HOMES = (".cargo", ".rustup", ".pyenv", ".nvm", ".sdkman", ".ghcup", ".juliaup", ".dotnet",
                   ".local/bin", "go")


class BwrapSandbox(Sandbox):
    """Each step in bubblewrap namespaces, as an unprivileged uid, seeing a read-only system.

    bwrap runs as root without a user namespace (a user namespace would map
    ``nobody`` inside to root outside, the owner of every system file); the
    job drops to ``uid`` (``nobody`` unless ``for_uid`` gave it one of its own:
    the runners do) with no capabilities and no_new_privs through util-linux's
    ``setpriv`` once its mounts are in place.
    """

    name = "bubblewrap"

    def __init__(self, cgroups: Cgroups | None = None, bwrap: str = "bwrap", setpriv: str = "setpriv",
                 uid: int = NOBODY, gid: int = NOBODY, expose: tuple[str, ...] = (), limits: Limits | None = None,
                 seccomp: bool = False):
        super().__init__(cgroups, limits=limits, seccomp=seccomp)
        self.bwrap = shutil.which(bwrap) or bwrap
        self.setpriv = shutil.which(setpriv) or setpriv
        self.uid = uid
        self.gid = gid
        self.secrets = self._secret_dirs()
        self.expose = self._exposed(expose)
        self.accounts = self._accounts()

    @staticmethod
    def _accounts() -> list[str]:
        """bwrap arguments binding the jobs' own /etc/passwd and /etc/group (accounts.py)."""
        if os.getuid() != 0:
            return []  # jobs run as the slave's own uid, an account already
        try:
            files = accounts.written()
        except OSError as exc:
            log.warning("jobs see the host's accounts, where their uid has no name: %s", exc)
            return []
        return [arg for dest, src in files.items() for arg in ("--ro-bind", src, dest)]

    @property
    def job_uid(self) -> int:
        return self.uid

    @property
    def file_owner(self) -> tuple[int, int] | None:
        return (self.uid, self.gid) if os.getuid() == 0 else None

    def for_uid(self, uid: int) -> "BwrapSandbox":
        box = copy.copy(self)  # the same cgroups and hidden paths; another uid and gid
        box.uid = box.gid = uid
        return box

    def describe(self) -> str:
        net = ("network allowed (--allow-network)" if self.limits.allow_network
               else "no network (own network namespace)")
        shown = f" except the toolchains {', '.join(self.expose)}" if self.expose else ""
        uid = (f"a uid of its own ({uids.FIRST}-{uids.FIRST + uids.COUNT - 1}, {self.uid} once all are taken)"
               if self.file_owner is not None else f"uid {self.uid}")
        return (f"isolation: bubblewrap; each job runs as {uid} without capabilities, in its own "
                f"PID, mount, IPC and UTS namespaces; {net}; read-only system, private /tmp, only the "
                f"job's directory writable; hidden: {', '.join(_outermost(self.secrets))}{shown} and the "
                f"other jobs' directories; " + self._describe_limits())

    @staticmethod
    def _secret_dirs() -> list[str]:
        """Directories a job must not see: the slave's home directory, $DISTEXEC_HOME, and /home: the
        host's people's files that every local account may read are not for jobs sent from elsewhere
        (a toolchain there on the slave's PATH, or the slave's own Python, is shown again)."""
        dirs = [os.path.realpath(config.home())]
        for home in (os.environ.get("HOME"), pwd.getpwuid(os.getuid()).pw_dir, "/home"):
            if home and os.path.realpath(home) != "/":
                dirs.append(os.path.realpath(home))
        return sorted(set(dirs))

    def _exposed(self, extra: tuple[str, ...]) -> tuple[str, ...]:
        """Toolchain directories inside a hidden one (``~/.cargo``...), shown read-only."""
        found = []
        # An extra directory is mounted again only where the sandbox hides it.
        hiding = ("/tmp", "/dev/shm", *self.secrets)
        candidates = [real for real in map(os.path.realpath, extra) if any(_under(real, h) for h in hiding)]
        for entry in os.environ.get("PATH", "").split(os.pathsep):
            real = os.path.realpath(entry) if entry else ""
            for hidden in self.secrets:
                if real and _under(real, hidden) and real != hidden:
                    # The install root: the first directory below the hidden one.
                    rel = os.path.relpath(real, hidden).split(os.sep)[0]
                    candidates.append(os.path.join(hidden, rel))
        for hidden in self.secrets:
            candidates += [os.path.join(hidden, name) for name in TOOLCHAIN_HOMES]
        distexec_home = os.path.realpath(config.home())
        for path in candidates:
            if not os.path.isdir(path) or path in found:
                continue
            # Never show a secret through a toolchain directory that holds it.
            if _under(distexec_home, path) or path in self.secrets:
                continue
            found.append(path)
        return tuple(sorted(found))

    def _extra_procs(self) -> int:
        return BWRAP_PROCS

    def _describe_cleanup(self) -> str:
        return "every process of a job is killed at its end (PID namespace)"

    def _nproc_rlimit(self) -> bool:
        # Without a pids cgroup: per real uid, each job's own (uids.py) unless all were taken.
        return not (self.cgroups and self.cgroups.pids)

    def kill(self, spawn: Spawn, pid: int) -> None:
        # Killing bwrap itself would orphan the namespace's init, left a zombie
        # until the system's init reaps it.  Killing the init ends the whole
        # namespace (the kernel kills the rest) and bwrap, having reaped it,
        # exits by itself for the runner to reap.
        inner = _children(pid)
        if not inner:
            kill_group(pid)  # not started yet: nothing to orphan
        for child in inner:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _prepare(self, workdir: str) -> None:
        """Hand the job's directory to the job's uid.

        Only what the slave wrote there is chowned (root-owned, single link,
        never through a symlink): an earlier step ran as the job's uid and may
        have planted links to system files.
        """
        if os.getuid() != 0:
            return
        for root, dirs, files in os.walk(workdir):
            paths = [os.path.join(root, n) for n in dirs + files]
            if root == workdir:
                paths.insert(0, root)
            for path in paths:
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    continue
                if st.st_uid == 0 and not stat.S_ISLNK(st.st_mode) \
                        and (stat.S_ISDIR(st.st_mode) or st.st_nlink == 1):
                    os.chown(path, self.uid, self.gid, follow_symlinks=False)

    def _wrap(self, argv: list[str], workdir: str, limits: Limits, cgroup: "JobCgroup | None",
              tmpdirs: dict[str, str]) -> tuple[list[str], Callable[[], None]]:
        self._prepare(workdir)
        workdir = os.path.realpath(workdir)
        size = str(limits.memory_bytes)
        # (destination, bwrap arguments), applied in this order: hiding tmpfs
        # first, then what is shown again inside them, the job's directory last.
        args = [self.bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", *self.accounts]
        # The first word on a path wins: /tmp stays sticky and world-writable
        # when it is also the parent of the job directories.
        tmpfs = {"/tmp": "1777", "/dev/shm": "1777"}
        tmpfs.setdefault(_hiding_root(os.path.dirname(workdir)), "0755")
        for d in self.secrets:
            if os.path.isdir(d):
                tmpfs.setdefault(d, "0755")
        # Every job's memory use is in the cgroup tree: hidden (see _own_cgroups).
        tmpfs[CGROUP_ROOT] = "0755"
        hiding, mounted = self._hiding(tmpfs, tmpdirs, size)
        args += hiding + self._own_cgroups(cgroup)
        made: set[str] = set()
        args += self._shown(mounted, made, [("--bind", workdir)])
        args += ["--chdir", workdir, "--unshare-pid", "--unshare-ipc", "--unshare-uts",
                 "--die-with-parent", "--new-session"]
        if not limits.allow_network:
            args.append("--unshare-net")
        view = _view(mounted, args)
        # The job's tmpfs (its directory, /tmp and /dev/shm): brought into the step's mount table.
        own = os.path.commonpath([workdir, *tmpdirs.values()]) if tmpdirs else None
        args += ["--", self.setpriv, f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups",
                 "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]
        return args + list(argv), SPACES.entry(view, own)

    def zygote_command(self, command: list[str], jobroot: str, cgroup_dirs: list[str],
                       limits: Limits) -> tuple[list[str], Callable[[], None]]:
        """bwrap around the warm pool's parent (slave/warm_zygote.py), started once, and what its
        process does before it execs bwrap (``mountview.Spaces.entry``).

        The same read-only system with the same paths hidden as a step's, but
        the parent stays root with only the capabilities it needs to isolate
        each child (mounts, the uid switch, killing a job): no other
        capability, and the other jobs' directories and the slave's secrets
        are not there to reach.  /run is a tmpfs of its own: each child mounts
        its tmpfs at ``/run/distexec`` (out of the way of /tmp and /var/tmp,
        which it covers).  The pool's cgroups are bound writable, to be joined.
        """
        args = [self.bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", *self.accounts]
        tmpfs = {"/tmp": "1777", "/dev/shm": "1777", "/run": "0755"}
        tmpfs.setdefault(_hiding_root(os.path.realpath(jobroot)), "0755")
        for d in self.secrets:
            if os.path.isdir(d):
                tmpfs.setdefault(d, "0755")
        tmpfs[CGROUP_ROOT] = "0755"
        hiding, mounted = self._hiding(tmpfs, {}, str(1 << 20))
        args += hiding + ["--perms", "1777", "--dir", "/run/lock", "--perms", "0755", "--dir", WARM_ROOT]
        made: set[str] = {"/run/lock", WARM_ROOT}
        if limits.allow_network and os.path.isdir("/run/systemd/resolve"):
            # /etc/resolv.conf may point there.
            args += self._parents("/run/systemd/resolve", mounted, made)
            args += ["--ro-bind", "/run/systemd/resolve", "/run/systemd/resolve"]
        args += self._shown(mounted, made, [("--bind", d) for d in cgroup_dirs])
        args += ["--chdir", "/", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--die-with-parent",
                 "--new-session", "--cap-drop", "ALL"]
        for cap in ZYGOTE_CAPS:
            args += ["--cap-add", cap]
        if not limits.allow_network:
            args.append("--unshare-net")
        # Private from the start: the jobs mounted on the host later never reach the parent, so
        # neither the children it forks (each copies its table).
        return args + ["--"] + list(command), SPACES.entry(_view(mounted, args), None)

    @staticmethod
    def _hiding(tmpfs: dict[str, str], tmpdirs: dict[str, str], size: str) -> tuple[list[str], list[str]]:
        """bwrap arguments for the tmpfs mounts that hide paths (destination -> mode), outermost
        first; a destination in ``tmpdirs`` is bound to that host directory instead.
        Returns the arguments and the paths now hidden."""
        args: list[str] = []
        mounted: list[str] = []
        for dest, perms in sorted(tmpfs.items(), key=lambda t: (len(t[0]), t[0])):
            if any(_under(dest, m) for m in mounted):
                continue  # already hidden by a parent
            if dest in tmpdirs:
                # The job's own, on its disk quota: empty, sticky, shared by its steps.
                args += ["--bind", tmpdirs[dest], dest]
            else:
                args += ["--perms", perms, "--size", size, "--tmpfs", dest]
            mounted.append(dest)
        return args, mounted

    def _shown(self, mounted: list[str], made: set[str], binds: list[tuple[str, str]]) -> list[str]:
        """The toolchains shown again (read-only) inside what is hidden, then ``binds``
        ((bwrap option, path) bound at its own path), with the directories above them."""
        args: list[str] = []
        extra = [path for _, path in binds]
        for src in list(self.expose) + extra:
            if src not in extra and any(_under(src, m) for m in self.expose if m != src):
                continue
            args += self._parents(src, mounted, made)
            option = dict((path, opt) for opt, path in binds).get(src, "--ro-bind")
            args += [option, src, src]
        return args

    @staticmethod
    def _own_cgroups(cgroup: "JobCgroup | None") -> list[str]:
        """The step's own cgroups, read-only, at their own paths in an otherwise empty /sys/fs/cgroup.

        The tree shows every job's memory use, so it is hidden; a JVM sizes
        its heap from the cgroup named in /proc/self/cgroup, looked up under
        the hierarchy's mount point: that one directory is shown again.
        """
        args: list[str] = []
        made: set[str] = set()
        for path in cgroup.dirs() if cgroup else ():
            if not _under(path, CGROUP_ROOT):
                continue
            args += BwrapSandbox._parents(path, [CGROUP_ROOT], made)
            args += ["--ro-bind", path, path]
        return args

    @staticmethod
    def _parents(dest: str, tmpfs: list[str], made: set[str]) -> list[str]:
        # bwrap makes missing mount points with mode 0700: inside a tmpfs the
        # job's uid could not walk through them, so make them 0755 first.
        out = []
        for top in tmpfs:
            if _under(dest, top) and dest != top:
                parts = os.path.relpath(os.path.dirname(dest), top).split(os.sep)
                path = top
                for part in parts:
                    if part in ("", "."):
                        continue
                    path = os.path.join(path, part)
                    if path not in made:
                        made.add(path)
                        out += ["--perms", "0755", "--dir", path]
        return out

    def probe(self, limits: Limits) -> str | None:
        """Run ``id -u`` through the sandbox once; None if it works, else why not."""
        why = mountview.supported()
        if why is not None:
            return f"a job's directory cannot be brought into its sandbox: {why}"
        workdir = tempfile.mkdtemp(prefix="distexec-probe-")
        spawn = None
        try:
            spawn = self.command(["id", "-u"], workdir, {}, limits, timeout=10)
            done = subprocess.run(spawn.argv, cwd=spawn.cwd, env=spawn.env, preexec_fn=spawn.preexec,
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=20,
                                  start_new_session=True)
        except (OSError, subprocess.SubprocessError) as exc:
            return f"{self.bwrap} could not be run: {exc}"
        finally:
            if spawn is not None:
                self.cleanup(spawn)
            shutil.rmtree(workdir, ignore_errors=True)
        if done.returncode != 0 or done.stdout.strip() != str(self.uid):
            err = (done.stderr.strip() or done.stdout.strip()).splitlines()
            return f"{self.bwrap} failed (exit {done.returncode}): {err[-1] if err else 'no message'}"
        return None


def best_sandbox(limits: Limits, mode: str = "auto") -> Sandbox:
    """The strongest sandbox this machine offers, probed once.

    ``mode`` is the slave's ``--sandbox``: ``auto`` falls back to no
    isolation (and says so), ``bwrap`` raises ValueError instead, ``none``
    does not try bubblewrap (cgroups and the system-call filter still apply).
    """
    box, check = sandbox_to_check(limits, mode)
    return box if check is None else check()


def sandbox_to_check(limits: Limits, mode: str = "auto") -> tuple[Sandbox, Callable[[], Sandbox] | None]:
    """``best_sandbox`` in two steps: the sandbox to use if it works, and the check that
    probes it (None: nothing to probe), which returns it or the fallback (or raises
    ValueError, see ``best_sandbox``).  The slave probes while it does other work."""
    try:
        cgroups = Cgroups()
    except OSError as exc:
        log.warning("cgroups unusable: %s", exc)
        cgroups = None
    for ctrl, why in (cgroups.missing.items() if cgroups else ()):
        log.warning("no %s cgroup for jobs: %s", ctrl, why)
    no_seccomp = seccomp_available()
    if no_seccomp:
        log.warning("no system-call filter for jobs: %s", no_seccomp)
    missing = [tool for tool in ("bwrap", "setpriv") if shutil.which(tool) is None]
    if mode == "none":
        why = "--sandbox none"
    elif missing:
        why = f"{' and '.join(missing)} not found: install bubblewrap and util-linux"
    elif os.getuid() != 0:
        why = "the slave is not root: bubblewrap cannot switch jobs to another uid"
    else:
        # The slave's own Python environment: session kernels run in it, and a
        # checkout or virtualenv under /tmp would otherwise vanish behind the job's private /tmp.
        box = BwrapSandbox(cgroups, limits=limits, seccomp=no_seccomp is None, expose=(sys.prefix,))
        box.why_no_seccomp = no_seccomp

        def check() -> Sandbox:
            why = box.probe(limits)
            return box if why is None else _fallback(cgroups, limits, mode, why, no_seccomp)
        return box, check
    return _fallback(cgroups, limits, mode, why, no_seccomp), None


def _fallback(cgroups, limits: Limits, mode: str, why: str, no_seccomp: str | None) -> Sandbox:
    if mode == "bwrap":
        raise ValueError(f"--sandbox bwrap: bubblewrap cannot isolate jobs here: {why}")
    log.warning("no sandbox: %s", why)
    box = Sandbox(cgroups, why_not=why, limits=limits, seccomp=no_seccomp is None)
    box.why_no_seccomp = no_seccomp
    return box
