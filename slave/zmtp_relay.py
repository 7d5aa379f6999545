"""A relay between the slave's ZeroMQ client and a session kernel's sockets that bounds each whole message.

libzmq bounds each frame of a message (``MAXMSGSIZE``), not the message,
and delivers a message whole: a kernel (the user's code) that sends one
message of thousands of frames has the slave (root, in no cgroup) buffer all
of it.  The relay reads the kernel's side as ZMTP 3 (the greeting, then
frames: a flags byte, a 1- or 8-byte size, the body) and cuts the connection
as soon as one message's frames add up to more than ``max_message`` bytes,
before it forwards them: libzmq drops the half-received message with the
connection, and reconnects.  What goes to the kernel is the slave's own and
passes as it is.

The kernel owns the folder of its sockets, so the name the relay connects to
may be a link to another Unix socket of the host.  Before it forwards a byte
the relay checks who listens there (``SO_PEERCRED``) and refuses anything
but the session's own processes, and a name that is no socket (a FIFO).
A hard link to another socket reaches that socket's process, as a symbolic
link does, and is refused the same way (on a job's tmpfs, the slave's
default, it cannot even be made: links stay within one file system).
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import struct
import time
from typing import Callable

log = logging.getLogger("distexec.slave.sessions")

SIGNATURE = 10  # 0xFF, 8 bytes, 0x7F: the part of a greeting each side sends before it reads the other's
GREETING = 64
MORE, LONG, COMMAND = 1, 2, 4
MAX_COMMAND = 64 << 10  # READY and PING carry a socket type, an identity, a context: a few hundred bytes
MAX_FRAMES = 1024  # per message: a Jupyter message has a handful, plus a widget's binary buffers
# Read at a time, then parsed without a pause: 16 KiB of the tiniest frames is ~10 ms of the slave's loop.
CHUNK = 16 << 10
CONNECT_RETRY = 0.005  # seconds between tries while the kernel has not bound its socket yet


class Refused(Exception):
    """What the kernel sent breaks the relay's bounds (or is not ZMTP 3): the connection is cut."""


def peer_pid(sock: socket.socket) -> int:
    pid, _uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                            struct.calcsize("3i")))
    return pid


async def _read(reader: asyncio.StreamReader, n: int) -> bytes:
    try:
        return await reader.readexactly(n)
    except asyncio.IncompleteReadError as exc:
        raise EOFError from exc


class Frames:
    """The kernel's ZMTP 3 frames after the greeting, read as they come: how much of each chunk may go on."""

    def __init__(self, max_message: int):
        self.max_message = max_message
        self.message = 0  # bytes of the message being received, over its frames so far
        self.body = 0  # bytes of the current frame's body still to come
        self.more = False  # the current frame has the MORE flag: its message goes on after it
        self.frames = 0  # frames of the message being received, so far

    def feed(self, buf: bytes) -> tuple[int, Refused | None]:
        """How many bytes of ``buf`` are whole frame parts within the bound (the rest is a header cut
        short, to come again with the next chunk), and what broke the bound there, if anything did."""
        pos, end = 0, len(buf)
        while pos < end:
            if self.body:
                step = min(self.body, end - pos)
                pos += step
                self.body -= step
                if not self.body and not self.more:
                    self.message = self.frames = 0
                continue
            flags = buf[pos]
            if flags & ~(MORE | LONG | COMMAND):
                return pos, Refused(f"frame flags {flags:#x}")
            head = 9 if flags & LONG else 2
            if end - pos < head:
                break
            size = int.from_bytes(buf[pos + 1:pos + head], "big")
            if flags & COMMAND and (size > MAX_COMMAND or flags & MORE):
                return pos, Refused(f"a command of {size} bytes")
            if self.message + size > self.max_message:
                return pos, Refused(f"a message of more than {self.max_message} bytes")
            if self.frames == MAX_FRAMES:
                return pos, Refused(f"a message of more than {MAX_FRAMES} frames")
            self.message += size
            self.frames += 1
            self.more = bool(flags & MORE)
            self.body = size
            pos += head
            if not size and not self.more:
                self.message = self.frames = 0
        return pos, None


