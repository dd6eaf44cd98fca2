"""Approvals through the real RunService over a real SQLite file (and the `loom-ops` CLI where
a decision is a process of its own): who may decide, what each decision does to the run,
deadlines, races and repeats of decisions, cancel, and rollback on reject."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from agent.chain import first_broken_link
from agent.errors import ServiceError, StoreError
from agent.records import ApprovalStatus, Decision, RunStatus, VoteOutcome
from agent.run.approvals import vote_outcome
from agent.service.runs import RunService
from agent.settings import Settings
from tests.cli_helpers import Cli
from tests.support import (
    DEPLOY,
    LATENCY,
    TWO_GATES,
    allow,
    lines,
    open_service,
    raw_rows,
    write_runbook,
)

# The shipped api-latency-spike runbook gates `scale-out`; these steps come after it.
AFTER_SCALE_OUT = {"rollout-wait", "verify", "handoff"}

UNDO_DRILL = """\
id: undo-drill
title: Undo drill
description: Live steps with rollbacks before a gate, so a rejection has something to undo.
triggers: [undo drill]
approvers: [cli:approver]
on_reject: rollback
steps:
  - id: one
    title: Append one
    run: "{python} append.py one"
    rollback:
      run: "{python} append.py undo-one"
  - id: look
    title: Nothing to undo
    note: only a note
  - id: two
    title: Append two
    run: "{python} append.py two"
    rollback:
      run: "{python} append.py undo-second"
  - id: three
    title: Append three
    run: "{python} append.py three"
    approval: required
    rollback:
      run: "{python} append.py undo-three"
  - id: four
    title: Append four
    run: "{python} append.py four"
"""

QUICK_GATE = """\
id: quick-gate
title: Quick gate
triggers: [quick gate]
approvers: [cli:approver]
approval_timeout: 0.2
steps:
  - id: look
    title: Look
    note: looking
  - id: act
    title: Act
    run: echo act
    approval: required
  - id: after
    title: After
    run: echo after
"""
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


def _pending(db: Path, run_id: str) -> list[tuple[str, str]]:
    """(kind, step_id) of a run's pending approval requests, straight from the file."""
    return [
        (kind, step)
        for kind, step in raw_rows(
            db,
            "SELECT kind, step_id FROM approvals WHERE run_id = ? AND status = 'pending'",
            (run_id,),
        )
    ]


async def _event_types(service: RunService, run_id: str) -> list[str]:
    """The types of a run's journal entries, in order."""
    return [event.type for event in await service.store.list_events(run_id)]


async def _snapshot(service: RunService, run_id: str) -> tuple[object, ...]:
    """What a refused decision must leave untouched: run row, approvals, journal length."""
    run = await service.get(run_id)
    approvals = await service.store.list_approvals(run_id)
    events = await service.store.list_events(run_id)
    return (run.status, run.checkpoint, run.error, approvals, len(events))


async def _executed_steps(service: RunService, run_id: str) -> list[str]:
    """Step ids that got an `execute_step` call, in order."""
    return [
        str(c.step_id)
        for c in await service.store.list_tool_calls(run_id)
        if c.tool == "execute_step"
    ]


# -- approve -----------------------------------------------------------------------------------


