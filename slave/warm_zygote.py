"""The warm pool's parent (a "zygote"): started once per slave inside bubblewrap,
it never runs user code and forks one fresh child per job.

Run by the slave (slave/warm_pool.py) as ``python3 -u -c <this file> FD CONFIG`` (CONFIG: a
marshal dump of {root, seccomp}, in hex)
with the job's interpreter, so a job sees the same ``sys.path`` as a fresh
``python3 main.py``.  Standard library only, and little of it (no json, pickle or
socket.py: marshal and _socket are built in): every MiB it touches makes each
fork dearer.  bwrap has already made it root with only
CAP_SYS_ADMIN, CAP_SETUID, CAP_SETGID and CAP_KILL, in its own PID, IPC, UTS
and network namespaces, on a read-only system with the secrets hidden.

Each child is forked ahead, for a slot (while the slot's job runs, or
once it has ended), and isolates itself before any job is given to it: a new
session; the memory+pids cgroup of the slot's next job (a slot has two, used
in turns, so the running job's holds none of it); its own mount and IPC
namespaces; a tmpfs of the disk limit holding its directory, /tmp, /var/tmp,
/dev/shm and /run/lock; the cgroup tree hidden.  It stays root while it
waits, so that the slot's running job (same uid as the next one) can neither
signal nor trace it.  Given its job, it takes the slot's own uid (so
concurrent jobs cannot signal or trace each other), no_new_privs, rlimits
and the seccomp program the slave built; makes
and enters its 0700 directory, writes the job's files and runs the job:
Python source in a fresh ``__main__``, anything else by execve.

Protocol on FD (a SOCK_SEQPACKET socket, one message each):
  in (a marshal dump of a dict; the slave is trusted):
       {"op": "prepare", "slot": S, "spec": {uid, gid, cgroups, disk_bytes, inodes}}: fork a child for
       slot S now (unless one waits already), which isolates itself and waits for the slot's next job (the
       slave sends it once the slot's job has run a while, or has ended)
       {"op": "run", "id": N, "slot": S} with SCM_RIGHTS [spec (memfd, a marshal dump), stdin, stdout, stderr]:
       hand the job to slot S's waiting child (forked now if there is none)
       {"op": "kill", "id": N}
  out (ASCII words, parsed by the slave without eval or unmarshal): "ready PID" once, or "error WHY";
       "exit N CODE|- BYTES,INODES,FREE_INODES|- DISK(0|1) WHY-IT-COULD-NOT-START(or empty)"
EOF on FD: the slave is gone; the zygote exits and bwrap's PID namespace takes every job with it.
"""
import array
import atexit  # every job's end runs its handlers: imported once here, not in each child
import ctypes
import gc
import marshal
import os
import resource
import select
import signal
import _socket as socket  # not socket.py: it imports enum and selectors
import sys

_LIBC = ctypes.CDLL(None, use_errno=True)
# Looked up here, once: a lookup in a child would build them again in every child.
_MOUNT, _UNSHARE, _PRCTL = _LIBC.mount, _LIBC.unshare, _LIBC.prctl
_CLONE_NEWNS, _CLONE_NEWIPC = 0x00020000, 0x08000000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_BIND, _MS_REC, _MS_PRIVATE = 2, 4, 8, 4096, 0x4000, 1 << 18
_PR_SET_PDEATHSIG, _PR_SET_SECCOMP, _PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS = 1, 22, 36, 38
_FDS = 4  # spec, stdin, stdout, stderr


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src, target, fstype, flags, data=None):
    _check(_MOUNT(src and src.encode(), target.encode(), fstype and fstype.encode(), flags,
                       data and data.encode()), f"mount {target}")