async def kernel_to_slave(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_message: int) -> None:
    """Forward ZMTP 3 from the kernel, cutting (``Refused``) a message past ``max_message`` bytes in all."""
    # The greeting in the pieces libzmq sends it in: each side waits for the other's
    # signature before its version, and for the version before the rest.
    signature = await _read(reader, SIGNATURE)
    if signature[0] != 0xFF or not signature[9] & 1:
        raise Refused("not a ZMTP 3 greeting")  # ZMTP 1.0 frames differently: libzmq must never see it
    writer.write(signature)
    version = await _read(reader, 1)
    if version[0] < 3:
        raise Refused(f"ZMTP major version {version[0]}")
    writer.write(version)
    writer.write(await _read(reader, GREETING - SIGNATURE - 1))
    await writer.drain()
    # Frames are parsed a chunk at a time, not awaited one by one: a kernel sending
    # tiny frames costs the slave a pass over bytes, not a coroutine step each.
    frames = Frames(max_message)
    pending = b""  # a frame header cut short by the end of the last chunk (at most 8 bytes)
    while True:
        data = await reader.read(CHUNK)
        if not data:
            raise EOFError
        buf = pending + data if pending else data
        whole, refused = frames.feed(buf)
        writer.write(buf[:whole])
        await writer.drain()
        if refused is not None:
            raise refused
        pending = buf[whole:]
        await asyncio.sleep(0)  # data already buffered would not yield: a turn for the slave's other work


async def slave_to_kernel(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        data = await reader.read(CHUNK)
        if not data:
            raise EOFError
        writer.write(data)
        await writer.drain()


def _not_a_socket(path: str) -> bool:
    """``path`` names something that is not a socket (stat does not open it: a FIFO cannot block it)."""
    try:
        return not stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False  # not there (yet), or a link to nothing


class Relay:
    """Listens at ``listen`` (in a folder of the slave's) and joins each connection to ``target`` (the kernel's).

    ``ours(pid)`` says whether a process listening at ``target`` is the
    session's; ``on_cut()`` is called when a connection is cut for what the
    kernel sent, ``on_refused()`` when ``target`` led to another process or
    to no socket (the session should end: its client would connect again and again).
    """

    def __init__(self, listen: str, target: str, max_message: int, ours: Callable[[int], bool],
                 connect_within: float, on_cut: Callable[[], object] | None = None,
                 on_refused: Callable[[], object] | None = None):
        self.listen, self.target = listen, target
        self.max_message = max_message
        self.ours = ours
        self.connect_within = connect_within
        self.on_cut = on_cut
        self.on_refused = on_refused
        self.server: asyncio.base_events.Server | None = None
        self._closed = False
        # Each link's task and its open streams.  Closed, not cancelled: asyncio's
        # server callback takes a cancelled handler for an error.
        self._links: dict[asyncio.Task, list[asyncio.StreamWriter]] = {}

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._link, path=self.listen)
        os.chmod(self.listen, 0o600)  # the slave alone connects here

    async def close(self) -> None:
        self._closed = True
        if self.server is not None:
            self.server.close()
        for writers in self._links.values():
            for w in writers:
                w.close()
        await asyncio.gather(*self._links, return_exceptions=True)

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        deadline = time.monotonic() + self.connect_within
        while not self._closed:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await asyncio.get_running_loop().sock_connect(sock, self.target)
            except OSError:
                sock.close()
                if _not_a_socket(self.target):
                    return self._refuse("is not a socket")  # a FIFO or a file in its place: no use waiting
                if time.monotonic() > deadline:
                    return None
                await asyncio.sleep(CONNECT_RETRY)  # the kernel has not bound it yet
                continue
            pid = peer_pid(sock)
            if not self.ours(pid):
                sock.close()
                return self._refuse(f"leads to process {pid}, not the session's")
            return await asyncio.open_unix_connection(sock=sock)
        return None

    def _refuse(self, why: str) -> None:
        log.warning("session socket %s %s: refused", self.target, why)
        if self.on_refused is not None:
            self.on_refused()

    async def _link(self, slave_r: asyncio.StreamReader, slave_w: asyncio.StreamWriter) -> None:
        writers = self._links[asyncio.current_task()] = [slave_w]
        try:
            kernel = None if self._closed else await self._connect()
            if kernel is None or self._closed:
                return
            kernel_r, kernel_w = kernel
            writers.append(kernel_w)
            down = asyncio.ensure_future(kernel_to_slave(kernel_r, slave_w, self.max_message))
            up = asyncio.ensure_future(slave_to_kernel(slave_r, kernel_w))
            await asyncio.wait([down, up], return_when=asyncio.FIRST_COMPLETED)
            for t in (down, up):
                t.cancel()
            await asyncio.gather(down, up, return_exceptions=True)
            if not down.cancelled() and isinstance(down.exception(), Refused):
                log.warning("session socket %s: cut: %s", self.target, down.exception())
                if self.on_cut is not None:
                    self.on_cut()
        except (OSError, EOFError):
            pass  # either side went away
        finally:
            del self._links[asyncio.current_task()]
            for w in writers:
                w.close()
