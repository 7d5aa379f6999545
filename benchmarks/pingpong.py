"""What one small send and a round trip cost between two bare processes here: the floor under every hop.

    python3 benchmarks/pingpong.py [--rounds 3000]

A parent and a forked child bounce 300 bytes (a job_update's size) over a TCP
loopback connection (TCP_NODELAY, as tornado sets it) and over a Unix socket
pair; prints the median time of the parent's ``send`` call and of the whole
round trip.  Compare a profile's per-call ``send`` time in the master or the
slave with these: the difference is the woken receiver running first on the
sender's core (docs/performance.md, "A send costs the sender the receiver's turn").
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

MESSAGE = b"x" * 300


def pair(kind: str) -> tuple[socket.socket, socket.socket]:
    if kind == "unix":
        return socket.socketpair()
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        a = socket.create_connection(srv.getsockname())
        b, _ = srv.accept()
    for s in (a, b):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return a, b


def measure(kind: str, rounds: int) -> tuple[float, float]:
    a, b = pair(kind)
    pid = os.fork()
    if pid == 0:  # the echo
        a.close()
        while True:
            data = b.recv(65536)
            if not data:
                os._exit(0)
            b.sendall(data)
    b.close()
    sends, trips = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        a.send(MESSAGE)
        t1 = time.perf_counter()
        got = 0
        while got < len(MESSAGE):
            got += len(a.recv(65536))
        trips.append(time.perf_counter() - t0)
        sends.append(t1 - t0)
    a.close()
    os.waitpid(pid, 0)
    return statistics.median(sends), statistics.median(trips)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3000)
    args = p.parse_args()
    for kind in ("tcp", "unix"):
        send, trip = measure(kind, args.rounds)
        print(f"{kind:<5} send p50 {send * 1e6:6.1f} us, round trip p50 {trip * 1e6:6.1f} us")


if __name__ == "__main__":
    main()
