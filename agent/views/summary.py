"""The audit summary of a run: outcome, duration, each step's result, each approval, errors,
and last its journal's head (published outside the store)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.chain import SHOWN_HEX, RunHead, tree_head
from agent.records import ApprovalRecord, RunRecord, RunTree, ToolCallRecord, record
from agent.run.outcomes import STEP_TOOLS, StepState, short_result, step_states
from agent.views.explain import executing_runs
from agent.views.jinja import HTML, TEXT
from agent.views.units import clock, duration, hms


@record
class StepResult:
    """The last word on one step of the runbook: what its attempts did, never a refusal of a
    repeat (those are counted apart)."""

    step_id: str
    title: str
    result: str  # ok, error, skipped, not run, rolled back
    detail: str
    attempts: int
    refusals: int = 0  # calls of the step the kernel refused (they never ran)


@dataclass
class RunSummary:
    """Everything the summary template shows."""

    run: RunRecord
    duration: str
    steps: list[StepResult] = field(default_factory=list)
    approvals: list[ApprovalRecord] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)  # identity -> how people know it
    timeline: list[str] = field(default_factory=list)  # start, each decision and its wait, end
    tree: tuple[RunRecord, ...] = ()  # the run and every run below it (the audit head's)

    @property
    def audit(self) -> str | None:
        """The head of the run's whole tree (every run's number, length and last link),
        published with the summary so a verifier outside the store can compare (`loom-ops
        audit verify RUN --head HEX`); None before its first event."""
        run, runs = self.run, self.tree or (self.run,)
        events = sum(r.event_count for r in runs)
        if not events:
            return None
        head = tree_head(RunHead.of(r) for r in runs)[:SHOWN_HEX]
        keys = sorted({r.key_id for r in runs if r.key_id})
        key = f"key{'s' if len(keys) > 1 else ''} {', '.join(keys)}" if keys else "unkeyed"
        if keys and any(r.key_id is None for r in runs):
            key += ", partly unkeyed"
        number = f"run #{run.run_no}, " if run.run_no is not None else ""
        size = f"tree of {len(runs)} run{'s' if len(runs) > 1 else ''}"
        return f"audit: {number}{size}, {events} events, head {head} ({key})"

    def who(self, identity: str) -> str:
        """An identity as people know it: `@alice (telegram:42)`, or the identity alone."""
        name = self.names.get(identity)
        return f"{name} ({identity})" if name else identity


def _detail(call: ToolCallRecord) -> str:
    outcome: dict[str, Any] = call.outcome or {}
    if call.status == "refused":
        return f"refused: {outcome.get('refused')}"
    if call.status == "skipped":
        return f"skipped by {outcome.get('decided_by')} (may have run)"
    if "denied" in outcome:
        return f"denied: {outcome['denied']}"
    if "mcp_tool" in outcome:
        return _mcp_detail(outcome)
    if outcome.get("dry_run"):
        if "argv" in outcome:
            return "dry-run: " + " ".join(outcome["argv"])
        return f"dry-run check {outcome.get('url')} (synthetic)"
    if "exit_code" in outcome:
        code = "timed out" if outcome.get("timed_out") else f"exit {outcome['exit_code']}"
        text = f"{code}: " + " ".join(outcome.get("argv", []))
        said = short_result(outcome).partition(": ")[2] if outcome.get("exit_code") else ""
        return f"{text} — {said}" if said else text
    if "status_code" in outcome:
        return f"HTTP {outcome['status_code']} in {outcome.get('latency_ms', 0):.0f} ms"
    if "note" in outcome:
        return f"note: {outcome['note']}"
    if "error" in outcome:
        return str(outcome["error"])
    return ""


def _mcp_detail(outcome: dict[str, Any]) -> str:
    """An MCP call as a person reads it: which server and tool, with what arguments, and (live)
    what it answered."""
    name, server, tool = outcome["mcp_tool"], outcome.get("server"), outcome.get("server_tool")
    if server is not None:
        target = f"server {server}, tool {tool}"
        target = target if name == f"{server}.{tool}" else f"{name} (server {server}, tool {tool})"
    elif outcome.get("config_error"):  # looked up in a config that cannot be read
        problem = str(outcome["config_error"])
        if len(problem) > _ARGUMENTS_SHOWN:
            problem = problem[: _ARGUMENTS_SHOWN - 1] + "…"
        target = f"{name} (MCP config unusable: {problem})"
    elif "server" in outcome:  # looked up, and the MCP config has no server for it
        target = f"{name} (no server in the MCP config)"
    else:
        target = name
    arguments = json.dumps(outcome.get("arguments") or {}, sort_keys=True, ensure_ascii=False)
    if len(arguments) > _ARGUMENTS_SHOWN:
        arguments = arguments[: _ARGUMENTS_SHOWN - 1] + "…"
    if outcome.get("dry_run"):
        return f"dry-run MCP {target}, arguments {arguments}"
    if outcome.get("error"):
        return f"MCP {target}: {str(outcome['error'])[:_ARGUMENTS_SHOWN]}"
    said = " ".join(str(outcome.get("text", ""))[: _ARGUMENTS_SHOWN * 2].split())  # JSON too
    if len(said) > _ARGUMENTS_SHOWN:
        said = said[: _ARGUMENTS_SHOWN - 1] + "…"
    return f"MCP {target}: {said}" if said else f"MCP {target}"


_ARGUMENTS_SHOWN = 200  # characters of an MCP call's arguments or answer in one summary line


# A run's error that ends with a tool's own words ("step ask failed (Error executing tool
# refuse)") is that error said again only when the words are long enough to be that tool's
# (not "failed") and what leads up to them is a short lead-in (the runbook's title and the
# step), so the summary never hides anything else the run said.
_QUOTED_MIN, _LEAD_IN_MAX = 16, 120


def _quotes(error: str, said: str) -> bool:
    """Whether a run's `error` only repeats a tool's error `said` after a short lead-in."""
    ending, words = error.rstrip(" .)"), said.rstrip(" .)")
    return (
        len(words) >= _QUOTED_MIN
        and ending.endswith(words)
        and len(ending) - len(words) <= _LEAD_IN_MAX
    )


def summary_of(tree: RunTree) -> RunSummary:
    """A run's summary from one snapshot of its tree (read with its tool calls): a supervised
    run's steps, approvals and errors come from the whole tree below it."""
    run = tree.root
    end = run.finished_at or time.time()
    summary = RunSummary(run=run, duration=duration(end - run.created_at), tree=tree.runs)
    errors: list[str] = []
    for member in tree.runs:
        # A tool's own words (an MCP error) that the run's error quotes again: said once.
        quoted: list[str] = []
        for call in tree.calls_of(member.id):
            if call.status in ("error", "refused"):
                where = f" ({member.role})" if member is not run else ""
                line = f"{call.tool} {call.step_id or ''}: {_detail(call)}".strip() + where
                errors.append(line)
                said = (call.outcome or {}).get("error")
                if said:
                    quoted.append(str(said))
        if member.error and not any(_quotes(member.error, said) for said in quoted):
            errors.append(member.error)
    executing = executing_runs(tree)
    if executing:
        executed = [call for member in executing for call in tree.calls_of(member.id)]
        summary.steps = _step_results(executing[0], executed)
    summary.errors = _counted(errors)
    summary.approvals = list(tree.approvals)
    names = {run.requested_by, *(a.decided_by for a in summary.approvals if a.decided_by)}
    summary.names = {i: tree.names[i] for i in names if i in tree.names}
    summary.timeline = _timeline(run, summary.approvals, tree.name)
    return summary


