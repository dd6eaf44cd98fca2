"""People and groups: who may decide and start, four eyes by person, and the people file.

Service-level tests over a real SQLite file, with identity strings as the front ends record
them (`cli:<login>`, `telegram:<user id>`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from agent.errors import ErrorKind, PeopleFileError, RunbookError, RunNotFound, ServiceError
from agent.people import People, PeopleFile, load_people, load_people_file
from agent.records import ApprovalStatus, Decision, RunStatus
from agent.runbook.model import load_catalog, load_runbook
from agent.service.runs import RunService
from agent.settings import Settings
from tests.support import ScriptedPolicy, call, final, open_service, turn, write_runbook

REPO = Path(__file__).resolve().parent.parent

# Sam is on call, with an identity on two front ends; Alex is in no group that may decide.
PEOPLE = """\
people:
  - name: sam
    cli: sam
    telegram: 100000001
    groups: [oncall]
  - name: alex
    cli: alex
    telegram: 200000001
    groups: [observers]
  - name: lee
    telegram: 100000002
    groups: [oncall]
"""

ONCALL_GATE = """\
id: oncall-gate
title: On-call gate
triggers: [oncall gate]
approvers: [group:oncall]
four_eyes: true
steps:
  - id: act
    title: Act
    run: echo act
    approval: required
"""

STARTERS_ONLY = """\
id: oncall-only
title: Only on call starts it
triggers: [oncall only]
starters: [group:oncall]
steps:
  - id: look
    title: Look
    note: looking
"""


@pytest.fixture
def people_settings(settings: Settings) -> Settings:
    """The test workspace with its own people file and the two runbooks above."""
    (settings.workspace / "people.yaml").write_text(PEOPLE)
    write_runbook(settings.workspace, "oncall-gate", ONCALL_GATE)
    write_runbook(settings.workspace, "oncall-only", STARTERS_ONLY)
    return settings


async def _snapshot(service: RunService, run_id: str) -> tuple[object, ...]:
    run = await service.get(run_id)
    approvals = await service.store.list_approvals(run_id)
    events = await service.store.list_events(run_id)
    return (run.status, run.checkpoint, approvals, len(events))


async def test_a_group_member_decides_from_any_of_their_identities(
    people_settings: Settings,
) -> None:
    async with open_service(people_settings) as service:
        await service.start("g1", "oncall gate", requested_by="cli:alex")
        result = await service.decide("g1", Decision.APPROVE, "telegram:100000001")
    assert result.changed and result.run.status == RunStatus.SUCCEEDED
    assert result.approval.decided_by == "telegram:100000001"


async def test_a_non_member_is_refused_naming_the_group(people_settings: Settings) -> None:
    async with open_service(people_settings) as service:
        await service.start("g2", "oncall gate", requested_by="cli:sam")
        before = await _snapshot(service, "g2")
        with pytest.raises(ServiceError) as refused:
            await service.decide("g2", Decision.APPROVE, "telegram:200000001")
        assert refused.value.kind == ErrorKind.FORBIDDEN
        assert str(refused.value) == (
            "alex (telegram:200000001) may not decide this request "
            "(runbook approvers: group:oncall)"
        )
        with pytest.raises(ServiceError, match=r"cli:mallory may not decide .*group:oncall"):
            await service.decide("g2", Decision.REJECT, "cli:mallory")
        assert await _snapshot(service, "g2") == before


async def test_four_eyes_bars_the_requester_on_every_front_end(people_settings: Settings) -> None:
    """Sam starts the run from the CLI; Sam's Telegram identity is still Sam."""
    async with open_service(people_settings) as service:
        await service.start("g3", "oncall gate", requested_by="cli:sam")
        before = await _snapshot(service, "g3")
        with pytest.raises(ServiceError, match="four eyes") as refused:
            await service.decide("g3", Decision.APPROVE, "telegram:100000001")
        assert str(refused.value) == (
            "sam (telegram:100000001) requested this run (as cli:sam) and the runbook asks "
            "for four eyes"
        )
        assert await _snapshot(service, "g3") == before
        result = await service.decide("g3", Decision.APPROVE, "telegram:100000002")
    assert result.changed and result.run.status == RunStatus.SUCCEEDED


