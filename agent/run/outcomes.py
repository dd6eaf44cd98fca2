"""Outcomes from facts: each step's true state, what the kernel lets a policy run again, and a
run's final status, all computed from recorded tool calls — never from the model's word.

Invariants:
- a step that acts (`run` or `mcp`) runs at most `1 + retries` times, failed attempts
  included, whether or not it is `idempotent: true`; one that is not idempotent never runs
  again once it succeeded or a person said to treat it as done; only a person's "retry" of an
  in-doubt attempt goes past that. Checks and notes are reads: a policy may repeat them (to
  poll a recovering service, or to verify before and after), within the run's budgets;
- a run that executes a runbook succeeds only when every step that is not `optional` has a
  successful last attempt (or a person's skip); a failed or never-run step rules success out;
- the model's final answer is its narrative: it can turn a run's success into a failure, never
  a failure into a success, and where it contradicts the facts the verdict says so in one line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import field
from typing import Any

from agent.records import RunStatus, record
from agent.runbook.model import Runbook, Step

STEP_TOOLS = ("execute_step", "check_health")
DONE = ("ok", "skipped")  # a step with one of these last results has happened


@record
class StepState:
    """What one step of a run has done so far."""

    attempts: int = 0  # attempts started, failed and in-doubt ones included
    last: str | None = None  # the last attempt's result (ok, error, skipped, …); None: never ran
    outcome: dict[str, Any] = field(default_factory=dict)
    refusals: int = 0  # calls the kernel refused (they never ran)
    skipped_by: str | None = None  # who said "it ran, treat it as done"

    @property
    def done(self) -> bool:
        """True once the step succeeded or a person said to treat it as done."""
        return self.last in DONE


def after_call(
    state: StepState, status: str, attempts: int, outcome: Mapping[str, Any] | None
) -> StepState:
    """The step's state after one recorded call of it: `attempts` is how many attempts that
    call made (a retried in-doubt call makes two); a refused call made none."""
    if status == "refused":
        return dataclasses.replace(state, refusals=state.refusals + 1)
    outcome = dict(outcome or {})
    skipped_by = outcome.get("decided_by") if status == "skipped" else None
    return dataclasses.replace(
        state,
        attempts=state.attempts + attempts,
        last=status,
        outcome=outcome,
        skipped_by=skipped_by,
    )


def step_states(
    calls: Iterable[tuple[str, str | None, str, int, Mapping[str, Any] | None]],
) -> dict[str, StepState]:
    """Each step's state from recorded calls `(tool, step_id, status, attempts, outcome)`, in
    the order they were proposed; calls of other tools are ignored."""
    states: dict[str, StepState] = {}
    for tool, step_id, status, attempts, outcome in calls:
        if tool in STEP_TOOLS and step_id:
            states[step_id] = after_call(
                states.get(step_id, StepState()), status, attempts, outcome
            )
    return states


def is_read(step: Step) -> bool:
    """Whether the step only looks (a check or a note): nothing limits how often it runs."""
    return step.action_kind in ("check", "note")


def repeat_refusal(step: Step, state: StepState) -> str | None:
    """Why the step may not run again, or None: a done step that is not idempotent is never
    repeated, and no step that acts runs more often than its runbook allows."""
    if is_read(step):
        return None
    if state.done and not step.idempotent:
        how = (
            f"a person ({state.skipped_by}) said to treat it as done"
            if state.last == "skipped"
            else f"it ran {_times(state.attempts)} and succeeded"
        )
        result = short_result(state.outcome)
        return (
            f"step {step.id!r} is done: {how}{f' ({result})' if result else ''}; it is not run "
            "again and needs no approval — go on with the next step"
        )
    allowed = 1 + step.retries
    if state.attempts >= allowed:
        result = short_result(state.outcome)
        return (
            f"step {step.id!r} has used all {allowed} attempt(s) its runbook allows "
            f"(retries: {step.retries}){f'; last result: {result}' if result else ''}; "
            "it is not run again"
        )
    return None


def short_result(outcome: Mapping[str, Any]) -> str:
    """A one-line account of an outcome: exit code and stderr's last line, an HTTP status, …"""
    if outcome.get("dry_run"):
        return "dry-run"
    if "denied" in outcome:
        return f"denied: {outcome['denied']}"
    if outcome.get("timed_out"):
        return "timed out"
    if "exit_code" in outcome:
        tail = _last_line(outcome.get("stderr")) or _last_line(outcome.get("stdout"))
        return f"exit {outcome['exit_code']}" + (f": {tail}" if tail else "")
    if "status_code" in outcome and outcome.get("error"):
        return str(outcome["error"])
    if "status_code" in outcome:
        return f"HTTP {outcome['status_code']}"
    if outcome.get("error"):
        return str(outcome["error"])[:200]
    return ""