class Zygote:
    def __init__(self, fd, config):
        self.sock = socket.socket(fileno=fd)
        self.root = config["root"]  # where each child mounts its tmpfs
        program = bytes.fromhex(config["seccomp"]) if config.get("seccomp") else b""
        self._filter = ctypes.create_string_buffer(program, len(program) or 1)
        self._fprog = _SockFprog(len(program) // 8, ctypes.cast(self._filter, ctypes.c_void_p))
        self.jobs = {}  # pid -> (job id, status socket)
        self.by_id = {}  # job id -> pid
        self.slots = {}  # slot -> what its children need before their job (uid, cgroups, disk)
        self.spares = {}  # slot -> (pid, status socket): a child isolated ahead, waiting for its job

    def setup(self):
        # Orphans of a job (a daemon it left) come to us, not to bwrap's init: reaped here.
        _check(_PRCTL(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "PR_SET_CHILD_SUBREAPER")
        # Mounted once: a job's uid sees only its own processes.
        _mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "hidepid=2")
        os.makedirs(self.root, 0o755, exist_ok=True)
        # The parser's and the AST types' first use is dear; paid here once, not in every child.
        compile("pass", "<warm>", "exec")
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        # What is here now stays: the collector never walks (and so never copies) these pages in a child.
        gc.collect()
        gc.freeze()

    def send(self, *words):
        try:
            self.sock.send(" ".join(map(str, words)).encode())
        except OSError:
            pass  # the slave is gone: the next recv sees EOF

    def serve(self):
        self.send("ready", os.getpid())
        while True:
            try:
                readable, _, _ = select.select([self.sock, self.wake_r], [], [])
            except InterruptedError:
                continue
            if self.wake_r in readable:
                try:
                    while os.read(self.wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
                self.reap()
            if self.sock in readable and not self.request():
                return

    def request(self):
        try:
            data, anc, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(_FDS * 4))
        except InterruptedError:
            return True
        fds = _fds_of(anc)
        if not data:
            return False
        msg = marshal.loads(data)
        if msg["op"] == "run" and len(fds) == _FDS:
            self.run(msg["id"], msg["slot"], fds)
            return True
        for fd in fds:
            os.close(fd)
        if msg["op"] == "prepare":
            self.slots[msg["slot"]] = msg["spec"]
            if msg["slot"] not in self.spares:
                self.spare(msg["slot"])
        elif msg["op"] == "kill":
            pid = self.by_id.get(msg["id"])
            if pid is not None:
                for kill in (os.killpg, os.kill):
                    try:
                        kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
        return True

    def spare(self, slot):
        """Fork a child for ``slot`` that isolates itself now and waits for its job (latency)."""
        status, status_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = os.fork()
        except OSError:
            status.close()
            status_child.close()
            return None
        if pid == 0:
            try:
                status.close()
                Child(self, self.slots[slot], status_child).start()
            finally:
                os._exit(126)
        status_child.close()
        self.spares[slot] = (pid, status)
        return self.spares[slot]

    def run(self, job_id, slot, fds):
        spare = None
        for _ in range(2):  # the spare, or (should it have died waiting) a new child
            spare = self.spares.pop(slot, None) or self.spare(slot)
            self.spares.pop(slot, None)
            if spare is None:
                break
            pid, status = spare
            try:
                status.sendmsg([b"job"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                break
            except OSError:
                status.close()
                spare = None
        for fd in fds:
            os.close(fd)
        if spare is None:
            self.send("exit", job_id, "-", "-", 0, "no child could be forked")
            return
        status.setblocking(False)
        self.jobs[pid] = (job_id, status)
        self.by_id[job_id] = pid

    def reap(self):
        while True:
            try:
                pid, wstatus = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for slot, (spare, status) in list(self.spares.items()):
                if spare == pid:  # died before its job came (its slot's cgroup killed, say)
                    status.close()
                    del self.spares[slot]
            job = self.jobs.pop(pid, None)
            if job is None:
                continue  # an orphan of some job, reaped
            job_id, status = job
            del self.by_id[job_id]
            error, free, disk, started, held = None, None, False, False, []
            while True:  # "ns" (isolated), then "ok" (the job starts) or "E..." (it could not)
                try:
                    data, anc, _, _ = status.recvmsg(4096, socket.CMSG_SPACE(2 * 4))
                except OSError:
                    break
                if not data:
                    break
                fds = _fds_of(anc)
                if data == b"ns":
                    held += fds
                elif data == b"ok":
                    started = True
                    for fd in fds:
                        try:
                            st = os.fstatvfs(fd)  # the job's tmpfs, kept alive by this descriptor
                            free = [st.f_bavail * st.f_frsize, st.f_files, st.f_favail]
                        finally:
                            os.close(fd)
                else:
                    for fd in fds:
                        os.close(fd)
                    if data.startswith(b"E"):
                        disk, error = data[1:2] == b"D", data[2:].decode(errors="replace")
            status.close()
            if error is None and not started:
                error = "the job's process ended before it started"
            self.send("exit", job_id, os.waitstatus_to_exitcode(wstatus), ",".join(map(str, free)) if free else "-",
                      int(disk), error or "")
            for fd in held:  # the job's namespaces end here, its end told already
                os.close(fd)


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
            run_python(spec, work)
        for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)  # Python ignores these; an exec'd program must not
        try:
            os.execve(spec["argv"][0], spec["argv"], spec["env"])
        except OSError as exc:
            os.write(2, f"distexec: cannot run {spec['argv'][0]}: {exc.strerror}\n".encode())
        os._exit(127)

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
        _check(_UNSHARE(_CLONE_NEWNS | _CLONE_NEWIPC), "unshare")
        # Held by the parent (in flight on the status socket until it reaps this child), so that tearing
        # them down is not part of this process's exit: a mount namespace's end waits out an RCU grace
        # period, milliseconds between the job's end and its parent hearing of it (measured: exit to
        # reaped p50 1.1-1.6 -> 0.65-0.8 ms, p90 4-5 -> 1-2.3 ms, 60 mounts).
        ns = [os.open(f"/proc/self/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC) for kind in ("mnt", "ipc")]
        self.status.sendmsg([b"ns"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", ns))])
        for fd in ns:
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
        for _, other in list(self.zygote.jobs.values()) + list(self.zygote.spares.values()):
            other.detach()
        _close_all_but((self.status.fileno(), self.keep))
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


def run_python(spec, work):
    """What ``python3 -u main.py ARGS`` does, in this fresh process: never returns."""
    path = os.path.join(work, spec["source_name"])
    main = type(sys)("__main__")
    main.__file__ = path
    main.__cached__ = None
    main.__builtins__ = __builtins__
    sys.modules["__main__"] = main
    sys.argv = [spec["source_name"]] + list(spec["args"])
    sys.path[0] = work
    if "random" in sys.modules:  # never the same sequence in two jobs
        sys.modules["random"].seed()
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
    os._exit(code)


def _exit_code(exc):
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code & 0xFF
    print(exc.code, file=sys.stderr)
    return 1


def main():
    fd, config = int(sys.argv[1]), marshal.loads(bytes.fromhex(sys.argv[2]))
    zygote = Zygote(fd, config)
    try:
        zygote.setup()
    except OSError as exc:
        zygote.send("error", f"the warm pool's parent could not start: {exc}")
        return 1
    zygote.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