async def test_starters_refuse_a_non_starter_and_store_nothing(people_settings: Settings) -> None:
    async with open_service(people_settings) as service:
        with pytest.raises(ServiceError) as refused:
            await service.start("s1", "oncall only", requested_by="telegram:200000001")
        assert refused.value.kind == ErrorKind.FORBIDDEN
        assert str(refused.value) == (
            "alex (telegram:200000001) may not start runbook oncall-only (starters: group:oncall)"
        )
        with pytest.raises(RunNotFound):
            await service.get("s1")
        started = await service.start("s2", "oncall only", requested_by="cli:sam")
    assert started.status == RunStatus.SUCCEEDED


async def test_starters_hold_for_a_runbook_a_model_chose(people_settings: Settings) -> None:
    """The request names no runbook (as an LLM reads it): the kernel refuses the pick."""
    script = [turn(call("read_runbook", runbook_id="oncall-only")), final("failed", "refused")]
    async with open_service(people_settings, ScriptedPolicy(script)) as service:
        run = await service.start("s3", "something odd", requested_by="telegram:200000001")
        [read] = await service.store.list_tool_calls("s3")
    assert run.status == RunStatus.FAILED and run.runbook_id is None
    assert read.status == "refused"
    assert read.outcome == {
        "refused": "alex (telegram:200000001) may not start runbook oncall-only "
        "(starters: group:oncall)"
    }


async def test_a_team_with_only_telegram_approver_ids_approves_every_shipped_runbook(
    tmp_path: Path,
) -> None:
    """No people file, no runbook edited: TELEGRAM_APPROVER_IDS alone is group:approvers."""
    workspace = tmp_path / "ws"
    shutil.copytree(REPO / "runbooks", workspace / "runbooks")
    settings = Settings(
        _env_file=None,
        db=str(tmp_path / "ops.sqlite"),
        workspace=workspace,
        mock_llm=True,
        user="tester",
        telegram_approvers="5550001,5550002,5550003",
    )
    shipped = sorted(load_catalog(workspace / "runbooks").runbooks)
    assert shipped == ["api-latency-spike", "disk-almost-full", "failed-deploy-rollback"]
    async with open_service(settings) as service:
        for runbook_id in shipped:
            run = await service.start(runbook_id, runbook_id, requested_by="telegram:5550002")
            decided = 0
            while run.status == RunStatus.WAITING_APPROVAL:
                pending = await service.pending_approval(run.id)
                assert pending is not None
                # A step may need two people (failed-deploy-rollback): the two who did not ask.
                for approver in ("telegram:5550001", "telegram:5550003")[: pending.required]:
                    result = await service.decide(
                        run.id, Decision.APPROVE, approver, approval_number=pending.number
                    )
                assert result.approval.status == ApprovalStatus.APPROVED
                decided += 1
                run = result.run
            assert decided >= 1, runbook_id
            assert run.status == RunStatus.SUCCEEDED, (runbook_id, run.error)


def test_a_people_file_with_an_error_is_one_line_naming_the_file_and_field(
    tmp_path: Path,
) -> None:
    path = tmp_path / "people.yaml"
    path.write_text("people:\n  - name: sam\n    telegram: '@sam'\n")
    with pytest.raises(PeopleFileError) as bad:
        load_people_file(path)
    assert str(bad.value) == f"{path}:3: people[0].telegram: Input should be a valid integer"

    path.write_text("people:\n  - name: sam\n    cli: sam\n  - name: kim\n    cli: sam\n")
    with pytest.raises(PeopleFileError) as taken:
        load_people_file(path)
    assert str(taken.value) == f"{path}:5: people[1].cli: cli:sam is already sam's identity"


