"""How much one client may ask of the master: submission and login rates.

A token bucket per key (a user name, or an address for logins): ``burst``
submissions at once, then ``rate`` per second.  Pure bookkeeping with an
injectable clock, so it is tested without sleeping.
"""
from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Callable

from distexec_kernel import protocol as P

if TYPE_CHECKING:
    from .auth import Identity

DEFAULT_RATE = 50.0
DEFAULT_BURST = 100
# Logins cost an Argon2 hash each (tens of ms of CPU): a few per second per
# address is plenty for people and keeps a password-guessing flood cheap.
LOGIN_RATE = 5.0
LOGIN_BURST = 10
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
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def take(self, key: str, cost: float = 1.0) -> float:
        """Spend ``cost`` tokens of ``key``; returns 0.0 if allowed, else the seconds until it is.

        Allowed with one token left, whatever ``cost``: a batch larger than
        what is left (or than the burst) goes through and leaves the bucket in
        debt, so the next submission waits until the batch is paid for.  The
        rate holds on average, and no batch is refused for its size alone.
        """
        if self.rate is None:
            return 0.0
        now = self.clock()
        tokens, at = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - cost, now)
            if len(self._buckets) > MAX_KEYS:
                self._forget_full(now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.rate

    def give_back(self, key: str, cost: float = 1.0) -> None:
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

    def __init__(self, submit_rate: float | None = None, submit_burst: float | None = None):
        self.submissions = RateLimiter(submit_rate, submit_burst)
        self.logins = RateLimiter(LOGIN_RATE, LOGIN_BURST)

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
            raise RateLimited(f"too many submissions from {ident.user!r}: at most "
                              f"{self.submissions.rate:g}/s (burst {self.submissions.burst:g}); "
                              f"retry in {wait:.2f} s", wait)


class RateLimited(P.ProtocolError):
    def __init__(self, message: str, retry_after: float):
        super().__init__("rate_limited", message)
        self.retry_after = retry_after

    def to_dict(self) -> dict:
        # The WebSocket's answer has no header: the wait travels in the error.
        return {**super().to_dict(), "retry_after": round(self.retry_after, 3)}
