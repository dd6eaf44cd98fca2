"""What the chat says about a run tree, gathered from the store in a person's terms: the
status people read, the steps done and the last one's result, what it waits for, the short
step list of `/explain`, and who is who (`@name`, not `telegram:<id>`).

A chat shows the root run only: the planner, executor and verifier children stand behind it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from markupsafe import Markup

from agent.records import ApprovalRecord, ApprovalStatus, RunRecord, RunStatus, ToolCallRecord
from agent.run.outcomes import DONE, STEP_TOOLS, short_result, step_states
from agent.store import RunStore
from agent.views.explain import step_lines
from bot.messages import (
    CHAT_IDENTITY,
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

# Roles that execute a runbook's steps (a supervisor's executor children, or a runbook run).
EXECUTING_ROLES = ("runbook", "executor")
# A team in the order it works: plan, execute, verify.
ROLE_ORDER = {"planner": 0, "executor": 1, "verifier": 2}


@dataclass(frozen=True)
class Tree:
    """A run tree as stored now: the root first, then every run below it."""

    root: RunRecord
    members: list[RunRecord]
    pending: list[ApprovalRecord]

    @property
    def children(self) -> list[RunRecord]:
        """The runs below the root."""
        return self.members[1:]

    @property
    def status(self) -> RunStatus:
        """The status a person reads for the whole tree."""
        return shown_status(self.root.status, [m.status for m in self.children], bool(self.pending))

    @property
    def runbook_id(self) -> str | None:
        """The runbook the tree runs, once one is chosen."""
        return self.root.runbook_id or next(
            (m.runbook_id for m in self.members if m.runbook_id), None
        )

    @property
    def executing(self) -> list[RunRecord]:
        """The runs that executed the runbook's steps (the first one's runbook)."""
        runs = [m for m in self.members if m.runbook and m.role in EXECUTING_ROLES]
        return [m for m in runs if m.runbook_id == runs[0].runbook_id] if runs else []


async def load_tree(store: RunStore, root_id: str) -> Tree:
    """The tree below `root_id` and its open approval requests."""
    ids = await store.subtree_ids(root_id)
    members = [await store.get_run(run_id) for run_id in ids]
    pending: list[ApprovalRecord] = []
    for member in members:
        pending += await store.list_approvals(member.id, ApprovalStatus.PENDING)
    children = sorted(members[1:], key=lambda m: (m.created_at, ROLE_ORDER.get(m.role, 9)))
    return Tree(members[0], [members[0], *children], sorted(pending, key=lambda a: a.id))


async def progress_of(store: RunStore, tree: Tree, now: float | None = None) -> Progress:
    """Where the tree stands: its status, steps done of all, the last step's result (with
    what a failure said), and what it waits for."""
    now = time.time() if now is None else now
    calls: list[ToolCallRecord] = []
    for run in tree.executing:
        calls += await store.list_tool_calls(run.id)
    steps = (tree.executing[0].runbook or {}).get("steps", []) if tree.executing else []
    states = step_states(
        (c.tool, c.step_id, c.status, c.attempt, c.outcome) for c in calls if c.status != "intent"
    )
    done = sum(1 for step in steps if states.get(step["id"]) and states[step["id"]].last in DONE)
    ran = [
        c
        for c in calls
        if c.tool in STEP_TOOLS and c.step_id and c.status not in ("intent", "refused")
    ]
    last = None
    if ran:
        call = max(ran, key=lambda c: (c.outcome_at or 0.0, c.intent_at))
        detail = short_result(call.outcome or {}) if call.status == "error" else ""
        # short_result starts with the exit code; the words say "failed" already.
        last = LastStep(call.step_id or "-", call.status, detail)
    waiting = None
    if tree.pending and not tree.root.status.is_terminal:
        waiting = waiting_words(tree.pending[0], now)
    return Progress(tree.status, tree.runbook_id, done, len(steps), last, waiting)


def waiting_words(approval: ApprovalRecord, now: float) -> str:
    """What a run waits for, in words: `approval #1 of step scale-out (in 9 min (05:14 UTC))`."""
    number = approval.number or approval.id
    what = "a decision" if approval.kind == "in_doubt" else "approval"
    step = f" of step {approval.step_id}" if approval.step_id else ""
    return f"{what} #{number}{step}, deadline {until(approval.deadline_at, now)}"


async def names_for(store: RunStore, identities: Iterable[str], texts: Iterable[str] = ()) -> Who:
    """How people know each identity (and each one named inside `texts`): `@alice`; an
    unknown one as it is."""
    wanted = {i for i in identities if i}
    for text in texts:
        wanted |= set(CHAT_IDENTITY.findall(text or ""))
    names = await store.chat_user_names(wanted)
    return lambda identity: names.get(identity, identity)


async def explain_lines(store: RunStore, tree: Tree, now: float | None = None) -> list[str]:
    """`/explain` in a person's terms, as HTML lines (no tag spans two lines): the run, who
    asked, each step's state, each approval request, and how it ended."""
    now = time.time() if now is None else now
    root = tree.root
    approvals = await _approvals(store, tree)
    who = await _names_of(store, tree, approvals)
    status = tree.status
    head = Markup("{} <b>Run <code>{}</code></b> · {}").format(
        STATUS_ICONS[status], root.id, STATUS_WORDS[status]
    )
    if tree.runbook_id:
        head += Markup(" · <code>{}</code>").format(tree.runbook_id)
    lines = [
        str(head),
        str(
            Markup("Asked by {} at {}: <i>{}</i>").format(
                who(root.requested_by), clock(root.created_at), clip(root.request, 300)
            )
        ),
    ]
    steps = await _step_list(store, tree, who)
    if steps:
        lines += ["", "<b>Steps</b>", *steps]
    if approvals:
        lines += ["", "<b>Approvals</b>", *(_approval_line(a, who, now) for a in approvals)]
    ending = _ending(tree, approvals, who)
    if ending:
        lines += ["", str(Markup("<b>Outcome:</b> {}").format(ending))]
    lines += [
        "",
        str(Markup("Every call and answer, in order: <code>/trace {}</code>").format(root.id)),
    ]
    return lines


