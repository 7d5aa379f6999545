"""A program's arguments after ``--``, for the CLI's ``submit`` and the magic's ``%%remote``.

argparse reads a program argument that starts with a dash (``--arg -v``) as an
option, and gives a ``nargs="*"`` positional its words only right after the
one before it: so the words after ``--`` are cut off by hand, and a refused
``--arg -v`` is told how to say it.
"""
from __future__ import annotations

# argparse's message for ``--arg -v``.
DASHED_ARG = "argument --arg: expected one argument"


def split(argv: list[str]) -> tuple[list[str], list[str]]:
    """The words before the first ``--``, and the program's arguments after it."""
    if "--" in argv:
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1:]
    return argv, []


def hint(message: str, usage: str) -> str:
    """``message``, and for a dashed ``--arg`` how to give it (``usage``: the command, up to its options)."""
    if DASHED_ARG not in message:
        return message
    return (f"{message}; an argument that starts with - is given as --arg=-v, or after -- with the "
            f"program's others: {usage} -- -v")
