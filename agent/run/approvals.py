"""Who may decide an approval request, and what each decision does to the run."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Collection, Iterable, Sequence

from agent.errors import DecisionRefused, ErrorKind
from agent.people import APPROVERS_GROUP, GROUP_PREFIX, People
from agent.records import (
    ApprovalKind,
    ApprovalRecord,
    ApprovalStatus,
    ApprovalVote,
    Decision,
    RunRecord,
    RunStatus,
    VoteOutcome,
)
from agent.store import DecisionEffect


def check_decider(
    approval: ApprovalRecord, decider: str, people: People, global_approvers: Sequence[str]
) -> None:
    """Raise DecisionRefused unless the person behind `decider` may decide `approval`.

    Every list that is set must name that person, by an identity or a group: the global
    `LOOM_OPS_APPROVERS` and the runbook's `approvers` (which can only narrow it), joined by
    its `escalate_to` once the request escalated (a request open to anyone stays open). Four
    eyes bars the person who requested the run, from whichever front end they decide.
    """
    who = people.describe(decider)
    if global_approvers and not people.admits(decider, global_approvers):
        raise DecisionRefused(f"{who} is not an approver (LOOM_OPS_APPROVERS)")
    deciders = approval.all_deciders
    if deciders and not people.admits(decider, deciders):
        # Only a request with deciders of its own refuses anyone, so this list is never empty.
        named = f"runbook approvers: {', '.join(approval.deciders)}"
        added = [entry for entry in deciders if entry not in approval.deciders]
        if added:
            named += f", escalated to {', '.join(added)}"
        raise DecisionRefused(f"{who} may not decide this request ({named})")
    if approval.four_eyes and people.same_person(decider, approval.requested_by):
        requested = "" if decider == approval.requested_by else f" (as {approval.requested_by})"
        raise DecisionRefused(
            f"{who} requested this run{requested} and the runbook asks for four eyes"
        )


def decision_status(approval: ApprovalRecord, decision: Decision) -> ApprovalStatus:
    """The approval status a decision records; skip exists only for in-doubt requests."""
    if decision == Decision.SKIP and approval.kind != ApprovalKind.IN_DOUBT:
        raise DecisionRefused(
            "skip applies only to a step that may or may not have run", kind=ErrorKind.INVALID
        )
    return {
        Decision.APPROVE: ApprovalStatus.APPROVED,
        Decision.SKIP: ApprovalStatus.SKIPPED,
        Decision.REJECT: ApprovalStatus.REJECTED,
    }[decision]


def vote_outcome(
    required: int, counted: Collection[str], person: str, decision: Decision
) -> VoteOutcome:
    """What `person`'s decision does to a request needing `required` approvals by distinct
    people, of whom `counted` (persons, not identities) approved so far: a person counts once
    whatever they say next, an approval (of a gate, or the retry of an in-doubt attempt)
    counts and completes it when it is the last one needed, a reject ends it at once.

    A skip of an in-doubt attempt ("it ran, treat it as done") ends it at once too, decided by
    one person like an abort: it starts nothing, so it is not the risky act the step's rule
    guards; the steps after it still stop at their own gates."""
    if person in counted:
        return VoteOutcome.ALREADY_COUNTED
    if decision in (Decision.REJECT, Decision.SKIP):
        return VoteOutcome.ENDS
    return VoteOutcome.COMPLETES if len(counted) + 1 >= required else VoteOutcome.COUNTED


def counting_votes(
    approval: ApprovalRecord,
    votes: Iterable[ApprovalVote],
    people: People,
    global_approvers: Sequence[str],
) -> list[ApprovalVote]:
    """The recorded approvals of `approval` that count now, oldest first, one per person:
    each vote's deciding identity mapped to its person under the people file in force, kept
    only while that identity may still decide the request (a renamed person counts once; one
    who left the group, or whom LOOM_OPS_APPROVERS no longer names, counts no more)."""
    counting: list[ApprovalVote] = []
    persons: set[str] = set()
    for vote in votes:
        if vote.decision == "reject":  # never on a pending request; never an approval
            continue
        try:
            check_decider(approval, vote.decided_by, people, global_approvers)
        except DecisionRefused:
            continue
        person = people.person(vote.decided_by).name
        if person not in persons:
            persons.add(person)
            counting.append(vote)
    return counting


def counted_persons(
    approval: ApprovalRecord,
    votes: Iterable[ApprovalVote],
    people: People,
    global_approvers: Sequence[str],
) -> list[str]:
    """The distinct persons whose recorded approvals of `approval` count now (see
    `counting_votes`), oldest first."""
    return [
        people.person(vote.decided_by).name
        for vote in counting_votes(approval, votes, people, global_approvers)
    ]


def decision_effect(
    approval: ApprovalRecord,
    run: RunRecord,
    decision: Decision,
    decider: str,
    note: str | None,
    rollback_on_reject: bool,
) -> DecisionEffect:
    """What the decision does to the gated call and the run, applied in one transaction."""
    now = time.time()
    checkpoint = run.checkpoint
    decided = {"decided_by": decider, "decided_at": now, "note": note}
    if decision == Decision.REJECT:
        outcome = {"approved": False, **decided}
        if approval.kind == ApprovalKind.GATE and rollback_on_reject:
            # The kernel rolls completed steps back, then ends the run as rejected.
            return DecisionEffect("ok", outcome, RunStatus.QUEUED, checkpoint.rolling_back())
        error = f"rejected by {decider}" + (f": {note}" if note else "")
        status = "ok" if approval.kind == ApprovalKind.GATE else None
        return DecisionEffect(status, outcome, RunStatus.REJECTED, None, error=error)
    advanced = dataclasses.replace(checkpoint, call=checkpoint.call + 1)
    if approval.kind == ApprovalKind.GATE:
        return DecisionEffect("ok", {"approved": True, **decided}, RunStatus.QUEUED, advanced)
    if decision == Decision.SKIP:
        outcome = {"skipped": True, "may_have_run": True, **decided}
        return DecisionEffect("skipped", outcome, RunStatus.QUEUED, advanced)
    return DecisionEffect("retry", None, RunStatus.QUEUED, None)


def addressees(
    entries: Sequence[str],
    people: People,
    global_approvers: Sequence[str],
    *,
    requested_by: str | None = None,
    counted: Collection[str] = (),
) -> list[str]:
    """One identity for each person `entries` (groups or identities) name, to mention in a
    reminder: their Telegram identity where they have one; leaving out the requester (four
    eyes: `requested_by`), the persons whose approvals are `counted` already, and whoever
    `global_approvers` (LOOM_OPS_APPROVERS, when set) bars, whatever `entries` say."""
    persons = {person.name: person for person in people.by_identity.values()}
    for entry in entries:  # identities nobody mapped are persons of their own
        if not entry.startswith(GROUP_PREFIX):
            persons.setdefault(people.person(entry).name, people.person(entry))
    barred = set(counted)
    if requested_by is not None:
        barred.add(people.person(requested_by).name)
    found = []
    for name, person in sorted(persons.items()):
        if name in barred or not person.identities:
            continue
        if not people.admits(person.identities[0], entries):
            continue
        if global_approvers and not people.admits(person.identities[0], global_approvers):
            continue
        chat = [i for i in person.identities if i.startswith("telegram:")]
        found.append(chat[0] if chat else person.identities[0])
    return found


def reminded(
    approval: ApprovalRecord,
    people: People,
    global_approvers: Sequence[str],
    counted: Collection[str],
) -> list[str]:
    """Whom a reminder of `approval` mentions: everyone who may decide it now and has not
    approved yet (a request open to anyone reminds the approvers)."""
    entries = approval.all_deciders or list(global_approvers) or [GROUP_PREFIX + APPROVERS_GROUP]
    requester = approval.requested_by if approval.four_eyes else None
    return addressees(entries, people, global_approvers, requested_by=requester, counted=counted)


def escalated(
    approval: ApprovalRecord,
    people: People,
    global_approvers: Sequence[str],
    counted: Collection[str],
) -> list[str]:
    """Whom an escalation of `approval` mentions: the people its `escalate_to` names (added
    as deciders, unless the request was open to anyone already) who may decide it."""
    requester = approval.requested_by if approval.four_eyes else None
    return addressees(
        approval.escalate_to, people, global_approvers, requested_by=requester, counted=counted
    )
