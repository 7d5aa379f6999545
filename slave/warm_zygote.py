"""The warm pool's parent (a "zygote"): started once per slave inside bubblewrap,
it never runs user code and forks one fresh child per job (slave/warm_child.py).

Run by the slave (slave/warm_pool.py) after warm_child.py, as one program read from stdin:
``python3 -u - FD``, with the job's interpreter; the first message on FD is its CONFIG (a marshal
dump of {root, seccomp, imports, netns}).  Neither is on its command line, which ``ps`` shows
every admin of the slave (tens of KiB of source there made ``ps aux`` unreadable).  bwrap has already made
it root with only CAP_SYS_ADMIN, CAP_SETUID, CAP_SETGID, CAP_KILL and CAP_NET_ADMIN, in its own
PID, IPC, UTS and network namespaces, on a read-only system with the secrets hidden.

Protocol on FD (a SOCK_SEQPACKET socket, one message each):
  in (a marshal dump of a dict; the slave is trusted):
       {"op": "prepare", "slot": S, "spec": {uid, gid, cgroups, disk_bytes, inodes}}: fork a child for
       slot S now (unless one waits already), which isolates itself and waits for the slot's next job (the
       slave sends it once the slot's job has run a while, or has ended)
       {"op": "run", "id": N, "slot": S} with SCM_RIGHTS [spec (memfd, a marshal dump), stdin, stdout, stderr]:
       hand the job to slot S's waiting child (forked now if there is none)
       {"op": "kill", "id": N}
  out (ASCII words, parsed by the slave without eval or unmarshal): "ready PID" once, or "error WHY"
       (before it, "refused MODULE WHY" for each of the modules to import that failed);
       "exit N CODE|- BYTES,INODES,FREE_INODES|- DISK(0|1) WHY-IT-COULD-NOT-START(or empty)": the job has
       ended (a Python job says so itself, just before its process exits; anything else, when it is reaped);
       "gone N": its process has been reaped, after its "exit" (the slot's cgroup can be checked then)
EOF on FD: the slave is gone; the zygote exits and bwrap's PID namespace takes every job with it.
"""
import gc
import os
import select
import signal
import sys

if "Child" not in globals():  # read on its own (a linter, a test), not after warm_child.py as the slave runs it
    from slave.warm_child import (_CLONE_NEWNET, _FDS, _MS_NODEV, _MS_NOEXEC, _MS_NOSUID,  # noqa: F401
                                  _PR_SET_CHILD_SUBREAPER, _PRCTL, _SETNS, _UNSHARE, Child, _SockFprog, _check,
                                  _drop_spare_capabilities, _fds_of, _loopback_up, _mount, array, ctypes, marshal,
                                  socket)


