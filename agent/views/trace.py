"""The offline trace: one self-contained HTML file explaining a run tree after the fact.

No external fetch of any kind: the CSS and the few lines of script are inline, and the page
reads fine with scripts off (sections fold with <details>, which needs no script).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from agent.records import ApprovalRecord, EventRecord, RunRecord, RunTree
from agent.views.explain import EXECUTING_ROLES, step_lines
from agent.views.jinja import HTML

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


def _entries(events: list[EventRecord]) -> list[TraceEntry]:
    """Turn the journal into timeline entries: intents are paired with their outcomes."""
    if not events:
        return []
    start = events[0].ts
    intents: dict[str, EventRecord] = {}
    entries: list[TraceEntry] = []
    previous = start
    for event in events:
        d = event.data
        offset = f"+{event.ts - start:.3f}s"
        if event.type == "policy_turn":
            calls = d["response"].get("calls") or []
            final = d["response"].get("final")
            what = ", ".join(c["name"] for c in calls) or (
                f"final: {final['outcome']}" if final else "nothing"
            )
            tokens = d.get("prompt_tokens", 0) + d.get("completion_tokens", 0)
            title = f"turn {d['turn']} · {d['policy']} → {what}"
            title += f" · {tokens} tokens" if tokens else ""
            latency = d["response"].get("latency_ms")
            if isinstance(latency, int | float):
                title += f" · {latency:.0f} ms"
            else:  # journaled before latency was recorded: the gap since the event before
                title += f" · ≈{(event.ts - previous) * 1000:.0f} ms"
            detail = {"prompt (end)": d["response"].get("prompt_excerpt") or "-", **d["response"]}
            entries.append(TraceEntry(offset, "llm", title, _block(detail)))
        elif event.type == "tool_intent":
            intents[d["call_key"]] = event
        elif event.type == "tool_outcome":
            intent = intents.get(d["call_key"])
            tool = intent.data["tool"] if intent else "decision"
            args = intent.data["args"] if intent else {}
            took = d.get("duration_ms")
            title = f"{tool} {json.dumps(args, ensure_ascii=False)}"
            title += f" · {took:.1f} ms" if isinstance(took, int | float) else ""
            detail = _outcome_block(args, d.get("outcome") or {})
            kind = "error" if d["status"] in ("error", "refused") else "tool"
            entries.append(TraceEntry(offset, kind, title, detail, d["status"]))
        elif event.type == "approval_requested":
            number = d.get("number") or d["approval_id"]
            title = f"approval #{number} requested for {d.get('step_id')}: {d['action']}"
            entries.append(TraceEntry(offset, "approval", title, _block(d), "pending"))
        elif event.type == "approval_decided":
            number = d.get("number") or d["approval_id"]
            title = f"approval #{number} {d['decision']} by {d['decided_by']}"
            if d.get("note"):
                title += f" — {d['note']}"
            entries.append(TraceEntry(offset, "approval", title, "", d["decision"]))
        elif event.type == "approval_expired":
            title = f"approval #{d['approval_id']} expired"
            entries.append(TraceEntry(offset, "error", title, "", "expired"))
        elif event.type == "run_interrupted":
            entries.append(TraceEntry(offset, "error", f"interrupted: {d['error']}"))
        elif event.type == "run_finished":
            title = f"finished {d['status']}"
            tail = d.get("error") or d.get("summary")
            kind = "run" if d["status"] == "succeeded" else "error"
            entries.append(TraceEntry(offset, kind, title + (f": {tail}" if tail else "")))
        elif event.type == "run_created":
            text = f"created by {d['requested_by']}: {d['request']}"
            entries.append(TraceEntry(offset, "run", text))
        elif event.type == "run_claimed":
            entries.append(TraceEntry(offset, "run", f"driven by {d['owner']}"))
        elif event.type == "audit":
            entries.append(TraceEntry(offset, "run", f"audit: {d['entry']}"))
        previous = event.ts
    return entries


def trace_of(tree: RunTree) -> list[RunTrace]:
    """Every run of the tree (read with its events), parents first, each with its timeline."""
    traces = []
    for run in tree.runs:
        events = tree.events_of(run.id)
        tokens = sum(
            e.data.get("prompt_tokens", 0) + e.data.get("completion_tokens", 0)
            for e in events
            if e.type == "policy_turn"
        )
        end = run.finished_at or (events[-1].ts if events else run.created_at)
        traces.append(
            RunTrace(
                run=run,
                started=_clock(run.created_at),
                duration=f"{end - run.created_at:.1f} s",
                tokens=tokens,
                entries=_entries(events),
                approvals=tree.approvals_of(run.id),
                steps=[line.strip() for line in step_lines(run, events)]
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
