"""`postmortem`: a Markdown post-mortem draft of an incident, written from its run tree's
journal. Pure functions over one snapshot of the tree (`RunTree`).

Invariants:
- every fact in the draft comes from the journal (times, people, decisions, outcomes); what
  only people know (the cause, the follow-ups) is left as empty sections to fill in;
- times are UTC; people appear as the chat knows them (`@bob`), else by identity;
- time to mitigate ends when the last step a person approved succeeded; time to resolve ends
  at the alert's resolve, else at a successful run's end.
"""

from __future__ import annotations

import time

from agent.events import (
    AlertReceived,
    AlertResolved,
    AlertSilenced,
    AlertUpdated,
    ApprovalDecided,
    ApprovalEscalated,
    ApprovalExpired,
    ApprovalReminded,
    ApprovalRequested,
    ApprovalVoted,
    RunClaimed,
    RunCreated,
    RunFinished,
    RunInterrupted,
    ToolOutcome,
)
from agent.records import AlertIncident, RunRecord, RunStatus, RunTree, record
from agent.run.outcomes import STEP_TOOLS, short_result
from agent.views.journal import JournalEntry, journal_steps, read_journal
from agent.views.mitigation import Mitigation, mitigation_of
from agent.views.units import clock, duration, hms

KEY_LINES = 5  # output lines of a step the draft quotes
MAX_LINE_CHARS = 200
EXECUTING_ROLES = ("runbook", "executor")
NOT_MITIGATED = "no step a person approved succeeded"


@record
class Moment:
    """One line of the timeline: when, who, what."""

    ts: float
    who: str
    what: str


def postmortem_of(
    tree: RunTree, incident: AlertIncident | None = None, now: float | None = None
) -> str:
    """The Markdown draft of the incident `tree` (read with its events); `incident` is the
    alert incident its root answers, if any (a resolve after the run ended is kept there)."""
    root = tree.root
    journal = read_journal(tree.events)
    roles = {run.id: run.role for run in tree.runs}
    moments = _timeline(tree, journal, roles, incident)
    fired = [m for m in moments if m.who == "alert"]
    first_alert = incident.first_at if incident is not None else None
    started = min(
        [root.created_at, *([first_alert] if first_alert else []), *(m.ts for m in fired)]
    )
    mitigation = mitigation_of(tree, journal)
    resolved = _resolved_at(root, journal, incident)
    # A supervised incident's runbook is its executor's.
    executing = next((run for run in tree.runs if run.runbook_id), None)
    title = ((executing.runbook or {}).get("title") if executing else None) or root.request
    lines = [
        f"# Post-mortem draft: {_inline(title)}",
        "",
        f"_Written by loom-ops from the journal of run `{root.id}` at "
        f"{clock(now if now is not None else time.time())}. The facts below come from the "
        "journal; the cause and the follow-ups are yours to write._",
        "",
        "## Summary",
        "",
        f"- **Incident:** {_inline(root.request)}",
    ]
    if executing is not None:
        lines.append(f"- **Runbook:** `{executing.runbook_id}`{_params(executing)}")
    lines += [
        f"- **Started:** {clock(started)} by {tree.name(root.requested_by)} ({root.origin.kind})",
        f"- **Outcome:** {_outcome(root, tree)}",
        f"- **Time to mitigate:** {_mitigated(started, mitigation)}",
        f"- **Time to resolve:** {_span(started, resolved, 'not resolved yet')}",
        "",
        "## What fired",
        "",
    ]
    if fired:
        lines += [f"- {clock(m.ts)}: {m.what}" for m in fired]
    else:
        lines.append(f"No alert: the run was started by a request ({root.origin.kind}).")
    lines += ["", "## Timeline", "", "| Time (UTC) | Who | What |", "|---|---|---|"]
    lines += [f"| {hms(m.ts)} | {_cell(m.who)} | {_cell(m.what)} |" for m in moments]
    lines += ["", "## Steps", ""]
    lines += _steps(tree, journal) or ["No runbook step ran."]
    lines += [
        "",
        "## Cause",
        "",
        "_What made this happen? (to be written)_",
        "",
        "## Follow-ups",
        "",
        "- [ ] _(to be written)_",
        "",
    ]
    return "\n".join(lines)


