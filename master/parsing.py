"""Whether a submitted program parses, judged off the master's event loop when it is large.

Parsing is CPU in the caller's thread: ``ast.parse`` of a 1 MiB Python program
takes about 1.2 s here and 400 MiB, a session cell's IPython transform of the
same 3.5 s.  On the loop, one user's batch of large programs held every
other user's jobs, events and the slaves' pings for tens of seconds.  So the
programs of a submission are parsed on the loop only while they are small in
all (``INLINE_BYTES``, a session cell's size counted once per pass its
transformer may make: ``_cost``); the rest go to a worker process (``python -m
master.parsing``), in parts of at most ``PART_BYTES``, the users who wait
taking turns, so that one user's large batch delays nobody else's by more
than one part.  A parse past ``PART_TIMEOUT`` or one that kills the worker
rejects the programs of that part as not parsed; the worker starts again for
the next.  ``Syntax.detail`` then answers from what was parsed ahead.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import marshal
import os
import resource
import struct
import subprocess
import sys

from distexec_kernel import languages as L

log = logging.getLogger("distexec.master")

INLINE_BYTES = 4 << 10  # programs of a submission up to this much in all are parsed on the loop (~5 ms)
PART_BYTES = 1 << 20  # what the worker parses for one user before the next user's turn
PART_TIMEOUT = 30.0  # seconds for one part; the largest program parses in under 4 s
# The worker ends once idle this long: a large program's tree left it 400 MiB it would hold for good
# (CPython keeps what it freed), and it starts again in about 0.1 s.
IDLE_STOP = 60.0
KEPT_BYTES = 64 << 20  # programs parsed ahead whose answer is kept for the jobs they become
WORKER_MEMORY = 2 << 30  # address space of the worker: a 1 MiB program's tree takes about 400 MiB
_HEADER = struct.Struct(">I")


def check(language: str, session: bool, source: str) -> dict | None:
    """None when the program parses (or nothing checks its language); else what is wrong, as
    ``languages.check_syntax`` says it.  A program too deeply nested for the parser, or too large for
    its memory, does not parse either: Python could not compile it to run it."""
    try:
        return L.check_session_syntax(source) if session else L.check_syntax(language, source)
    except RecursionError:
        return _unparsed("it is nested too deeply for Python's parser")
    except MemoryError:
        return _unparsed("Python's parser ran out of memory on it")


def _key(user: str | None, job: dict) -> tuple:
    """What a program's answer depends on: (user, session, language, source); a session cell is IPython."""
    return user, job.get("session") is not None, job["language"], job["source"]


def _cost(key: tuple) -> int:
    """What parsing a program costs, in bytes of plain Python that would cost as much.

    A session cell is IPython: its transformer tokenizes the whole cell again for each line it
    rewrites (``!ls``, ``%time``, ``x?``), so 3.9 KiB of ``a?`` lines took 15 s where plain Python
    of that size takes 5 ms, and held the loop (the slaves' pings too) all that time.  Each ``!``,
    ``%``, ``?`` or line starting with an autocall escape (``/``, ``,``, ``;``) may be one more pass.
    """
    _, session, _, source = key
    if not session or len(source) > INLINE_BYTES:
        return len(source)
    passes = 1 + source.count("!") + source.count("%") + source.count("?")
    passes += sum(1 for line in source.splitlines() if line.lstrip()[:1] in ("/", ",", ";"))
    return len(source) * passes


def _unparsed(why: str) -> dict:
    return {"message": f"SyntaxError: {why}", "line": None, "column": None}


class Syntax:
    """What each program said when parsed, for ``Admission.rejection``; large ones parsed ahead."""

    def __init__(self):
        self._worker = Worker()
        # (user, session, language, source) -> detail, oldest first, their sources KEPT_BYTES at most.
        # Keyed by user too: a cached answer to another user's program would tell, by its speed, that
        # someone submitted that program.
        self._known: collections.OrderedDict[tuple, dict | None] = collections.OrderedDict()
        self._known_bytes = 0
        self._last: tuple = (None, None)  # (key, detail): a map's jobs share their program
        self._ahead: dict[str | None, asyncio.Future] = {}  # user -> their submission being parsed ahead

    def detail(self, user: str | None, job: dict) -> dict | None:
        """What is wrong with the job's program, or None if it parses."""
        key = _key(user, job)
        if key != self._last[0]:
            found = self._known.get(key, self)
            self._last = (key, check(key[2], key[1], key[3]) if found is self else found)
        return self._last[1]

    async def ahead(self, user: str | None, subs: list[dict]) -> None:
        """Parse the programs of ``subs`` (checked submissions of ``user``) now, in the worker when
        they are large in all, so that ``detail`` has their answers.  A user's submissions are
        judged in the order they came: this one waits for their previous one's parse."""
        keys = [k for k in dict.fromkeys(_key(user, sub) for sub in subs)
                if L.canonical(k[2]) in L.SYNTAX_CHECKS and k not in self._known]
        before, inline = self._ahead.get(user), sum(map(_cost, keys)) <= INLINE_BYTES
        if before is None and inline:
            return  # parsed on the loop by detail, without a turn of the loop
        loop = asyncio.get_running_loop()
        mine = self._ahead[user] = loop.create_future()
        try:
            if before is not None:
                await asyncio.shield(before)
            if not inline:
                for key, found in zip(keys, await self._worker.parse(user, [k[1:] for k in keys])):
                    self._keep(key, found)
        finally:
            mine.set_result(None)
            if self._ahead.get(user) is mine:
                del self._ahead[user]

    def _keep(self, key: tuple, found: dict | None) -> None:
        self._known[key] = found
        self._known_bytes += len(key[3])
        while self._known_bytes > KEPT_BYTES and len(self._known) > 1:
            old, _ = self._known.popitem(last=False)
            self._known_bytes -= len(old[3])

    def close(self) -> None:
        self._worker.close()


