"""What surrounds a job's process: limits, environment, isolation.

``Sandbox.command`` turns the argv of a compile or run step into what is
actually spawned.  The runner knows nothing of how isolation is done, so a
stronger sandbox is a change here only.
"""
from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from typing import Callable


@dataclass
class Limits:
    memory_mb: int = 1024
    output_mb: int = 16
    max_procs: int = 64
    allow_network: bool = False
    open_files: int = 256
    file_size_mb: int = 256

    @property
    def memory_bytes(self) -> int:
        return self.memory_mb << 20

    @property
    def output_bytes(self) -> int:
        return self.output_mb << 20


@dataclass
class Spawn:
    argv: list[str]
    cwd: str
    env: dict[str, str]
    preexec: Callable[[], None] | None


# Only these reach a job: never the slave's secret or the user's tokens.
PASSED_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "JAVA_HOME", "GOROOT")


def job_env(workdir: str, extra: dict[str, str]) -> dict[str, str]:
    env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.setdefault("LANG", "C.UTF-8")
    env.update(HOME=workdir, TMPDIR=workdir, PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
    env.update(extra)
    return env


def _rlimits(limits: Limits) -> Callable[[], None]:
    def apply() -> None:
        # Runs in the child between fork and exec: plain syscalls only.
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
        size = limits.file_size_mb << 20
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    return apply


class Sandbox:
    """No isolation beyond a process group, a private directory, a clean
    environment and resource limits.  Subclasses add real isolation."""

    name = "none"

    def describe(self) -> str:
        return ("isolation: NONE beyond a private working directory, a clean environment and "
                "resource limits; jobs run as the slave's user and can reach the network")

    def command(self, argv: list[str], workdir: str, extra_env: dict[str, str], limits: Limits) -> Spawn:
        return Spawn(list(argv), workdir, job_env(workdir, extra_env), _rlimits(limits))

    def cleanup(self, spawn: Spawn) -> None:
        pass


def best_sandbox(limits: Limits) -> Sandbox:
    """The strongest sandbox this machine offers."""
    return Sandbox()