async def test_approve_resumes_the_run_and_records_the_decider(service: RunService) -> None:
    """Approval records who, when and why, journals request then decision, and the run ends."""
    run = await service.start("inc-1", LATENCY)
    assert run.status == RunStatus.WAITING_APPROVAL
    pending = await service.pending_approval("inc-1")
    assert pending is not None
    assert (pending.step_id, pending.kind, pending.status) == ("scale-out", "gate", "pending")
    assert pending.action == "kubectl scale deployment/checkout-api -n production --replicas=6"
    assert pending.rollback == "kubectl scale deployment/checkout-api -n production --replicas=3"
    assert pending.deciders == ["group:approvers"]
    assert "scale-out" not in await _executed_steps(service, "inc-1")

    before = time.time()
    result = await service.decide("inc-1", Decision.APPROVE, "cli:oncall", "LGTM")

    assert result.changed
    assert result.message == "approved by cli:oncall"
    assert result.run.status == RunStatus.SUCCEEDED
    assert result.run.error is None
    approval = result.approval
    assert approval.status == ApprovalStatus.APPROVED
    assert approval.decided_by == "cli:oncall"
    assert approval.note == "LGTM"
    assert approval.decided_at is not None and before <= approval.decided_at <= time.time()
    assert await service.pending_approval("inc-1") is None

    types = await _event_types(service, "inc-1")
    assert types.count("approval_requested") == 1 and types.count("approval_decided") == 1
    assert types.index("approval_requested") < types.index("approval_decided")
    events = await service.store.list_events("inc-1")
    decided = next(e for e in events if e.type == "approval_decided")
    assert decided.data["decided_by"] == "cli:oncall" and decided.data["decision"] == "approved"
    assert first_broken_link(events) is None
    # The gated step ran only after the decision, then the rest of the runbook.
    executed = await _executed_steps(service, "inc-1")
    assert executed[executed.index("scale-out") :] == ["scale-out", "rollout-wait", "handoff"]


# -- reject ------------------------------------------------------------------------------------


async def test_reject_stops_the_run_and_names_the_decider(service: RunService) -> None:
    """A rejection ends the run; nothing after the gate runs; the error says who and why."""
    await service.start("inc-2", LATENCY)
    result = await service.decide("inc-2", Decision.REJECT, "telegram:100000001", "not now")

    assert result.changed
    assert result.run.status == RunStatus.REJECTED
    assert result.run.error == "rejected by telegram:100000001: not now"
    assert result.approval.status == ApprovalStatus.REJECTED
    assert result.approval.decided_by == "telegram:100000001"
    calls = await service.store.list_tool_calls("inc-2")
    gate_calls = [c for c in calls if c.step_id == "scale-out"]
    assert [(c.tool, c.status) for c in gate_calls] == [("await_approval", "ok")]
    assert gate_calls[0].outcome is not None and gate_calls[0].outcome["approved"] is False
    assert not AFTER_SCALE_OUT & {c.step_id for c in calls}
    assert "record_audit" not in {c.tool for c in calls}
    assert (await _event_types(service, "inc-2"))[-1] == "run_finished"


async def test_reject_with_rollback_undoes_completed_steps_newest_first(
    workspace: Path, settings: Settings
) -> None:
    """`on_reject: rollback` runs each completed step's rollback, newest first, for real."""
    write_runbook(workspace, "undo-drill", UNDO_DRILL)
    allow(workspace, "append.py", "re:one|two|three|four|undo-one|undo-second|undo-three")
    live = settings.model_copy(update={"allow_shell": True})
    async with open_service(live) as service:
        run = await service.start("undo", "undo-drill please")
        assert run.status == RunStatus.WAITING_APPROVAL
        assert lines(workspace) == ["one", "two"]

        result = await service.decide("undo", Decision.REJECT, "cli:approver", "too risky")

        assert result.changed
        assert result.run.status == RunStatus.REJECTED
        calls = await service.store.list_tool_calls("undo")
        rollbacks = [c for c in calls if c.tool == "rollback_step"]
        assert [(c.step_id, c.status) for c in rollbacks] == [("two", "ok"), ("one", "ok")]
        journal = await service.store.list_events("undo")
        intents = [e.data for e in journal if e.type == "tool_intent"]
        assert [(i["tool"], i["step_id"]) for i in intents[-2:]] == [
            ("rollback_step", "two"),
            ("rollback_step", "one"),
        ]
        turns = await service.store.list_policy_turns("undo")
        assert turns[-1].policy == "kernel:rollback"
        assert lines(workspace) == ["one", "two", "undo-second", "undo-one"]
        # The gated step and everything after it never ran, and nothing was undone for them.
        assert await _executed_steps(service, "undo") == ["one", "look", "two"]
        assert result.approval.decided_by == "cli:approver"
        assert result.run.summary == (
            "rejected by cli:approver: too risky; rolled back 2 of 2 step(s) (two, one)"
        )
        types = await _event_types(service, "undo")
        assert types.index("approval_decided") < types.index("run_finished")
        assert types.count("run_finished") == 1
        assert first_broken_link(await service.store.list_events("undo")) is None