class Worker:
    """The parsing process, started when first needed; users' parts in turns."""

    def __init__(self):
        self._proc: asyncio.subprocess.Process | None = None
        self._waiting: collections.OrderedDict[str | None, collections.deque] = collections.OrderedDict()
        self._serving: asyncio.Task | None = None
        self._idle: asyncio.TimerHandle | None = None  # stops the worker (IDLE_STOP)

    async def parse(self, user: str | None, items: list[tuple]) -> list[dict | None]:
        """``check`` of each ``(session, language, source)``, in the worker."""
        loop = asyncio.get_running_loop()
        parts, part, size = [], [], 0
        for item in items:
            if part and size + len(item[2]) > PART_BYTES:
                parts.append(part)
                part, size = [], 0
            part.append(item)
            size += len(item[2])
        parts.append(part)
        futures = [loop.create_future() for _ in parts]
        self._waiting.setdefault(user, collections.deque()).extend(zip(parts, futures))
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if self._serving is None or self._serving.done():
            self._serving = asyncio.ensure_future(self._serve())
        out: list[dict | None] = []
        for fut in futures:
            out += await fut
        return out

    async def _serve(self) -> None:
        while self._waiting:
            user, queue = next(iter(self._waiting.items()))
            part, fut = queue.popleft()
            del self._waiting[user]
            if queue:  # the user's next part waits for the other users' turns
                self._waiting[user] = queue
            try:
                answers = await asyncio.wait_for(self._ask(part), PART_TIMEOUT)
            except asyncio.TimeoutError:
                log.warning("parsing %d program(s) of %s took over %g s: rejected", len(part), user, PART_TIMEOUT)
                self._stop()
                answers = [_unparsed(f"it took over {PART_TIMEOUT:g} s to parse")] * len(part)
            except (OSError, EOFError, ValueError) as exc:
                log.error("the parsing process failed on %d program(s) of %s (%s)", len(part), user, exc)
                self._stop()
                answers = [_unparsed("Python's parser failed on it")] * len(part)
            if not fut.cancelled():
                fut.set_result(answers)
        # Nothing waits (a parse that comes meanwhile cancels this first): no race with a request.
        self._idle = asyncio.get_running_loop().call_later(IDLE_STOP, self._stop)

    async def _ask(self, part: list[tuple]) -> list[dict | None]:
        # Blocking pipes in a thread: the worker answers in one write, and a kill (timeout, close) ends the read.
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen([sys.executable, "-m", "master.parsing"], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE)
        return await asyncio.to_thread(_exchange, self._proc, part)

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait()  # at once, after a kill
            proc.stdin.close()
            proc.stdout.close()

    def close(self) -> None:
        if self._serving is not None:
            self._serving.cancel()
        if self._idle is not None:
            self._idle.cancel()
        self._stop()


def _exchange(proc: subprocess.Popen, part: list[tuple]) -> list[dict | None]:
    data = marshal.dumps(part)
    proc.stdin.write(_HEADER.pack(len(data)) + data)
    proc.stdin.flush()
    header = proc.stdout.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError("the parsing process ended")
    (n,) = _HEADER.unpack(header)
    body = proc.stdout.read(n)
    answers = marshal.loads(body) if len(body) == n else None
    if not isinstance(answers, list) or len(answers) != len(part):
        raise ValueError("a malformed answer")
    return answers


def _serve_requests() -> None:
    """The worker: each request on stdin a marshal dump of ``[(session, language, source)]``, each answer
    on stdout a marshal dump of the details, both after their length; it ends when the master does."""
    resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY, WORKER_MEMORY))
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        header = stdin.read(_HEADER.size)
        if len(header) < _HEADER.size:
            return
        part = marshal.loads(stdin.read(_HEADER.unpack(header)[0]))
        answers = marshal.dumps([check(language, session, source) for session, language, source in part])
        stdout.write(_HEADER.pack(len(answers)) + answers)
        stdout.flush()


if __name__ == "__main__":
    os.nice(5)  # behind the master's own loop when the cores are busy
    _serve_requests()