@record
class Verdict:
    """A run's final status and, when the facts and the model disagree, why in one line."""

    status: RunStatus
    facts: str | None  # None when the model's claim and the facts agree


def verdict(
    role: str,
    claimed: str,
    runbook: Runbook | None,
    states: Mapping[str, StepState],
    children: Sequence[tuple[str, RunStatus]] = (),
) -> Verdict:
    """The status a run ends with, from its facts and the model's `claimed` outcome
    ("succeeded" or "failed"). `children` are the (role, status) of every child run, for a
    supervisor."""
    problem = _facts_problem(role, runbook, states, children)
    if claimed != "succeeded":
        # The model's failure stands (the safe side); its account is the run's error.
        return Verdict(RunStatus.FAILED, None)
    if problem is None:
        return Verdict(RunStatus.SUCCEEDED, None)
    return Verdict(RunStatus.FAILED, f"the model reported success; {problem}")


def _facts_problem(
    role: str,
    runbook: Runbook | None,
    states: Mapping[str, StepState],
    children: Sequence[tuple[str, RunStatus]],
) -> str | None:
    """Why the facts rule success out, or None when they allow it."""
    if role == "supervisor":
        if not children:
            return "no child run was started"
        if not any(child_role == "executor" for child_role, _ in children):
            return "no executor run was started, so no step ran"
        # Every child counts, not the last of each role: a failed executor stays a failure
        # even when a later plan (another runbook, say) went through.
        failed = [f"{r} {s}" for r, s in children if s != RunStatus.SUCCEEDED]
        return f"child runs did not succeed: {', '.join(failed)}" if failed else None
    if runbook is None:
        return "no runbook was read, so no step ran"
    if role == "planner":
        return None  # the plan is the pinned runbook and params
    if role == "verifier":
        checks = [step for step in runbook.steps if step.check is not None]
        unchecked = [s.id for s in checks if states.get(s.id, StepState()).last is None]
        failing = [s.id for s in checks if states.get(s.id, StepState()).last not in (None, *DONE)]
        if failing:
            return f"health checks failed: {', '.join(failing)}"
        if unchecked:
            return f"{len(checks) - len(unchecked)} of {len(checks)} checks ran"
        return None
    required = [step for step in runbook.steps if not step.optional]
    failed = [
        s.id for s in runbook.steps if states.get(s.id, StepState()).last not in (None, *DONE)
    ]
    done = [s.id for s in required if states.get(s.id, StepState()).done]
    missing = [s.id for s in required if not states.get(s.id, StepState()).done]
    if failed:
        return f"step(s) failed: {', '.join(failed)} ({len(done)} of {len(required)} steps done)"
    if missing:
        ran = f"{len(done)} of {len(required)} steps ran"
        return f"{ran}; not run: {', '.join(missing)}"
    return None


def _times(n: int) -> str:
    return "once" if n == 1 else f"{n} times"


def _last_line(text: object) -> str:
    if not isinstance(text, str):
        return ""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""
