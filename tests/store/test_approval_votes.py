"""Approval by several people, on both engines: a step's `approval: {required: 2, ...}` needs
that many distinct people (a person counts once, whichever identity they use), a reject ends
it at once, and two last approvals at once complete it once.

Real RunService over a real SQLite file and a real PostgreSQL schema (LOOM_OPS_TEST_PG_DSN).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.chain import first_broken_link
from agent.errors import DeciderRefused, ServiceError
from agent.records import ApprovalStatus, Decision, RunStatus
from agent.service.runs import RunService
from agent.settings import Settings
from agent.store import RunStore
from tests.support import write_runbook

TWO_PEOPLE = """\
id: two-people
title: Two people
triggers: [two people]
approvers: [group:oncall]
steps:
  - id: look
    title: Look
    note: looking
  - id: act
    title: Act
    run: echo act
    approval: {required: 2, from: [group:oncall, group:leads], four_eyes: true}
  - id: after
    title: After
    note: done
"""

# sam is one person on two front ends; tester starts runs (and is on call, so four eyes bites).
PEOPLE = """\
people:
  - name: tester
    cli: tester
    groups: [oncall]
  - name: sam
    cli: sam
    telegram: 100000001
    groups: [oncall]
  - name: lee
    cli: lee
    groups: [leads]
  - name: kim
    cli: kim
    groups: [leads]
  - name: pat
    cli: pat
