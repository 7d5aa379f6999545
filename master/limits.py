"""How much one client may ask of the master: submission, read and login rates.

A token bucket per key (a user name; for failed logins an address, and an address with a name): ``burst``
submissions at once, then ``rate`` per second.  Pure bookkeeping with an
injectable clock, so it is tested without sleeping.
"""
from __future__ import annotations

import asyncio
import math
import time
from typing import TYPE_CHECKING, Callable, Hashable

from distexec_kernel import protocol as P

if TYPE_CHECKING:
    from .auth import Identity

DEFAULT_RATE = 50.0
DEFAULT_BURST = 100
# What the master reads of one user's submissions, in MiB per second and at once.  Each MiB costs the master's
# loop (decoding 3 ms, storing, sending on to a slave) what every other user's jobs and events wait on: one
# user pipelining 7 MiB submissions took another's trivial jobs from 5 ms to 0.1-0.7 s at p50 (parse_stall.py).
DEFAULT_READ_RATE = 16.0
DEFAULT_READ_BURST = 32.0
# Failed logins per user name and address: a few per second is plenty for people who mistype, and a
# password-guessing flood is cut off before it costs a hash.  Keyed by the name too: a class behind one
# address (a NAT, a JupyterHub) shares it, and one student's retry loop with a wrong password locked
# every other student there out.
LOGIN_RATE = 5.0
LOGIN_BURST = 10
# Failed logins per address whatever the names: guesses spread over many names (each within its own
# budget) are cut off too, while a whole class mistyping once each at nine o'clock is not.
LOGIN_ADDRESS_RATE = 10.0
LOGIN_ADDRESS_BURST = 30
LOGIN_NAME_CHARS = 256  # of a name, as a key: a made-up name of megabytes is not kept whole
# Argon2 hashes at once (64 MiB and tens of ms of CPU each), the others waiting their turn in order:
# thirty logins at once took the master from 34 to 429 MiB in the default executor's threads.
LOGIN_HASHES_AT_ONCE = 2
MAX_KEYS = 10_000  # buckets kept; full (idle) ones are dropped first


def parse_rate(text: str) -> float | None:
    """``"50/s"``, ``"600/min"``, ``"50"`` -> submissions per second; ``"0"``/``"none"`` -> no limit."""
    text = text.strip().lower()
    if text in ("", "0", "none", "off", "unlimited"):
        return None
    per = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
    count, _, unit = text.partition("/")
    try:
        value = float(count)
    except ValueError:
        raise ValueError(f"bad rate {text!r}: use N/s, N/min or N/h") from None
    if unit and unit not in per:
        raise ValueError(f"bad rate {text!r}: use N/s, N/min or N/h")
    if not value > 0 or math.isinf(value):
        raise ValueError(f"bad rate {text!r}: must be a positive number")
    return value / per.get(unit or "s")


class RateLimiter:
    """Token buckets keyed by client; ``take(key)`` says how long to wait, 0 if allowed."""

    def __init__(self, rate: float | None, burst: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.burst = float(burst if burst is not None else max(1.0, 2 * (rate or 0)))
        self.clock = clock
        self._buckets: dict[Hashable, tuple[float, float]] = {}  # key -> (tokens, at)

    def take(self, key: Hashable, cost: float = 1.0) -> float:
        """Spend ``cost`` tokens of ``key``; returns 0.0 if allowed, else the seconds until it is.

        Allowed with one token left, whatever ``cost``: a batch larger than
        what is left (or than the burst) goes through and leaves the bucket in
        debt, so the next submission waits until the batch is paid for.  The
        rate holds on average, and no batch is refused for its size alone.
        """
        if self.rate is None:
            return 0.0
        now = self.clock()
        tokens = self._tokens(key, now)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - cost, now)
            if len(self._buckets) > MAX_KEYS:
                self._forget_full(now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.rate

    def wait(self, key: Hashable) -> float:
        """What ``take`` would answer, spending nothing."""
        if self.rate is None:
            return 0.0
        tokens = self._tokens(key, self.clock())
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate

    def _tokens(self, key: Hashable, now: float) -> float:
        """``key``'s tokens at ``now``: what it had, refilled at the rate up to the burst."""
        tokens, at = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - at) * self.rate)

    def give_back(self, key: Hashable, cost: float = 1.0) -> None:
        """Return ``cost`` tokens ``take`` spent (up to the burst)."""
        if self.rate is not None and key in self._buckets:
            tokens, at = self._buckets[key]
            self._buckets[key] = (min(self.burst, tokens + cost), at)

    def _forget_full(self, now: float) -> None:
        # A bucket that has refilled is the same as no bucket: drop those.
        for key in [k for k, (t, at) in self._buckets.items()
                    if t + (now - at) * self.rate >= self.burst]:
            del self._buckets[key]