async def test_a_failed_rollback_is_not_reported_as_rolled_back(
    workspace: Path, settings: Settings
) -> None:
    """If a rollback action fails, the run's summary must not claim the step was rolled back."""
    write_runbook(workspace, "undo-drill", UNDO_DRILL)
    # undo-second is NOT admitted: the rollback of `two` is denied by the allowlist.
    allow(workspace, "append.py", "re:one|two|three|four|undo-one|undo-three")
    live = settings.model_copy(update={"allow_shell": True})
    async with open_service(live) as service:
        await service.start("undo", "undo-drill please")
        result = await service.decide("undo", Decision.REJECT, "cli:approver")
        statuses = {
            c.step_id: c.status
            for c in await service.store.list_tool_calls("undo")
            if c.tool == "rollback_step"
        }
        assert statuses == {"two": "error", "one": "ok"}
        assert lines(workspace) == ["one", "two", "undo-one"]
        assert result.run.status == RunStatus.REJECTED
        summary = result.run.summary or ""
        assert "rolled back 2 step(s)" not in summary, summary
        assert "rolled back 1 of 2 step(s) (one)" in summary, summary
        assert "rollback FAILED for two" in summary, summary


@pytest.mark.parametrize(
    "budget",
    [
        pytest.param({"max_steps": 5}, id="max_steps"),
        pytest.param({"max_tool_calls": 5}, id="calls"),
    ],
)
async def test_a_spent_budget_does_not_skip_the_rollback(
    workspace: Path, settings: Settings, budget: dict[str, int]
) -> None:
    """A rejection rolls back completed steps even when the run used its whole budget."""
    write_runbook(workspace, "undo-drill", UNDO_DRILL)
    allow(workspace, "append.py", "re:one|two|three|four|undo-one|undo-second|undo-three")
    # The mock reaches the gate with 5 policy turns and 4 tool calls spent, so either budget
    # of 5 leaves the kernel less than the two rollbacks it must run.
    limited = settings.model_copy(update={"allow_shell": True, **budget})
    async with open_service(limited) as service:
        run = await service.start("spent", "undo-drill please")
        assert run.status == RunStatus.WAITING_APPROVAL
        assert (run.checkpoint.steps_used, run.checkpoint.tool_calls_used) == (5, 4)

        result = await service.decide("spent", Decision.REJECT, "cli:approver")

        assert lines(workspace) == ["one", "two", "undo-second", "undo-one"]
        assert result.run.status == RunStatus.REJECTED, result.run.error


DOUBT_DRILL = """\
id: doubt-drill
title: Doubt drill
triggers: [doubt drill]
approvers: [cli:approver]
on_reject: rollback
steps:
  - id: slow
    title: A slow step that is not idempotent
    run: "{python} append.py slow 0.5"
    rollback:
      run: "{python} append.py undo-slow"
  - id: gate
    title: Gated step
    run: "{python} append.py gated"
    approval: required
"""