"""


@pytest.fixture
def settings(workspace: Path, db_url: str) -> Settings:
    write_runbook(workspace, "two-people", TWO_PEOPLE)
    (workspace / "people.yaml").write_text(PEOPLE)
    return Settings(_env_file=None, db=db_url, workspace=workspace, mock_llm=True, user="tester")


async def _start(service: RunService, run_id: str) -> None:
    run = await service.start(run_id, "two people", requested_by="cli:tester")
    assert run.status == RunStatus.WAITING_APPROVAL


async def _votes(service: RunService, run_id: str) -> list[tuple[str, str]]:
    (approval,) = await service.store.list_approvals(run_id)
    return [(v.person, v.decided_by) for v in await service.store.approval_votes(approval.id)]


async def test_a_two_person_rule_needs_two_distinct_people(service: RunService) -> None:
    await _start(service, "inc-1")

    first = await service.decide("inc-1", Decision.APPROVE, "cli:sam", "LGTM")

    assert first.changed
    assert first.message == "recorded: 1 of 2 approvals, waiting for one more"
    assert first.approval.status == ApprovalStatus.PENDING
    assert first.run.status == RunStatus.WAITING_APPROVAL
    executed = {c.step_id for c in await service.store.list_tool_calls("inc-1")}
    assert "after" not in executed  # the gated step has not run: nothing after it either

    second = await service.decide("inc-1", Decision.APPROVE, "cli:lee")

    assert second.changed
    assert second.message == "approved by cli:lee: 2 of 2 approvals, done"
    assert second.approval.status == ApprovalStatus.APPROVED
    assert second.run.status == RunStatus.SUCCEEDED
    assert await _votes(service, "inc-1") == [("sam", "cli:sam"), ("lee", "cli:lee")]
    events = await service.store.list_events("inc-1")
    types = [e.type for e in events]
    assert types.count("approval_voted") == 1 and types.count("approval_decided") == 1
    voted = next(e for e in events if e.type == "approval_voted")
    assert voted.data | {} == {
        "approval_id": first.approval.id,
        "decided_by": "cli:sam",
        "approvals": 1,
        "required": 2,
        "number": 1,
        "note": "LGTM",
    }
    assert first_broken_link(events) is None


async def test_the_same_person_counts_once_on_any_front_end(service: RunService) -> None:
    """sam taps twice, then approves from the CLI: one approval; the run still waits."""
    await _start(service, "inc-2")
    await service.decide("inc-2", Decision.APPROVE, "telegram:100000001")
    journal = len(await service.store.list_events("inc-2"))

    for identity in ("telegram:100000001", "cli:sam"):
        again = await service.decide("inc-2", Decision.APPROVE, identity)
        assert not again.changed
        assert again.message == (
            "already counted: 1 of 2 approvals, waiting for one more; nothing changed"
        )
        assert again.run.status == RunStatus.WAITING_APPROVAL

    assert await _votes(service, "inc-2") == [("sam", "telegram:100000001")]
    assert len(await service.store.list_events("inc-2")) == journal
    assert (await service.get("inc-2")).status == RunStatus.WAITING_APPROVAL


async def test_four_eyes_bars_the_requester_and_who_is_not_in_from(service: RunService) -> None:
    await _start(service, "inc-3")

    with pytest.raises(DeciderRefused, match="requested this run"):
        await service.decide("inc-3", Decision.APPROVE, "cli:tester")
    with pytest.raises(DeciderRefused, match="may not decide"):
        await service.decide("inc-3", Decision.APPROVE, "cli:pat")

    assert await _votes(service, "inc-3") == []


async def test_a_reject_after_one_approval_ends_the_run_rejected(service: RunService) -> None:
    await _start(service, "inc-4")
    await service.decide("inc-4", Decision.APPROVE, "cli:sam")

    rejected = await service.decide("inc-4", Decision.REJECT, "cli:lee", "not now")

    assert rejected.changed
    assert rejected.approval.status == ApprovalStatus.REJECTED
    assert rejected.run.status == RunStatus.REJECTED
    assert rejected.run.error == "rejected by cli:lee: not now"
    with pytest.raises(ServiceError, match="already rejected"):
        await service.decide("inc-4", Decision.APPROVE, "cli:kim")
    assert [v for v, _ in await _votes(service, "inc-4")] == ["sam", "lee"]


async def test_concurrent_last_approvals_complete_the_request_once(
    service: RunService, settings: Settings
) -> None:
    """Two people tap the last approval at once, each through their own store connection
    (two processes): one completes it, the other is counted before it or finds it done; the
    gated step runs once."""
    for round_ in range(3):
        run_id = f"race-{round_}"
        await _start(service, run_id)
        await service.decide(run_id, Decision.APPROVE, "cli:sam")
        others = [RunService(await RunStore.open(settings.db), settings) for _ in range(2)]
        try:
            results = await asyncio.gather(
                others[0].decide(run_id, Decision.APPROVE, "cli:lee", wait=False),
                others[1].decide(run_id, Decision.APPROVE, "cli:kim", wait=False),
            )
        finally:
            for other in others:
                await other.close()
        completed = [r for r in results if r.changed]
        assert len(completed) == 1, [r.message for r in results]
        assert completed[0].approval.status == ApprovalStatus.APPROVED
        loser = next(r for r in results if not r.changed)
        assert loser.message.startswith("already approved")
        assert len(await _votes(service, run_id)) == 2
        events = [e.type for e in await service.store.list_events(run_id)]
        assert events.count("approval_decided") == 1 and events.count("approval_voted") == 1


async def test_concurrent_taps_by_one_person_count_once(
    service: RunService, settings: Settings
) -> None:
    await _start(service, "twice")
    others = [RunService(await RunStore.open(settings.db), settings) for _ in range(2)]
    try:
        results = await asyncio.gather(
            others[0].decide("twice", Decision.APPROVE, "cli:sam", wait=False),
            others[1].decide("twice", Decision.APPROVE, "telegram:100000001", wait=False),
        )
    finally:
        for other in others:
            await other.close()
    assert sorted(r.changed for r in results) == [False, True]
    assert [p for p, _ in await _votes(service, "twice")] == ["sam"]
    assert (await service.get("twice")).status == RunStatus.WAITING_APPROVAL


def _edit_people(settings: Settings, old: str, new: str) -> None:
    """Change the people file in force, as an operator editing it between two votes."""
    path = Path(settings.workspace) / "people.yaml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


async def test_a_renamed_person_still_counts_once(service: RunService, settings: Settings) -> None:
    """sam approves in chat; the people file then renames sam to samuel (same identities):
    the same human approving again from the CLI is already counted, and the rule still
    needs a second person."""
    await _start(service, "rename")
    await service.decide("rename", Decision.APPROVE, "telegram:100000001")
    _edit_people(settings, "name: sam\n", "name: samuel\n")

    again = await service.decide("rename", Decision.APPROVE, "cli:sam")

    assert not again.changed
    assert (
        again.message == "already counted: 1 of 2 approvals, waiting for one more; nothing changed"
    )
    assert again.approval.status == ApprovalStatus.PENDING
    done = await service.decide("rename", Decision.APPROVE, "cli:lee")
    assert done.message == "approved by cli:lee: 2 of 2 approvals, done"


async def test_an_approval_stops_counting_when_its_person_leaves_the_group(
    service: RunService, settings: Settings
) -> None:
    """sam approves, then leaves on-call (no group any more): lee's approval is the first
    that counts, and kim's completes the rule."""
    await _start(service, "left")
    await service.decide("left", Decision.APPROVE, "cli:sam")
    _edit_people(
        settings, "    telegram: 100000001\n    groups: [oncall]\n", "    telegram: 100000001\n"
    )

    lee = await service.decide("left", Decision.APPROVE, "cli:lee")

    assert lee.changed and lee.message == "recorded: 1 of 2 approvals, waiting for one more"
    assert lee.approval.status == ApprovalStatus.PENDING
    assert lee.run.status == RunStatus.WAITING_APPROVAL
    # What the card and the API show is what counts: sam's vote no longer does.
    assert lee.approved_by == ["cli:lee"]
    card = await service.approval_request(lee.approval.id)
    assert [vote.decided_by for vote in card.votes] == ["cli:lee"]
    voted = [e.data for e in await service.store.list_events("left") if e.type == "approval_voted"]
    assert [(v["decided_by"], v["approvals"]) for v in voted] == [("cli:sam", 1), ("cli:lee", 1)]
    kim = await service.decide("left", Decision.APPROVE, "cli:kim")
    assert kim.message == "approved by cli:kim: 2 of 2 approvals, done"
    assert kim.run.status == RunStatus.SUCCEEDED
    assert kim.approved_by == ["cli:lee", "cli:kim"]
    card = await service.approval_request(kim.approval.id)
    assert [vote.decided_by for vote in card.votes] == ["cli:lee", "cli:kim"]


async def test_a_vote_whose_identity_left_its_person_gives_way_to_their_new_one(
    service: RunService, settings: Settings
) -> None:
    """sam approves from the CLI; the people file then drops sam's CLI login, so that vote
    counts for nobody: sam approving in chat counts (once), in place of the old vote."""
    await _start(service, "moved")
    await service.decide("moved", Decision.APPROVE, "cli:sam")
    _edit_people(settings, "    cli: sam\n", "")

    chat = await service.decide("moved", Decision.APPROVE, "telegram:100000001")

    assert chat.changed and chat.message == "recorded: 1 of 2 approvals, waiting for one more"
    assert await _votes(service, "moved") == [("sam", "telegram:100000001")]
    journaled = [
        e.data["decided_by"]
        for e in await service.store.list_events("moved")
        if e.type == "approval_voted"
    ]
    assert journaled == ["cli:sam", "telegram:100000001"]
