"""One warm job's process, forked by the warm pool's parent (slave/warm_zygote.py).

The slave runs the two files as one program, this one first (slave/warm_pool.py):
``python3 -u - FD`` with the program on stdin, so a job sees the same ``sys.path`` as a
fresh ``python3 main.py``.  Standard library only, and little of it
(no json, pickle or socket.py: marshal and _socket are built in): every MiB the
parent touches makes each fork dearer.

Each child is forked ahead, for a slot (while the slot's job runs, or
once it has ended), and isolates itself before any job is given to it: a new
session; the memory+pids cgroup of the slot's next job (a slot has two, used
in turns, so the running job's holds none of it); its own mount and IPC
namespaces; a tmpfs of the disk limit holding its directory, /tmp, /var/tmp,
/dev/shm and /run/lock; the cgroup tree hidden; then it rehearses the job's
path once (_rehearse), so that its page copies are made before the job comes.
It stays root while it waits, so that the slot's running job (same uid as
the next one) can neither signal nor trace it.  Given its job, it takes the
slot's own uid (so concurrent jobs cannot signal or trace each other),
no_new_privs, rlimits and the seccomp program the slave built; makes
and enters its 0700 directory, writes the job's files and runs the job:
Python source in a fresh ``__main__``, anything else as its own child (spawned).
It says the job ended on a pipe just before its process exits (``_done``).
"""
import array
import atexit  # every job's end runs its handlers: imported once by the parent, not in each child
import ctypes
import fcntl
import marshal
import os
import resource
import signal
import struct
import _socket as socket  # not socket.py: it imports enum and selectors
import sys

_LIBC = ctypes.CDLL(None, use_errno=True)
# Looked up here, once: a lookup in a child would build them again in every child.
_MOUNT, _UNSHARE, _PRCTL, _SETNS = _LIBC.mount, _LIBC.unshare, _LIBC.prctl, _LIBC.setns
_CLONE_NEWNS, _CLONE_NEWIPC, _CLONE_NEWNET = 0x00020000, 0x08000000, 0x40000000
_SIOCSIFFLAGS, _IFF_UP, _IFF_LOOPBACK, _IFF_RUNNING = 0x8914, 0x1, 0x8, 0x40
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_BIND, _MS_REC, _MS_PRIVATE = 2, 4, 8, 4096, 0x4000, 1 << 18
_PR_SET_PDEATHSIG, _PR_SET_SECCOMP, _PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS = 1, 22, 36, 38
_FDS = 4  # spec, stdin, stdout, stderr
_PR_CAPBSET_DROP, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 24, 47, 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _drop_spare_capabilities():
    """Once, in the parent: no capability any process of a job could gain by exec (an empty
    bounding set, none inheritable or ambient; bwrap's --cap-add set them).  The parent keeps
    what it has (to mount, to take a slot's uid); a child loses all of it with its uid."""
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        _check(_PRCTL(_PR_CAPBSET_DROP, cap, 0, 0, 0), "PR_CAPBSET_DROP")
    _check(_PRCTL(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "PR_CAP_AMBIENT_CLEAR_ALL")
    header, data = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0), (_CapData * 2)()
    _check(_LIBC.capget(ctypes.byref(header), data), "capget")
    data[0].inheritable = data[1].inheritable = 0
    _check(_LIBC.capset(ctypes.byref(header), data), "capset")


def _mount(src, target, fstype, flags, data=None):
    _check(_MOUNT(src and src.encode(), target.encode(), fstype and fstype.encode(), flags,
                       data and data.encode()), f"mount {target}")


