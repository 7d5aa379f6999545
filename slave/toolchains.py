"""Which languages this slave can run, found by asking each toolchain its version."""
from __future__ import annotations

import asyncio
import logging
import shutil

from distexec_kernel import languages as L

log = logging.getLogger("distexec.slave.toolchains")

DETECT_TIMEOUT = 15.0


async def _version(lang: L.Language) -> str | None:
    # Every program a language needs must be there: a JDK's java without javac is no use.
    needed = [lang.version[:1], (lang.compile or ())[:1], lang.run[:1]]
    if not lang.version or any(shutil.which(cmd[0]) is None for cmd in needed if cmd):
        return None
    try:
        proc = await asyncio.create_subprocess_exec(
            *lang.version, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL)
        out, _ = await asyncio.wait_for(proc.communicate(), DETECT_TIMEOUT)
    except (OSError, asyncio.TimeoutError) as exc:
        log.warning("%s: %s did not answer: %s", lang.name, lang.version[0], exc)
        return None
    if proc.returncode != 0:
        return None
    return L.parse_version(lang, out.decode(errors="replace"))


async def detect(only: list[str] | None = None) -> dict[str, str]:
    """Language name -> toolchain version, for every language found here.

    ``only`` restricts the set (``--languages``); names may be aliases.
    """
    wanted = [L.canonical(n) for n in only] if only else list(L.LANGUAGES)
    unknown = [n for n in wanted if n not in L.LANGUAGES]
    if unknown:
        raise ValueError(f"unknown language(s): {', '.join(unknown)}; known: {', '.join(L.LANGUAGES)}")
    langs = [L.LANGUAGES[n] for n in wanted]
    versions = await asyncio.gather(*(_version(lang) for lang in langs))
    found = {lang.name: v for lang, v in zip(langs, versions) if v is not None}
    missing = [lang.name for lang, v in zip(langs, versions) if v is None]
    if missing:
        log.info("not available here: %s", ", ".join(missing))
    return found
