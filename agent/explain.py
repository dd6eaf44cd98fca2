"""`explain`: a run's journal as a readable timeline, one line (or two) per event."""

from __future__ import annotations

import json
import time
from typing import Any

from agent.records import EventRecord, RunRecord

MAX_VALUE_CHARS = 160


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
        lines = f"approval #{d['approval_id']} ({d['kind']}) for {d.get('step_id')}: {d['action']}"
        lines += f"\n{'':>12}why: {d['reason']}; rollback: {d.get('rollback') or '-'}"
        return lines + f"; who: {who}; until {deadline}"
    if kind == "approval_decided":
        note = f' — "{d["note"]}"' if d.get("note") else ""
        return f"approval #{d['approval_id']} {d['decision']} by {d['decided_by']}{note}"
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


def render_timeline(run: RunRecord, events: list[EventRecord]) -> str:
    """The whole timeline of a run: every step, call, approval and error, with times."""
    header = [
        f"Run {run.id} — role {run.role} — status {run.status}"
        + (f" — runbook {run.runbook_id}" if run.runbook_id else ""),
        f"Started {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(run.created_at))}",
    ]
    start = events[0].ts if events else run.created_at
    lines = [f"{'+' + format(e.ts - start, '.3f') + 's':>11} {describe_event(e)}" for e in events]
    return "\n".join([*header, "", *lines]) + "\n"
