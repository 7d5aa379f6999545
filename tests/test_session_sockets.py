"""A session's kernel talks to the slave (root) through its ZeroMQ sockets: what
a kernel run by a user can send there, and where it can point them.

The cluster tests are attacks from a cell; each failed before slave/zmtp_relay.py.
"""
from __future__ import annotations

import asyncio
import socket
import textwrap
import threading

import psutil
import pytest

from distexec_kernel import Cluster, protocol as P
from slave.zmtp_relay import GREETING, MAX_FRAMES, Frames, Refused, kernel_to_slave

from conftest import wait_for

WAIT = 90


def run(c: Cluster, source: str, **kw):
    return c.submit(source, **kw).wait(WAIT)


# -- the relay's reading of ZMTP, byte by byte ------------------------------------------

def _greeting(major: int = 3) -> bytes:
    return b"\xff" + bytes(8) + b"\x7f" + bytes([major, 0]) + b"NULL".ljust(20, b"\0") + bytes(32)


def _frame(body: bytes, more: bool = False, command: bool = False) -> bytes:
    flags = (1 if more else 0) | (4 if command else 0)
    if len(body) > 255:
        return bytes([flags | 2]) + len(body).to_bytes(8, "big") + body
    return bytes([flags, len(body)]) + body


def _relay(sent: bytes, max_message: int) -> tuple[bytes, BaseException | None]:
    """Feed ``sent`` to ``kernel_to_slave`` as the kernel; what it forwarded, and how it ended."""
    async def go():
        kernel, relay_in = socket.socketpair()
        relay_out, slave = socket.socketpair()
        reader, reader_w = await asyncio.open_unix_connection(sock=relay_in)
        _, writer = await asyncio.open_unix_connection(sock=relay_out)
        kernel.sendall(sent)
        kernel.shutdown(socket.SHUT_WR)
        try:
            await kernel_to_slave(reader, writer, max_message)
            ended = None
        except (Refused, EOFError) as exc:
            ended = exc
        for w in (writer, reader_w):
            w.close()
            await w.wait_closed()
        out = b""
        while chunk := slave.recv(1 << 20):  # to the end: its other side is closed
            out += chunk
        kernel.close()
        slave.close()
        return out, ended

    return asyncio.run(go())


def test_the_relay_forwards_messages_within_the_bound_byte_for_byte():
    stream = (_greeting() + _frame(b"READY\x0bSocket-Type", command=True)
              + _frame(b"a" * 300, more=True) + _frame(b"b" * 200) + _frame(b"c" * 500))
    out, ended = _relay(stream, max_message=500)
    assert out == stream and isinstance(ended, EOFError)


def test_a_message_of_many_frames_past_the_bound_is_cut_before_its_bytes_go_on():
    head = _greeting() + _frame(b"a" * 300, more=True)
    out, ended = _relay(head + _frame(b"b" * 300, more=True) + _frame(b"c"), max_message=500)
    assert isinstance(ended, Refused) and "more than 500 bytes" in str(ended)
    assert out == head  # not one byte of the frame that broke the bound


def _byte_by_byte(stream: bytes, max_message: int) -> tuple[bytes, Refused | None]:
    """What ``Frames`` lets through when the stream comes one byte at a time (headers cut anywhere)."""
    frames, pending, passed = Frames(max_message), b"", b""
    for i in range(len(stream)):
        buf = pending + stream[i:i + 1]
        whole, refused = frames.feed(buf)
        passed += buf[:whole]
        if refused is not None:
            return passed, refused
        pending = buf[whole:]
        assert len(pending) <= 8
    return passed, None


def test_frames_cut_anywhere_are_read_as_whole_ones():
    ok = (_frame(b"a" * 300, more=True) + _frame(b"") + _frame(b"b" * 200) + _frame(b"", more=True)
          + _frame(b"c" * 500, more=True) + _frame(b"d"))
    assert _byte_by_byte(ok, 501) == (ok, None)
    first = _frame(b"a" * 300, more=True)
    passed, refused = _byte_by_byte(first + _frame(b"b" * 301), 600)
    assert passed == first and "more than 600 bytes" in str(refused)
    # Frames are counted too: empty ones cost the slave a pass each, and no Jupyter message has thousands.
    many = _frame(b"", more=True) * MAX_FRAMES
    passed, refused = _byte_by_byte(many + _frame(b""), 1 << 20)
    assert passed == many and f"more than {MAX_FRAMES} frames" in str(refused)
    assert _byte_by_byte(many[2:] + _frame(b"") + many, 1 << 20) == (many[2:] + _frame(b"") + many, None)


