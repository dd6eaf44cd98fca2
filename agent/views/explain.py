"""`explain`: a run tree's journal as a readable timeline, one line (or two) per event, and
each runbook step's true state. Pure functions over one snapshot of the tree (`RunTree`)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from agent.records import EventRecord, RunRecord, RunTree
from agent.run.outcomes import DONE, STEP_TOOLS, StepState, after_call, short_result, step_states

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


def _outcome(data: dict[str, Any]) -> str:
    outcome = data.get("outcome") or {}
    status = data.get("status")
    duration = data.get("duration_ms")
    took = f" in {duration:.1f} ms" if isinstance(duration, int | float) else ""
    return f"{status}{took}: {_short(outcome)}"


def describe_event(event: EventRecord) -> str:
    """One event as a line of the timeline (without the time column)."""
    d = event.data
    kind = event.type
    if kind == "run_created":
        return f"created by {d['requested_by']} ({d['origin']['kind']}): {_short(d['request'])}"
    if kind == "run_claimed":
        taken = f", taken over from {d['taken_over_from']}" if d.get("taken_over_from") else ""
        return f"driven by {d['owner']}{taken}"
    if kind == "policy_turn":
        tokens = d.get("prompt_tokens", 0) + d.get("completion_tokens", 0)
        used = f" [{tokens} tokens]" if tokens else ""
        return f"turn {d['turn']} ({d['policy']}){used} → {_calls(d['response'])}"
    if kind == "tool_intent":
        again = f" (attempt {d['attempt']})" if d.get("attempt", 1) > 1 else ""
        return f"call {d['call_key']}{again}: {d['tool']} {_short(d['args'], 100)}"
    if kind == "tool_outcome":
        return f"result {d['call_key']} {_outcome(d)}"
    if kind == "approval_requested":
        who = ", ".join(d.get("deciders") or []) or "any approver"
        deadline = time.strftime("%H:%M:%S UTC", time.gmtime(d["deadline_at"]))
        number = d.get("number") or d["approval_id"]
        lines = f"approval #{number} ({d['kind']}) for {d.get('step_id')}: {d['action']}"
        lines += f"\n{'':>12}why: {d['reason']}; rollback: {d.get('rollback') or '-'}"
        return lines + f"; who: {who}; until {deadline}"
    if kind == "approval_decided":
        note = f' — "{d["note"]}"' if d.get("note") else ""
        number = d.get("number") or d["approval_id"]
        return f"approval #{number} {d['decision']} by {d['decided_by']}{note}"
    if kind == "approval_expired":
        return f"approval #{d['approval_id']} expired without a decision"
    if kind == "audit":
        return f"audit: {_short(d['entry'])}"
    if kind == "run_interrupted":
        return f"interrupted: {d['error']} (resume to continue)"
    if kind == "run_finished":
        tail = d.get("error") or d.get("summary") or ""
        return f"finished {d['status']}" + (f": {_short(tail)}" if tail else "")
    return f"{kind}: {_short(d)}"


def explain_tree(tree: RunTree) -> str:
    """The timeline of every run of the tree (read with its events), parents first."""
    return "\n".join(render_timeline(run, tree.events_of(run.id)) for run in tree.runs)


def executing_runs(tree: RunTree) -> list[RunRecord]:
    """The runs of the tree that executed its runbook's steps: the first such run's runbook,
    by every run that executed it (a step run by a second executor ran all the same)."""
    runs = [run for run in tree.runs if run.runbook and run.role in EXECUTING_ROLES]
    return [run for run in runs if run.runbook_id == runs[0].runbook_id] if runs else []


def tree_step_lines(tree: RunTree) -> list[str]:
    """Each runbook step's true state (`step_lines`) from the journals of the runs that
    executed the tree's runbook (read with its events); none when no runbook ran."""
    executing = executing_runs(tree)
    if not executing:
        return []
    ids = {run.id for run in executing}
    return step_lines(executing[0], [event for event in tree.events if event.run_id in ids])


@dataclass(frozen=True)
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


def step_lines(run: RunRecord, events: list[EventRecord]) -> list[str]:
    """Each runbook step's true state from the journal: its last attempt's result, how many
    attempts it took, and how many repeats the kernel refused."""
    steps = (run.runbook or {}).get("steps", [])
    calls: dict[str, tuple[str, str | None, int]] = {}  # call key -> tool, step, attempt
    states: dict[str, StepState] = {}
    for event in events:
        d = event.data
        if event.type == "tool_intent":
            calls[d["call_key"]] = (d["tool"], d.get("step_id"), d.get("attempt", 1))
        elif event.type == "tool_outcome" and d.get("call_key") in calls:
            tool, step_id, _ = calls[d["call_key"]]
            if tool in STEP_TOOLS and step_id:
                tried = 0 if d.get("status") == "refused" else 1
                previous = states.get(step_id, StepState())
                states[step_id] = after_call(previous, d.get("status", ""), tried, d.get("outcome"))
    lines = []
    for step in steps:
        state = states.get(step["id"], StepState())
        if state.last is None:
            text = "not run"
        else:
            times = "once" if state.attempts == 1 else f"{state.attempts} attempts"
            result = short_result(state.outcome) if state.last != "ok" else ""
            who = f" by {state.skipped_by}" if state.skipped_by else ""
            text = f"{state.last}{who} ({times})" + (f": {result}" if result else "")
        if state.refusals:
            text += f"; {state.refusals} call(s) refused"
        lines.append(f"  {step['id']}: {text}")
    return lines


def render_timeline(run: RunRecord, events: list[EventRecord]) -> str:
    """The whole timeline of a run: each step's state, then every call, approval and error,
    with times; a refused call repeated word for word is one line with a count."""
    header = [
        f"Run {run.id} — role {run.role} — status {run.status}"
        + (f" — runbook {run.runbook_id}" if run.runbook_id else ""),
        f"Started {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(run.created_at))}",
    ]
    steps = step_lines(run, events)
    if steps and run.role in ("runbook", "executor"):
        header += ["", "Steps:", *steps]
    start = events[0].ts if events else run.created_at
    lines: list[str] = []
    held: list[str] = []  # a turn and an intent that may lead to a repeat of the last refusal
    repeated, last_refusal = 0, None
    proposed: dict[str, str] = {}  # call key -> the call (tool and arguments)

    def flush() -> None:
        nonlocal repeated
        if repeated:
            lines.append(f"{'':>11} (the same call refused {repeated} more time(s))")
            repeated = 0
        lines.extend(held)
        held.clear()

    for event in events:
        line = f"{'+' + format(event.ts - start, '.3f') + 's':>11} {describe_event(event)}"
        if event.type == "tool_intent":
            proposed[event.data["call_key"]] = _short([event.data["tool"], event.data["args"]])
        refusal = _refusal_key(event, proposed)
        if last_refusal is not None and event.type in ("policy_turn", "tool_intent"):
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


def _refusal_key(event: EventRecord, proposed: dict[str, str]) -> str | None:
    """What makes a refused outcome the same as another (the call and the reason), else None."""
    if event.type != "tool_outcome" or event.data.get("status") != "refused":
        return None
    call = proposed.get(event.data.get("call_key", ""), "")
    return call + json.dumps(event.data.get("outcome"), sort_keys=True)