class Child:
    """One job's process: isolates itself for its slot, waits for the job, runs it; never returns."""

    def __init__(self, zygote, slot, status):
        self.zygote, self.slot, self.status = zygote, slot, status

    def start(self):
        stage = "isolate"
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            self.isolate(self.slot)
            _rehearse()
            stage = "wait"
            data, anc, _, _ = self.status.recvmsg(64, socket.CMSG_SPACE(_FDS * 4))
            fds = _fds_of(anc)
            if data != b"job" or len(fds) != _FDS:
                os._exit(0)  # no job after all: the parent is going
            stage = "job"
            self.become(self.slot)
            spec = marshal.loads(_read_all(fds[0]))
            self.setup(spec, fds[1:])
            stage = "files"
            work = self.write_files(spec)
            stage = "job"
            self.enter(spec)
        except BaseException as exc:  # nothing of the job ran: say why, for the slave's log
            if stage == "wait":
                os._exit(0)
            try:
                tb = exc.__traceback__
                while tb.tb_next is not None:
                    tb = tb.tb_next
                why = f"{exc!r} (warm_zygote.py line {tb.tb_lineno})"
                self.status.send(b"E" + (b"D" if stage == "files" else b"-") + why.encode()[:2000])
            finally:
                os._exit(126)
        if spec["mode"] == "python":
            run_python(spec, work, self.done)
        run_program(spec, self.done)

    def isolate(self, slot):
        """What does not depend on the job: done before it comes."""
        pid = str(os.getpid()).encode()
        # First: every process of the job is born inside.  The next job's cgroup, not the running job's
        # (a slot has two, used in turns): a join can wait out an RCU grace period, milliseconds, so it is
        # done here, ahead, where no job waits for it.
        for path in slot["cgroups"]:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, pid)
            finally:
                os.close(fd)
        os.setsid()
        # Its slot's network namespace (without network: only a loopback), which no job running beside
        # it shares.  Shared by the whole pool, one job's loopback server (a notebook's, a test's) was
        # open to every other user's job, and /proc/net listed it for them.  Made once per slot by the
        # parent (warm_zygote.py), joined here: made per job, it cost a third of the pool's throughput.
        if slot.get("netns") is not None:
            _check(_SETNS(slot["netns"], _CLONE_NEWNET), "setns")
        _check(_UNSHARE(_CLONE_NEWNS | _CLONE_NEWIPC), "unshare")
        # Held by the parent (in flight on the status socket until it reaps this child), so that tearing
        # them down is not part of this process's exit: a mount namespace's end waits out an RCU grace
        # period, milliseconds between the job's end and its parent hearing of it (measured: exit to
        # reaped p50 1.1-1.6 -> 0.65-0.8 ms, p90 4-5 -> 1-2.3 ms, 60 mounts).
        ns = [os.open(f"/proc/self/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC) for kind in ("mnt", "ipc")]
        # With them, the read end of the pipe a Python job's process says "done" on (run_python).
        done_r, self.done_w = os.pipe2(os.O_CLOEXEC)
        self.status.sendmsg([b"ns"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", ns + [done_r]))])
        for fd in ns + [done_r]:
            os.close(fd)
        _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
        root, size, uid, gid = self.zygote.root, slot["disk_bytes"], slot["uid"], slot["gid"]
        # The job's tmpfs, all of it the job uid's: root here has no CAP_DAC_OVERRIDE or CAP_CHOWN,
        # so the folders are made as that uid (seteuid), mounted over as root.
        _mount("tmpfs", root, "tmpfs", _MS_NOSUID | _MS_NODEV,
               f"size={size},nr_inodes={slot['inodes']},mode=0755,uid={uid},gid={gid}")
        os.umask(0)
        os.setegid(gid)
        os.seteuid(uid)
        shared = [("tmp", "/tmp"), ("vartmp", "/var/tmp"), ("shm", "/dev/shm"), ("lock", "/run/lock")]
        for name, _ in shared:
            os.mkdir(f"{root}/{name}", 0o1777)
        os.seteuid(0)
        os.setegid(0)
        for name, target in shared:
            _mount(f"{root}/{name}", target, None, _MS_BIND)
        # Hide every job's cgroups (memory use of the others): a tmpfs over the tree.
        _mount("tmpfs", "/sys/fs/cgroup", "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "size=4k,mode=0755")
        self.keep = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        # Nothing of the parent stays open: its socket, the other children's status sockets.
        # Detached first, so no finalizer closes a number the job reuses.
        self.zygote.sock.detach()
        for other in [job.status for job in self.zygote.jobs.values()] + [st for _, st in self.zygote.spares.values()]:
            other.detach()
        _close_all_but((self.status.fileno(), self.keep, self.done_w))
        # Ahead too (attaching compiles it, ~0.1 ms): root with CAP_SYS_ADMIN needs no no_new_privs for
        # it, and what is left to do before the job (setresuid, mkdir, setrlimit...) is nothing it refuses.
        if self.zygote._fprog.len:
            _check(_PRCTL(_PR_SET_SECCOMP, 2, ctypes.byref(self.zygote._fprog), 0, 0), "seccomp")

    def become(self, slot):
        """The job's own uid, taken only now: while it waits, the slot's running job has that uid."""
        uid, gid = slot["uid"], slot["gid"]
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        _check(_PRCTL(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")

    def setup(self, spec, stdio):
        """What the job brings: its directory (0700, made as its uid), rlimits, stdio."""
        self.work = f"{self.zygote.root}/{spec['dirname']}"
        os.mkdir(self.work, 0o700)
        for which, soft, hard in spec["rlimits"]:
            resource.setrlimit(which, (soft, hard))  # only ever lowered: no privilege needed
        for i, fd in enumerate(stdio):
            os.dup2(fd, i)
            os.close(fd)
        os.chdir(self.work)

    def write_files(self, spec):
        # A fresh tmpfs that nothing else has written: no link can be there yet.
        for name, data in spec["files"].items():
            path = os.path.normpath(os.path.join(self.work, name))
            if not path.startswith(self.work + "/"):
                raise ValueError(f"bad file name {name!r}")
            if "/" in path[len(self.work) + 1:]:  # makedirs' failed mkdir of an existing folder is dear
                os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, spec["modes"].get(name, 0o644))
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
        return self.work

    def enter(self, spec):
        os.umask(0o022)
        if spec["mode"] == "python":  # execve is given the environment; Python's must be the job's
            _set_environ(spec["env"])
        # The slave reads the tmpfs's free space through this once the job has ended (disk_limit).
        self.status.sendmsg([b"ok"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [self.keep]))])
        self.status.close()
        os.close(self.keep)
        st = os.fstat(self.done_w)
        self.done = (self.done_w, st.st_dev, st.st_ino, os.getpid())


def _loopback_up():
    """``ip link set lo up`` in this process's (new) network namespace, as bwrap does for a fresh job's."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        fcntl.ioctl(sock.fileno(), _SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", _IFF_UP | _IFF_LOOPBACK | _IFF_RUNNING))
    finally:
        sock.close()


def _rehearse():
    """The job's path once without a job (our code only, in a module of its own), while this child
    waits for one: the pages that path writes, shared with the parent since the fork, are copied now
    rather than while a job waits (about 0.45 ms of a warm job's 2.8 at rest, docs/performance.md)."""
    try:
        spec = marshal.loads(marshal.dumps({"mode": "python", "source": "pass", "files": {"main.py": b"pass"},
                                            "env": dict(os.environ), "rlimits": [(0, 1, 1)], "args": []}))
        main = type(sys)("__main__")
        main.__builtins__ = __builtins__
        code = compile(spec["source"], "main.py", "exec")  # two steps: warm_timeline.py stamps the job's one
        exec(code, main.__dict__)
        path = os.path.normpath(os.path.join("/", *spec["files"]))
        path.startswith(os.path.dirname(path) + "/")
        memoryview(spec["files"]["main.py"])
        resource.getrlimit(resource.RLIMIT_NOFILE)
        array.array("i", [0]).frombytes(b"")
        os.fstat(0)
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:  # a rehearsal, never a reason to lose the child
        pass


def _fds_of(anc):
    fds = array.array("i")
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return list(fds)


def _set_environ(env):
    """os.environ = env, changing only what differs: this parent's and a job's differ in a few keys,
    and every change is a Python-level call with a putenv."""
    for key in [key for key in os.environ if key not in env]:
        del os.environ[key]
    for key, value in env.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


def _read_all(fd):
    size = os.fstat(fd).st_size
    data = os.pread(fd, size, 0)
    os.close(fd)
    return data


def _close_all_but(keep):
    low = 3
    for fd in sorted(keep):
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, 65536)


def run_python(spec, work, done):
    """What ``python3 -u main.py ARGS`` does, in this fresh process: never returns."""
    path = os.path.join(work, spec["source_name"])
    main = type(sys)("__main__")
    main.__file__ = path
    main.__cached__ = None
    main.__builtins__ = __builtins__
    sys.modules["__main__"] = main
    sys.argv = [spec["source_name"]] + list(spec["args"])
    sys.orig_argv = sys.orig_argv[:2] + sys.argv  # [python3, -u, main.py, ARGS], not the parent's
    sys.path[0] = work
    if "random" in sys.modules:  # never the same sequence in two jobs
        sys.modules["random"].seed()
    if "numpy.random" in sys.modules:  # numpy's global generator too (--warm-imports numpy, pandas...)
        sys.modules["numpy.random"].seed()
    code = 0
    try:
        exec(compile(spec["source"], path, "exec"), main.__dict__)
    except SystemExit as exc:
        code = _exit_code(exc)
    except BaseException:
        kind, value, tb = sys.exc_info()
        tb = tb.tb_next if tb is not None else None  # without this frame
        sys.excepthook(kind, value.with_traceback(tb), tb)
        code = 1
    try:
        if "threading" in sys.modules:
            sys.modules["threading"]._shutdown()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except SystemExit as exc:
        code = _exit_code(exc)
    except BaseException:
        code = code or 120
    if os.getpid() == done[3]:  # not a process the job forked that ran on to the end of its code
        _done(done, code)
    os._exit(code)


def _done(done, code):
    """Say the job's end to the parent now: this process's exit (its memory's teardown) takes a
    millisecond or more, and the job's result need not wait for it.  Its output ends here too."""
    try:
        os.close(1)
        os.close(2)
    except OSError:
        pass
    fd, dev, ino, _ = done
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) == (dev, ino):  # not a file the job opened under that number
            os.set_blocking(fd, False)  # a job that filled it has only itself to blame: never wait
            os.write(fd, b"done %d" % code)
    except OSError:
        pass  # the job closed it: its end is heard when it is reaped


def run_program(spec, done):
    """Run the job's program as this process's own child and say its end: never returns.

    Spawned (a vfork: this interpreter's memory is neither copied for it nor torn down before it
    starts, as an execve here would do), the program starts sooner, and its end is told before this
    process's exit frees that memory.  This process ignores the signals a job may send its own
    process group: they are the program's to take."""
    # Ignored before the spawn (a program may signal its group at once), and back to their defaults in
    # the program, as an execve from here gave it (Python ignores SIGPIPE and SIGXFSZ; a program must not).
    for sig in _IGNORABLE:
        signal.signal(sig, signal.SIG_IGN)
    try:
        pid = os.posix_spawn(spec["argv"][0], spec["argv"], spec["env"], setsigdef=_IGNORABLE)
    except OSError as exc:
        os.write(2, f"distexec: cannot run {spec['argv'][0]}: {exc.strerror}\n".encode())
        _done(done, 127)
        os._exit(127)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    if os.WIFSIGNALED(status):  # ended the same way, for the parent to see when it reaps this process
        sig = os.WTERMSIG(status)
        if sig in _IGNORABLE:
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)  # a signal whose default is not to end (none of the program's could be)
    code = os.waitstatus_to_exitcode(status)
    _done(done, code)
    os._exit(code)


# What the process waiting for a program ignores (SIGCHLD: its wait needs it).
_IGNORABLE = [sig for sig in signal.Signals if sig not in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD)]


def _exit_code(exc):
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code & 0xFF
    print(exc.code, file=sys.stderr)
    return 1
