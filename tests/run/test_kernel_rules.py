"""The kernel's rules against a model that lies, repeats itself and invents things.

Each test scripts the local OpenAI-compatible stand-in (tests/openai_standin.py) and drives the
run through the real `openai` client and the real RunService with live commands, so a side
effect is a line in a file: outcomes come from the journal, not from the model's word; a step
runs at most as often as its runbook allows; one approval is one attempt.
"""

from __future__ import annotations

import time
from pathlib import Path

from agent.chain import first_broken_link
from agent.policy.base import PolicyContext, PolicyDecision
from agent.records import Decision, RunStatus
from agent.service.runs import RunService
from agent.settings import SecretStr, Settings
from agent.views.explain import render_timeline
from agent.views.summary import render_summary, summary_of
from agent.views.trace import render_trace, trace_of
from tests.openai_standin import serve, tool_reply
from tests.support import (
    ScriptedPolicy,
    allow,
    call,
    final,
    lines,
    open_service,
    turn,
    write_runbook,
)

DRILL = """\
id: rules-drill
title: Rules drill
triggers: [rules drill]
approvers: [cli:approver]
steps:
  - id: look
    title: Look around
    note: looking
  - id: act
    title: Append once (not idempotent, no retries)
    run: "{python} append.py act"
  - id: scale
    title: Make an effect, then exit 1 (gated)
    run: "{python} effect_then_fail.py scale"
    approval: required
  - id: tidy
    title: Optional tidy-up
    note: tidying
    optional: true
  - id: verify
    title: Health endpoint answers
    check: {url: "http://127.0.0.1:9/healthz"}
"""

EFFECT_THEN_FAIL = """\
import sys
with open("out.txt", "a") as handle:
    handle.write(sys.argv[1] + "\\n")
sys.exit(1)
"""


def _finish(outcome: str, summary: str = "all done") -> dict:
    return tool_reply(("finish_run", {"outcome": outcome, "summary": summary}))


def _step(tool: str, step_id: str) -> dict:
    return tool_reply((tool, {"step_id": step_id}))


READ = tool_reply(("read_runbook", {"runbook_id": "rules-drill"}))
# The model reads the runbook, runs look and act, and asks to run scale: the run waits there.
TO_THE_GATE = [
    READ,
    _step("execute_step", "look"),
    _step("execute_step", "act"),
    tool_reply(("await_approval", {"step_id": "scale"})),
]
SCALES_FINE = "print('scaled')\n"  # scale's command without the failure: exit 0


def _llm(
    settings: Settings,
    workspace: Path,
    base_url: str,
    scale: str = EFFECT_THEN_FAIL,
    **update: object,
) -> Settings:
    """Settings for the LLM stand-in at `base_url`, live commands, the drill, and `scale` as
    the gated step's script."""
    write_runbook(workspace, "rules-drill", DRILL)
    (workspace / "effect_then_fail.py").write_text(scale)
    allow(workspace, "append.py", "act")
    allow(workspace, "effect_then_fail.py", "scale")
    return settings.model_copy(
        update={
            "mock_llm": False,
            "openai_api_key": SecretStr("sk-test-0123456789abcdefghijklmnop"),
            "openai_base_url": base_url,
            "openai_model": "stand-in-1",
            "llm_max_retries": 0,
            "allow_shell": True,
            **update,
        }
    )


async def _run(settings: Settings, workspace: Path, script: list[dict], run_id: str) -> RunService:
    with serve(script) as stand_in:
        service = await RunService.open(_llm(settings, workspace, stand_in.base_url))
        await service.start(run_id, "rules-drill")
        return service


async def test_a_claim_of_success_with_no_step_run_fails_the_run(
    settings: Settings, workspace: Path
) -> None:
    """The model reads the runbook and says "succeeded": the run fails, and says why."""
    service = await _run(settings, workspace, [READ, _finish("succeeded")], "early")
    try:
        run = await service.get("early")
        assert run.status == RunStatus.FAILED
        assert run.error == (
            "the model reported success; 0 of 4 steps ran; not run: look, act, scale, verify"
        )
        assert run.summary is not None and run.summary.startswith("all done\n")
        assert lines(workspace) == []
        text = render_summary(summary_of(await service.run_tree("early")))
        assert "the model reported success; 0 of 4 steps ran" in text
    finally:
        await service.close()


