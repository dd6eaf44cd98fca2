"""The offline trace: one self-contained HTML file explaining a run tree after the fact.

No external fetch of any kind: the CSS and the few lines of script are inline, and the page
reads fine with scripts off (sections fold with <details>, the waterfall's bars are links to
each attempt's details, and its tooltips are SVG <title>s: none needs a script). The picture's
geometry is agent.views.waterfall's; this module says what each part means in words.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
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
    UnknownEvent,
)
from agent.records import CHAT_IDENTITY, ApprovalRecord, RunRecord, RunTree, record
from agent.views.explain import EXECUTING_ROLES, executing_runs, step_lines
from agent.views.jinja import HTML
from agent.views.journal import JournalEntry, read_journal
from agent.views.units import clock, duration, hms
from agent.views.waterfall import (
    OUTCOMES,
    Bar,
    Lane,
    depths,
    lane_of,
    layout,
)

MAX_BLOCK_CHARS = 4000  # one argument or outcome block; the journal keeps the rest


@dataclass
class TraceEntry:
    """One line of a run's timeline, with an optional detail block."""

    offset: str
    kind: str  # llm | tool | approval | error | run
    title: str
    detail: str = ""
    status: str = ""


@record
class Attempt:
    """One attempt of a tool call as people read it: the command it ran, what that printed
    (stderr's tail first), and what a person decided about it; `anchor` is its id on the page,
    the target of its bar in the waterfall."""

    anchor: str
    label: str
    outcome: str
    heading: str  # `flaky · attempt 2 · ok · 59 ms · at +0.1 s`
    command: str
    result: str  # `exit 3`, `HTTP 200`, ...
    stderr: str
    stdout: str
    rest: str  # the rest of the outcome, as JSON
    decision: str


@dataclass
class RunTrace:
    """One run of the tree, its timeline, and its lane of the waterfall."""

    run: RunRecord
    started: str
    duration: str
    tokens: int
    entries: list[TraceEntry] = field(default_factory=list)
    approvals: list[ApprovalRecord] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)  # each step's true state (explain's lines)
    lane: Lane | None = None
    attempts: list[Attempt] = field(default_factory=list)
    runbook_id: str | None = None  # its runbook; the root's is the one its tree ran
    params: str = ""  # that runbook's parameters, `key=value …`
    requested_by: str = ""  # as people know them
    summary: str = ""  # people named as people know them
    error: str = ""
    names: Mapping[str, str] = field(default_factory=dict)  # identity -> `@alice`


def _block(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, indent=2, ensure_ascii=False)
    if len(text) > MAX_BLOCK_CHARS:
        text = text[:MAX_BLOCK_CHARS] + f"\n… ({len(text) - MAX_BLOCK_CHARS} more characters)"
    return text


def _tail(text: str) -> str:
    """The end of a command's output, where its errors are; the journal keeps the rest."""
    if len(text) > MAX_BLOCK_CHARS:
        text = f"… ({len(text) - MAX_BLOCK_CHARS} earlier characters)\n" + text[-MAX_BLOCK_CHARS:]
    return text


def _named(text: str, name: Callable[[str], str]) -> str:
    """Free text (an error, a summary) with each chat identity as people know it."""
    return CHAT_IDENTITY.sub(lambda found: name(found.group(0)), text)


def _outcome_block(args: dict[str, Any], outcome: dict[str, Any]) -> str:
    """A call's arguments and outcome as people read them: what a command printed as text
    (stderr first, where errors are), the rest as JSON."""
    streams = {name: outcome[name] for name in ("stderr", "stdout") if outcome.get(name)}
    rest = {k: v for k, v in outcome.items() if k not in streams}
    parts = [_block({"args": args, "outcome": rest})]
    parts += [f"--- {name} ---\n{_tail(str(text))}" for name, text in streams.items()]
    return "\n".join(parts)


def _entries(journal: list[JournalEntry], name: Callable[[str], str] = str) -> list[TraceEntry]:
    """Turn the journal into timeline entries: each outcome shows the call it answers, each
    person as people know them (`name`)."""
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
                title = f"approval #{number} {decided.decision} by {name(decided.decided_by)}"
                if decided.note:
                    title += f" — {decided.note}"
                entries.append(TraceEntry(offset, "approval", title, "", decided.decision))
            case ApprovalVoted() as voted:
                number = voted.number or voted.approval_id
                title = (
                    f"approval #{number} approved by {name(voted.decided_by)} "
                    f"({voted.approvals} of {voted.required})"
                )
                if voted.note:
                    title += f" — {voted.note}"
                entries.append(TraceEntry(offset, "approval", title, "", "pending"))
            case ApprovalExpired(approval_id=approval_id, on_expiry=on_expiry):
                title = f"approval #{approval_id} expired"
                if on_expiry == "rollback":
                    title += ": rolling the completed steps back"
                entries.append(TraceEntry(offset, "error", title, "", "expired"))
            case ApprovalReminded() as reminded:
                whom = ", ".join(name(who) for who in reminded.mentioned) or "nobody"
                title = f"approval #{reminded.number} reminded {whom}"
                entries.append(TraceEntry(offset, "approval", title, "", "pending"))
            case ApprovalEscalated() as escalated:
                title = f"approval #{escalated.number} escalated to " + ", ".join(
                    escalated.escalate_to
                )
                entries.append(TraceEntry(offset, "approval", title, "", "pending"))
            case RunInterrupted(error=error):
                entries.append(TraceEntry(offset, "error", f"interrupted: {error}"))
            case RunFinished() as finished:
                title = f"finished {finished.status}"
                tail = _named(finished.error or finished.summary or "", name)
                kind = "run" if finished.status == "succeeded" else "error"
                entries.append(TraceEntry(offset, kind, title + (f": {tail}" if tail else "")))
            case RunCreated(requested_by=who, request=asked):
                entries.append(TraceEntry(offset, "run", f"created by {name(who)}: {asked}"))
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
        title += f" · {duration(result.duration_ms / 1000)}"
    detail = _outcome_block(args, result.outcome or {})
    kind = "error" if result.status in ("error", "refused") else "tool"
    return TraceEntry(offset, kind, title, detail, result.status)