async def test_a_skipped_in_doubt_step_is_rolled_back_on_reject(
    workspace: Path, settings: Settings
) -> None:
    """A step a human declared done (skip) counts as completed when the run is rolled back."""
    write_runbook(workspace, "doubt-drill", DOUBT_DRILL)
    allow(workspace, "append.py", "re:slow|undo-slow|gated", "**")
    live = settings.model_copy(update={"allow_shell": True})
    async with open_service(live) as first, open_service(live) as second:
        # The first process loses its lease while `slow` runs: the step is left in doubt.
        driving = asyncio.create_task(first.start("doubt", "doubt-drill"))
        deadline = time.monotonic() + 10
        while "slow" not in lines(workspace):
            assert time.monotonic() < deadline and not driving.done()
            await asyncio.sleep(0.01)
        taken = await second.store.claim_run("doubt", "intruder:1:x", 30, lambda _owner: True)
        await driving
        await taken.release()
        await second.resume("doubt")
        in_doubt = await second.pending_approval("doubt")
        assert in_doubt is not None and (in_doubt.kind, in_doubt.step_id) == ("in_doubt", "slow")
        # The operator sees the line in out.txt: the step ran, skip it.
        skipped = await second.decide("doubt", Decision.SKIP, "cli:approver")
        assert skipped.changed and skipped.run.status == RunStatus.WAITING_APPROVAL

        gate = await second.pending_approval("doubt")
        assert gate is not None
        result = await second.decide(
            "doubt", Decision.REJECT, "cli:approver", approval_number=gate.number
        )

        assert result.run.status == RunStatus.REJECTED
        assert lines(workspace) == ["slow", "undo-slow"]


# -- expire ------------------------------------------------------------------------------------


async def test_runbook_deadline_expires_the_run_and_a_late_decision_changes_nothing(
    workspace: Path, service: RunService
) -> None:
    """Past the runbook's approval_timeout the request expires; a late tap changes nothing."""
    write_runbook(workspace, "quick-gate", QUICK_GATE)
    await service.start("late", "quick-gate now")
    pending = await service.pending_approval("late")
    assert pending is not None
    assert pending.deadline_at - pending.created_at == pytest.approx(0.2, abs=0.05)
    assert await service.expire_overdue() == []  # not yet
    assert (await service.get("late")).status == RunStatus.WAITING_APPROVAL

    await asyncio.sleep(0.3)
    assert len(await service.expire_overdue()) == 1
    assert await service.expire_overdue() == []  # once

    run = await service.get("late")
    assert run.status == RunStatus.EXPIRED
    assert run.error == "approval request expired without a decision"
    approval = await service.store.get_approval(pending.id)
    assert approval.status == ApprovalStatus.EXPIRED and approval.decided_by is None
    types = await _event_types(service, "late")
    assert types[-2:] == ["approval_expired", "run_finished"]

    before = await _snapshot(service, "late")
    late = await service.decide(
        "late", Decision.APPROVE, "cli:approver", approval_token=pending.token
    )
    assert not late.changed
    assert "already expired" in late.message
    with pytest.raises(ServiceError, match="already expired"):
        await service.decide("late", Decision.APPROVE, "cli:approver")
    assert await _snapshot(service, "late") == before
    assert "act" not in await _executed_steps(service, "late")


async def test_a_decision_after_the_settings_deadline_expires_instead(
    settings: Settings,
) -> None:
    """With no runbook timeout the settings' one applies; deciding late expires, not approves."""
    quick = settings.model_copy(update={"approval_timeout": 0.2})
    async with open_service(quick) as service:
        await service.start("drill", "crash drill")
        pending = await service.pending_approval("drill")
        assert pending is not None and pending.step_id == "append-two"
        assert pending.deadline_at - pending.created_at == pytest.approx(0.2, abs=0.05)
        await asyncio.sleep(0.3)

        with pytest.raises(ServiceError, match="already expired"):
            await service.decide("drill", Decision.APPROVE, "cli:approver")

        run = await service.get("drill")
        assert run.status == RunStatus.EXPIRED
        approval = await service.store.get_approval(pending.id)
        assert approval.status == ApprovalStatus.EXPIRED and approval.decided_by is None
        assert "append-two" not in await _executed_steps(service, "drill")
        assert "approval_decided" not in await _event_types(service, "drill")


# -- double decisions --------------------------------------------------------------------------