async def test_a_claim_of_success_after_a_failed_check_fails_the_run(
    settings: Settings, workspace: Path
) -> None:
    """Every step ran but the live health check failed (connection refused): not a success."""
    with serve(list(TO_THE_GATE)) as stand_in:
        llm = _llm(settings, workspace, stand_in.base_url, SCALES_FINE, live_checks=True)
        service = await RunService.open(llm)
        try:
            run = await service.start("check", "rules-drill")
            assert run.status == RunStatus.WAITING_APPROVAL
            stand_in.script.extend(
                [_step("execute_step", "scale"), _step("check_health", "verify")]
            )
            stand_in.script.append(_finish("succeeded", "healthy"))
            result = await service.decide("check", Decision.APPROVE, "cli:approver")
        finally:
            await service.close()
    assert result.run.status == RunStatus.FAILED
    assert result.run.error is not None
    assert result.run.error.startswith("the model reported success; step(s) failed: verify")


async def test_an_ungated_step_runs_once_however_often_the_model_asks(
    settings: Settings, workspace: Path
) -> None:
    """`act` (not idempotent, retries 0) asked for three times: it runs once; the repeats are
    refused with the step's outcome, and the summary says it ran once."""
    script = [
        READ,
        _step("execute_step", "look"),
        _step("execute_step", "act"),
        _step("execute_step", "act"),
        _step("execute_step", "act"),
        _finish("failed", "gave up"),
    ]
    service = await _run(settings, workspace, script, "ungated")
    try:
        assert lines(workspace) == ["act"]
        calls = [c for c in await service.store.list_tool_calls("ungated") if c.step_id == "act"]
        assert [c.status for c in calls] == ["ok", "refused", "refused"]
        refusal = calls[1].outcome["refused"]
        assert "is done: it ran once and succeeded" in refusal
        assert "await_approval" not in refusal
        text = render_summary(summary_of(await service.run_tree("ungated")))
        assert "act — Append once (not idempotent, no retries): ok (ran once); 2 repeat(s)" in text
    finally:
        await service.close()


async def test_one_approval_covers_one_attempt_whatever_its_result(
    settings: Settings, workspace: Path
) -> None:
    """`scale` makes its effect and exits 1: one approval, five asks, one effect; the run
    fails (the step failed), and asking for a second approval is refused too."""
    with serve(list(TO_THE_GATE)) as stand_in:
        service = await RunService.open(_llm(settings, workspace, stand_in.base_url))
        try:
            run = await service.start("gated", "rules-drill")
            assert run.status == RunStatus.WAITING_APPROVAL
            stand_in.script.extend([_step("execute_step", "scale")] * 5)
            stand_in.script.append(tool_reply(("await_approval", {"step_id": "scale"})))
            stand_in.script.append(_finish("succeeded", "scaled"))
            result = await service.decide("gated", Decision.APPROVE, "cli:approver")
            calls = await service.store.list_tool_calls("gated")
            approvals = await service.store.list_approvals("gated")
        finally:
            await service.close()
    assert lines(workspace) == ["act", "scale"]
    scale = [c for c in calls if c.step_id == "scale" and c.tool == "execute_step"]
    assert [c.status for c in scale] == ["error", "refused", "refused", "refused", "refused"]
    assert (
        "has used all 1 attempt(s) its runbook allows (retries: 0)" in (scale[1].outcome["refused"])
    )
    again = [c for c in calls if c.tool == "await_approval"][-1]
    assert again.status == "refused"
    assert len(approvals) == 1  # no second request reached people
    assert result.run.status == RunStatus.FAILED
    assert result.run.error is not None and "step(s) failed: scale" in result.run.error


