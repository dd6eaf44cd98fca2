"""What the chat says about a run tree, in a person's terms: the status people read, the steps
done and the last one's result, what it waits for, the short step list of `/explain`, and who
is who (`@name`, not `telegram:<id>`). Pure functions over one snapshot of the tree
(`RunTree`, read by the service), so a message shows one moment.

A chat shows the root run only: the planner, executor and verifier children stand behind it.
"""

from __future__ import annotations

import time

from markupsafe import Markup

from agent.records import ApprovalRecord, ApprovalStatus, RunRecord, RunStatus, RunTree
from agent.views.explain import step_progress, step_text, tree_steps
from bot.messages import (
    STATUS_ICONS,
    STATUS_WORDS,
    STEP_ICONS,
    LastStep,
    Progress,
    Who,
    clip,
    clock,
    hhmm,
    in_words,
    shown_status,
    until,
)

# A team in the order it works: plan, execute, verify.
ROLE_ORDER = {"planner": 0, "executor": 1, "verifier": 2}


def tree_status(tree: RunTree) -> RunStatus:
    """The status a person reads for the whole tree."""
    return shown_status(tree.root.status, [m.status for m in tree.children], bool(tree.pending))


def runbook_of(tree: RunTree) -> str | None:
    """The runbook the tree runs, once one is chosen."""
    return tree.root.runbook_id or next((m.runbook_id for m in tree.runs if m.runbook_id), None)


def team(tree: RunTree) -> list[RunRecord]:
    """The runs below the root in the order the team works (plan, execute, verify)."""
    return sorted(tree.children, key=lambda m: (m.created_at, ROLE_ORDER.get(m.role, 9)))


def progress_of(tree: RunTree, now: float | None = None) -> Progress:
    """Where the tree (read with its tool calls) stands: its status, steps done of all, the
    last step's result (with what a failure said), and what it waits for."""
    now = time.time() if now is None else now
    steps = step_progress(tree)
    last = None
    if steps.last_step is not None:
        last = LastStep(steps.last_step, steps.last_status, steps.last_detail)
    waiting = None
    if tree.pending and not tree.root.status.is_terminal:
        waiting = waiting_words(tree.pending[0], now)
    return Progress(tree_status(tree), runbook_of(tree), steps.done, steps.total, last, waiting)


def waiting_words(approval: ApprovalRecord, now: float) -> str:
    """What a run waits for, in words: `approval #1 of step scale-out (in 9 min (05:14 UTC))`."""
    number = approval.number or approval.id
    what = "a decision" if approval.kind == "in_doubt" else "approval"
    step = f" of step {approval.step_id}" if approval.step_id else ""
    return f"{what} #{number}{step}, deadline {until(approval.deadline_at, now)}"


def explain_lines(tree: RunTree, now: float | None = None) -> list[str]:
    """`/explain` in a person's terms, as HTML lines (no tag spans two lines): the run, who
    asked, each step's state, each approval request, and how it ended. The tree is read with
    its events."""
    now = time.time() if now is None else now
    root = tree.root
    who = tree.name
    status = tree_status(tree)
    head = Markup("{} <b>Run <code>{}</code></b> · {}").format(
        STATUS_ICONS[status], root.id, STATUS_WORDS[status]
    )
    runbook = runbook_of(tree)
    if runbook:
        head += Markup(" · <code>{}</code>").format(runbook)
    lines = [
        str(head),
        str(
            Markup("Asked by {} at {}: <i>{}</i>").format(
                who(root.requested_by), clock(root.created_at), clip(root.request, 300)
            )
        ),
    ]
    steps = _step_list(tree, who)
    if steps:
        lines += ["", "<b>Steps</b>", *steps]
    if tree.approvals:
        lines += ["", "<b>Approvals</b>", *(_approval_line(a, who, now) for a in tree.approvals)]
    ending = _ending(tree)
    if ending:
        lines += ["", str(Markup("<b>Outcome:</b> {}").format(ending))]
    lines += [
        "",
        str(Markup("Every call and answer, in order: <code>/trace {}</code>").format(root.id)),
    ]
    return lines


def outcome_line(tree: RunTree) -> str:
    """How a finished tree ended, as an HTML line; empty while it runs."""
    ending = _ending(tree)
    return str(Markup("<b>Outcome:</b> {}").format(ending)) if ending else ""


def _step_list(tree: RunTree, who: Who) -> list[str]:
    """One line per runbook step, from the journal of the runs that executed them."""
    lines = []
    for number, (step_id, step) in enumerate(tree_steps(tree), start=1):
        word = step.last or "not run"
        state = step_text(step)
        state = ("failed" + state[len("error") :]) if word == "error" else state
        state = in_words(state, who)  # "skipped by telegram:42" -> "skipped by @sam"
        icon = STEP_ICONS.get(word, "•")
        lines.append(
            str(
                Markup("{} {}. <code>{}</code>: {}").format(icon, number, step_id, clip(state, 300))
            )
        )
    return lines


def _approval_line(approval: ApprovalRecord, who: Who, now: float) -> str:
    number = approval.number or approval.id
    step = approval.step_id or "-"
    if approval.status == ApprovalStatus.PENDING:
        return str(
            Markup("#{} <code>{}</code>: waiting, deadline {}").format(
                number, step, until(approval.deadline_at, now)
            )
        )
    by = f" by {who(approval.decided_by)}" if approval.decided_by else ""
    at = f" at {hhmm(approval.decided_at)}" if approval.decided_at else ""
    note = Markup(" — “{}”").format(approval.note) if approval.note else ""
    return str(
        Markup("#{} <code>{}</code>: {}{}{}{}").format(number, step, approval.status, by, at, note)
    )


def _ending(tree: RunTree) -> str:
    """How a finished tree ended, in one line (a rejection by whom and why, not the kernel's
    composed error); empty while it runs."""
    root = tree.root
    if not root.status.is_terminal:
        return ""
    status = tree_status(tree)
    who = tree.name
    decided = [a for a in tree.approvals if a.status == status]
    if status in (RunStatus.REJECTED, RunStatus.EXPIRED) and decided:
        last = decided[-1]
        if status == RunStatus.EXPIRED:
            return f"no decision on request #{last.number or last.id} before its deadline"
        reason = f": {last.note}" if last.note else ""
        return f"rejected by {who(last.decided_by or '')}{reason}"
    text = root.error or root.summary or ""
    return clip(in_words(text, who), 600)
