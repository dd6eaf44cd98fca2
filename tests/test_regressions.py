"""Regression tests for defects found in review: approvals, cancel, shutdown, redaction, CLI.

Real components throughout: real SQLite files, the real RunService/kernel, and the real
`loom-ops` console script in a subprocess (killed with a failpoint where a crash is needed).
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from agent.policy.base import ToolCall
from agent.records import Decision, RunStatus
from agent.service.runs import RunService
from agent.settings import Settings
from tests.cli_helpers import Cli, assert_usage_error
from tests.support import (
    LATENCY,
    ScriptedPolicy,
    allow,
    call,
    final,
    lines,
    open_service,
    raw_rows,
    table_text,
    turn,
    write_runbook,
)
from tests.test_approvals import TWO_GATES
from tests.test_kernel import SLOW_DRILL

FOUR_EYES_DRILL = """\
id: four-eyes-drill
title: Four eyes drill
triggers: [four eyes drill]
approvers: [cli:tester, cli:lead]
four_eyes: true
steps:
  - id: act
    title: Append one
    run: "{python} append.py one"
    approval: required
"""


def _cli(workspace: Path, tmp_path: Path) -> Cli:
    return Cli(workspace, tmp_path / "ops.sqlite")


def _pending(db: Path, run_id: str) -> list[tuple[str, str]]:
    return [
        (kind, step)
        for kind, step in raw_rows(
            db,
            "SELECT kind, step_id FROM approvals WHERE run_id = ? AND status = 'pending'",
            (run_id,),
        )
    ]


# -- 1. four eyes does not hold for an in-doubt retry of a gated step ---------------------------


def test_four_eyes_holds_for_the_in_doubt_retry_of_a_gated_step(
    workspace: Path, tmp_path: Path
) -> None:
    write_runbook(workspace, "four-eyes-drill", FOUR_EYES_DRILL)
    cli = _cli(workspace, tmp_path)
    live = {"LOOM_OPS_ALLOW_SHELL": "1"}
    started = cli("runbook", "four-eyes-drill", "--run-id", "fe", "--mock-llm", env=live)
    assert started.returncode == 0, started.describe()
    assert _pending(cli.db, "fe") == [("gate", "act")]
    # A second pair of eyes approves; the process dies right after the intent of `act`.
    killed = cli(
        "approve",
        "--run-id",
        "fe",
        "--as",
        "lead",
        "--mock-llm",
        env={**live, "LOOM_OPS_FAILPOINT": "after_intent:1"},
    )
    assert killed.returncode == -signal.SIGKILL, killed.describe()
    resumed = cli("resume", "--run-id", "fe", "--mock-llm", env=live)
    assert resumed.returncode == 0, resumed.describe()
    assert _pending(cli.db, "fe") == [("in_doubt", "act")]

    # The requester (cli:tester) now decides alone to run the gated side effect again.
    alone = cli(  # acts as cli:tester
        "approve", "--run-id", "fe", "--approval", "2", "--mock-llm", env=live
    )

    assert alone.returncode == 2, alone.describe()
    assert "four eyes" in alone.stderr
    assert lines(workspace) == []


# -- 2. one gate approval authorizes any number of executions ------------------------------------


async def test_one_approval_runs_a_gated_step_once(settings: Settings, workspace: Path) -> None:
    script = [
        turn(call("read_runbook", runbook_id="crash-drill")),
        turn(call("await_approval", step_id="append-two", reason="scale")),
        turn(call("execute_step", step_id="append-two")),
        turn(call("execute_step", step_id="append-two")),  # the same risky step, again
        final("succeeded", "done"),
    ]
    live = settings.model_copy(update={"allow_shell": True})
    async with open_service(live, ScriptedPolicy(script)) as service:
        run = await service.start("again", "crash drill")
        assert run.status == RunStatus.WAITING_APPROVAL
        await service.decide("again", Decision.APPROVE, "cli:approver")

        assert lines(workspace) == ["two"], "the approved command ran more than once"


# -- 3. a duplicated CLI approve decides the *next* gate -----------------------------------------


def test_a_duplicate_cli_approve_does_not_approve_the_next_gate(
    workspace: Path, tmp_path: Path
) -> None:
    write_runbook(workspace, "two-gates", TWO_GATES)
    cli = _cli(workspace, tmp_path)
    assert cli("runbook", "two gates", "--run-id", "tg", "--mock-llm").returncode == 0
    assert _pending(cli.db, "tg") == [("gate", "first")]
    # Two on-call engineers both read "approve gate `first`" and both approve it.
    for _ in range(2):
        cli("approve", "--run-id", "tg", "--as", "approver", "--mock-llm")

    decided_second = raw_rows(
        cli.db,
        "SELECT status, decided_by FROM approvals WHERE run_id = 'tg' AND step_id = 'second' "
        "AND status != 'pending'",
    )
    assert decided_second == [], "gate `second` was approved by a decision meant for `first`"


# -- 4. closing the service leaves a run leased by a live owner ----------------------------------


async def test_close_does_not_strand_a_background_run(settings: Settings) -> None:
    service = await RunService.open(settings)
    await service.start("bg", LATENCY, wait=False)
    await service.close()
    await asyncio.sleep(0.1)

    async with open_service(settings) as other:
        run = await other.resume("bg")  # RunBusy today: leased by this (alive) process

    assert run.status == RunStatus.WAITING_APPROVAL


# -- 5. secrets in dict keys reach the journal ---------------------------------------------------

TOKEN = "ghp_A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"


async def test_a_secret_in_an_argument_key_never_reaches_the_journal(settings: Settings) -> None:
    script = [
        turn(ToolCall(name="record_audit", args={"entry": "note", TOKEN: "x"})),
        final("failed", "done"),
    ]
    async with open_service(settings, ScriptedPolicy(script)) as service:
        await service.start("keyleak", "crash drill")
    dumped = table_text(settings.db, ("events", "tool_calls", "llm_calls"))
    leaked = [table for table, text in dumped.items() if TOKEN in text]
    assert leaked == []


# -- 6. CLI paths that print a traceback -------------------------------------------------------


def test_a_db_path_under_a_file_is_one_line(workspace: Path, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    result = _cli(workspace, tmp_path)("runs", db=tmp_path / "afile" / "ops.sqlite")
    assert_usage_error(result, "ops.sqlite")


def test_a_bad_failpoint_setting_is_one_line(workspace: Path, tmp_path: Path) -> None:
    result = _cli(workspace, tmp_path)("runs", env={"LOOM_OPS_FAILPOINT": "bogus"})
    assert_usage_error(result, "failpoint")


# -- 7. a cross-process cancel loses the outcome of a call that finished ------------------------


async def test_a_call_finished_after_a_remote_cancel_is_closed(
    settings: Settings, workspace: Path
) -> None:
    write_runbook(workspace, "slow-drill", SLOW_DRILL)
    allow(workspace, "append.py", "re:slow|fast", "**")
    live = settings.model_copy(update={"allow_shell": True, "lease_ttl": 30})
    async with open_service(live) as driver, open_service(live) as other:
        driving = asyncio.create_task(driver.start("far", "slow-drill seconds=0.5"))
        for _ in range(500):
            if "slow" in lines(workspace):
                break
            await asyncio.sleep(0.01)
        await other.cancel("far", "cli:oncall")
        after = await asyncio.wait_for(driving, timeout=10)
        assert after.status == RunStatus.CANCELLED
        slow = next(c for c in await other.store.list_tool_calls("far") if c.step_id == "slow")

    assert slow.status != "intent", "the command ran to its end but its call is still in doubt"