async def outcome_line(store: RunStore, tree: Tree) -> str:
    """How a finished tree ended, as an HTML line; empty while it runs."""
    approvals = await _approvals(store, tree)
    ending = _ending(tree, approvals, await _names_of(store, tree, approvals))
    return str(Markup("<b>Outcome:</b> {}").format(ending)) if ending else ""


async def _approvals(store: RunStore, tree: Tree) -> list[ApprovalRecord]:
    approvals: list[ApprovalRecord] = []
    for member in tree.members:
        approvals += await store.list_approvals(member.id)
    return sorted(approvals, key=lambda a: a.id)


async def _names_of(store: RunStore, tree: Tree, approvals: list[ApprovalRecord]) -> Who:
    root = tree.root
    identities = [root.requested_by, *(a.decided_by or "" for a in approvals)]
    return await names_for(store, identities, [root.error or "", root.summary or ""])


async def _step_list(store: RunStore, tree: Tree, who: Who) -> list[str]:
    """One line per runbook step, from the journal of the runs that executed them."""
    if not tree.executing:
        return []
    events = []
    for run in tree.executing:
        events += await store.list_events(run.id)
    events.sort(key=lambda event: event.seq)
    lines = []
    for number, line in enumerate(step_lines(tree.executing[0], events), start=1):
        step_id, _, state = line.strip().partition(": ")
        word = "not run" if state.startswith("not run") else state.split(" ", 1)[0]
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


def _ending(tree: Tree, approvals: list[ApprovalRecord], who: Who) -> str:
    """How a finished tree ended, in one line (a rejection by whom and why, not the kernel's
    composed error); empty while it runs."""
    root = tree.root
    if not root.status.is_terminal:
        return ""
    status = tree.status
    decided = [a for a in approvals if a.status == status]
    if status in (RunStatus.REJECTED, RunStatus.EXPIRED) and decided:
        last = decided[-1]
        if status == RunStatus.EXPIRED:
            return f"no decision on request #{last.number or last.id} before its deadline"
        reason = f": {last.note}" if last.note else ""
        return f"rejected by {who(last.decided_by or '')}{reason}"
    text = root.error or root.summary or ""
    return clip(in_words(text, who), 600)
