"""Every language distexec knows, in one table.

The master uses it to turn aliases into main names and to check Python
syntax before queueing; the slave uses it to find toolchains and to build
the compile and run commands; the client uses it to guess a language from a
file extension.  Standard library only, like the protocol.

Adding a language is one ``Language(...)`` entry in ``LANGUAGES`` plus its
tests.  Command templates are argv lists with these placeholders:
``{source}`` the source file name, ``{exe}`` the compiled artefact name,
``{main}`` the source's stem (Java's public class).
"""
from __future__ import annotations

import ast
import os
import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Language:
    name: str
    aliases: tuple[str, ...] = ()
    extensions: tuple[str, ...] = ()
    # File the program is written to in the job's directory.
    source: str = "main"
    # argv that prints the toolchain's version; its first word must be on PATH.
    version: tuple[str, ...] = ()
    compile: tuple[str, ...] | None = None
    run: tuple[str, ...] = ()
    # Extra environment for compile and run steps.
    env: tuple[tuple[str, str], ...] = ()
    # Seconds the compile step may take, apart from the job's own timeout.
    compile_timeout: float = 60.0
    # Regex picking the version number out of the version command's output.
    version_pattern: str = r"(\d+(?:\.\d+)+)"
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def source_name(self, source: str) -> str:
        return self.source


def _python_syntax(source: str) -> dict | None:
    try:
        ast.parse(source, filename="main.py")
    except SyntaxError as exc:
        return {
            "message": f"{type(exc).__name__}: {exc.msg}",
            "line": exc.lineno,
            "column": exc.offset,
            "text": (exc.text or "").rstrip("\n") or None,
        }
    except ValueError as exc:  # source with NUL bytes
        return {"message": f"SyntaxError: {exc}", "line": None, "column": None}
    return None


LANGUAGES: dict[str, Language] = {
    lang.name: lang
    for lang in (
        Language(
            name="python",
            aliases=("py", "python3"),
            extensions=(".py",),
            source="main.py",
            version=("python3", "--version"),
            # -u: output reaches the notebook line by line, not at exit.
            run=("python3", "-u", "{source}"),
        ),
        Language(
            name="bash",
            aliases=("shell",),
            extensions=(".bash",),
            source="main.bash",
            version=("bash", "--version"),
            run=("bash", "{source}"),
        ),
        Language(
            name="sh",
            aliases=(),
            extensions=(".sh",),
            source="main.sh",
            # dash has no --version; the package manager is the only honest source.
            version=("sh", "-c", "echo posix-sh 1.0"),
            run=("sh", "{source}"),
        ),
    )
}

# Master-side syntax checks: language -> function(source) -> None | error details.
SYNTAX_CHECKS = {"python": _python_syntax}


def _alias_table() -> dict[str, str]:
    table = {}
    for lang in LANGUAGES.values():
        table[lang.name] = lang.name
        for alias in lang.aliases:
            table[alias] = lang.name
    return table


ALIASES = _alias_table()


def canonical(name: str) -> str:
    """The main name for ``name`` or an alias of it; unknown names are kept (lower case)."""
    key = name.strip().lower()
    return ALIASES.get(key, key)


def get(name: str) -> Language | None:
    return LANGUAGES.get(canonical(name))


def from_filename(path: str) -> str | None:
    """The language of a file, from its extension (``prog.rs`` -> ``rust``)."""
    ext = os.path.splitext(path)[1].lower()
    for lang in LANGUAGES.values():
        if ext in lang.extensions:
            return lang.name
    return None


def check_syntax(language: str, source: str) -> dict | None:
    """None when the program parses (or nothing can check it); else the error details."""
    check = SYNTAX_CHECKS.get(canonical(language))
    return check(source) if check else None


def parse_version(lang: Language, output: str) -> str:
    match = re.search(lang.version_pattern, output)
    return match.group(1) if match else output.strip().splitlines()[0][:40] if output.strip() else "unknown"
