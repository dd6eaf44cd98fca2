"""`mitigation_of`: which step mitigated an incident, read from its run tree's journal. The
alert card and the post-mortem draft both ask this one function, so they never disagree.

Invariants:
- a mitigation is a step's own execution (`execute_step`, status ok) of a step a person
  approved before it ran; an approval's result, a rollback or a skip never counts;
- the last such execution (before the resolve, when one is given) is the one that counts.
"""

from __future__ import annotations

from agent.events import ApprovalDecided, ApprovalRequested, ToolOutcome
from agent.records import RunTree, record
from agent.views.journal import JournalEntry, read_journal

STEP_EXECUTION = "execute_step"  # the tool that runs a step itself (not its approval)


@record
class Mitigation:
    """The last approved step that succeeded: when, which (id and title), and whether it
    only pretended (a dry run)."""

    ts: float
    step_id: str
    title: str
    dry_run: bool


def mitigation_of(
    tree: RunTree, journal: list[JournalEntry] | None = None, before: float | None = None
) -> Mitigation | None:
    """The last step a person approved whose own execution succeeded (at or before `before`,
    when given), in `tree` (its events read, or already read as `journal`)."""
    entries = journal if journal is not None else read_journal(tree.events)
    titles = {
        (run.id, str(step.get("id"))): str(step.get("title") or "")
        for run in tree.runs
        for step in (run.runbook or {}).get("steps") or []
    }
    steps_of: dict[int, tuple[str, str]] = {}
    approved: set[tuple[str, str]] = set()
    found: Mitigation | None = None
    for entry in entries:
        ts, run_id = entry.record.ts, entry.record.run_id
        if before is not None and ts > before:
            break
        match entry.event:
            case ApprovalRequested(approval_id=approval_id, step_id=step_id) if step_id:
                steps_of[approval_id] = (run_id, step_id)
            case ApprovalDecided(approval_id=approval_id, decision="approved"):
                if approval_id in steps_of:
                    approved.add(steps_of[approval_id])
            case ToolOutcome(status="ok", outcome=outcome) if (
                entry.intent is not None
                and entry.intent.tool == STEP_EXECUTION
                and (run_id, entry.intent.step_id or "") in approved
            ):
                step_id = entry.intent.step_id or ""
                dry_run = isinstance(outcome, dict) and bool(outcome.get("dry_run"))
                found = Mitigation(ts, step_id, titles.get((run_id, step_id), ""), dry_run)
    return found