async def test_a_completed_gated_step_is_not_run_or_approved_again(
    settings: Settings, workspace: Path
) -> None:
    """After `scale` ran ok, a repeat and a second await_approval are refused as done; the
    summary shows it ran (not "refused") and groups the 33 identical refusals in one line."""
    (workspace / "out.txt").write_text("")
    with serve(list(TO_THE_GATE)) as stand_in:
        scale = EFFECT_THEN_FAIL.replace("sys.exit(1)", "sys.exit(0)")
        service = await RunService.open(_llm(settings, workspace, stand_in.base_url, scale))
        try:
            await service.start("done", "rules-drill")
            stand_in.script.append(_step("execute_step", "scale"))
            stand_in.script.append(tool_reply(("await_approval", {"step_id": "scale"})))
            stand_in.script.extend([_step("execute_step", "scale")] * 33)
            # 40 policy turns in all: the default budget, which refusals use up like any turn.
            stand_in.script.append(_finish("failed", "stopped"))
            result = await service.decide("done", Decision.APPROVE, "cli:approver")
            calls = await service.store.list_tool_calls("done")
            approvals = await service.store.list_approvals("done")
            text = render_summary(summary_of(await service.run_tree("done")))
            timeline = render_timeline(result.run, await service.store.list_events("done"))
            page = render_trace(trace_of(await service.run_tree("done", events=True)))
        finally:
            await service.close()
    assert lines(workspace) == ["act", "scale"]
    assert len(approvals) == 1
    second_ask = [c for c in calls if c.tool == "await_approval"][-1]
    assert second_ask.status == "refused"
    assert "is done" in second_ask.outcome["refused"]
    assert "needs no approval" in second_ask.outcome["refused"]
    assert result.run.status == RunStatus.FAILED
    assert "scale — Make an effect, then exit 1 (gated): ok (ran once); 33 repeat(s)" in text
    refusal_lines = [line for line in text.splitlines() if "execute_step scale: refused" in line]
    assert len(refusal_lines) == 1 and refusal_lines[0].endswith("(33 times)")
    # explain: the step's true state first, and the 33 identical refusals as one line more.
    assert "  scale: ok (once); 33 call(s) refused" in timeline
    assert "(the same call refused 32 more time(s))" in timeline
    assert timeline.count('refused in 0.0 ms: {"refused": "step \'scale\' is done') == 2
    assert "<li>scale: ok (once); 33 call(s) refused</li>" in page


async def test_invented_tools_and_steps_are_refused_and_do_not_count(
    settings: Settings, workspace: Path
) -> None:
    """A made-up tool and a made-up step are refused observations; claiming success after
    them fails the run, naming the steps that never ran."""
    script = [
        READ,
        tool_reply(("kubectl_exec", {"cmd": "rm -rf /"})),
        _step("execute_step", "drop-database"),
        _step("execute_step", "look"),
        _finish("succeeded"),
    ]
    service = await _run(settings, workspace, script, "invent")
    try:
        run = await service.get("invent")
        calls = await service.store.list_tool_calls("invent")
        assert [c.status for c in calls] == ["ok", "refused", "refused", "ok"]
        assert "unknown tool 'kubectl_exec'" in calls[1].outcome["refused"]
        assert "not in runbook" in calls[2].outcome["refused"]
        assert run.status == RunStatus.FAILED
        assert run.error == (
            "the model reported success; 1 of 4 steps ran; not run: act, scale, verify"
        )
        assert first_broken_link(await service.store.list_events("invent")) is None
    finally:
        await service.close()


async def test_a_run_succeeds_when_every_required_step_did_and_optional_ones_may_be_left_out(
    settings: Settings, workspace: Path
) -> None:
    """The facts allow success without the `optional` step; the model's word then stands."""
    with serve(list(TO_THE_GATE)) as stand_in:
        service = await RunService.open(_llm(settings, workspace, stand_in.base_url, SCALES_FINE))
        try:
            await service.start("ok", "rules-drill")
            stand_in.script.extend(
                [_step("execute_step", "scale"), _step("check_health", "verify")]
            )
            stand_in.script.append(_finish("succeeded", "scaled and verified"))
            result = await service.decide("ok", Decision.APPROVE, "cli:approver")
        finally:
            await service.close()
    assert result.run.status == RunStatus.SUCCEEDED, result.run.error
    assert result.run.summary == "scaled and verified"
    assert lines(workspace) == ["act"]


# -- a supervisor's model: the same rules across the incident tree ------------------------------

ONCE = """\
id: once-drill
title: Once drill
triggers: [once drill]
approvers: [cli:approver]
steps:
  - id: act
    title: Append once (not idempotent, no retries)
    run: "{python} append.py act"
  - id: again
    title: Append, declared idempotent, no retries
    run: "{python} append.py again"
    idempotent: true
    optional: true
  - id: poll
    title: A check may be polled
    check: {url: "http://127.0.0.1:9/healthz"}
    optional: true
"""


class _ByRole:
    """A scripted model per role: the supervisor's, the planner's, each executor's."""

    name = "scripted"

    def __init__(self, scripts: dict[str, list[PolicyDecision]]) -> None:
        self.scripts = {role: ScriptedPolicy(script) for role, script in scripts.items()}

    def preflight(self, request: str, catalog: object) -> None:
        """Accept every request."""

    async def decide(self, context: PolicyContext) -> PolicyDecision:
        """The role's scripted answer for the run's next turn."""
        return await self.scripts[context.role].decide(context)