@pytest.mark.parametrize("approve_first", [True, False])
async def test_concurrent_decisions_exactly_one_wins(
    service: RunService, approve_first: bool
) -> None:
    """Approve and reject at the same moment: one changes the run, the other says `already`."""
    for n in range(4):
        run_id = f"race-{n}"
        await service.start(run_id, LATENCY)
        approve = service.decide(run_id, Decision.APPROVE, "cli:oncall", "go")
        reject = service.decide(run_id, Decision.REJECT, "telegram:100000001", "stop")
        pair = (approve, reject) if approve_first else (reject, approve)
        results = await asyncio.gather(*pair)

        winners = [r for r in results if r.changed]
        losers = [r for r in results if not r.changed]
        assert len(winners) == 1 and len(losers) == 1, [r.message for r in results]
        assert "already" in losers[0].message and "nothing changed" in losers[0].message
        approval = await service.store.get_approval(winners[0].approval.id)
        run = await service.get(run_id)
        if approval.status == ApprovalStatus.APPROVED:
            assert approval.decided_by == "cli:oncall"
            assert run.status == RunStatus.SUCCEEDED
        else:
            assert approval.status == ApprovalStatus.REJECTED
            assert approval.decided_by == "telegram:100000001"
            assert run.status == RunStatus.REJECTED
        assert losers[0].message.startswith(f"already {approval.status} by {approval.decided_by}")
        assert (await _event_types(service, run_id)).count("approval_decided") == 1
        assert first_broken_link(await service.store.list_events(run_id)) is None


async def test_a_second_decision_changes_nothing(service: RunService) -> None:
    """Once decided, the same request (a second tap) and the finished run stay as they are."""
    await service.start("twice", LATENCY)
    pending = await service.pending_approval("twice")
    assert pending is not None
    first = await service.decide("twice", Decision.APPROVE, "cli:oncall")
    assert first.changed and first.run.status == RunStatus.SUCCEEDED
    before = await _snapshot(service, "twice")

    again = await service.decide(
        "twice", Decision.REJECT, "telegram:100000001", approval_token=pending.token
    )
    assert not again.changed
    assert again.message == "already approved by cli:oncall; nothing changed"
    assert again.run.status == RunStatus.SUCCEEDED
    with pytest.raises(ServiceError, match="already succeeded"):
        await service.decide("twice", Decision.REJECT, "telegram:100000001")
    assert await _snapshot(service, "twice") == before


async def test_a_stale_button_does_not_decide_the_next_gate(
    workspace: Path, service: RunService
) -> None:
    """The first gate's token, used again while the run waits at the second gate, is a no-op."""
    write_runbook(workspace, "two-gates", TWO_GATES)
    await service.start("gates", "two-gates")
    first = await service.pending_approval("gates")
    assert first is not None and first.step_id == "first"
    approved = await service.decide("gates", Decision.APPROVE, "cli:approver")
    assert approved.changed and approved.run.status == RunStatus.WAITING_APPROVAL
    second = await service.pending_approval("gates")
    assert second is not None and second.step_id == "second"
    before = await _snapshot(service, "gates")

    stale = await service.decide(
        "gates", Decision.REJECT, "cli:approver", approval_token=first.token
    )

    assert not stale.changed and "already approved" in stale.message
    assert await _snapshot(service, "gates") == before
    assert (await service.pending_approval("gates")) == second


def test_a_duplicate_cli_approve_does_not_approve_the_next_gate(
    workspace: Path, tmp_path: Path
) -> None:
    """Two on-call engineers both run `loom-ops approve` for gate `first`: the second command
    must not approve gate `second`, which nobody has seen yet."""
    write_runbook(workspace, "two-gates", TWO_GATES)
    cli = Cli(workspace, tmp_path / "ops.sqlite")
    assert cli("runbook", "two gates", "--run-id", "tg", "--mock-llm").returncode == 0
    assert _pending(cli.db, "tg") == [("gate", "first")]
    for _ in range(2):
        cli("approve", "--run-id", "tg", "--as", "approver", "--mock-llm")

    decided_second = raw_rows(
        cli.db,
        "SELECT status, decided_by FROM approvals WHERE run_id = 'tg' AND step_id = 'second' "
        "AND status != 'pending'",
    )
    assert decided_second == [], "gate `second` was approved by a decision meant for `first`"