def _timeline(
    tree: RunTree,
    journal: list[JournalEntry],
    roles: dict[str, str],
    incident: AlertIncident | None,
) -> list[Moment]:
    """What people, the runs and the alerts did, in time order."""
    root = tree.root
    numbers: dict[int, int] = {}
    asked_at: dict[int, float] = {}
    moments = []
    for entry in journal:
        ts, run_id = entry.record.ts, entry.record.run_id
        role = roles.get(run_id, "run")
        match entry.event:
            case RunCreated() as created if run_id == root.id:
                moments.append(
                    Moment(ts, tree.name(created.requested_by), f"started the run ({root.id})")
                )
            case RunClaimed(taken_over_from=taken) if taken:
                moments.append(Moment(ts, "loom-ops", f"{role} taken over from {taken}"))
            case RunInterrupted(error=error):
                moments.append(Moment(ts, "loom-ops", f"{role} interrupted: {error}"))
            case ApprovalRequested() as request:
                number = request.number or request.approval_id
                numbers[request.approval_id] = number
                asked_at[request.approval_id] = ts
                whom = ", ".join(tree.name(d) for d in request.deciders) or "an approver"
                step = f" step {request.step_id}:" if request.step_id else ""
                needs = f" ({request.required} people)" if request.required > 1 else ""
                moments.append(
                    Moment(
                        ts,
                        "loom-ops",
                        f"asked {whom}{needs} to decide #{number}:{step} {request.action}",
                    )
                )
            case ApprovalVoted() as vote:
                number = numbers.get(vote.approval_id, vote.approval_id)
                moments.append(
                    Moment(
                        ts,
                        tree.name(vote.decided_by),
                        f"approved #{number} ({vote.approvals} of {vote.required})",
                    )
                )
            case ApprovalDecided() as decided:
                number = numbers.get(decided.approval_id, decided.approval_id)
                waited = ts - asked_at.get(decided.approval_id, ts)
                note = f": {decided.note}" if decided.note else ""
                moments.append(
                    Moment(
                        ts,
                        tree.name(decided.decided_by),
                        f"{decided.decision} #{number} after {duration(waited)}{note}",
                    )
                )
            case ApprovalExpired(approval_id=approval_id, on_expiry=on_expiry):
                number = numbers.get(approval_id, approval_id)
                then = "; rolling back" if on_expiry == "rollback" else ""
                moments.append(Moment(ts, "loom-ops", f"#{number} expired: nobody decided{then}"))
            case ApprovalReminded() as reminded:
                whom = ", ".join(tree.name(who) for who in reminded.mentioned) or "nobody"
                moments.append(Moment(ts, "loom-ops", f"reminded {whom} of #{reminded.number}"))
            case ApprovalEscalated() as escalated:
                added = ", ".join(escalated.escalate_to)
                moments.append(Moment(ts, "loom-ops", f"escalated #{escalated.number} to {added}"))
            case ToolOutcome() as result if (
                entry.intent is not None and entry.intent.tool in STEP_TOOLS
            ):
                step = entry.intent.step_id or entry.intent.tool
                said = (
                    short_result(result.outcome or {}) if isinstance(result.outcome, dict) else ""
                )
                moments.append(
                    Moment(
                        ts, role, f"step {step}: {result.status}" + (f" ({said})" if said else "")
                    )
                )
            case RunFinished() as finished if run_id == root.id:
                by = f" by {tree.name(finished.by)}" if finished.by else ""
                error = f": {finished.error}" if finished.error else ""
                moments.append(Moment(ts, "loom-ops", f"run {finished.status}{by}{error}"))
            case AlertReceived() as alert:
                labels = ", ".join(f"{k}={v}" for k, v in sorted(alert.labels.items()))
                moments.append(
                    Moment(
                        alert.first_at,
                        "alert",
                        f"{alert.alertname} {alert.status} ({alert.firing} firing; {labels}), "
                        f"from {alert.source}",
                    )
                )
                if alert.start == "auto":
                    moments.append(Moment(ts, "loom-ops", "started the run on its own (auto)"))
            case AlertUpdated() as update:
                moments.append(
                    Moment(update.received_at, "alert", f"fired again ({update.firing} firing)")
                )
            case AlertResolved(resolved_at=resolved_at):
                moments.append(Moment(resolved_at, "alert", "resolved"))
            case AlertSilenced() as silence:
                moments.append(
                    Moment(
                        ts,
                        tree.name(silence.by),
                        f"silenced it in Alertmanager until {hms(silence.until)} UTC",
                    )
                )
    journaled = any(isinstance(entry.event, AlertResolved) for entry in journal)
    if incident is not None and incident.resolved_at is not None and not journaled:
        moments.append(Moment(incident.resolved_at, "alert", "resolved after the run ended"))
    return sorted(moments, key=lambda m: m.ts)  # an alert's own times precede its journaling


