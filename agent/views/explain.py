"""`explain`: a run tree's journal as a readable timeline, one line (or two) per event, and
each runbook step's true state. Pure functions over one snapshot of the tree (`RunTree`)."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from agent.events import (
    ApprovalDecided,
    ApprovalEscalated,
    ApprovalExpired,
    ApprovalReminded,
    ApprovalRequested,
    ApprovalVoted,
    Audit,
    PolicyTurn,
    RunClaimed,
    RunCreated,
    RunFinished,
    RunInterrupted,
    ToolIntent,
    ToolOutcome,
)
from agent.records import EventRecord, RunRecord, RunTree, record
from agent.run.outcomes import DONE, STEP_TOOLS, StepState, short_result, step_states
from agent.views.journal import JournalEntry, journal_steps, read_journal

MAX_VALUE_CHARS = 160
# Roles that execute a runbook's steps (a supervisor's executor children, or a runbook run).
EXECUTING_ROLES = ("runbook", "executor")


def _short(value: Any, limit: int = MAX_VALUE_CHARS) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _calls(response: dict[str, Any]) -> str:
    calls = response.get("calls") or []
    parts = [f"{c['name']}({_short(c.get('args', {}), 80)})" for c in calls]
    final = response.get("final")
    if final:
        parts.append(f"final {final['outcome']}: {_short(final['summary'], 100)}")
    return ", ".join(parts) or "(nothing)"


def _outcome(result: ToolOutcome) -> str:
    took = f" in {result.duration_ms:.1f} ms" if isinstance(result.duration_ms, int | float) else ""
    return f"{result.status}{took}: {_short(result.outcome or {})}"


def describe_event(entry: JournalEntry) -> str:
    """One event as a line of the timeline (without the time column); one this version
    cannot read shows its type and stored data."""
    match entry.event:
        case RunCreated() as created:
            origin = created.origin["kind"]
            return f"created by {created.requested_by} ({origin}): {_short(created.request)}"
        case RunClaimed(owner=owner, taken_over_from=taken_from):
            taken = f", taken over from {taken_from}" if taken_from else ""
            return f"driven by {owner}{taken}"
        case PolicyTurn() as turn:
            tokens = turn.prompt_tokens + turn.completion_tokens
            used = f" [{tokens} tokens]" if tokens else ""
            return f"turn {turn.turn} ({turn.policy}){used} → {_calls(turn.response)}"
        case ToolIntent() as intent:
            again = f" (attempt {intent.attempt})" if intent.attempt > 1 else ""
            return f"call {intent.call_key}{again}: {intent.tool} {_short(intent.args, 100)}"
        case ToolOutcome() as result:
            return f"result {result.call_key} {_outcome(result)}"
        case ApprovalRequested() as request:
            who = ", ".join(request.deciders or []) or "any approver"
            deadline = time.strftime("%H:%M:%S UTC", time.gmtime(request.deadline_at))
            number = request.number or request.approval_id
            lines = f"approval #{number} ({request.kind}) for {request.step_id}: {request.action}"
            lines += f"\n{'':>12}why: {request.reason}; rollback: {request.rollback or '-'}"
            if request.required > 1:
                who = f"{request.required} distinct people of {who}"
            return lines + f"; who: {who}; until {deadline}"
        case ApprovalVoted() as voted:
            note = f' — "{voted.note}"' if voted.note else ""
            number = voted.number or voted.approval_id
            return (
                f"approval #{number} approved by {voted.decided_by}{note} "
                f"({voted.approvals} of {voted.required}, waiting for more)"
            )
        case ApprovalDecided() as decided:
            note = f' — "{decided.note}"' if decided.note else ""
            number = decided.number or decided.approval_id
            return f"approval #{number} {decided.decision} by {decided.decided_by}{note}"
        case ApprovalExpired(approval_id=approval_id, on_expiry=on_expiry):
            rollback = "; rolling the completed steps back" if on_expiry == "rollback" else ""
            return f"approval #{approval_id} expired without a decision{rollback}"
        case ApprovalReminded() as reminded:
            whom = ", ".join(reminded.mentioned) or "nobody to mention"
            private = f" (privately too: {', '.join(reminded.privately)})"
            return f"approval #{reminded.number} reminded {whom}" + (
                private if reminded.privately else ""
            )
        case ApprovalEscalated() as escalated:
            added = ", ".join(escalated.escalate_to)
            whom = f" ({', '.join(escalated.mentioned)})" if escalated.mentioned else ""
            return f"approval #{escalated.number} escalated to {added}{whom}"
        case Audit(entry=text):
            return f"audit: {_short(text)}"
        case RunInterrupted(error=error):
            return f"interrupted: {error} (resume to continue)"
        case RunFinished() as finished:
            tail = finished.error or finished.summary or ""
            return f"finished {finished.status}" + (f": {_short(tail)}" if tail else "")
    # Unknown to this version, or a type the timeline has no words for: what was stored.
    return f"{entry.record.type}: {_short(entry.record.data)}"


def explain_tree(tree: RunTree) -> str:
    """The timeline of every run of the tree (read with its events), parents first."""
    return "\n".join(render_timeline(run, tree.events_of(run.id)) for run in tree.runs)


def executing_runs(tree: RunTree) -> list[RunRecord]:
    """The runs of the tree that executed its runbook's steps: the first such run's runbook,
    by every run that executed it (a step run by a second executor ran all the same)."""
    runs = [run for run in tree.runs if run.runbook and run.role in EXECUTING_ROLES]
    return [run for run in runs if run.runbook_id == runs[0].runbook_id] if runs else []


def tree_steps(tree: RunTree) -> list[tuple[str, StepState]]:
    """Each runbook step (its id) with its true state, from the journals of the runs that
    executed the tree's runbook (the tree read with its events); none when no runbook ran."""
    executing = executing_runs(tree)
    if not executing:
        return []
    ids = {run.id for run in executing}
    journal = read_journal(event for event in tree.events if event.run_id in ids)
    return journal_steps(executing[0], journal)


