"""The slave's one ``Runner``: jobs that name a session go to the sessions, the rest to fresh processes."""
from __future__ import annotations

import asyncio

from .runner import Outcome, OutputCallback, Runner
from .sessions import SessionRunner


class RoutingRunner(Runner):
    """The slave's one ``Runner``: jobs that name a session go to the sessions,
    the rest to the runner of fresh processes."""

    def __init__(self, processes: Runner, sessions: SessionRunner):
        self.processes = processes
        self.sessions = sessions

    def describe(self) -> str:
        return f"{self.processes.describe()}; {self.sessions.describe()}"

    async def run(self, job: dict, on_output: OutputCallback, cancel: asyncio.Event) -> Outcome:
        runner = self.sessions if job.get("session") else self.processes
        return await runner.run(job, on_output, cancel)

    async def close(self) -> None:
        await self.sessions.close()
        await self.processes.close()

    # What the agent asks of a runner that keeps sessions.
    def session_names(self) -> list[tuple]:
        return self.sessions.session_names()

    async def end_session(self, name: tuple, reason: str = "ended by a user") -> bool:
        return await self.sessions.end_session(name, reason)

    @property
    def max_sessions_per_user(self) -> int:  # type: ignore[override]
        return self.sessions.max_per_user

    @property
    def on_session_ended(self):  # type: ignore[override]
        return self.sessions.on_ended

    @on_session_ended.setter
    def on_session_ended(self, callback) -> None:
        self.sessions.on_ended = callback