async def test_forged_or_foreign_tokens_change_nothing(service: RunService) -> None:
    """A token that does not exist, or belongs to another run, decides nothing."""
    await service.start("mine", LATENCY)
    await service.start("other", LATENCY)
    other = await service.pending_approval("other")
    assert other is not None
    before = await _snapshot(service, "mine")
    with pytest.raises((ServiceError, StoreError)):
        await service.decide("mine", Decision.APPROVE, "cli:oncall", approval_token="forged-123")
    with pytest.raises(ServiceError, match="another run"):
        await service.decide("mine", Decision.APPROVE, "cli:oncall", approval_token=other.token)
    assert await _snapshot(service, "mine") == before
    assert (await service.get("other")).status == RunStatus.WAITING_APPROVAL


# -- who may decide ----------------------------------------------------------------------------


async def test_a_decider_not_in_the_runbook_approvers_is_refused(service: RunService) -> None:
    """Anyone outside the runbook's approvers gets an error, and nothing changes."""
    await service.start("auth", LATENCY)
    before = await _snapshot(service, "auth")
    for decision in (Decision.APPROVE, Decision.REJECT):
        with pytest.raises(ServiceError, match="cli:mallory may not decide"):
            await service.decide("auth", decision, "cli:mallory")
    with pytest.raises(ServiceError, match="may not decide"):
        await service.decide("auth", Decision.APPROVE, "telegram:100000002")  # approver elsewhere
    assert await _snapshot(service, "auth") == before
    result = await service.decide("auth", Decision.APPROVE, "telegram:100000001")
    assert result.changed and result.run.status == RunStatus.SUCCEEDED


NARROW_GATE = """\
id: narrow-gate
title: Narrow gate
triggers: [narrow gate]
approvers: [cli:oncall, telegram:100000001]
steps:
  - id: act
    title: Act
    run: echo act
    approval: required
"""


async def test_the_global_approvers_setting_narrows_every_runbook(settings: Settings) -> None:
    """LOOM_OPS_APPROVERS and the runbook's list must both name the decider."""
    write_runbook(settings.workspace, "narrow-gate", NARROW_GATE)
    narrowed = settings.model_copy(update={"approvers": ["cli:oncall", "cli:boss"]})
    async with open_service(narrowed) as service:
        await service.start("narrow", "narrow gate")
        before = await _snapshot(service, "narrow")
        # In the runbook's list, not in the global one.
        with pytest.raises(ServiceError, match="LOOM_OPS_APPROVERS"):
            await service.decide("narrow", Decision.APPROVE, "telegram:100000001")
        # In the global list, not in the runbook's one.
        with pytest.raises(ServiceError, match="runbook approvers"):
            await service.decide("narrow", Decision.APPROVE, "cli:boss")
        assert await _snapshot(service, "narrow") == before
        result = await service.decide("narrow", Decision.APPROVE, "cli:oncall")
        assert result.changed and result.run.status == RunStatus.SUCCEEDED


