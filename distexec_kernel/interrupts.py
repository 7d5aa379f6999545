"""Ctrl-C (a kernel interrupt) while a submission is on its way to the master.

A KeyboardInterrupt raised inside the request leaves the caller without the
job or group the master may already have made: nobody could cancel it, and
it runs on, unseen.  So a first interrupt there is held until the answer is
in, and the caller cancels what it got; a second one is raised at once, for
a master that does not answer.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


class Held:
    """Whether an interrupt came while held."""

    def __init__(self) -> None:
        self.pressed = False


@contextlib.contextmanager
def held() -> Iterator[Held]:
    """Hold a first SIGINT for the duration (``.pressed`` says it came); a second is raised.

    Only the main thread takes signals: elsewhere nothing is held, nor needs to be.
    """
    state = Held()
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def note(signum, frame):
        if state.pressed:
            raise KeyboardInterrupt
        state.pressed = True

    previous = signal.signal(signal.SIGINT, note)
    try:
        yield state
    finally:
        # None: a handler not set from Python; Python's own is what raises KeyboardInterrupt.
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