def _timeline(
    run: RunRecord, approvals: Sequence[ApprovalRecord], name: Callable[[str], str]
) -> list[str]:
    """The run's shape in a few lines: its start, each request with who decided it and the
    wait it caused, and its end with how much of the time was spent waiting for people."""
    lines = [f"{hms(run.created_at)}  started by {name(run.requested_by)}"]
    waited = 0.0
    for a in sorted(approvals, key=lambda a: a.created_at):
        what = f"#{a.number or a.id} {a.step_id or a.kind}"
        if a.decided_at is None:
            lines.append(f"{hms(a.created_at)}  {what}: waiting for a decision since then")
            continue
        wait = a.decided_at - a.created_at
        waited += wait
        if a.decided_by:
            said = f"{a.status} by {name(a.decided_by)} after {duration(wait)}"
        else:
            said = f"{a.status} after {duration(wait)}: nobody decided"
            if a.status == "expired":  # never consent: say what the runbook made of it
                rolled = a.on_expiry == "rollback" and a.kind == "gate"
                said += "; completed steps rolled back" if rolled else "; the run stopped"
        lines.append(f"{hms(a.decided_at)}  {what}: {said}")
    if run.finished_at is not None:
        total = run.finished_at - run.created_at
        spent = f"{duration(total)} in all"
        if waited >= 0.5:  # less is a script's or a test's decision, not a person's wait
            spent += f", {duration(waited)} of it waiting for people"
        lines.append(f"{hms(run.finished_at)}  {run.status} ({spent})")
    return lines


def _step_results(run: RunRecord, calls: list[ToolCallRecord]) -> list[StepResult]:
    """Each step's true state: its last attempt's result and how many attempts it took; a
    refused repeat never hides that the step ran."""
    states = step_states(
        (c.tool, c.step_id, c.status, c.attempt, c.outcome) for c in calls if c.status != "intent"
    )
    last_attempt: dict[str, ToolCallRecord] = {}
    for call in calls:
        attempted = call.tool in STEP_TOOLS or call.tool == "rollback_step"
        if attempted and call.step_id and call.status != "refused":
            last_attempt[call.step_id] = call
    results = []
    for step in (run.runbook or {}).get("steps", []):
        state = states.get(step["id"], StepState())
        last = last_attempt.get(step["id"])
        if last is None:
            detail = f"refused {_times(state.refusals)}" if state.refusals else ""
            results.append(StepResult(step["id"], step["title"], "not run", detail, 0))
            continue
        result = (
            "rolled back" if last.tool == "rollback_step" else _RESULT.get(last.status, last.status)
        )
        attempts = max(state.attempts, 1)
        results.append(
            StepResult(step["id"], step["title"], result, _detail(last), attempts, state.refusals)
        )
    return results


# Call states that are not a result, as a person should read them.
_RESULT = {
    "intent": "in flight (may have run)",
    "retry": "to be run again",
    "cancelled": "cancelled (may have run)",
}


def _counted(lines: list[str]) -> list[str]:
    """Lines in first-seen order, a repeated one once with its count ("... (33 times)")."""
    counts: dict[str, int] = {}
    for line in lines:
        counts[line] = counts.get(line, 0) + 1
    return [line if n == 1 else f"{line} ({n} times)" for line, n in counts.items()]


def _times(n: int) -> str:
    return "once" if n == 1 else f"{n} times"


def render_summary(summary: RunSummary, html: bool = False, hints: Sequence[str] = ()) -> str:
    """The audit summary: plain text, or Telegram HTML (only b and code tags; all else escaped).
    `hints` are closing lines on where to read more (commands are shown as code)."""
    env = HTML if html else TEXT
    return env.get_template("summary.j2").render(s=summary, clock=clock, hints=hints)
