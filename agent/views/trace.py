"""The offline trace: one self-contained HTML file explaining a run tree after the fact.

No external fetch of any kind: the CSS and the few lines of script are inline, and the page
reads fine with scripts off (sections fold with <details>, which needs no script).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from agent.events import (
    ApprovalDecided,
    ApprovalExpired,
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
    UnknownEvent,
)
from agent.records import ApprovalRecord, RunRecord, RunTree
from agent.views.explain import EXECUTING_ROLES, step_lines
from agent.views.jinja import HTML
from agent.views.journal import JournalEntry, read_journal

MAX_BLOCK_CHARS = 4000  # one argument or outcome block; the journal keeps the rest


@dataclass
class TraceEntry:
    """One line of a run's timeline, with an optional detail block."""

    offset: str
    kind: str  # llm | tool | approval | error | run
    title: str
    detail: str = ""
    status: str = ""


@dataclass
class RunTrace:
    """One run of the tree and its timeline."""

    run: RunRecord
    started: str
    duration: str
    tokens: int
    entries: list[TraceEntry] = field(default_factory=list)
    approvals: list[ApprovalRecord] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)  # each step's true state (explain's lines)


def _block(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, indent=2, ensure_ascii=False)
    if len(text) > MAX_BLOCK_CHARS:
        text = text[:MAX_BLOCK_CHARS] + f"\n… ({len(text) - MAX_BLOCK_CHARS} more characters)"
    return text


def _outcome_block(args: dict[str, Any], outcome: dict[str, Any]) -> str:
    """A call's arguments and outcome as people read them: what a command printed as text
    (stderr first, where errors are), the rest as JSON."""
    streams = {name: outcome[name] for name in ("stderr", "stdout") if outcome.get(name)}
    rest = {k: v for k, v in outcome.items() if k not in streams}
    parts = [_block({"args": args, "outcome": rest})]
    parts += [f"--- {name} ---\n{_block(str(text))}" for name, text in streams.items()]
    return "\n".join(parts)


def _clock(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def _entries(journal: list[JournalEntry]) -> list[TraceEntry]:
    """Turn the journal into timeline entries: each outcome shows the call it answers."""
    if not journal:
        return []
    start = previous = journal[0].record.ts
    entries: list[TraceEntry] = []
    for entry in journal:
        ts = entry.record.ts
        offset = f"+{ts - start:.3f}s"
        match entry.event:
            case PolicyTurn() as turn:
                entries.append(_turn_entry(offset, turn, ts - previous))
            case ToolOutcome() as result:
                entries.append(_outcome_entry(offset, result, entry.intent))
            case ApprovalRequested() as request:
                number = request.number or request.approval_id
                title = f"approval #{number} requested for {request.step_id}: {request.action}"
                detail = _block(entry.record.data)  # the request as journaled
                entries.append(TraceEntry(offset, "approval", title, detail, "pending"))
            case ApprovalDecided() as decided:
                number = decided.number or decided.approval_id
                title = f"approval #{number} {decided.decision} by {decided.decided_by}"
                if decided.note:
                    title += f" — {decided.note}"
                entries.append(TraceEntry(offset, "approval", title, "", decided.decision))
            case ApprovalVoted() as voted:
                number = voted.number or voted.approval_id
                title = (
                    f"approval #{number} approved by {voted.decided_by} "
                    f"({voted.approvals} of {voted.required})"
                )
                if voted.note:
                    title += f" — {voted.note}"
                entries.append(TraceEntry(offset, "approval", title, "", "pending"))
            case ApprovalExpired(approval_id=approval_id):
                title = f"approval #{approval_id} expired"
                entries.append(TraceEntry(offset, "error", title, "", "expired"))
            case RunInterrupted(error=error):
                entries.append(TraceEntry(offset, "error", f"interrupted: {error}"))
            case RunFinished() as finished:
                title = f"finished {finished.status}"
                tail = finished.error or finished.summary
                kind = "run" if finished.status == "succeeded" else "error"
                entries.append(TraceEntry(offset, kind, title + (f": {tail}" if tail else "")))
            case RunCreated(requested_by=who, request=asked):
                entries.append(TraceEntry(offset, "run", f"created by {who}: {asked}"))
            case RunClaimed(owner=owner):
                entries.append(TraceEntry(offset, "run", f"driven by {owner}"))
            case Audit(entry=text):
                entries.append(TraceEntry(offset, "run", f"audit: {text}"))
            case UnknownEvent(type=kind, raw=raw):  # another version's: what was stored
                entries.append(
                    TraceEntry(offset, "run", f"{kind} (unreadable by this version)", _block(raw))
                )
        previous = ts
    return entries


def _turn_entry(offset: str, turn: PolicyTurn, gap: float) -> TraceEntry:
    """A policy turn: what it answered, its tokens and latency, and the answer in full;
    `gap` is the time since the event before (the latency of a turn journaled without)."""
    response = turn.response
    calls = response.get("calls") or []
    final = response.get("final")
    what = ", ".join(c["name"] for c in calls) or (
        f"final: {final['outcome']}" if final else "nothing"
    )
    tokens = turn.prompt_tokens + turn.completion_tokens
    title = f"turn {turn.turn} · {turn.policy} → {what}"
    title += f" · {tokens} tokens" if tokens else ""
    latency = response.get("latency_ms")
    if isinstance(latency, int | float):
        title += f" · {latency:.0f} ms"
    else:  # journaled before latency was recorded: the gap since the event before
        title += f" · ≈{gap * 1000:.0f} ms"
    detail = {"prompt (end)": response.get("prompt_excerpt") or "-", **response}
    return TraceEntry(offset, "llm", title, _block(detail))


def _outcome_entry(offset: str, result: ToolOutcome, intent: ToolIntent | None) -> TraceEntry:
    """A tool call's outcome with the call it answers (a decision's outcome has none)."""
    tool = intent.tool if intent else "decision"
    args = intent.args if intent else {}
    title = f"{tool} {json.dumps(args, ensure_ascii=False)}"
    if isinstance(result.duration_ms, int | float):
        title += f" · {result.duration_ms:.1f} ms"
    detail = _outcome_block(args, result.outcome or {})
    kind = "error" if result.status in ("error", "refused") else "tool"
    return TraceEntry(offset, kind, title, detail, result.status)


def trace_of(tree: RunTree) -> list[RunTrace]:
    """Every run of the tree (read with its events), parents first, each with its timeline."""
    traces = []
    for run in tree.runs:
        events = tree.events_of(run.id)
        journal = read_journal(events)
        tokens = sum(
            entry.event.prompt_tokens + entry.event.completion_tokens
            for entry in journal
            if isinstance(entry.event, PolicyTurn)
        )
        end = run.finished_at or (events[-1].ts if events else run.created_at)
        traces.append(
            RunTrace(
                run=run,
                started=_clock(run.created_at),
                duration=f"{end - run.created_at:.1f} s",
                tokens=tokens,
                entries=_entries(journal),
                approvals=tree.approvals_of(run.id),
                steps=[line.strip() for line in step_lines(run, journal)]
                if run.role in EXECUTING_ROLES
                else [],
            )
        )
    return traces


def render_trace(traces: list[RunTrace]) -> str:
    """The self-contained HTML page."""
    return HTML.get_template("trace.html.j2").render(
        traces=traces, generated=_clock(time.time()), clock=_clock
    )
