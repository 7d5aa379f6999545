"""The slave's side of the warm pool's parent (slave/warm_zygote.py, slave/warm_child.py): start it in
bubblewrap, hand it jobs, hear how they end.

A SOCK_SEQPACKET socket pair connects the two: one message per request or
answer, a job's descriptors (its spec in a memfd, stdin, stdout, stderr)
passed with SCM_RIGHTS.  The socket has no name anywhere, and each child
closes its end before it runs anything of the job, so no job can reach it.
"""
from __future__ import annotations

import array
import asyncio
import logging
import marshal
import os
import socket
from dataclasses import dataclass

from distexec_kernel.procs import die_with_parent, write_all

log = logging.getLogger("distexec.slave.warm")

# The pool's parent: one program made of these files, in this order (the child's code, then the parent's).
SOURCES = [os.path.join(os.path.dirname(os.path.abspath(__file__)), name) for name in ("warm_child.py",
                                                                                         "warm_zygote.py")]
# The parent's interpreter flags: its program on stdin (``-``), then FD.  Also how its process is told
# apart from the jobs' (tests, benchmarks/warm.py).
PARENT_FLAGS = ["-u", "-"]
START_TIMEOUT = 30.0  # seconds for bwrap and the interpreter to say they are ready
STOP_GRACE = 5.0


class ZygoteDied(Exception):
    """The warm pool's parent is gone (or never answered): its jobs died with it."""


@dataclass
class Ended:
    """How one warm child ended, as its parent saw it."""

    exit_code: int | None  # as subprocess reports it: negative for a signal
    free: list | None  # the child's tmpfs at its end: [free bytes, inodes, free inodes]
    error: str | None  # why it could not start the job (nothing of the job ran)
    disk: bool  # ...because the job's files did not fit in its disk limit


