"""Approvals through the RunService: approve, reject, expire, double and unauthorized decisions."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.approvals import Decision
from agent.journal import first_broken_link
from agent.records import ApprovalStatus, RunStatus
from agent.service import RunService, ServiceError
from agent.settings import Settings

LATENCY = "incident: API latency spike"


async def test_approve_resumes_and_records_who(service: RunService) -> None:
    run = await service.start("inc-1", LATENCY)
    assert run.status == RunStatus.WAITING_APPROVAL
    pending = await service.pending_approval("inc-1")
    assert pending is not None and pending.step_id == "scale-out"
    assert "kubectl scale deployment/checkout-api" in pending.action

    result = await service.decide("inc-1", Decision.APPROVE, "cli:oncall", "LGTM")

    assert result.changed and result.run.status == RunStatus.SUCCEEDED
    assert result.approval.decided_by == "cli:oncall" and result.approval.note == "LGTM"
    events = await service.store.list_events("inc-1")
    types = [e.type for e in events]
    assert types.index("approval_requested") < types.index("approval_decided")
    assert first_broken_link(events) is None


async def test_reject_ends_the_run_and_skips_the_rest(service: RunService) -> None:
    await service.start("inc-2", LATENCY)
    result = await service.decide("inc-2", Decision.REJECT, "cli:oncall", "not now")
    assert result.run.status == RunStatus.REJECTED
    assert result.run.error == "rejected by cli:oncall: not now"
    executed = {c.step_id for c in await service.store.list_tool_calls("inc-2")}
    assert "scale-out" in executed  # the await_approval call
    assert not {"rollout-wait", "verify", "handoff"} & executed


async def test_reject_with_rollback_runs_completed_rollbacks(
    workspace: Path, settings: Settings
) -> None:
    (workspace / "runbooks" / "two-gates.yaml").write_text(
        "id: two-gates\ntitle: Two gates\ntriggers: [two gates]\non_reject: rollback\n"
        "steps:\n"
        "  - {id: first, title: First, run: echo first, rollback: {run: echo undo-first}}\n"
        "  - {id: plain, title: Plain, note: nothing to undo}\n"
        "  - {id: second, title: Second, run: echo second, approval: required,\n"
        "     rollback: {run: echo undo-second}}\n"
    )
    service = await RunService.open(settings)
    try:
        await service.start("rb", "two gates")
        result = await service.decide("rb", Decision.REJECT, "cli:tester")
        assert result.run.status == RunStatus.REJECTED
        calls = await service.store.list_tool_calls("rb")
        rollbacks = [
            (c.tool, c.step_id, c.outcome["argv"]) for c in calls if c.tool == "rollback_step"
        ]
        assert rollbacks == [("rollback_step", "first", ["echo", "undo-first"])]
        assert result.run.summary == "rejected by cli:tester; rolled back 1 of 1 step(s) (first)"
    finally:
        await service.close()


async def test_expiry_ends_the_run_and_a_late_decision_changes_nothing(
    settings: Settings,
) -> None:
    service = await RunService.open(settings.model_copy(update={"approval_timeout": 0.2}))
    try:
        # The drill has no approval_timeout of its own, so the setting applies.
        await service.start("late", "crash drill")
        await asyncio.sleep(0.3)
        assert await service.expire_overdue() == 1
        run = await service.get("late")
        assert run.status == RunStatus.EXPIRED
        with pytest.raises(ServiceError, match="already expired"):
            await service.decide("late", Decision.APPROVE, "cli:approver")
        approvals = await service.store.list_approvals("late")
        assert [a.status for a in approvals] == [ApprovalStatus.EXPIRED]
    finally:
        await service.close()


async def test_first_decision_wins_under_a_race(service: RunService) -> None:
    await service.start("race", LATENCY)
    results = await asyncio.gather(
        service.decide("race", Decision.APPROVE, "cli:oncall"),
        service.decide("race", Decision.REJECT, "cli:oncall"),
    )
    assert sorted(r.changed for r in results) == [False, True]
    loser = next(r for r in results if not r.changed)
    assert "already" in loser.message
    winner = next(r for r in results if r.changed)
    final = await service.get("race")
    expected = RunStatus.SUCCEEDED if winner.approval.status == "approved" else RunStatus.REJECTED
    assert final.status == expected


async def test_unauthorized_and_four_eyes_are_refused(service: RunService) -> None:
    await service.start("who", LATENCY)
    with pytest.raises(ServiceError, match="may not decide"):
        await service.decide("who", Decision.APPROVE, "cli:intruder")
    assert (await service.get("who")).status == RunStatus.WAITING_APPROVAL

    await service.start("eyes", "failed deploy rollback", requested_by="cli:oncall")
    with pytest.raises(ServiceError, match="four eyes"):
        await service.decide("eyes", Decision.APPROVE, "cli:oncall")
    result = await service.decide("eyes", Decision.APPROVE, "cli:lead")
    assert result.run.status == RunStatus.SUCCEEDED


async def test_global_approvers_narrow_every_runbook(settings: Settings) -> None:
    narrowed = settings.model_copy(update={"approvers": ["cli:lead"]})
    service = await RunService.open(narrowed)
    try:
        await service.start("g", LATENCY)
        with pytest.raises(ServiceError, match="LOOM_OPS_APPROVERS"):
            await service.decide("g", Decision.APPROVE, "cli:oncall")
    finally:
        await service.close()


async def test_decisions_on_finished_runs_and_skip_on_a_gate(service: RunService) -> None:
    await service.start("done", LATENCY)
    with pytest.raises(ServiceError, match="skip applies only"):
        await service.decide("done", Decision.SKIP, "cli:oncall")
    await service.decide("done", Decision.APPROVE, "cli:oncall")
    with pytest.raises(ServiceError, match="already succeeded"):
        await service.decide("done", Decision.REJECT, "cli:oncall")
    cancelled = await service.start("gone", LATENCY)
    assert cancelled.status == RunStatus.WAITING_APPROVAL
    assert (await service.cancel("gone", "cli:tester")).status == RunStatus.CANCELLED
    with pytest.raises(ServiceError, match="already cancelled"):
        await service.decide("gone", Decision.APPROVE, "cli:oncall")


async def test_fifty_runs_at_once_in_one_process(service: RunService) -> None:
    messages = [LATENCY, "disk almost full on /var", "failed deploy rollback"]
    runs = await asyncio.gather(*(service.start(f"many-{i}", messages[i % 3]) for i in range(50)))
    assert all(r.status == RunStatus.WAITING_APPROVAL for r in runs)
    deciders = {
        "api-latency-spike": "cli:oncall",
        "disk-almost-full": "cli:oncall",
        "failed-deploy-rollback": "cli:lead",
    }
    results = await asyncio.gather(
        *(service.decide(r.id, Decision.APPROVE, deciders[r.runbook_id or ""]) for r in runs)
    )
    assert all(r.changed and r.run.status == RunStatus.SUCCEEDED for r in results)
    for run in runs:
        assert first_broken_link(await service.store.list_events(run.id)) is None
