"""The slave's end of a session kernel's sockets, bounded against a kernel that floods.

The kernel runs the user's code, so everything it sends is hostile input to
the slave (root, in no cgroup).  Three bounds:

- every socket reaches the kernel through a ``zmtp_relay.Relay``, which cuts
  a message larger than ``max_message`` in all (libzmq's own MAXMSGSIZE,
  also set, bounds each frame only), and queues at most ``QUEUED_MESSAGES``
  messages (RCVHWM; past it the kernel's side drops or waits); libzmq
  connects again after a cut;
- the iopub channel is read all the time by ``IopubPump``: a cell's own
  messages go to that cell's handler, everything else (a thread an earlier
  cell started, printing after that cell returned) is dropped unread, so
  nothing piles up in the slave between cells;
- a message cut as too large during a cell, on any socket, ends that cell
  with ``output_limit`` (``IopubPump.cut_one``), as more output than the limit.

A cell's message that cannot be handled (JSON too deep for Python's parser,
fields of a type no kernel of ours sends but a cell may) is skipped: logged,
said in the cell's stderr, and the pump goes on.  Before, one such message
ended the pump's task unseen, and the session's cells had no output after it.
"""
from __future__ import annotations

import asyncio
import json
import logging
import queue
import re
import time
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger("distexec.slave.sessions")

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# A traceback's frame in a cell: "Cell In[6], line 5" (6: the kernel's count, not the notebook's).
CELL_LINE = re.compile(r"Cell In\[(\d+)\], line (\d+)")
CELL_NAME = re.compile(r"Cell In\[(\d+)\]")
QUEUED_MESSAGES = 32  # per socket (zmq RCVHWM): with max_message, what a slow slave may hold
MESSAGE_MARGIN = 64 << 10  # a message's header and JSON quoting around its output
# Skipped messages said (in the log, and the cell's stderr) per cell: a cell sending thousands must not
# flood the slave's log.  The rest are counted, in one line at the cell's end.
SKIPS_SAID = 5


def make_client(connection: dict, max_message: int):
    """An AsyncKernelClient for ``connection`` (a connection file's fields, kept by the slave: the
    kernel could rewrite its file) on a zmq context of its own whose sockets are bounded (see module doc)."""
    # zmq and jupyter_client load with the first session, not with every slave (tens of ms of a start).
    import zmq.asyncio
    from jupyter_client.asynchronous import AsyncKernelClient

    ctx = zmq.asyncio.Context()
    ctx.setsockopt(zmq.MAXMSGSIZE, max_message)
    ctx.setsockopt(zmq.RCVHWM, QUEUED_MESSAGES)
    ctx.setsockopt(zmq.LINGER, 0)
    client = AsyncKernelClient(context=ctx)
    client.load_connection_info(connection)
    client.allow_stdin = True
    return client


def close_client(client) -> None:
    try:
        client.stop_channels()
    except Exception:
        pass
    try:
        client.context.destroy(linger=0)
    except Exception:
        pass