async def test_four_eyes_bars_the_requester(service: RunService) -> None:
    """`failed-deploy-rollback` has four eyes: the requester may not decide; another may."""
    run = await service.start("deploy", DEPLOY, requested_by="cli:oncall")
    assert run.status == RunStatus.WAITING_APPROVAL
    pending = await service.pending_approval("deploy")
    assert pending is not None
    assert pending.four_eyes and pending.requested_by == "cli:oncall"
    assert pending.step_id == "rollback"
    before = await _snapshot(service, "deploy")
    for decision in (Decision.APPROVE, Decision.REJECT):
        with pytest.raises(ServiceError, match="four eyes"):
            await service.decide("deploy", decision, "cli:oncall")
    assert await _snapshot(service, "deploy") == before

    first = await service.decide("deploy", Decision.APPROVE, "cli:lead", "second pair of eyes")
    assert first.changed and first.run.status == RunStatus.WAITING_APPROVAL  # one of two
    result = await service.decide("deploy", Decision.APPROVE, "telegram:100000001")
    assert result.changed and result.run.status == RunStatus.SUCCEEDED
    assert result.approval.decided_by == "telegram:100000001"


def test_four_eyes_holds_for_the_in_doubt_retry_of_a_gated_step(
    workspace: Path, tmp_path: Path
) -> None:
    """A second pair of eyes approves a four-eyes gate; the process dies right after the
    command's intent, so the step is in doubt. Running it again is the same risky act: the
    requester may not decide that alone either."""
    write_runbook(workspace, "four-eyes-drill", FOUR_EYES_DRILL)
    cli = Cli(workspace, tmp_path / "ops.sqlite")
    live = {"LOOM_OPS_ALLOW_SHELL": "1"}
    started = cli("runbook", "four-eyes-drill", "--run-id", "fe", "--mock-llm", env=live)
    assert started.returncode == 0, started.describe()
    assert _pending(cli.db, "fe") == [("gate", "act")]
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


# -- what cannot be decided --------------------------------------------------------------------


async def test_a_finished_run_has_nothing_to_decide(service: RunService) -> None:
    """A run that ended (here: out of budget before any gate) refuses decisions."""
    run = await service.start("done", LATENCY, max_steps=2)
    assert run.status == RunStatus.FAILED
    with pytest.raises(ServiceError, match="already failed; nothing to decide"):
        await service.decide("done", Decision.APPROVE, "cli:oncall")
    assert await service.store.list_approvals("done") == []


async def test_skip_is_refused_for_a_gate(service: RunService) -> None:
    """Skip means "treat as done" and exists only for in-doubt steps, never for a gate."""
    await service.start("skip", LATENCY)
    before = await _snapshot(service, "skip")
    with pytest.raises(ServiceError, match="skip applies only"):
        await service.decide("skip", Decision.SKIP, "cli:oncall")
    assert await _snapshot(service, "skip") == before
    assert "scale-out" not in await _executed_steps(service, "skip")


async def test_an_overlong_note_is_refused(service: RunService) -> None:
    """A note over the limit is refused before anything is decided."""
    await service.start("note", LATENCY)
    before = await _snapshot(service, "note")
    with pytest.raises(ServiceError, match="note is longer"):
        await service.decide("note", Decision.APPROVE, "cli:oncall", "x" * 5000)
    assert await _snapshot(service, "note") == before


async def test_cancel_closes_the_pending_request(service: RunService) -> None:
    """Cancelling a waiting run closes its request; later decisions change nothing."""
    await service.start("cancel", LATENCY)
    pending = await service.pending_approval("cancel")
    assert pending is not None

    run = await service.cancel("cancel", "cli:oncall")

    assert run.status == RunStatus.CANCELLED
    assert run.error == "cancelled by cli:oncall"
    assert run.lease_owner is None and run.finished_at is not None
    closed = await service.store.get_approval(pending.id)
    assert closed.status == ApprovalStatus.CANCELLED and closed.decided_by == "cli:oncall"
    assert await service.pending_approval("cancel") is None
    before = await _snapshot(service, "cancel")

    with pytest.raises(ServiceError, match="already cancelled"):
        await service.decide("cancel", Decision.APPROVE, "cli:oncall")
    stale = await service.decide(
        "cancel", Decision.APPROVE, "cli:oncall", approval_token=pending.token
    )
    assert not stale.changed and "already cancelled" in stale.message
    with pytest.raises(ServiceError, match="already cancelled"):
        await service.cancel("cancel", "cli:oncall")
    assert await _snapshot(service, "cancel") == before
    assert "scale-out" not in await _executed_steps(service, "cancel")