async def test_a_bad_people_file_refuses_decisions_with_its_one_line(
    people_settings: Settings,
) -> None:
    async with open_service(people_settings) as service:
        await service.start("b1", "oncall gate", requested_by="cli:alex")
        people = people_settings.workspace / "people.yaml"
        people.write_text("people:\n  - name: sam\n    grups: [oncall]\n")
        with pytest.raises(ServiceError) as refused:
            await service.decide("b1", Decision.APPROVE, "telegram:100000001")
    assert refused.value.kind == ErrorKind.INVALID
    assert str(refused.value) == (
        f"{people}:3: people[0].grups: unknown field 'grups' (did you mean 'groups'?)"
    )


def test_settings_alone_form_the_group_approvers(tmp_path: Path) -> None:
    settings = Settings(
        _env_file=None,
        workspace=tmp_path,
        approvers="cli:oncall",
        telegram_approvers="5550001",
    )
    people = load_people(settings)
    assert people.admits("telegram:5550001", ["group:approvers"])
    assert people.admits("cli:oncall", ["group:approvers"])
    assert not people.admits("cli:tester", ["group:approvers"])
    assert not people.same_person("cli:oncall", "telegram:5550001")  # nothing maps them


def test_one_person_is_one_person_whatever_the_identity() -> None:
    people = People.build(
        load_people_file(REPO / "people.example.yaml"), approvers=["telegram:100000002"]
    )
    assert people.same_person("cli:sam", "telegram:100000001")
    assert people.admits("cli:sam", ["telegram:100000001"])  # named by another identity
    assert people.admits("cli:lee", ["group:approvers"])  # through TELEGRAM_APPROVER_IDS
    assert not people.admits("cli:alex", ["group:approvers"])
    assert people.may_act_for_others("cli:ops") and not people.may_act_for_others("cli:sam")


def test_a_runbook_names_people_by_identity_or_group_and_nothing_else(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(ONCALL_GATE.replace("approvers: [group:oncall]", "starters: [group:On Call]"))
    with pytest.raises(RunbookError) as bad:
        load_runbook(path)
    assert str(bad.value) == (
        f"{path}:4: starters[0]: starter 'group:On Call': a group name must match "
        "[a-z0-9][a-z0-9_-]{0,62}"
    )
    path.write_text(ONCALL_GATE.replace("group:oncall", "oncall"))
    with pytest.raises(RunbookError, match=r"approvers\[0\]: approver 'oncall' must be"):
        load_runbook(path)


def test_a_token_is_one_more_identity_of_its_person_and_the_file_wins() -> None:
    """`api:<token name>` counts as the token's person (groups, four eyes); an identity the
    file maps stays the file's person, and a token of someone who left the file is nobody's."""
    file = load_people_file(REPO / "people.example.yaml")
    people = People.build(file).with_tokens({"sam-laptop": "sam", "gone-ci": "gone"})
    assert people.admits("api:sam-laptop", ["group:approvers"])
    assert people.same_person("api:sam-laptop", "telegram:100000001")
    assert people.describe("api:sam-laptop") == "sam (api:sam-laptop)"
    assert "api:sam-laptop" in people.by_name["sam"].identities
    assert not people.person("api:gone-ci").known
    assert People.build(file).with_tokens({}) == People.build(file)
    assert not people.admits("api:sam-laptop", ["group:leads"])
    mapped = PeopleFile.model_validate(
        {"people": [{"name": "sam", "api": "shared"}, {"name": "lee"}]}
    )
    claimed = People.build(mapped).with_tokens({"shared": "lee", "lee-ci": "lee"})
    assert claimed.person("api:shared").name == "sam"  # the file's mapping stands
    assert claimed.person("api:lee-ci").name == "lee"  # a person with no identity but tokens