class Zygote:
    def __init__(self, fd):
        self.sock = socket.socket(fileno=fd)
        config = marshal.loads(self.sock.recv(1 << 20))  # sent before this process started
        self.root = config["root"]  # where each child mounts its tmpfs
        program = bytes.fromhex(config["seccomp"]) if config.get("seccomp") else b""
        self._filter = ctypes.create_string_buffer(program, len(program) or 1)
        self._fprog = _SockFprog(len(program) // 8, ctypes.cast(self._filter, ctypes.c_void_p))
        self.jobs = {}  # pid -> _Job
        self.by_id = {}  # job id -> pid
        self.watched = {}  # fd -> pid: a running job's status socket, until its EOF; a Python job's "done" pipe
        self.slots = {}  # slot -> what its children need before their job (uid, cgroups, disk)
        self.spares = {}  # slot -> (pid, status socket): a child isolated ahead, waiting for its job
        self.imports = config.get("imports") or []  # modules every Python job finds imported (--warm-imports)
        self.netns = config.get("netns", False)  # a network namespace per slot (no network)
        self.nets = {}  # slot -> a descriptor of its network namespace, made once

    def setup(self):
        # Orphans of a job (a daemon it left) come to us, not to bwrap's init: reaped here.
        _check(_PRCTL(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "PR_SET_CHILD_SUBREAPER")
        # Mounted once: a job's uid sees only its own processes.
        _mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "hidepid=2")
        _drop_spare_capabilities()
        os.makedirs(self.root, 0o755, exist_ok=True)
        # The parser's and the AST types' first use is dear; paid here once, not in every child.
        compile("pass", "<warm>", "exec")
        self.refused = _preload(self.imports)
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
        for name, why in self.refused:
            self.send("refused", name, why)
        self.send("ready", os.getpid())
        while True:
            try:
                readable, _, _ = select.select([self.sock, self.wake_r, *self.watched], [], [])
            except InterruptedError:
                continue
            for fd in readable:
                job = self.jobs.get(self.watched.get(fd))
                if job is not None:
                    self.hear(job)
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
            if self.netns:
                msg["spec"]["netns"] = self.net_of(msg["slot"])
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

    def net_of(self, slot):
        """The slot's own network namespace (a loopback only): made once, by stepping into a new one
        and back.  Its jobs run one after another, each killed whole before the next, so what one
        leaves there (nothing: only its sockets, closed with it) meets no other user's job."""
        if slot not in self.nets:
            home = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                _check(_UNSHARE(_CLONE_NEWNET), "unshare")
                _loopback_up()
                self.nets[slot] = os.open("/proc/self/ns/net", os.O_RDONLY)
            finally:
                _check(_SETNS(home, _CLONE_NEWNET), "setns")
                os.close(home)
        return self.nets[slot]

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
            self.send("gone", job_id)
            return
        status.setblocking(False)
        self.jobs[pid] = job = _Job(job_id, status)
        self.by_id[job_id] = pid
        self.watched[status.fileno()] = pid
        self.hear(job)  # "ns" (sent while it waited) brings its "done" pipe

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
            del self.by_id[job.id]
            self.hear(job)
            self.unwatch(job.status.fileno())
            job.status.close()
            if job.done_r is not None:
                self.unwatch(job.done_r)
                os.close(job.done_r)
            if not job.told:
                if job.error is None and not job.started:
                    job.error = "the job's process ended before it started"
                self.tell(job, os.waitstatus_to_exitcode(wstatus))
            self.send("gone", job.id)
            for fd in job.held:  # the job's namespaces end here, its end told already
                os.close(fd)

    def unwatch(self, fd):
        self.watched.pop(fd, None)

    def hear(self, job):
        """What the child said on its status socket, written by our code before any of the job's (the
        child closes it before the job runs): "ns" (isolated; with its namespaces and its "done" pipe),
        then "ok" (the job starts) or "E..." (it could not).  Then a Python job's "done CODE" on that pipe,
        just before its process exits: the job can write there too, so only one read is made, and only a
        plain exit code taken from it (what a job says of its own exit code, it could have made true)."""
        while job.status.fileno() in self.watched:
            try:
                data, anc, _, _ = job.status.recvmsg(4096, socket.CMSG_SPACE(3 * 4))
            except OSError:
                break  # nothing more now
            fds = _fds_of(anc)
            if not data:
                self.unwatch(job.status.fileno())  # its end closed (the job runs) or it is gone
            elif data == b"ns" and len(fds) == 3 and not job.held:
                job.held, job.done_r = fds[:2], fds[2]
                os.set_blocking(job.done_r, False)
                self.watched[job.done_r] = self.by_id.get(job.id)
                continue
            elif data == b"ok":
                job.started = True
                job.tmpfs, fds = (fds[0], fds[1:]) if fds else (None, [])
            elif data.startswith(b"E"):
                job.disk, job.error = data[1:2] == b"D", data[2:].decode(errors="replace")
            for fd in fds:
                os.close(fd)
        if job.done_r is not None and job.done_r in self.watched:
            try:
                data = os.read(job.done_r, 16)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            self.unwatch(job.done_r)
            word, _, code = data.partition(b" ")
            if word == b"done" and code.isdigit() and len(code) <= 3 and job.started and not job.told:
                self.tell(job, int(code) & 0xFF)

    def tell(self, job, code):
        """The job's end, to the slave: once, whichever of "done" and the reaping comes first."""
        job.told = True
        free = None
        if job.tmpfs is not None:
            try:
                st = os.fstatvfs(job.tmpfs)  # the job's tmpfs, kept alive by this descriptor
                free = [st.f_bavail * st.f_frsize, st.f_files, st.f_favail]
            finally:
                os.close(job.tmpfs)
                job.tmpfs = None
        self.send("exit", job.id, code, ",".join(map(str, free)) if free else "-", int(job.disk), job.error or "")


def _preload(names):
    """Import ``names`` once for every job: each child has them in sys.modules from its start, their
    pages shared copy-on-write with this process and its other children, so what a job changes in one
    reaches no other job.  Returns [(name, why)] for those that failed (the rest are served); raises
    OSError if they started a thread, which a fork would not copy into the children."""
    refused = []
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if p]  # not this process's current directory, whatever it holds
    try:
        for name in names:
            try:
                __import__(name)
            except BaseException as exc:  # not there, or broken: the pool serves without it
                refused.append((name, f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300]))
    finally:
        sys.path[:] = saved
    threads = len(os.listdir("/proc/self/task"))
    if threads > 1:
        raise OSError(f"importing {', '.join(names)} started {threads - 1} thread(s), which no child would have")
    return refused


class _Job:
    """A child given its job, as its parent follows it."""

    def __init__(self, job_id, status):
        self.id, self.status = job_id, status
        self.held = []  # its mount and IPC namespaces, closed once it is reaped
        self.done_r = None  # the pipe a Python job's process says "done" on
        self.tmpfs = None  # its tmpfs (a descriptor), measured at its end
        self.started = self.told = self.disk = False
        self.error = None


def main():
    zygote = Zygote(int(sys.argv[1]))
    try:
        zygote.setup()
    except OSError as exc:
        zygote.send("error", f"the warm pool's parent could not start: {exc}")
        return 1
    zygote.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
