"""`loom-ops worker`: claims runnable runs from the shared store and drives them.

Any number of workers, on any machines sharing the database, take runs with leases: a claim
marks a run running under the worker's lease in one transaction (skipping rows another worker
is claiming), the lease is renewed while the run is driven, and a run whose worker died is
claimed again once its lease expired. A commit that makes a run runnable (a new run, a
decision, a child's end) wakes the workers: at once in this process, through LISTEN/NOTIFY
from other processes on PostgreSQL, and within `poll_interval` on SQLite.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys

from agent.errors import StoreUnavailable
from agent.records import Claim
from agent.service.maintenance import Maintenance
from agent.service.runs import RunService
from agent.settings import Settings

log = logging.getLogger(__name__)


class Worker:
    """Keeps up to `concurrency` runs driven by this process, claiming more as slots free."""

    def __init__(self, service: RunService, concurrency: int, poll_interval: float) -> None:
        self._service = service
        self._concurrency = concurrency
        self._poll_interval = poll_interval

    async def run(self) -> None:
        """Claim and drive until cancelled (drives in flight then hand their runs back)."""
        service = self._service
        while True:
            service.runs_ready.clear()
            service.drive_ended.clear()
            free = self._concurrency - service.driving
            try:
                claimed = await self._claim(free)
            except StoreUnavailable as exc:  # the database is away: wait, retry
                log.warning("cannot claim runs: %s", exc)
                await asyncio.sleep(self._poll_interval)
                continue
            for claim in claimed:
                self._service.drive_claimed(claim)
            if claimed:
                log.info("claimed %s", ", ".join(claim.run_id for claim in claimed))
            if claimed and len(claimed) == free:
                # Full: wait for a slot; more may be waiting, so look at once when one frees.
                await self._service.drive_ended.wait()
                continue
            if claimed:
                continue  # others may have queued meanwhile: look again before waiting
            await _first_of(service.runs_ready, self._poll_interval)

    async def _claim(self, limit: int) -> list[Claim]:
        """Claim runs; stopped meanwhile, hand back what the claim took all the same (its
        transaction commits on the database thread whatever happens to this task)."""
        claiming = asyncio.ensure_future(self._service.claim(limit))
        try:
            return await asyncio.shield(claiming)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                for claim in await claiming:
                    await self._service.release(claim)
            raise


async def _first_of(event: asyncio.Event, timeout: float) -> None:
    # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()


async def run_worker(
    settings: Settings,
    concurrency: int,
    stop: asyncio.Event,
    poll_interval: float = 1.0,
    hurry: asyncio.Event | None = None,
) -> int:
    """Serve as a worker until `stop` is set, then let the steps in flight end (unless
    `hurry` is set meanwhile); returns the exit code."""
    service = await RunService.open(settings)
    try:
        service.prepare()
        async with Maintenance(service, "worker", recover=False):
            worker = asyncio.create_task(
                Worker(service, concurrency, poll_interval).run(), name="loom-ops:worker"
            )
            # What it may act live says which runs it takes (only those it may act in full).
            live = settings.effects.live
            acts = f"acting live: {', '.join(live)}" if live else "dry-run: acting nothing live"
            print(
                f"loom-ops: worker {service.owner} on {service.store_label}, "
                f"up to {concurrency} runs at once, {acts}",
                file=sys.stderr,
                flush=True,
            )
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({worker, stopping}, return_when=asyncio.FIRST_COMPLETED)
            for task in (worker, stopping):
                task.cancel()
            results = await asyncio.gather(worker, stopping, return_exceptions=True)
            failure = results[0]
            if isinstance(failure, Exception):
                raise failure
            # Claiming no more, still registered as live: the steps in flight end first.
            await service.drain(settings.drain_seconds, hurry)
    finally:
        await service.close()  # drives still going hand their runs back (queued, announced)
    return 0