class Gate:
    """The per-client limits the handlers apply before calling ``Master``."""

    def __init__(self, submit_rate: float | None = None, submit_burst: float | None = None,
                 read_rate: float | None = None, read_burst: float = DEFAULT_READ_BURST):
        self.submissions = RateLimiter(submit_rate, submit_burst)
        # Bytes of submissions read, per user (MiB/s and MiB given): a user past it is read later, not refused.
        self.reads = RateLimiter(read_rate * (1 << 20) if read_rate else None, read_burst * (1 << 20))
        self.logins = RateLimiter(LOGIN_RATE, LOGIN_BURST)  # failures only, per (address, user name)
        self.address_logins = RateLimiter(LOGIN_ADDRESS_RATE, LOGIN_ADDRESS_BURST)  # failures, per address
        self.login_turns = asyncio.Semaphore(LOGIN_HASHES_AT_ONCE)  # first come, first hashed

    def check_login(self, address: str, user: str | None = None) -> None:
        """Raise ``rate_limited`` if ``address`` has failed to log in too often of late, as ``user`` or
        under any names (``user`` None: the name is not read yet).

        Only failures are counted (``login_failed``), and each attempt is checked again at its turn to
        hash: a class behind one address (a NAT, a JupyterHub) logging in at once is never refused, one
        person there sending wrong passwords is refused for their own name only, and a flood of guesses
        is cut off, costing at most ``LOGIN_HASHES_AT_ONCE`` hashes past the budget."""
        wait = self.address_logins.wait(address)
        if wait:
            raise RateLimited(f"too many failed login attempts from this address; retry in {_seconds(wait)}", wait)
        wait = self.logins.wait(_login_key(address, user)) if user is not None else 0.0
        if wait:
            raise RateLimited(f"too many failed login attempts as {user[:64]!r} from this address; "
                              f"retry in {_seconds(wait)}", wait)

    def login_failed(self, address: str, user: str | None = None) -> None:
        self.address_logins.take(address)
        if user is not None:
            self.logins.take(_login_key(address, user))

    def check_submit(self, ident: "Identity", jobs: int = 1) -> None:
        """Raise ``rate_limited`` if ``ident`` submits faster than allowed; a batch counts its ``jobs``.

        Keyed by the authenticated user, not the client id a request names,
        which anyone can make up.  Admins are not limited: they run the
        cluster (benchmarks, batch drivers) and can cancel anything anyway;
        the bounded queue still protects the master's memory from them.
        """
        if ident.admin:
            return
        wait = self.submissions.take(ident.user, jobs)
        if wait:
            rate = self.submissions.rate
            per = f"{rate:g}/s" if rate >= 1 else f"{rate * 60:g}/min"
            raise RateLimited(f"too many submissions from {ident.user!r}: at most "
                              f"{per} (burst {self.submissions.burst:g}); "
                              f"retry in {_seconds(wait)}", wait)

    def read_wait(self, ident: "Identity | None", size: int) -> float:
        """Seconds before ``size`` more bytes of ``ident``'s submissions are read: 0, spent now, while the
        user is within the read rate (a message larger than what is left goes, leaving a debt); else how
        long to wait, spending nothing.  The handler then stops reading that user's connection (its own
        later messages wait behind), while every other user's are read as ever.  Admins are not held."""
        if ident is None or ident.admin:
            return 0.0
        return self.reads.take(ident.user, size)

    async def read_turn(self, ident: "Identity | None", size: int) -> None:
        """Wait until ``size`` more bytes of ``ident``'s submissions may be read (``read_wait``)."""
        while wait := self.read_wait(ident, size):
            await asyncio.sleep(wait)

    def refund_submit(self, ident: "Identity", jobs: int = 1) -> None:
        """Give back what ``check_submit`` spent on a submission refused whole (too large, malformed,
        past the queue's cap): nothing of it was queued, so it costs the user nothing."""
        if not ident.admin:
            self.submissions.give_back(ident.user, jobs)


def _login_key(address: str, user: str) -> tuple[str, str]:
    return address, user[:LOGIN_NAME_CHARS]


def _seconds(wait: float) -> str:
    """A wait as people read it: rounded up (a "retry in 0.0 s" that is refused again misleads)."""
    return f"{math.ceil(wait * 100) / 100:.2f} s" if wait < 1 else f"{math.ceil(wait * 10) / 10:.1f} s"


class RateLimited(P.ProtocolError):
    def __init__(self, message: str, retry_after: float):
        super().__init__("rate_limited", message)
        self.retry_after = retry_after

    def to_dict(self) -> dict:
        # The WebSocket's answer has no header: the wait travels in the error.
        return {**super().to_dict(), "retry_after": round(self.retry_after, 3)}
