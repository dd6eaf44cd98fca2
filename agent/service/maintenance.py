"""What a long-running process (the bot, the HTTP API, a worker) does beside its front end:
say it is alive, remind, escalate and expire approval requests at their timers, and drive on
the runs that became runnable elsewhere (a CLI decision) or that a dead process left."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from types import TracebackType

from agent.records import Effects
from agent.service.runs import HEARTBEAT_INTERVAL, PROCESS_LIVE_WITHIN, RunService
from agent.settings import switched_on

log = logging.getLogger(__name__)

# A request opened by another process (a CLI run) is not announced here (one opened here
# is): look for due timers of requests at least this often.
MAX_SWEEP_SLEEP = 5.0
RESTART_DELAY = 1.0
JOURNAL_WATCH_INTERVAL = 1.0
# How often a process that drives runs looks for runnable ones when nothing woke it: what a
# decision recorded by another process waits at most on SQLite (PostgreSQL wakes it at once).
RUNNABLE_POLL = 0.5
# How often a process that drives no runs looks whether runs wait for one that does, besides
# when a run becomes runnable here; and how soon after the last look at the earliest. A run
# is named once it waited a whole PROCESS_LIVE_WITHIN with no live process that drives runs:
# a worker started beside this process, or back from an outage, has beaten by then.
UNDRIVEN_CHECK = 3.0
UNDRIVEN_SPACING = 1.0


class Maintenance:
    """`async with Maintenance(service, kind):` registers the process (`kind`: serve,
    telegram, worker…) with a heartbeat, runs the approval timers' sweeper, the runnable-runs
    loop (when `recover` and the service executes runs; when it executes none, a watch that
    logs runs left waiting for want of a process that does), and follows other processes'
    commits; with `watch_journal` it also polls the journal once a second for readers (SSE
    streams): how SQLite learns of other processes' writes, and a safety net beside
    PostgreSQL's NOTIFY."""

    def __init__(
        self,
        service: RunService,
        kind: str,
        watch_journal: bool = False,
        recover: bool = True,
    ) -> None:
        self._service = service
        self._kind = kind
        self._watch_journal = watch_journal
        self._recover = recover and service.executes_runs
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Maintenance:
        # A worker drives runs through its own claim loop (recover=False), and counts as a
        # process that drives them all the same.
        drives = self._service.executes_runs
        self._tasks = [
            background(lambda: heartbeat_forever(self._service, self._kind, drives), "heartbeat"),
            background(lambda: sweep_approvals_forever(self._service), "approval timers"),
            background(
                lambda: self._service.store.follow_others(journal=self._watch_journal), "listen"
            ),
        ]
        if self._recover:
            self._tasks.append(background(lambda: drive_runnable_forever(self._service), "runs"))
        elif not drives:
            warned: set[str] = set()  # kept when the task starts again (after an outage)
            self._tasks.append(
                background(
                    lambda: warn_of_undriven_runs_forever(self._service, warned), "undriven runs"
                )
            )
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


async def sweep_approvals_forever(service: RunService) -> None:
    """Make the timers of pending approval requests go off: remind, escalate, expire (their
    chat messages then say so), waking at the earliest one. Each hop is made in one
    transaction that finds it not made yet, so processes sweeping one store make it once."""
    opened = service.store.approval_opened
    while True:
        opened.clear()  # before the look: a request opened from here on wakes the next one
        await service.sweep_approvals(wait=False)
        due = await service.store.next_approval_timer()
        delay = MAX_SWEEP_SLEEP if due is None else due - time.time() + 0.01
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(MAX_SWEEP_SLEEP, max(0.01, delay))):
                await opened.wait()


async def heartbeat_forever(service: RunService, kind: str, drives_runs: bool) -> None:
    """Keep this process in the store's registry of live processes while it runs, and take
    it out on a clean exit (a killed one goes stale: its heartbeat stops)."""
    owner, effects = service.owner, service.settings.effects
    try:
        while True:
            await service.store.beat_process(owner, kind, drives_runs, effects)
            await asyncio.sleep(HEARTBEAT_INTERVAL)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.shield(service.store.forget_process(owner))


async def drive_runnable_forever(service: RunService) -> None:
    """Drive the runs that become runnable while this process runs: queued by a decision in
    another process, woken by a child's end, or left by a dead owner. Woken by the store
    (this process's commits; PostgreSQL's NOTIFY), else every RUNNABLE_POLL seconds; a run
    asked to wait after an outage (`not_before`) is left until then."""
    store = service.store
    while True:
        store.runs_ready.clear()
        started = await service.drive_runnable()
        if started:
            log.info("driving %d run(s): %s", len(started), ", ".join(started))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(RUNNABLE_POLL):
                await store.runs_ready.wait()


async def warn_of_undriven_runs_forever(service: RunService, warned: set[str]) -> None:
    """In a process that drives no runs (`--no-worker`): log once per run (`warned` holds
    those named) when a run waited PROCESS_LIVE_WITHIN seconds and no live process drives
    runs, so a run does not sit queued unnoticed. Looks when a run becomes runnable here (a
    start, a decision), when a run seen waiting is due, and every UNDRIVEN_CHECK seconds."""
    store = service.store
    since: dict[str, float] = {}  # run id -> when it was first seen waiting for nobody
    while True:
        store.runs_ready.clear()
        now = time.monotonic()
        waiting = await service.runs_nobody_drives()
        since = {run_id: since.get(run_id, now) for run_id in waiting}
        due = [
            r for r, seen in since.items() if r not in warned and now - seen >= PROCESS_LIVE_WITHIN
        ]
        if due:
            log.warning(
                "%s: start `loom-ops worker`%s (this process was started with --no-worker)",
                *await _undriven(service, due),
            )
        warned.intersection_update(waiting)  # a run that waits again later is named again
        warned.update(due)
        unnamed = [seen for r, seen in since.items() if r not in warned]
        look = min([UNDRIVEN_CHECK, *(seen + PROCESS_LIVE_WITHIN - now for seen in unnamed)])
        await asyncio.sleep(UNDRIVEN_SPACING)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, look - UNDRIVEN_SPACING)):
                await store.runs_ready.wait()


async def _undriven(service: RunService, run_ids: list[str]) -> tuple[str, str]:
    """The warning's words for runs nobody drives: which wait and why, and the settings a
    worker needs for what they do live. Where live processes do drive runs, they may not
    act these."""
    kinds: dict[str, bool] = {}
    for run_id in run_ids:
        effects = (await service.get(run_id)).effects
        kinds.update((kind, True) for kind in (effects.live if effects is not None else ()))
    on = switched_on(Effects(**kinds).live)  # in the order the settings are documented
    needs = f" with {on}" if on else ""
    if not any(p.drives_runs for p in await service.live_processes()):
        return f"{_runs_wait(run_ids)} and no live process drives runs", needs
    them = "it" if len(run_ids) == 1 else "them"
    return f"{_runs_wait(run_ids)} and no live process that drives runs may act {them}", needs


def _runs_wait(run_ids: list[str], shown: int = 10) -> str:
    """The log's words for waiting runs: "run a waits", "runs a, b wait", "runs a, …, j and
    5 more wait"."""
    if len(run_ids) == 1:
        return f"run {run_ids[0]} waits"
    more = f" and {len(run_ids) - shown} more" if len(run_ids) > shown else ""
    return f"runs {', '.join(run_ids[:shown])}{more} wait"


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