class IopubPump:
    """Reads the kernel's iopub socket for the session's whole life.

    ``handler`` (set for the length of one cell) gets that cell's messages,
    deserialized; without a handler, or for another cell's message, the raw
    frames are dropped.  ``dropped`` counts what was thrown away.
    """

    def __init__(self, client, label: str = "?"):
        self.client = client
        self.label = label  # the session, as the log names it
        self.socket = client.iopub_channel.socket
        self.cell_id: str | None = None
        self.handler: Callable[[dict], None] | None = None
        self.job_id: int | None = None  # the current cell's, for the log
        self.say: Callable[[str], None] | None = None  # writes a line to the current cell's stderr
        self.skipped = 0  # messages of the current cell that could not be handled
        self.dropped = 0
        self.heard = 0.0  # when iopub last gave a message, anyone's (monotonic): whether it still flows
        self.cut = asyncio.Event()  # set when a message past max_message was cut during the current cell
        self._read_task = asyncio.ensure_future(self._read())

    def start_cell(self, msg_id: str, handler: Callable[[dict], None], job_id: int | None = None,
                   say: Callable[[str], None] | None = None) -> None:
        self.cell_id, self.handler = msg_id, handler
        self.cut.clear()
        self.job_id, self.say, self.skipped = job_id, say, 0

    def end_cell(self) -> None:
        if self.skipped > SKIPS_SAID:
            log.warning("session %s, job %s: %d more messages of its kernel were skipped", self.label,
                        self.job_id, self.skipped - SKIPS_SAID)
        self.cell_id, self.handler, self.job_id, self.say = None, None, None, None

    async def _read(self) -> None:
        import zmq
        session = self.client.session
        while True:
            try:
                frames = await self.socket.recv_multipart(copy=False)
            except (zmq.ZMQError, asyncio.CancelledError):
                return
            self.heard = time.monotonic()
            # A ready message completes the await without yielding: without this
            # a flood would starve the event loop (and the master's pings).
            await asyncio.sleep(0)
            handler = self.handler
            if handler is None:
                self.dropped += 1
                continue
            try:
                _, parts = session.feed_identities(frames, copy=False)
                msg = session.deserialize(parts, content=False, copy=False)
                if (msg.get("parent_header") or {}).get("msg_id") != self.cell_id:
                    self.dropped += 1
                    continue
            except (ValueError, TypeError, KeyError, json.JSONDecodeError):
                self.dropped += 1  # malformed or wrongly signed: the kernel's problem
                continue
            except Exception as exc:  # whose it was is unknown; it came while this cell ran
                self.dropped += 1
                self._skipped(None, exc)
                continue
            try:
                msg["content"] = session.unpack(msg["content"])
                handler(msg)
            except Exception as exc:
                self.dropped += 1
                self._skipped(msg.get("msg_type"), exc)

    def _skipped(self, kind, exc: Exception) -> None:
        """A message of the current cell that could not be handled: log it, and say so in the cell's stderr."""
        self.skipped += 1
        if self.skipped > SKIPS_SAID:
            if self.skipped == SKIPS_SAID + 1 and self.say is not None:
                self.say("distexec: more messages of the kernel could not be handled; they were skipped too\n")
            return
        kind = kind if isinstance(kind, str) else "?"
        log.warning("session %s, job %s: a %r message of its kernel was skipped", self.label, self.job_id,
                    kind[:64], exc_info=exc)
        if self.say is not None:
            self.say(f"distexec: a {kind[:64]!r} message of the kernel could not be handled and was skipped "
                     f"({type(exc).__name__}; the slave's log has more)\n")

    def cut_one(self) -> None:
        """A relay cut a message of the kernel's as too large: the current cell's, for all we know."""
        if self.cell_id is not None:
            self.cut.set()

    def close(self) -> None:
        self._read_task.cancel()


@dataclass
class CellState:
    job_id: int | None = None
    count: int | None = None  # the kernel's execution count of this cell
    ename: str | None = None
    evalue: str | None = None
    line: int | None = None
    exit_requested: bool = False
    # A request sent on shell after the cell was interrupted, or went idle without its reply: its reply
    # says the cell is over.  A SIGINT that lands as the cell ends, after its code but before its reply
    # is sent, makes ipykernel drop the reply ("KeyboardInterrupt caught in kernel"); waiting for it
    # ended a session that was alive and idle, or held a cell that was over for 5 s.
    probe: str | None = None
    # Set at the cell's execute_input: its handler has begun, so an interrupt now lands in the cell and not
    # in the silent request before it that sets argv and stdin.
    started: asyncio.Event = field(default_factory=asyncio.Event)


def exit_code(evalue: str | None) -> int:
    if evalue in (None, "", "None"):
        return 0
    try:
        return int(evalue)
    except ValueError:
        return 1  # sys.exit("message"): Python exits with 1 and prints it


async def until_ready(kc) -> None:
    """Ask for kernel_info until the kernel answers and its output channel is connected.

    What ``wait_for_ready`` does, minus its heartbeat check.
    """
    while True:
        kc.kernel_info()
        try:
            msg = await kc.get_shell_msg(timeout=1.0)
        except queue.Empty:
            continue
        if msg["msg_type"] != "kernel_info_reply":
            continue
        try:
            # The reply's busy/idle status on iopub proves the subscription is live.
            await kc.get_iopub_msg(timeout=0.5)
        except queue.Empty:
            continue
        break
    while True:  # drop what the handshake left on iopub
        try:
            await kc.get_iopub_msg(timeout=0.05)
        except queue.Empty:
            return


async def answer_input(kc, msg_id: str, lines, feed: Callable[[str, str], None]) -> None:
    """Serve ``input()`` from the job's stdin, one line per call; EOFError at its end."""
    while True:
        msg = await kc.get_stdin_msg()
        if msg["msg_type"] != "input_request" or msg.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        prompt = msg["content"].get("prompt") or ""
        prompt = prompt if isinstance(prompt, str) else str(prompt)  # a cell may send a request of its own
        if prompt:
            # What the cell printed before input() was flushed to iopub before
            # this request left, but travels on another socket: let it land first.
            await iopub_settled(kc)
            feed("stdout", prompt)
        kc.input(next(lines, "\x04"))  # ipykernel raises EOFError for \x04


async def iopub_settled(kc, most: float = 0.2) -> None:
    import zmq
    deadline = time.monotonic() + most
    socket = kc.iopub_channel.socket
    while time.monotonic() < deadline:
        await asyncio.sleep(0.005)
        if not socket.get(zmq.EVENTS) & zmq.POLLIN:
            await asyncio.sleep(0)  # the pump handles what it took last
            return