def _resolved_at(
    root: RunRecord, journal: list[JournalEntry], incident: AlertIncident | None
) -> float | None:
    """When the incident was resolved: the alert's resolve (journaled while the run was
    open, else kept on the incident), else a successful run's end."""
    for entry in reversed(journal):
        if isinstance(entry.event, AlertResolved):
            return entry.event.resolved_at
    if incident is not None:
        return incident.resolved_at
    return root.finished_at if root.status == RunStatus.SUCCEEDED else None


def _steps(tree: RunTree, journal: list[JournalEntry]) -> list[str]:
    """Each executing run's runbook steps: outcome, attempts and the key output lines."""
    lines: list[str] = []
    for run in tree.runs:
        if run.role not in EXECUTING_ROLES:
            continue
        own = [entry for entry in journal if entry.record.run_id == run.id]
        for n, (step_id, state) in enumerate(journal_steps(run, own), start=1):
            attempts = f"{state.attempts} attempt{'s' if state.attempts != 1 else ''}"
            lines.append(f"### {n}. `{step_id}`: {state.last or 'not run'} ({attempts})")
            if state.skipped_by:
                lines.append(f"Treated as done by {tree.name(state.skipped_by)}.")
            said = short_result(state.outcome)
            if said:
                lines.append(f"Result: {_inline(said)}")
            output = _key_lines(state.outcome)
            if output:
                lines += ["", "```", *output, "```"]
            lines.append("")
    return lines


def _key_lines(outcome: dict[str, object]) -> list[str]:
    """The last lines of a step's output: stderr first when it failed, else stdout."""
    failed = outcome.get("exit_code") not in (None, 0)
    streams = ("stderr", "stdout") if failed else ("stdout", "stderr")
    for stream in streams:
        text = outcome.get(stream)
        if isinstance(text, str) and text.strip():
            tail = [line.rstrip() for line in text.strip().splitlines()][-KEY_LINES:]
            # A fence inside the block would end it early.
            return [line[:MAX_LINE_CHARS].replace("```", "'''") for line in tail]
    return []


def _outcome(root: RunRecord, tree: RunTree) -> str:
    said = str(root.status)
    if root.error:
        said += f": {_inline(root.error)}"
    if root.finished_at:
        said += f" at {clock(root.finished_at)}"
    return said


def _mitigated(start: float, mitigation: Mitigation | None) -> str:
    if mitigation is None:
        return NOT_MITIGATED
    said = f"{_span(start, mitigation.ts, '')}, when step `{mitigation.step_id}` succeeded"
    return said + (" (a dry run: nothing was changed)" if mitigation.dry_run else "")


def _span(start: float, end: float | None, otherwise: str) -> str:
    if end is None:
        return otherwise
    return f"{duration(end - start)} ({hms(start)} to {hms(end)} UTC)"


def _params(run: RunRecord) -> str:
    if not run.params:
        return ""
    shown = ", ".join(f"{k}={v}" for k, v in sorted(run.params.items()))
    return f" ({_inline(shown)})"


def _inline(text: str) -> str:
    """Text on one line, as Markdown shows it literally enough."""
    return " ".join(str(text).split())


def _cell(text: str) -> str:
    """Text for a Markdown table cell: one line, no column breaks."""
    return _inline(text).replace("|", "\\|")