@record
class StepProgress:
    """How far a tree's runbook got: steps done of all, and the step that ran last."""

    done: int
    total: int
    last_step: str | None = None  # the step of the latest attempt that ran (not refused)
    last_status: str = ""  # its call's status: ok, error, skipped, ...
    last_detail: str = ""  # what a failed attempt said, in short


def step_progress(tree: RunTree) -> StepProgress:
    """Steps done of the tree's runbook and its last step's result, from the tool calls of
    the runs that executed it (the tree read with its calls)."""
    executing = executing_runs(tree)
    if not executing:
        return StepProgress(0, 0)
    calls = [call for run in executing for call in tree.calls_of(run.id)]
    steps = (executing[0].runbook or {}).get("steps", [])
    states = step_states(
        (c.tool, c.step_id, c.status, c.attempt, c.outcome) for c in calls if c.status != "intent"
    )
    done = sum(1 for step in steps if states.get(step["id"]) and states[step["id"]].last in DONE)
    ran = [
        c
        for c in calls
        if c.tool in STEP_TOOLS and c.step_id and c.status not in ("intent", "refused")
    ]
    if not ran:
        return StepProgress(done, len(steps))
    last = max(ran, key=lambda c: (c.outcome_at or 0.0, c.intent_at))
    detail = short_result(last.outcome or {}) if last.status == "error" else ""
    return StepProgress(done, len(steps), last.step_id, last.status, detail)


def step_text(state: StepState) -> str:
    """A step's true state in words: its last attempt's result, how many attempts it took,
    and how many repeats the kernel refused (`error (2 attempts): exit 1: boom`)."""
    if state.last is None:
        text = "not run"
    else:
        times = "once" if state.attempts == 1 else f"{state.attempts} attempts"
        result = short_result(state.outcome) if state.last != "ok" else ""
        who = f" by {state.skipped_by}" if state.skipped_by else ""
        text = f"{state.last}{who} ({times})" + (f": {result}" if result else "")
    if state.refusals:
        text += f"; {state.refusals} call(s) refused"
    return text


def step_lines(run: RunRecord, journal: Sequence[JournalEntry]) -> list[str]:
    """Each runbook step of the run and its true state, one line each, from its journal."""
    return [f"  {step_id}: {step_text(state)}" for step_id, state in journal_steps(run, journal)]


def render_timeline(run: RunRecord, events: list[EventRecord]) -> str:
    """The whole timeline of a run: each step's state, then every call, approval and error,
    with times; a refused call repeated word for word is one line with a count."""
    header = [
        f"Run {run.id} — role {run.role} — status {run.status}"
        + (f" — runbook {run.runbook_id}" if run.runbook_id else ""),
        f"Started {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(run.created_at))}",
    ]
    journal = read_journal(events)
    steps = step_lines(run, journal)
    if steps and run.role in EXECUTING_ROLES:
        header += ["", "Steps:", *steps]
    start = events[0].ts if events else run.created_at
    lines: list[str] = []
    held: list[str] = []  # a turn and an intent that may lead to a repeat of the last refusal
    repeated, last_refusal = 0, None

    def flush() -> None:
        nonlocal repeated
        if repeated:
            lines.append(f"{'':>11} (the same call refused {repeated} more time(s))")
            repeated = 0
        lines.extend(held)
        held.clear()

    for entry in journal:
        offset = "+" + format(entry.record.ts - start, ".3f") + "s"
        line = f"{offset:>11} {describe_event(entry)}"
        refusal = _refusal_key(entry)
        if last_refusal is not None and isinstance(entry.event, PolicyTurn | ToolIntent):
            held.append(line)
            continue
        if refusal is not None and refusal == last_refusal:
            repeated += 1
            held.clear()
            continue
        flush()
        lines.append(line)
        last_refusal = refusal
    flush()
    return "\n".join([*header, "", *lines]) + "\n"


def _refusal_key(entry: JournalEntry) -> str | None:
    """What makes a refused outcome the same as another (the call and the reason), else None."""
    match entry.event:
        case ToolOutcome(status="refused", outcome=outcome):
            call = _short([entry.intent.tool, entry.intent.args]) if entry.intent else ""
            return call + json.dumps(outcome, sort_keys=True)
    return None