@pytest.mark.parametrize("stream, why", [
    (b"\x00\x05hello" + bytes(60), "not a ZMTP 3 greeting"),  # ZMTP 1.0: libzmq would frame it otherwise
    (_greeting(major=2), "major version 2"),
    (_greeting() + _frame(b"x" * 300, more=True, command=True), "a command"),
    (_greeting() + bytes([0x08, 1, 0]), "frame flags"),
])
def test_what_is_not_zmtp_3_is_cut(stream, why):
    out, ended = _relay(stream, max_message=1 << 20)
    assert isinstance(ended, Refused) and why in str(ended), ended
    assert len(out) <= GREETING


# -- attacks from a cell ------------------------------------------------------------------

# One message of many frames, each under the limit, sent on the kernel's own iopub socket.
MANY_FRAMES = textwrap.dedent("""
    import time
    kernel = get_ipython().kernel
    chunk = b"z" * (1 << 20)
    kernel.iopub_thread.schedule(lambda: kernel.iopub_thread.socket.send_multipart([chunk] * 400, copy=False))
    time.sleep(60)  # a deadline, not a wait: the relay's cut ends the cell within a second or two
    print("sent")
""")


def test_a_message_of_many_small_frames_does_not_grow_the_slave(make_cluster):
    lc = make_cluster(1, slots=1, languages="python", slave_args=["--output-limit", "1"])
    slave = psutil.Process(lc.slaves[0].pid)
    with Cluster(lc.url, token=lc.token) as c:
        assert run(c, "kept = 1", session="m").status == P.SUCCEEDED
        base = slave.memory_info().rss
        peak, done = [base], threading.Event()

        def watch():
            while True:
                peak[0] = max(peak[0], slave.memory_info().rss)
                if done.wait(0.02):  # a sample every 20 ms until the job has ended
                    return

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            job = run(c, MANY_FRAMES, session="m")
        finally:
            done.set()
            watcher.join()
        grown = (peak[0] - base) >> 20
        assert grown < 100, f"the slave grew by {grown} MiB"
        # 400 MiB in one message: cut at the output limit, as one too large frame is.
        assert job.status == P.FAILED and job.error["code"] == P.OUTPUT_LIMIT, (job.error, job.stderr)
        after = run(c, "print(kept)", session="m")
        assert after.status == P.SUCCEEDED and after.stdout == "1\n", (after.error, after.stderr)


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_a_kernel_cannot_point_the_slave_at_another_socket_of_the_host(make_cluster, tmp_path, request, kind):
    # Root's socket elsewhere on the host: what a kernel would like the slave to talk to.
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    target = str(tmp_path / "service.sock")
    listener.bind(target)
    listener.listen()
    request.addfinalizer(listener.close)
    got: list[bytes] = []

    def serve():
        try:
            conn, _ = listener.accept()
        except OSError:
            return  # closed at the end of the test: nobody came
        conn.settimeout(3)
        data = b""
        try:
            while chunk := conn.recv(4096):
                data += chunk
        except socket.timeout:
            pass
        got.append(data)
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    # The socket's name becomes a link to the target (or a FIFO, which root must not wait on);
    # a message too large then has the slave connect to that name again.
    plant = f"os.symlink({target!r}, name)" if kind == "symlink" else "os.mkfifo(name)"
    lc = make_cluster(1, slots=1, languages="python", slave_args=["--output-limit", "1"])
    with Cluster(lc.url, token=lc.token) as c:
        job = run(c, textwrap.dedent(f"""
            import json, os
            port = json.load(open(".distexec-kernel.json"))["iopub_port"]
            name = f".distexec-k-{{port}}"
            os.unlink(name)
            {plant}
            print("x" * (3 << 20))
        """), session="l")
        assert job.status != P.SUCCEEDED, job.stdout[-200:]
        # The session is ended (its client would try that name again and again); its next job says why.
        after = wait_for(lambda: (j := run(c, "print('again')", session="l")).stderr and j, 60,
                         "the session to be ended")
        assert after.status == P.SUCCEEDED and after.stdout == "again\n", (after.error, after.stderr)
        assert "sockets was replaced by something else" in after.stderr
        assert got in ([b""], []), f"the slave sent {got[0][:16]!r} to a socket that was not the kernel's"
        if kind == "symlink":  # it connected, saw whose socket it was, and sent nothing
            assert wait_for(lambda: got, 10, "the planted socket to see its connection closed") == [b""]
        # The slave serves others as before.
        assert run(c, "print('fine')").stdout == "fine\n"