def _attempt(bar: Bar, origin: float) -> Attempt:
    """An attempt's details in words: the command as a person would type it, its output as
    text (stderr's tail first), the rest of its outcome, and any decision about it."""
    result: Mapping[str, Any] = bar.result or {}
    argv = result.get("argv")
    if isinstance(argv, list):
        command = shlex.join(str(arg) for arg in argv)
    else:
        command = f"{bar.tool} {json.dumps(dict(bar.args), ensure_ascii=False)}"
    if result.get("timed_out"):
        said = "timed out"
    elif "exit_code" in result:
        said = f"exit {result['exit_code']}"
    elif "status_code" in result:
        said = f"HTTP {result['status_code']}" + (" (dry run)" if result.get("dry_run") else "")
    else:
        said = ""
    shown = {"argv", "stderr", "stdout", "exit_code", "status_code", "timed_out"}
    rest = {k: v for k, v in result.items() if k not in shown}
    what = {"in_doubt": "in doubt", "running": "still running"}.get(bar.outcome, bar.outcome)
    again = f" · attempt {bar.attempt}" if bar.attempt > 1 else ""
    heading = (
        f"{bar.label}{again} · {what} · {duration(bar.seconds)} "
        f"· at +{duration(bar.start - origin)}"
    )
    if bar.outcome == "in_doubt" and not bar.result:
        said = "its driver was lost before it reported: it may or may not have run"
    return Attempt(
        anchor=bar.anchor,
        label=bar.label,
        outcome=bar.outcome,
        heading=heading,
        command=command,
        result=said,
        stderr=_tail(str(result.get("stderr") or "")),
        stdout=_tail(str(result.get("stdout") or "")),
        rest=_block(rest) if rest else "",
        decision=bar.decision,
    )


def _params(params: Mapping[str, Any]) -> str:
    return " ".join(f"{key}={value}" for key, value in sorted(params.items()))


def trace_of(tree: RunTree) -> list[RunTrace]:
    """Every run of the tree (read with its events), parents first, each with its timeline,
    its lane of the waterfall and its attempts' details."""
    now = time.time()
    depth = depths(tree.runs)
    executing = executing_runs(tree)
    plan = executing[0] if executing else None  # the runbook the tree ran, for its root
    origin = min((run.created_at for run in tree.runs), default=now)
    traces = []
    for index, run in enumerate(tree.runs, start=1):
        events = tree.events_of(run.id)
        journal = read_journal(events)
        tokens = sum(
            entry.event.prompt_tokens + entry.event.completion_tokens
            for entry in journal
            if isinstance(entry.event, PolicyTurn)
        )
        end = run.finished_at or (events[-1].ts if events else run.created_at)
        lane = lane_of(run, journal, index=index, depth=depth[run.id], now=now, name=tree.name)
        origin = min(origin, lane.start)
        pinned = plan if run is tree.root and not run.runbook_id else None
        traces.append(
            RunTrace(
                run=run,
                started=clock(run.created_at),
                duration=duration(end - run.created_at),
                tokens=tokens,
                entries=_entries(journal, tree.name),
                approvals=tree.approvals_of(run.id),
                steps=[line.strip() for line in step_lines(run, journal)]
                if run.role in EXECUTING_ROLES
                else [],
                lane=lane,
                runbook_id=pinned.runbook_id if pinned else run.runbook_id,
                params=_params(pinned.params if pinned else run.params),
                requested_by=tree.name(run.requested_by),
                summary=_named(run.summary or "", tree.name),
                error=_named(run.error or "", tree.name),
                names=tree.names,
            )
        )
    for trace in traces:
        if trace.lane is not None:
            trace.attempts = [_attempt(bar, origin) for bar in trace.lane.bars]
    return traces


def render_trace(traces: list[RunTrace]) -> str:
    """The self-contained HTML page: the waterfall of the whole tree, then each run."""
    lanes = [trace.lane for trace in traces if trace.lane is not None]
    return HTML.get_template("trace.html.j2").render(
        traces=traces,
        picture=layout(lanes),
        outcomes=OUTCOMES,
        generated=clock(time.time()),
        clock=clock,
        hour=hms,
        human=duration,
    )
