"""A warm job's pipes, on the slave's side: its output read straight from the event loop, its stdin
written from a thread."""
from __future__ import annotations

import asyncio
import codecs
import os

from distexec_kernel.procs import write_all

from .runner import READ_CHUNK, Capture


class OutputPipe:
    """One of the job's output pipes, read straight from the event loop into ``capture`` (no transport,
    stream reader and task per pipe: a warm job is short, and those cost more than it)."""

    def __init__(self, fd: int, stream: str, capture: Capture):
        self.fd, self.stream, self.capture = fd, stream, capture
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.loop = asyncio.get_running_loop()
        self.done = self.loop.create_future()  # set at EOF
        os.set_blocking(fd, False)
        self.loop.add_reader(fd, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self.fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.capture.feed(self.stream, self.decoder.decode(data), len(data))
            return
        tail = self.decoder.decode(b"", final=True)
        if tail:
            self.capture.feed(self.stream, tail, len(tail.encode()))
        self.close()
        self.done.set_result(None)

    def close(self) -> None:
        if self.fd >= 0:
            self.loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1


def feed(fd: int, data: bytes) -> None:
    """The job's stdin, on a thread: a program that never reads it blocks only this thread."""
    try:
        write_all(fd, data)
    except OSError:
        pass  # it did not read all of its input: its business
    finally:
        os.close(fd)