def _once_settings(settings: Settings, workspace: Path) -> Settings:
    write_runbook(workspace, "once-drill", ONCE)
    allow(workspace, "append.py", "re:act|again")
    return settings.model_copy(update={"allow_shell": True})


async def test_a_second_executor_does_not_run_a_completed_step_again(
    settings: Settings, workspace: Path
) -> None:
    """A supervisor's model delegates the executor three times: `act` runs once in the whole
    incident; the later executors are told it is done; the summary says so."""
    policy = _ByRole(
        {
            "supervisor": [
                turn(call("delegate_subagent", role="planner")),
                *[turn(call("delegate_subagent", role="executor"))] * 3,
                final("succeeded", "acted"),
            ],
            "planner": [
                turn(call("read_runbook", runbook_id="once-drill")),
                final("succeeded", "plan"),
            ],
            "executor": [turn(call("execute_step", step_id="act")), final("succeeded", "ok")],
        }
    )
    async with open_service(_once_settings(settings, workspace), policy) as service:
        run = await service.start("tree", "once-drill", role="supervisor")
        children = await service.store.child_runs("tree")
        later = await service.store.list_tool_calls("tree:sub:executor-3")
        text = render_summary(summary_of(await service.run_tree("tree")))
    assert lines(workspace) == ["act"]
    assert [c.role for c in children] == ["planner", "executor", "executor", "executor"]
    assert later[0].status == "refused" and "is done" in later[0].outcome["refused"]
    assert run.status == RunStatus.SUCCEEDED, run.error
    assert "act — Append once (not idempotent, no retries): ok (ran once); 2 repeat(s)" in text


async def test_a_failed_executor_fails_its_supervisor_whatever_follows(
    settings: Settings, workspace: Path
) -> None:
    """The first executor fails; the model delegates another that goes through and claims
    success: every child counts, so the incident fails and says why."""
    policy = _ByRole(
        {
            "supervisor": [
                turn(call("delegate_subagent", role="planner")),
                turn(call("delegate_subagent", role="executor")),
                turn(call("delegate_subagent", role="executor")),
                final("succeeded", "fixed on the second go"),
            ],
            "planner": [
                turn(call("read_runbook", runbook_id="once-drill")),
                final("succeeded", "plan"),
            ],
            "executor": [turn(call("execute_step", step_id="act")), final("succeeded", "ok")],
        }
    )
    (workspace / "append.py").write_text("import sys; sys.exit(1)\n")  # act fails, no line
    async with open_service(_once_settings(settings, workspace), policy) as service:
        run = await service.start("tree", "once-drill", role="supervisor")
        statuses = [c.status for c in await service.store.child_runs("tree")]
    assert statuses == ["succeeded", "failed", "failed"]
    assert run.status == RunStatus.FAILED
    assert run.error == (
        "the model reported success; child runs did not succeed: executor failed, executor failed"
    )


async def test_retries_bound_idempotent_actions_but_not_polled_checks(
    settings: Settings, workspace: Path
) -> None:
    """`again` (idempotent, retries 0) asked three times runs once; the check `poll` may be
    asked three times (polling a recovering service is a read)."""
    policy = ScriptedPolicy(
        [
            turn(call("read_runbook", runbook_id="once-drill")),
            turn(call("execute_step", step_id="act")),
            *[turn(call("execute_step", step_id="again"))] * 3,
            *[turn(call("check_health", step_id="poll"))] * 3,
            final("succeeded", "done"),
        ]
    )
    async with open_service(_once_settings(settings, workspace), policy) as service:
        run = await service.start("bounded", "once-drill")
        calls = await service.store.list_tool_calls("bounded")
    assert lines(workspace) == ["act", "again"]
    again = [c for c in calls if c.step_id == "again"]
    assert [c.status for c in again] == ["ok", "refused", "refused"]
    assert "has used all 1 attempt(s)" in again[1].outcome["refused"]
    assert [c.status for c in calls if c.step_id == "poll"] == ["ok", "ok", "ok"]
    assert run.status == RunStatus.SUCCEEDED, run.error


# -- what a run does live is fixed where it starts -------------------------------------------


