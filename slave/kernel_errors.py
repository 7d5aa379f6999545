"""Run in each session kernel at its start: an exception's text bounded before it is sent.

A cell that raises ``ValueError('x' * 50_000_000)`` has ipykernel send the
text twice over (the ``error`` message, then the ``execute_reply``), each
past the largest message the slave's relay passes (zmtp_relay.py).  The
relay cuts the kernel's socket: the cell could not be ended cleanly and the
session was started again, its variables lost.  Here, in the kernel, the
exception's text and its traceback are cut to ``cap`` characters each
before ipykernel sends them; the cell fails as any cell that raised, and a
traceback that takes the cell's output past its limit still ends it so.
A cell can undo this: it then only loses its own session, as before.

Its source is handed to ipykernel (``exec_lines``), which runs it in the
user's namespace: one function, deleted once called (``setup_line``).
"""
import functools
import inspect


def _distexec_bound_errors(cap: int) -> None:
    shell = get_ipython()  # noqa: F821 (the kernel's namespace has it)
    kernel = shell.kernel

    def cut(text: str, most: int) -> str:
        if len(text) <= most:
            return text
        told = f"… [{len(text) - most} characters cut]"
        return text[:max(0, most - len(told))] + told

    def traceback(stb: list) -> list:
        if sum(len(s) for s in stb) <= cap:
            return stb
        return [cut(s, cap // max(1, len(stb))) for s in stb]

    class Said:
        def __init__(self, text: str):
            self.text = text

        def __str__(self) -> str:
            return self.text

    show = shell._showtraceback

    def _showtraceback(etype, evalue, stb):
        try:
            text = str(evalue)
        except Exception:  # a __str__ that raises: ipykernel's own str() would have, too
            text = f"<{etype.__name__}: its text could not be made>"
        return show(etype, Said(cut(text, cap)), traceback(stb))

    execute = kernel.do_execute

    async def do_execute(*args, **kwargs):
        reply = execute(*args, **kwargs)
        if hasattr(reply, "__await__"):
            reply = await reply
        if isinstance(reply, dict) and reply.get("status") == "error":
            reply["evalue"] = cut(str(reply.get("evalue", "")), cap)
            reply["traceback"] = traceback(list(reply.get("traceback") or []))
        return reply

    shell._showtraceback = _showtraceback
    kernel.do_execute = do_execute


@functools.cache
def _source() -> str:
    return inspect.getsource(_distexec_bound_errors)  # read from this file once, at the first session


def setup_line(cap: int) -> str:
    """The code ipykernel runs at its start for this (``--IPKernelApp.exec_lines``)."""
    name = _distexec_bound_errors.__name__
    return f"{_source()}\n{name}({cap})\ndel {name}\n"
