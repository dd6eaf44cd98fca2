"""The supervisor team: planner, then executor and verifier in parallel, as durable child runs;
and what a decision or a cancel sent to one run of the tree does to the rest of it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.chain import first_broken_link
from agent.errors import PolicyUnavailable, ServiceError
from agent.policy.base import PolicyContext, PolicyDecision
from agent.policy.mock import MockPolicy
from agent.records import ApprovalStatus, Decision, RunStatus
from agent.service.runs import RunService
from agent.settings import Settings
from tests.cli_helpers import CLI_USER, REPO
from tests.conftest import make_workspace
from tests.support import (
    LATENCY,
    TWO_GATES,
    ScriptedPolicy,
    call,
    final,
    open_service,
    turn,
    write_runbook,
)


async def test_the_team_plans_executes_verifies_and_merges(service: RunService) -> None:
    root = await service.start("inc", LATENCY, role="supervisor")
    assert root.status == RunStatus.WAITING_CHILDREN
    children = {r.id: r for r in await service.store.child_runs("inc")}
    assert set(children) == {"inc:sub:planner", "inc:sub:executor", "inc:sub:verifier"}
    assert {r.id: r.role for r in children.values()} == {
        "inc:sub:planner": "planner",
        "inc:sub:executor": "executor",
        "inc:sub:verifier": "verifier",
    }
    assert children["inc:sub:planner"].status == RunStatus.SUCCEEDED
    assert children["inc:sub:executor"].runbook_id == "api-latency-spike"  # the plan, pinned
    assert children["inc:sub:executor"].status == RunStatus.WAITING_APPROVAL

    # Approving through the root decides the executor's gate, resumes it, then the root.
    result = await service.decide("inc", Decision.APPROVE, "cli:oncall")
    assert result.approval.run_id == "inc:sub:executor"
    final_root = await service.get("inc")
    assert final_root.status == RunStatus.SUCCEEDED
    assert "executor succeeded" in (final_root.summary or "")
    assert "verifier succeeded" in (final_root.summary or "")
    for run_id in ("inc", *children):
        assert first_broken_link(await service.store.list_events(run_id)) is None
    # Each role used only its own tools.
    tools = {
        run_id: {c.tool for c in await service.store.list_tool_calls(run_id)}
        for run_id in ("inc", *children)
    }
    assert tools["inc"] == {"delegate_subagent", "delegate_subagents_batch"}
    assert tools["inc:sub:planner"] == {"read_runbook"}
    assert tools["inc:sub:executor"] == {"execute_step", "await_approval"}
    assert tools["inc:sub:verifier"] == {"check_health", "await_sibling", "record_audit"}
    # The verifier took its baseline, waited for the executor, then checked again.
    verifier = [c.tool for c in await service.store.list_tool_calls("inc:sub:verifier")]
    assert verifier == ["check_health", "await_sibling", "check_health", "record_audit"]


async def test_a_role_delegated_twice_gets_its_own_id(settings: Settings) -> None:
    policy = ScriptedPolicy(
        [
            turn(call("delegate_subagent", role="planner")),
            turn(call("delegate_subagents_batch", roles=["verifier", "verifier"])),
            turn(call("execute_step", step_id="pods")),  # not a supervisor's tool
            final("succeeded", "done"),
        ]
    )
    async with open_service(settings, policy) as service:
        run = await service.start("twice", LATENCY, role="supervisor")
        ids = [r.id for r in await service.store.child_runs("twice")]
        calls = await service.store.list_tool_calls("twice")
    assert ids == ["twice:sub:planner", "twice:sub:verifier", "twice:sub:verifier-2"]
    assert calls[-1].status == "refused" and "not available" in calls[-1].outcome["refused"]
    # No executor ran, so no step did: the model's "succeeded" does not stand.
    assert run.status == RunStatus.FAILED
    assert run.error is not None and "no executor run was started" in run.error


class ExecutorLlmDown(MockPolicy):
    """The mock policy, its endpoint down for the executor alone (counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.executor_asked = 0

    async def decide(self, context: PolicyContext) -> PolicyDecision:
        if context.role == "executor":
            self.executor_asked += 1
            raise PolicyUnavailable("LLM endpoint answered 503 Service Unavailable")
        return await super().decide(context)


async def test_a_child_handed_back_for_a_later_try_waits_for_it(settings: Settings) -> None:
    """A child an outage stopped is handed back to be tried a lease TTL later, and its
    parent's drive leaves it until then. Before, the parent drove it again at once: each
    time it asked the dead endpoint and journaled a claim and a stop, hundreds of times a
    second, for as long as the process ran."""
    policy = ExecutorLlmDown()
    async with open_service(settings, policy) as service:
        root = await asyncio.wait_for(service.start("down", LATENCY, role="supervisor"), 20)
        events = await service.store.list_events("down:sub:executor")
        children = {r.role: r.status for r in await service.store.child_runs("down")}
    assert root.status == RunStatus.WAITING_CHILDREN
    assert children == {
        "planner": RunStatus.SUCCEEDED,
        "executor": RunStatus.QUEUED,  # for its next try
        "verifier": RunStatus.WAITING_CHILDREN,  # for the executor
    }
    assert policy.executor_asked == 1
    assert [e.type for e in events].count("run_interrupted") == 1


async def test_an_unknown_role_is_refused(service: RunService) -> None:
    with pytest.raises(ServiceError, match="unknown role"):
        await service.start("odd", LATENCY, role="overlord")


def _cli(workspace: Path, db: Path, *args: str, failpoint: str | None = None) -> int:
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("LOOM_OPS_")}
    env.update(
        LOOM_OPS_DB=str(db),
        LOOM_OPS_WORKSPACE=str(workspace),
        LOOM_OPS_MOCK_LLM="1",
        LOOM_OPS_USER=CLI_USER,  # the tests' people file lets this login act for others
        PYTHONPATH=str(REPO),
    )
    if failpoint:
        env["LOOM_OPS_FAILPOINT"] = failpoint
    done = subprocess.run(
        [sys.executable, "-m", "agent.frontends.cli", *args, "--json"],
        cwd=workspace,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode


def _status(db: Path, run_id: str) -> str:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()[0]


@pytest.mark.parametrize(
    ("stage", "failpoint"),
    [
        ("supervise", "after_intent:1"),  # while the planner runs
        ("supervise", "after_outcome:1"),  # the plan made, the root not yet woken
        ("supervise", "after_intent:5"),  # executor and verifier both under way
        ("supervise", "after_wait:1"),  # the executor parked at its approval
        ("approve", "after_outcome:4"),  # the executor finished, the root not yet woken
        ("approve", "after_claim:2"),  # the root woken and claimed, not yet merged
    ],
)
def test_sigkill_anywhere_in_the_tree_then_resume_the_root(
    tmp_path: Path, stage: str, failpoint: str
) -> None:
    """A supervise tree killed anywhere, resumed by the root's id, ends with nothing done twice."""
    workspace = make_workspace(tmp_path / "ws")
    db = tmp_path / "ops.sqlite"
    armed: str | None = failpoint
    code = _cli(
        workspace,
        db,
        "supervise",
        LATENCY,
        "--run-id",
        "t",
        failpoint=armed if stage == "supervise" else None,
    )
    if stage == "supervise":
        assert code == -signal.SIGKILL, "the failpoint never fired: the test would prove nothing"
        armed = None
    for _ in range(8):
        if _status(db, "t") in ("succeeded", "failed"):
            break
        with sqlite3.connect(db) as conn:
            pending = conn.execute(
                "SELECT COUNT(*) FROM approvals WHERE status = 'pending'"
            ).fetchone()[0]
        if pending:  # decided through the root's id
            code = _cli(
                workspace, db, "approve", "--run-id", "t", "--as", "oncall", failpoint=armed
            )
            if armed:
                assert code == -signal.SIGKILL, "the failpoint never fired"
                armed = None
            else:
                assert code == 0
        else:
            assert _cli(workspace, db, "resume", "--run-id", "t") in (0, 1)
    assert _status(db, "t") == "succeeded", failpoint
    with sqlite3.connect(db) as conn:
        done = conn.execute(
            "SELECT run_id, step_id, COUNT(*) FROM tool_calls "
            "WHERE tool IN ('execute_step', 'check_health', 'record_audit') AND status = 'ok' "
            "GROUP BY run_id, step_id, tool"
        ).fetchall()
        tree = [r[0] for r in conn.execute("SELECT id FROM runs ORDER BY id")]
    # Every executor step ran once; the verifier checked twice (baseline, then after the
    # executor ended) and audited once.
    expected = {("t:sub:verifier", "verify"): 2, ("t:sub:verifier", None): 1}
    assert all(count == expected.get((run, step), 1) for run, step, count in done), done
    assert tree == ["t", "t:sub:executor", "t:sub:planner", "t:sub:verifier"]
    assert json.dumps(done)  # the tree did real work
    assert {(r, s) for r, s, _ in done if r == "t:sub:executor"} >= {
        ("t:sub:executor", "scale-out"),
        ("t:sub:executor", "handoff"),
    }


def test_status_of_a_parent_names_the_children_nobody_drives(tmp_path: Path) -> None:
    """Killed while its executor ran, the root waits for children nobody drives: its
    `status` names them, with the command that drives the tree on (`--json`: their ids, as
    `undriven`); with a live worker, it says by when that worker takes them over instead."""
    workspace = make_workspace(tmp_path / "ws")
    db = tmp_path / "ops.sqlite"
    code = _cli(workspace, db, "supervise", LATENCY, "--run-id", "t", failpoint="after_intent:5")
    assert code == -signal.SIGKILL, "the failpoint never fired: the test would prove nothing"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_OPS_")}
    env.update(LOOM_OPS_DB=str(db), LOOM_OPS_WORKSPACE=str(workspace), PYTHONPATH=str(REPO))

    def status(*json_flag: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "agent.frontends.cli", "status", "t", *json_flag],
            cwd=workspace,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr  # the root itself waits, as it should
        if json_flag:
            return done.stdout
        assert done.stdout.startswith("Run t: waiting_children\n"), done.stdout
        return done.stdout.splitlines()[-1]

    def undriven() -> set[str]:
        """What `status --json` says nobody drives (what a monitor alerts on)."""
        payload = json.loads(status("--json"))
        assert payload["status"] == "waiting_children", payload
        return set(payload["undriven"])

    said = status()
    head, _, command = said.partition(" now: ")
    assert command == "loom-ops resume t", said  # LOOM_OPS_DB names the store already
    # The verifier, started beside the executor, may be waiting for it already or not.
    running = {c for c in ("t:sub:executor", "t:sub:verifier") if _status(db, c) == "running"}
    assert "t:sub:executor" in running
    assert head.startswith("Nobody drives ") and set(head[14:].split(", ")) == running, said
    assert undriven() == running
    with sqlite3.connect(db) as conn:  # a worker's heartbeat, as `loom-ops worker` writes it
        conn.execute(
            "INSERT INTO processes (owner, kind, drives_runs, started_at, heartbeat_at) "
            "VALUES ('w:1', 'worker', 1, ?, ?)",
            (time.time(), time.time()),
        )
    said = status()  # the dead driver's lease has not run out yet: when, and what is faster
    assert said.startswith("Waiting for the live worker to take t:sub:executor"), said
    assert said.endswith("the lease of its gone driver runs out (or now: loom-ops resume t)")
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM processes")
    assert _cli(workspace, db, "resume", "t") in (0, 1)  # what it says does drive them on
    assert _status(db, "t:sub:executor") == "waiting_approval"  # at its gate, scale-out
    assert undriven() == set()  # every child is held or waits for a person


async def test_cancelling_the_root_cancels_the_whole_tree(service: RunService) -> None:
    await service.start("c", LATENCY, role="supervisor")
    root = await service.cancel("c", "cli:oncall")
    assert root.status == RunStatus.CANCELLED
    statuses = {r.id: r.status for r in await service.store.child_runs("c")}
    assert statuses == {
        "c:sub:planner": RunStatus.SUCCEEDED,  # already done: left as it was
        "c:sub:executor": RunStatus.CANCELLED,
        "c:sub:verifier": RunStatus.CANCELLED,
    }
    gate = await service.store.list_approvals("c:sub:executor")
    assert [a.status for a in gate] == ["cancelled"]


async def test_cancel_a_child_lets_the_tree_finish(service: RunService) -> None:
    """Cancelling the executor alone: its sibling and the root still come to an end."""
    await service.start("cc", LATENCY, role="supervisor")
    await service.cancel("cc:sub:executor", "cli:oncall")
    assert (await service.get("cc:sub:verifier")).status.is_terminal
    assert (await service.get("cc")).status.is_terminal


async def test_reject_through_root_finishes_the_tree(service: RunService) -> None:
    """A rejection sent to the root reaches the executor's gate and ends the whole tree."""
    await service.start("rj", LATENCY, role="supervisor")
    assert (await service.get("rj:sub:verifier")).status == RunStatus.WAITING_CHILDREN
    await service.decide("rj", Decision.REJECT, "cli:oncall")
    assert (await service.get("rj:sub:executor")).status == RunStatus.REJECTED
    assert (await service.get("rj:sub:verifier")).status.is_terminal
    assert (await service.get("rj")).status == RunStatus.FAILED


async def test_deciding_through_a_sibling_does_not_approve_another_childs_gate(
    service: RunService,
) -> None:
    """The verifier has no request of its own: a decision sent to it is refused, and the
    executor's gate stays pending."""
    await service.start("sb", LATENCY, role="supervisor")
    assert (await service.get("sb:sub:verifier")).status == RunStatus.WAITING_CHILDREN
    with pytest.raises(ServiceError):
        await service.decide("sb:sub:verifier", Decision.APPROVE, "cli:oncall")
    gate = await service.store.list_approvals("sb:sub:executor")
    assert [a.status for a in gate] == [ApprovalStatus.PENDING]


class _SupervisorOnly:
    """A scripted supervisor over children played by the deterministic mock."""

    name = "scripted+mock"

    def __init__(self, supervisor: ScriptedPolicy) -> None:
        self._supervisor = supervisor
        self._mock = MockPolicy()

    def preflight(self, request: str, catalog: object) -> None:
        """Accept every request."""

    async def decide(self, context: PolicyContext) -> PolicyDecision:
        """The script for the supervisor, the mock for everyone else."""
        if context.role == "supervisor":
            return await self._supervisor.decide(context)
        return await self._mock.decide(context)


async def test_several_pending_requests_below_a_root_must_be_named(settings: Settings) -> None:
    policy = ScriptedPolicy(
        [
            turn(call("delegate_subagent", role="planner")),
            turn(call("delegate_subagents_batch", roles=["executor", "executor"])),
            final("succeeded", "both executed"),
        ]
    )
    async with open_service(settings, _SupervisorOnly(policy)) as service:
        await service.start("p", LATENCY, role="supervisor")
        with pytest.raises(ServiceError) as refused:
            await service.decide("p", Decision.APPROVE, "cli:oncall")
        assert "has had 2 approval requests; say which one" in str(refused.value)
        assert "#1 (gate for step scale-out in p:sub:executor)" in str(refused.value)
        assert "p:sub:executor" in str(refused.value) and "p:sub:executor-2" in str(refused.value)
        for child in ("p:sub:executor", "p:sub:executor-2"):
            assert [a.status for a in await service.store.list_approvals(child)] == ["pending"]


async def test_repeated_unnamed_approve_through_root_does_not_open_the_next_gate(
    settings: Settings,
) -> None:
    """The same approve sent to the root twice (a retried CLI call, a double tap): the second
    must not approve the executor's second gate, which no human has seen yet."""
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
        with contextlib.suppress(ServiceError):
            await service.decide("g", Decision.APPROVE, "cli:approver")
        gates = await service.store.list_approvals("g:sub:executor")
        assert [(a.step_id, a.status) for a in gates] == [
            ("first", ApprovalStatus.APPROVED),
            ("second", ApprovalStatus.PENDING),
        ]


async def test_the_trace_shows_the_whole_tree(service: RunService, tmp_path: Path) -> None:
    from agent.views.trace import render_trace, trace_of

    await service.start("tr", LATENCY, role="supervisor")
    await service.decide("tr", Decision.APPROVE, "cli:oncall")
    traces = trace_of(await service.run_tree("tr", calls=False, events=True))
    assert [t.run.id for t in traces] == [
        "tr",
        "tr:sub:planner",
        "tr:sub:executor",
        "tr:sub:verifier",
    ]
    html = render_trace(traces)
    assert html.count('<section class="run child"') == 3