async def test_a_dry_run_run_stays_dry_when_a_live_process_approves_it(
    settings: Settings, workspace: Path
) -> None:
    """Started without LOOM_OPS_ALLOW_SHELL, approved by a process that has it: the gated
    command is still only shown, never run."""
    async with open_service(settings) as dry:
        run = await dry.start("dry", "crash-drill")
        assert run.status == RunStatus.WAITING_APPROVAL
        pending = await dry.pending_approval("dry")
        assert pending is not None and pending.mode == "dry-run"
    live = settings.model_copy(update={"allow_shell": True})
    async with open_service(live) as approver:
        result = await approver.decide("dry", Decision.APPROVE, "cli:approver")
        calls = await approver.store.list_tool_calls("dry")
    assert lines(workspace) == []
    acted = [c for c in calls if c.tool == "execute_step" and c.step_id.startswith("append")]
    assert len(acted) == 2 and all(c.outcome.get("dry_run") for c in acted), acted
    assert result.run.status == RunStatus.SUCCEEDED, result.run.error


async def test_a_live_run_waits_rather_than_finish_dry_in_a_process_that_may_not_act(
    settings: Settings, workspace: Path
) -> None:
    """Started live, approved by a process without LOOM_OPS_ALLOW_SHELL: the run is left
    for a process that may act it, and the decision says so. Resumed there by name, it is
    not finished as a dry run; it waits, saying why, and a process allowed to act goes on
    live, from the answer the first process got (the policy is not asked for it again)."""
    live = settings.model_copy(update={"allow_shell": True})
    async with open_service(live) as starter:
        run = await starter.start("live", "crash-drill")
        assert run.status == RunStatus.WAITING_APPROVAL
        assert lines(workspace) == ["one"]
    async with open_service(settings) as dry:
        result = await dry.decide("live", Decision.APPROVE, "cli:approver")
        left = await dry.store.list_events("live")
        await dry.resume("live")
        events = await dry.store.list_events("live")
        # Stopped without a pause: a process that may act it picks it up at once.
        stopped = await dry.get("live")
    assert result.run.status == RunStatus.QUEUED
    assert result.message == (
        "approved by cli:approver; the run waits for a process with LOOM_OPS_ALLOW_SHELL=1: "
        "no live process that drives runs has it"
    )
    # Not driven there: the starter's claim is the only one, and nothing stopped it.
    assert [e.type for e in left].count("run_claimed") == 1, left
    assert "run_interrupted" not in [e.type for e in left], left
    interrupted = [e for e in events if e.type == "run_interrupted"]
    assert "LOOM_OPS_ALLOW_SHELL off" in interrupted[-1].data["error"]
    assert stopped.status == RunStatus.QUEUED and stopped.due(time.time()), stopped
    assert lines(workspace) == ["one"]  # append-two neither ran nor was shown as done
    async with open_service(live) as resumer:
        resumed = await resumer.resume("live")
        events = await resumer.store.list_events("live")
    assert resumed.status == RunStatus.SUCCEEDED, resumed.error
    assert lines(workspace) == ["one", "two"]
    stop = max(i for i, e in enumerate(events) if e.type == "run_interrupted")
    assert events[stop - 1].type == "policy_turn"  # the answer the dry process could not act on
    turns = [e.data["turn"] for e in events if e.type == "policy_turn"]
    assert turns == sorted(set(turns)), turns  # each answer asked for once


async def test_a_live_run_keeps_to_the_runbook_and_params_its_request_names(
    settings: Settings,
) -> None:
    """A person named the runbook and a param; a model (confused, or steered by the incident
    text) reads another runbook, then the named one with another value: both are refused,
    and the run commits only to what was named. In a dry run the model may choose."""
    script = [
        turn(call("read_runbook", runbook_id="api-latency-spike")),
        turn(call("read_runbook", runbook_id="disk-almost-full", params={"mount": "/"})),
        turn(call("read_runbook", runbook_id="disk-almost-full", params={"mount": "/data"})),
        final("failed", "scripted end"),
    ]
    live = settings.model_copy(update={"allow_shell": True})
    async with open_service(live, ScriptedPolicy(script)) as service:
        run = await service.start("live", "disk-almost-full mount=/data", role="runbook")
        calls = await service.store.list_tool_calls("live")
    assert [c.status for c in calls] == ["refused", "refused", "ok"], calls
    assert "names runbook 'disk-almost-full'" in calls[0].outcome["refused"]
    assert "sets mount=/data" in calls[1].outcome["refused"]
    assert run.runbook_id == "disk-almost-full"

    async with open_service(settings, ScriptedPolicy(script)) as service:
        run = await service.start("dry", "disk-almost-full mount=/data", role="runbook")
        calls = await service.store.list_tool_calls("dry")
    assert calls[0].status == "ok" and run.runbook_id == "api-latency-spike"