# -- approval by several people ----------------------------------------------------------------

TWO_PEOPLE_DRILL = """\
id: two-people-drill
title: Two people drill
triggers: [two people drill]
approvers: [group:approvers]
steps:
  - id: act
    title: Act
    note: acting
    approval: {required: 2, from: [group:approvers, group:leads], four_eyes: true}
"""


async def test_a_step_without_a_rule_is_decided_by_one_approver_as_before(
    service: RunService,
) -> None:
    """`approval: required`: one decision ends the request; no partial approval is journaled."""
    await service.start("one", LATENCY)
    pending = await service.pending_approval("one")
    assert pending is not None and pending.required == 1

    result = await service.decide("one", Decision.APPROVE, "cli:oncall")

    assert result.message == "approved by cli:oncall"
    assert result.run.status == RunStatus.SUCCEEDED
    assert [v.decided_by for v in result.votes] == ["cli:oncall"]
    assert "approval_voted" not in await _event_types(service, "one")


async def test_explain_and_the_trace_show_each_approval(
    workspace: Path, service: RunService
) -> None:
    from agent.views.explain import explain_tree
    from agent.views.trace import render_trace, trace_of

    write_runbook(workspace, "two-people-drill", TWO_PEOPLE_DRILL)
    await service.start("two", "two people drill")
    await service.decide("two", Decision.APPROVE, "cli:oncall", "ok by me")
    await service.decide("two", Decision.APPROVE, "cli:lead")

    tree = await service.run_tree("two", calls=False, events=True)
    explained = explain_tree(tree)
    assert "2 distinct people of group:approvers, group:leads" in explained
    assert 'approval #1 approved by cli:oncall — "ok by me" (1 of 2, waiting for more)' in explained
    assert "approval #1 approved by cli:lead" in explained
    html = render_trace(trace_of(tree))
    assert "approval #1 approved by cli:oncall (1 of 2) — ok by me" in html


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ("{required: 0}", "steps[0].approval.required: Input should be greater than or equal"),
        ("{required: 2, from: [oncall]}", "steps[0].approval.from[0]: approver 'oncall' must"),
        ("{requierd: 2}", "unknown field 'requierd' in an approval rule (did you mean 'required'"),
        ("sometimes", "steps[0].approval: approval must be required, none, or a rule"),
    ],
)
def test_a_bad_approval_rule_is_one_line_naming_the_field(
    tmp_path: Path, rule: str, message: str
) -> None:
    cli = Cli(tmp_path / "ws", tmp_path / "ops.sqlite")
    (tmp_path / "ws" / "runbooks").mkdir(parents=True)
    text = TWO_PEOPLE_DRILL.replace(
        "{required: 2, from: [group:approvers, group:leads], four_eyes: true}", rule
    )
    (tmp_path / "ws" / "runbooks" / "bad.yaml").write_text(text)

    result = cli("runbooks", "validate")

    assert result.returncode != 0 and "Traceback" not in result.stderr, result.describe()
    assert message in result.stdout + result.stderr, result.describe()


def test_a_skip_or_an_abort_of_an_in_doubt_attempt_ends_it_at_once() -> None:
    """However many people a retry needs, "it ran, treat it as done" and an abort start
    nothing, so one person decides them."""
    for decision in (Decision.SKIP, Decision.REJECT):
        assert vote_outcome(2, [], "sam", decision) == VoteOutcome.ENDS
        assert vote_outcome(2, ["lee"], "sam", decision) == VoteOutcome.ENDS
    assert vote_outcome(2, [], "sam", Decision.APPROVE) == VoteOutcome.COUNTED
    assert vote_outcome(2, ["lee"], "sam", Decision.APPROVE) == VoteOutcome.COMPLETES
