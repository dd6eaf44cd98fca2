"""CLI identity is the login: `--as` only from a login the people file lets act for others.

Real `loom-ops` processes over a real SQLite file; the tests' login is `tester`
(tests.cli_helpers.CLI_USER).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import DeciderRefused
from agent.records import Decision
from agent.service.runs import DecisionResult, RunService
from agent.settings import Settings
from tests.cli_helpers import Cli, assert_usage_error, make_cli_workspace, snapshot
from tests.support import raw_rows

LATENCY = "incident: API latency spike"

# The tests' people, except that the login `tester` is a person of its own, not a shared account.
NO_ACTING = """\
people:
  - name: tester
    cli: tester
  - name: oncall
    cli: oncall
    groups: [approvers]
  - name: lead
    cli: lead
    groups: [leads]
"""


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(make_cli_workspace(tmp_path / "ws"), tmp_path / "ops.sqlite")


def _decided_by(cli: Cli, run_id: str) -> list[str]:
    return [
        row[0]
        for row in raw_rows(
            cli.db, "SELECT decided_by FROM approvals WHERE run_id = ? ORDER BY number", (run_id,)
        )
    ]


def test_as_is_refused_without_the_people_files_permission(cli: Cli) -> None:
    (cli.workspace / "people.yaml").write_text(NO_ACTING)
    assert cli("runbook", LATENCY, "--run-id", "inc-1", "--mock-llm").returncode == 0
    before = snapshot(cli.db)

    refused = cli("approve", "inc-1", "--as", "oncall", "--note", "LGTM")

    line = assert_usage_error(refused, "--as oncall", "cli:tester may not act for others")
    assert str(cli.workspace / "people.yaml") in line
    assert snapshot(cli.db) == before


def test_as_does_not_let_the_requester_bypass_four_eyes(cli: Cli) -> None:
    """The issue's case: the requester of `failed-deploy-rollback` approved with --as lead."""
    (cli.workspace / "people.yaml").write_text(NO_ACTING)
    started = cli("runbook", "failed-deploy-rollback", "--run-id", "dep", "--mock-llm")
    assert started.returncode == 0, started.describe()
    before = snapshot(cli.db)

    assert_usage_error(cli("approve", "dep", "--as", "lead"), "may not act for others")
    assert_usage_error(cli("cancel", "dep", "--as", "lead"), "may not act for others")
    assert snapshot(cli.db) == before


def test_as_is_allowed_where_the_people_file_lets_the_login_act_for_others(cli: Cli) -> None:
    assert cli("runbook", LATENCY, "--run-id", "inc-2", "--mock-llm").returncode == 0

    approved = cli("approve", "inc-2", "--as", "oncall", "--note", "LGTM")

    assert approved.returncode == 0, approved.describe()
    assert _decided_by(cli, "inc-2") == ["cli:oncall"]


def test_a_cli_decision_is_recorded_as_the_login(cli: Cli) -> None:
    (cli.workspace / "people.yaml").write_text(NO_ACTING)
    assert cli("runbook", LATENCY, "--run-id", "inc-3", "--mock-llm").returncode == 0

    refused = cli("approve", "inc-3")  # tester is no approver, and cannot speak for one
    assert_usage_error(refused, "tester may not decide", "group:approvers")
    approved = cli("approve", "inc-3", env={"LOOM_OPS_USER": "oncall"})

    assert approved.returncode == 0, approved.describe()
    assert _decided_by(cli, "inc-3") == ["cli:oncall"]


def test_a_people_file_with_an_error_is_one_line_naming_the_file_and_field(cli: Cli) -> None:
    assert cli("runbook", LATENCY, "--run-id", "inc-4", "--mock-llm").returncode == 0
    people = cli.workspace / "people.yaml"
    people.write_text("people:\n  - name: oncall\n    cli: oncall\n    groups: oncall\n")
    before = snapshot(cli.db)

    for command in (["approve", "inc-4", "--as", "oncall"], ["approve", "inc-4"]):
        line = assert_usage_error(cli(*command))
        assert line == f"loom-ops: {people}:4: people[0].groups: Input should be a valid list"
    assert snapshot(cli.db) == before


