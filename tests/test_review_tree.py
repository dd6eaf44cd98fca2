"""Review findings: failing tests for defects in the supervisor tree, policies, MCP, trace, CLI.

Each test is xfail(strict=True): it fails today because of the bug its reason names.
"""

from __future__ import annotations

import contextlib

import pytest

from agent.errors import ServiceError
from agent.records import ApprovalStatus, Decision, RunStatus
from agent.service.runs import RunService
from agent.settings import Settings
from tests.support import ScriptedPolicy, call, final, open_service, turn, write_runbook
from tests.test_approvals import TWO_GATES
from tests.test_supervisor import _SupervisorOnly

LATENCY = "incident: API latency spike"


async def test_reject_through_root_finishes_the_tree(service: RunService) -> None:
    await service.start("rj", LATENCY, role="supervisor")
    assert (await service.get("rj:sub:verifier")).status == RunStatus.WAITING_CHILDREN
    await service.decide("rj", Decision.REJECT, "cli:oncall")
    assert (await service.get("rj:sub:executor")).status == RunStatus.REJECTED
    assert (await service.get("rj:sub:verifier")).status.is_terminal
    assert (await service.get("rj")).status == RunStatus.FAILED


async def test_cancel_a_child_lets_the_tree_finish(service: RunService) -> None:
    await service.start("cc", LATENCY, role="supervisor")
    await service.cancel("cc:sub:executor", "cli:oncall")
    assert (await service.get("cc:sub:verifier")).status.is_terminal
    assert (await service.get("cc")).status.is_terminal


async def test_repeated_unnamed_approve_through_root_does_not_open_the_next_gate(
    settings: Settings,
) -> None:
    write_runbook(settings.workspace, "two-gates", TWO_GATES)
    policy = ScriptedPolicy(
        [
            turn(call("delegate_subagent", role="planner")),
            turn(call("delegate_subagent", role="executor")),
            final("succeeded", "done"),
        ]
    )
    async with open_service(settings, _SupervisorOnly(policy)) as service:
        await service.start("g", "two gates", role="supervisor")
        first = await service.decide("g", Decision.APPROVE, "cli:approver")
        assert first.changed and first.approval.step_id == "first"
        # The same command again (a retried CLI call, a double tap): it must not approve
        # the second gate, which no human has seen yet.
        with contextlib.suppress(ServiceError):
            await service.decide("g", Decision.APPROVE, "cli:approver")
        gates = await service.store.list_approvals("g:sub:executor")
        assert [(a.step_id, a.status) for a in gates] == [
            ("first", ApprovalStatus.APPROVED),
            ("second", ApprovalStatus.PENDING),
        ]


async def test_deciding_through_a_sibling_does_not_approve_another_childs_gate(
    service: RunService,
) -> None:
    await service.start("sb", LATENCY, role="supervisor")
    assert (await service.get("sb:sub:verifier")).status == RunStatus.WAITING_CHILDREN
    with pytest.raises(ServiceError):
        await service.decide("sb:sub:verifier", Decision.APPROVE, "cli:oncall")
    gate = await service.store.list_approvals("sb:sub:executor")
    assert [a.status for a in gate] == [ApprovalStatus.PENDING]


# -- a hung health check (HTTP here; an MCP `check` goes through the same timeout) ----------

HUNG_CHECK_RUNBOOK = """\
id: hung-check
title: Hung check drill
triggers: [hung check drill]
steps:
  - id: probe
    title: Health endpoint that never answers
    timeout: 0.5
    check:
      url: http://127.0.0.1:{port}/healthz
"""


async def test_a_hanging_health_check_obeys_the_step_timeout(settings: Settings, workspace) -> None:
    import asyncio

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(3600)

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    (workspace / "runbooks" / "hung-check.yaml").write_text(HUNG_CHECK_RUNBOOK.format(port=port))
    configured = settings.model_copy(update={"live_checks": True, "run_deadline": 60.0})
    try:
        async with open_service(configured) as service:
            run = await asyncio.wait_for(service.start("hc", "hung check drill"), timeout=2.5)
        assert run.status == RunStatus.FAILED
    finally:
        server.close()


# -- CLI: audit verify on a corrupted journal ------------------------------------------------


def test_audit_verify_reports_undecodable_event_data_as_tampered(tmp_path) -> None:
    import sqlite3

    from tests.cli_helpers import Cli, make_cli_workspace

    cli = Cli(make_cli_workspace(tmp_path / "ws"), tmp_path / "ops.sqlite")
    started = cli("runbook", "disk almost full on /var", "--run-id", "a1", "--mock-llm")
    assert started.returncode in (0, 1), started.describe()
    with sqlite3.connect(cli.db) as conn:
        conn.execute("DROP TRIGGER events_no_update")
        conn.execute(
            "UPDATE events SET data = '{\"broken' WHERE seq = "
            "(SELECT MAX(seq) FROM events WHERE run_id = 'a1')"
        )
    conn.close()
    result = cli("audit", "verify", "--run-id", "a1")
    assert "Traceback" not in result.stderr, result.stderr[-400:]
    assert result.returncode == 1
    assert "TAMPERED" in result.stdout
