"""What a long-running process (the bot, the HTTP API) does beside its front end: expire
approval requests at their deadline, and drive on the runs a dead process left."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from types import TracebackType

from agent.service import RunService

log = logging.getLogger(__name__)

# A request opened by another process (a CLI run) is not announced here: look for overdue
# requests at least this often.
MAX_EXPIRY_SLEEP = 5.0
RESTART_DELAY = 1.0
JOURNAL_WATCH_INTERVAL = 1.0


class Maintenance:
    """`async with Maintenance(service):` runs the expiry sweeper, the recovery loop (when
    `recover` and the service executes runs), and follows other processes' commits; with
    `watch_journal` it also polls the journal once a second for readers (SSE streams): how
    SQLite learns of other processes' writes, and a safety net beside PostgreSQL's NOTIFY."""

    def __init__(
        self, service: RunService, watch_journal: bool = False, recover: bool = True
    ) -> None:
        self._service = service
        self._watch_journal = watch_journal
        self._recover = recover and service.executes_runs
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Maintenance:
        self._tasks = [
            background(lambda: expire_overdue_forever(self._service), "expiry"),
            background(self._service.store.follow_others, "listen"),
        ]
        if self._recover:
            self._tasks.append(background(lambda: recover_forever(self._service), "recovery"))
        if self._watch_journal:
            self._tasks.append(background(lambda: watch_journal(self._service), "journal"))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await stop_all(self._tasks)


async def expire_overdue_forever(service: RunService) -> None:
    """Expire approval requests at their deadline (their chat messages then say so)."""
    while True:
        await service.expire_overdue(wait=False)
        deadline = await service.store.next_approval_deadline()
        delay = MAX_EXPIRY_SLEEP if deadline is None else deadline - time.time() + 0.01
        await asyncio.sleep(min(MAX_EXPIRY_SLEEP, max(0.01, delay)))


async def recover_forever(service: RunService) -> None:
    """Drive on the runs a dead process left, at once and then once per lease TTL: a run a
    passing fault interrupted (an unreachable LLM, a locked database) is queued for resume,
    and a long-running process is what resumes it."""
    while True:
        recovered = await service.recover()
        if recovered:
            ids = ", ".join(run.id for run in recovered)
            log.info("recovered %d run(s): %s", len(recovered), ids)
        await asyncio.sleep(service.settings.lease_ttl)


async def watch_journal(service: RunService) -> None:
    """Notice events other processes append (a CLI decision), once a second; this process's
    own writes wake readers at once."""
    while True:
        await service.store.notice_other_writers()
        await asyncio.sleep(JOURNAL_WATCH_INTERVAL)


def background(work: Callable[[], Awaitable[None]], name: str) -> asyncio.Task[None]:
    """Run `work` as a task; when it fails it is logged and started again, so one bad moment
    (a locked database, say) does not stop it for good."""

    async def guarded() -> None:
        while True:
            try:
                await work()
                return
            except Exception:
                log.exception("the %s task failed; starting it again", name)
            await asyncio.sleep(RESTART_DELAY)

    return asyncio.create_task(guarded(), name=f"loom-ops:{name}")


async def stop_all(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel tasks and wait until they have stopped."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