class Zygote:
    """One running parent: ``start``, then ``run`` jobs; ``died`` says why it is gone."""

    def __init__(self, command_for, python: str, env: dict[str, str], config: dict):
        # command_for(command) -> the bwrap argv around the parent's command line, and what its
        # process does first (BwrapSandbox.zygote_command).
        self.command_for = command_for
        self.python = python
        self.env = env
        self.config = config
        self.proc: asyncio.subprocess.Process | None = None
        self.sock: socket.socket | None = None
        self.died: str | None = None
        self.pid: int | None = None  # the parent's pid inside its PID namespace
        self._pending: dict[int, asyncio.Future] = {}
        self._gone: dict[int, asyncio.Future] = {}
        self._ready: asyncio.Future | None = None
        self.refused: list[str] = []  # "MODULE WHY" for each module it was to import and could not
        self._next = 0

    async def start(self) -> None:
        """Start the parent and wait until it is ready; raises OSError saying why not."""
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # The program on stdin and its config as the first message: on the command line, both showed in
        # every `ps` of the slave (~40 KiB a parent).
        source = "\n".join(_read(path) for path in SOURCES).encode()
        command = [self.python, *PARENT_FLAGS, str(theirs.fileno())]
        argv, first = self.command_for(command)

        def before_exec() -> None:
            die_with_parent()
            first()

        try:
            ours.send(marshal.dumps(self.config))
            self.proc = await asyncio.create_subprocess_exec(
                *argv, pass_fds=[theirs.fileno()], env=self.env, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL, start_new_session=True, preexec_fn=before_exec)
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        self.proc.stdin.write(source)
        self.proc.stdin.close()  # its end: the interpreter reads to it, then runs the program
        ours.setblocking(False)
        self.sock = ours
        self._ready = loop.create_future()
        loop.add_reader(ours.fileno(), self._readable)
        self._watcher = watcher = asyncio.ensure_future(self._watch())
        try:
            hello = await asyncio.wait_for(asyncio.shield(self._ready), START_TIMEOUT)
        except (asyncio.TimeoutError, ZygoteDied) as exc:
            await self.close()
            watcher.cancel()
            raise OSError(f"the warm pool's parent did not start: {exc or 'no answer'}") from None
        kind, _, rest = hello.partition(" ")
        if kind != "ready":
            await self.close()
            raise OSError(rest or f"the warm pool's parent said {hello!r}")
        self.pid = int(rest)

    async def _watch(self) -> None:
        code = await self.proc.wait()
        self._die(f"its bwrap exited with code {code}")

    def prepare(self, slot: int, spec: dict) -> None:
        """Have a child for ``slot`` forked and isolated now, to wait for the slot's next job.
        ``spec``: what it needs before the job (uid, gid, cgroups, disk_bytes, inodes)."""
        if self.died is None:
            try:
                self._send({"op": "prepare", "slot": slot, "spec": spec}, [])
            except ZygoteDied:
                pass

    def run(self, slot: int, spec: bytes, fds: list[int]) -> asyncio.Future:
        """Hand a job to ``slot``'s child: ``spec`` (a marshal dump the child reads) and its stdin, stdout and
        stderr.  The future gets ``Ended``, or ZygoteDied."""
        if self.died is not None:
            raise ZygoteDied(self.died)
        self._next += 1
        ident = self._next
        memfd = os.memfd_create("distexec-job", os.MFD_CLOEXEC)
        try:
            write_all(memfd, spec)
            self._send({"op": "run", "id": ident, "slot": slot}, [memfd] + fds)
        finally:
            os.close(memfd)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        future.ident = ident
        # Set once the child has been reaped (its "exit" may come before: a Python job says it ended
        # just before its process exits); None, or ZygoteDied.
        future.gone = loop.create_future()
        self._pending[ident] = future
        self._gone[ident] = future.gone
        return future

    def kill(self, future: asyncio.Future) -> None:
        """Kill that job's process group now (its cgroup is killed too, by the caller)."""
        if self.died is None and not future.done():
            try:
                self._send({"op": "kill", "id": future.ident}, [])
            except ZygoteDied:
                pass

    def _send(self, msg: dict, fds: list[int]) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            self.sock.sendmsg([marshal.dumps(msg)], anc)
        except BlockingIOError:
            # Its queue is full: it has stopped reading, so it is as good as dead.
            self._die("its socket stopped taking requests")
            raise ZygoteDied(self.died) from None
        except OSError as exc:
            self._die(f"its socket failed: {exc}")
            raise ZygoteDied(self.died) from None

    def _readable(self) -> None:
        while self.sock is not None:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            except OSError as exc:
                self._die(f"its socket failed: {exc}")
                return
            if not data:
                self._die("it closed its socket")
                return
            text = data.decode(errors="replace")
            if text.startswith(("ready ", "error ")):
                if self._ready is not None and not self._ready.done():
                    self._ready.set_result(text)
            elif text.startswith("refused "):
                self.refused.append(text[len("refused "):])
            elif text.startswith(("exit ", "gone ")):
                exit = text.startswith("exit ")
                try:
                    ident, value = _ended(text) if exit else (int(text[5:]), None)
                except ValueError:
                    self._die(f"it sent {text[:200]!r}")
                    return
                future = (self._pending if exit else self._gone).pop(ident, None)
                if future is not None and not future.done():
                    future.set_result(value)

    def _die(self, why: str) -> None:
        if self.died is not None:
            return
        self.died = why
        if self.sock is not None:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
        for future in [self._ready, *self._pending.values(), *self._gone.values()]:
            if future is not None and not future.done():
                future.set_exception(ZygoteDied(why))
                future.exception()  # retrieved: nobody may be waiting any more
        self._pending.clear()
        self._gone.clear()

    async def close(self) -> None:
        """Stop the parent: it exits when its socket closes, and its PID namespace takes every job along."""
        self._die("stopped by the slave")
        if self.proc is not None and self.proc.returncode is None:
            try:
                await asyncio.wait_for(self.proc.wait(), STOP_GRACE)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _ended(text: str) -> tuple[int, Ended]:
    """``exit N CODE|- BYTES,INODES,FREE_INODES|- DISK WHY`` (slave/warm_zygote.py): plain words, parsed
    without unmarshal or eval, as the parent runs in the sandbox."""
    _, ident, code, free, disk, why = text.split(" ", 5)
    sizes = None if free == "-" else [int(x) for x in free.split(",")]
    return int(ident), Ended(None if code == "-" else int(code), sizes, why or None, disk == "1")
