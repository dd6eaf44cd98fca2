"""Starts beside other processes on one store: the active-run cap (LOOM_OPS_MAX_ACTIVE_RUNS)
holds across them (the count and the creation are one transaction, which every process's
creations serialize on), and a run another process takes first is still started."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.errors import RunExists, TooManyRuns
from agent.records import RunStatus
from agent.service.runs import RunService
from agent.settings import Settings
from tests.support import LATENCY


def capped_settings(workspace: Path, db: str) -> Settings:
    return Settings(
        _env_file=None, db=db, workspace=workspace, mock_llm=True, user="tester", max_active_runs=1
    )


async def test_two_services_on_one_store_cannot_both_pass_the_cap(
    workspace: Path, db_url: str
) -> None:
    """Two processes (a bot and `serve`, two bot instances) starting at the same moment with
    one slot: one run each round, the other refused."""
    settings = capped_settings(workspace, db_url)
    # executes_runs=False: the runs stay queued, so active, as under a busy worker pool.
    a = await RunService.open(settings, executes_runs=False)
    b = await RunService.open(settings, executes_runs=False)
    try:
        for n in range(8):
            results = await asyncio.gather(
                a.start(f"a{n}", LATENCY, capped=True, wait=False),
                b.start(f"b{n}", LATENCY, capped=True, wait=False),
                return_exceptions=True,
            )
            refused = [r for r in results if isinstance(r, BaseException)]
            assert len(refused) == 1 and isinstance(refused[0], TooManyRuns), results
            assert await a.active_runs() == 1
            for run in results:
                if not isinstance(run, BaseException):
                    await a.cancel(run.id, by="cli:tester")
    finally:
        await a.close()
        await b.close()


async def test_a_start_handled_again_at_the_cap_finds_its_run(
    workspace: Path, tmp_path: Path
) -> None:
    """A /run handled again after a crash, while its own run fills the one slot, is told
    its run exists (the chat then finds it), not that the cap is reached."""
    settings = capped_settings(workspace, str(tmp_path / "ops.sqlite"))
    service = await RunService.open(settings, executes_runs=False)
    try:
        await service.start("tg-abc123", LATENCY, capped=True, wait=False)
        with pytest.raises(RunExists):
            await service.start("tg-abc123", LATENCY, capped=True, wait=False)
        with pytest.raises(TooManyRuns, match="LOOM_OPS_MAX_ACTIVE_RUNS"):
            await service.start("tg-other", LATENCY, capped=True, wait=False)
    finally:
        await service.close()


async def test_a_start_another_process_drove_first_returns_the_run_as_it_stands(
    workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`loom-ops runbook` beside `serve` on one store: serve's loop may claim the new run and
    drive it to its approval before the CLI claims it. The start happened; the CLI reports
    the run as it stands instead of failing."""
    settings = capped_settings(workspace, str(tmp_path / "ops.sqlite"))
    cli = await RunService.open(settings)
    other = await RunService.open(settings)
    try:
        create_run = cli.store.create_run

        async def created_then_driven_elsewhere(*args: object, **kwargs: object) -> object:
            run = await create_run(*args, **kwargs)  # type: ignore[arg-type]
            await other.kernel.drive(run.id)  # the other process wins the claim
            return run

        monkeypatch.setattr(cli.store, "create_run", created_then_driven_elsewhere)
        run = await cli.start("by-cli", LATENCY, role="runbook")
        assert run.status == RunStatus.WAITING_APPROVAL
        assert (await cli.pending_approval("by-cli")) is not None
    finally:
        await cli.close()
        await other.close()