# -- approval by several people ------------------------------------------------------------------

DEPLOY = "failed-deploy-rollback"  # its rollback needs two people, neither the requester


async def _decide_in_chat(cli: Cli, run_id: str, identity: str) -> DecisionResult:
    """A decision as the bot records a tap: the person's telegram: identity, in-process."""
    settings = Settings(
        _env_file=None, db=str(cli.db), workspace=cli.workspace, mock_llm=True, user="tester"
    )
    service = await RunService.open(settings)
    try:
        return await service.decide(run_id, Decision.APPROVE, identity, wait=False)
    finally:
        await service.close()


async def test_approving_in_chat_then_in_the_cli_as_the_same_person_counts_once(cli: Cli) -> None:
    """lead is telegram:100000002 and cli:lead (the tests' people file): one person."""
    started = cli("runbook", DEPLOY, "--run-id", "dep-1", "--mock-llm")
    assert started.returncode == 0, started.describe()
    tapped = await _decide_in_chat(cli, "dep-1", "telegram:100000002")
    assert tapped.message == "recorded: 1 of 2 approvals, waiting for one more"
    before = snapshot(cli.db)

    again = cli("approve", "dep-1", env={"LOOM_OPS_USER": "lead"})

    assert_usage_error(again, "already counted: 1 of 2 approvals, waiting for one more")
    assert snapshot(cli.db) == before
    second = cli("approve", "dep-1", env={"LOOM_OPS_USER": "oncall"})
    assert second.returncode == 0, second.describe()
    assert "Decision: approved by cli:oncall: 2 of 2 approvals, done" in second.stdout
    votes = raw_rows(cli.db, "SELECT person, decided_by FROM approval_votes ORDER BY decided_at")
    assert [tuple(v) for v in votes] == [("lead", "telegram:100000002"), ("oncall", "cli:oncall")]


def test_the_cli_answer_says_how_many_approvals_are_in(cli: Cli) -> None:
    assert cli("runbook", DEPLOY, "--run-id", "dep-2", "--mock-llm").returncode == 0

    first = cli("approve", "dep-2", "--json", env={"LOOM_OPS_USER": "oncall"})

    assert first.returncode == 0, first.describe()
    payload = first.json()
    assert payload["status"] == "waiting_approval"
    assert payload["message"] == "Decision: recorded: 1 of 2 approvals, waiting for one more"


def test_status_says_how_many_approvals_a_request_has_and_whose(cli: Cli) -> None:
    """A request that needs two people, one approval in: `status` says 1 of 2 and by whom,
    so a run whose second approver is missing does not just sit until it expires unsaid."""
    assert cli("runbook", DEPLOY, "--run-id", "dep-5", "--mock-llm").returncode == 0
    waiting = cli("status", "dep-5")
    assert "  approvals: 0 of 2 so far\n" in waiting.stdout, waiting.describe()
    assert cli("approve", "dep-5", env={"LOOM_OPS_USER": "oncall"}).returncode == 0

    shown = cli("status", "dep-5")
    assert "  approvals: 1 of 2 so far (cli:oncall)\n" in shown.stdout, shown.describe()
    request = cli("status", "dep-5", "--json").json()["approval"]
    assert (request["required"], request["approved_by"]) == (2, ["cli:oncall"])


async def test_four_eyes_holds_across_front_ends_for_a_two_person_rule(cli: Cli) -> None:
    """lead starts the run from the CLI: their chat tap is refused; nothing is counted."""
    started = cli(
        "runbook", DEPLOY, "--run-id", "dep-3", "--mock-llm", env={"LOOM_OPS_USER": "lead"}
    )
    assert started.returncode == 0, started.describe()
    before = snapshot(cli.db)

    with pytest.raises(DeciderRefused, match="four eyes"):
        await _decide_in_chat(cli, "dep-3", "telegram:100000002")

    assert snapshot(cli.db) == before
