"""Per-person API tokens end to end: `loom-ops tokens` as real processes, and `loom-ops serve`
as a real process authenticating people by them (issue 16, point 5).

A token's requests act as `api:<token name>`, which the service counts as the token's person
(groups, approvers, four eyes); LOOM_OPS_API_TOKEN stays the service token.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.cli_helpers import Cli, assert_usage_error, make_cli_workspace
from tests.http_harness import ServeProcess, free_port, poll_run
from tests.support import DISK

DEPLOY = "failed deploy of checkout-api"  # group:approvers or group:leads, four eyes


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    """The shipped runbooks and the tests' people (oncall, lead…); no database yet."""
    return Cli(make_cli_workspace(tmp_path / "ws"), tmp_path / "ops.sqlite")


def _create(cli: Cli, person: str, name: str) -> str:
    result = cli("tokens", "create", "--person", person, "--name", name)
    assert result.returncode == 0, result.describe()
    secret = result.stdout.strip()
    assert result.stdout == secret + "\n" and secret.startswith("lo_") and len(secret) > 40
    return secret


@pytest.fixture
def serve(cli: Cli) -> Iterator[ServeProcess]:
    """`loom-ops serve` over the CLI's workspace and database (no service token)."""
    server = ServeProcess(cli.workspace, cli.db, free_port())
    try:
        yield server
    finally:
        server.stop()


def _client(server: ServeProcess, secret: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=15)


def _waiting(client: httpx.Client, message: str, run_id: str) -> None:
    body = {"message": message, "run_id": run_id, "role": "runbook"}
    response = client.post("/runs", json=body)
    assert response.status_code == 201, response.text
    poll_run(client, run_id, lambda r: r["approval"] is not None)


# -- the command --------------------------------------------------------------------------------


def test_create_prints_the_token_once_and_the_store_keeps_only_its_hash(cli: Cli) -> None:
    result = cli("tokens", "create", "--person", "oncall", "--name", "oncall-web")
    assert result.returncode == 0, result.describe()
    secret = result.stdout.strip()
    assert secret.startswith("lo_")
    assert "oncall-web" in result.stderr and "api:oncall-web" in result.stderr
    with sqlite3.connect(cli.db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        (stored,) = conn.execute("SELECT token_hash FROM api_tokens").fetchone()
    assert secret not in stored
    files = [p for p in cli.db.parent.iterdir() if p.name.startswith(cli.db.name)]
    for path in files:  # the database and any -wal/-shm beside it
        assert secret.encode() not in path.read_bytes(), path
        assert secret[3:].encode() not in path.read_bytes(), path

    listed = cli("tokens", "list")
    assert listed.returncode == 0, listed.describe()
    assert "oncall-web" in listed.stdout and "oncall" in listed.stdout
    assert secret not in listed.stdout and secret[3:] not in listed.stdout
    payload = json.loads(cli("tokens", "list", "--json").stdout)
    (token,) = payload["tokens"]
    assert token["identity"] == "api:oncall-web" and token["revoked_at"] is None
    assert secret not in json.dumps(payload)

    # A second token of that name is refused; the default name is the person's.
    assert_usage_error(
        cli("tokens", "create", "--person", "lead", "--name", "oncall-web"), "exists already"
    )
    other = cli("tokens", "create", "--person", "lead")
    assert other.returncode == 0 and "lead-" in other.stderr, other.describe()


def test_an_unknown_person_is_one_line_exit_2_and_nothing_is_written(cli: Cli) -> None:
    assert_usage_error(cli("tokens", "create", "--person", "nobody"), "nobody", "people file")
    assert_usage_error(
        cli("tokens", "create", "--person", "oncall", "--name", "bad name"), "token name"
    )
    assert not cli.db.exists()
    cli("tokens", "create", "--person", "oncall", "--name", "first")  # the store exists now
    assert_usage_error(cli("tokens", "create", "--person", "nobody"), "nobody")
    assert [t["name"] for t in json.loads(cli("tokens", "list", "--json").stdout)["tokens"]] == [
        "first"
    ]
    assert_usage_error(cli("tokens", "revoke", "nope"), "nope")


def test_a_token_with_no_people_file_says_there_is_none(cli: Cli) -> None:
    """Without a people file the refusal says there is none, not that the person is missing
    from a file that does not exist."""
    (cli.workspace / "people.yaml").unlink()
    result = cli("tokens", "create", "--person", "oncall")
    assert_usage_error(result, "there is no people file at")
    assert "no person of that name" not in result.stderr
    assert not cli.db.exists()


# -- HTTP ---------------------------------------------------------------------------------------


def test_an_approval_with_a_persons_token_is_that_persons(cli: Cli, serve: ServeProcess) -> None:
    secret = _create(cli, "oncall", "oncall-web")  # oncall is in group:approvers
    serve.start()
    with _client(serve) as anonymous, _client(serve, secret) as oncall:
        _waiting(anonymous, DISK, "disk")
        # api:oncall-web is in no runbook and not in the people file: only as oncall's
        # identity is it an approver of group:approvers.
        response = oncall.post("/runs/disk/approve")
        assert response.status_code == 200, response.text
        assert response.json()["message"] == "approved by api:oncall-web"
        run = poll_run(oncall, "disk")
        assert run["status"] == "succeeded", run
        assert "approved by api:oncall-web" in oncall.get("/runs/disk/explain").text


def test_four_eyes_refuses_the_requester_through_their_own_token(
    cli: Cli, serve: ServeProcess
) -> None:
    mine = _create(cli, "oncall", "oncall-web")
    lead = _create(cli, "lead", "lead-web")
    serve.start()
    with _client(serve, mine) as oncall, _client(serve, lead) as leads:
        _waiting(oncall, DEPLOY, "deploy")  # requested by api:oncall-web: oncall
        refused = oncall.post("/runs/deploy/approve")
        assert refused.status_code == 403, refused.text
        assert "four eyes" in refused.json()["error"]
        # From another front end, the same person is refused too: cli:oncall is oncall.
        by_cli = cli("approve", "deploy", "--as", "oncall")
        assert_usage_error(by_cli, "four eyes")
        assert oncall.get("/runs/deploy").json()["approval"]["status"] == "pending"
        decided = leads.post("/runs/deploy/approve")
        assert decided.status_code == 200, decided.text
        # The rollback needs two people: lead's approval is the first.
        assert decided.json()["approved_by"] == ["api:lead-web"]
        assert decided.json()["message"] == "recorded: 1 of 2 approvals, waiting for one more"
        # The run in the answer still waits for that request, as GET shows it.
        waiting = decided.json()["run"]
        assert waiting["status"] == "waiting_approval"
        assert waiting["approval"] == oncall.get("/runs/deploy").json()["approval"]
        assert waiting["approval"]["status"] == "pending"


def test_a_revoked_or_unknown_token_gets_401(cli: Cli, serve: ServeProcess) -> None:
    secret = _create(cli, "oncall", "oncall-web")
    serve.start()
    with _client(serve, secret) as oncall, _client(serve, "lo_" + "x" * 43) as unknown:
        assert oncall.get("/runs").status_code == 200
        assert unknown.get("/runs").status_code == 401
        revoked = cli("tokens", "revoke", "oncall-web")
        assert revoked.returncode == 0 and "revoked" in revoked.stdout, revoked.describe()
        for response in (oncall.get("/runs"), oncall.post("/runs", json={"message": DISK})):
            assert response.status_code == 401, response.text
            assert response.headers["www-authenticate"] == "Bearer"
        listed = json.loads(cli("tokens", "list", "--json").stdout)["tokens"]
        assert listed[0]["revoked_at"] is not None
        assert oncall.get("/healthz").status_code == 200


def test_the_service_token_starts_and_reads_but_decides_only_as_a_mapped_person(
    cli: Cli, tmp_path: Path
) -> None:
    server = ServeProcess(cli.workspace, cli.db, free_port(), LOOM_OPS_API_TOKEN="s3rvice")
    try:
        server.start()
        with _client(server, "s3rvice") as svc:
            _waiting(svc, DISK, "disk")
            assert svc.get("/runs/disk").json()["requested_by"] == "api:http"
            refused = svc.post("/runs/disk/approve")
            assert refused.status_code == 403, refused.text
            assert "service token" in refused.json()["error"]
        with _client(server) as nobody:
            assert nobody.get("/runs").status_code == 401
    finally:
        server.stop()
    # The people file maps the service's identity to a person: it decides as them.
    people = cli.workspace / "people.yaml"
    people.write_text(people.read_text() + "    api: http\n")  # the last person: lead
    server = ServeProcess(cli.workspace, cli.db, free_port(), LOOM_OPS_API_TOKEN="s3rvice")
    try:
        server.start()
        with _client(server, "s3rvice") as svc:
            # Started by the service, it is lead's own run: four eyes holds for it too.
            _waiting(svc, DEPLOY, "deploy")
            refused = svc.post("/runs/deploy/approve")
            assert refused.status_code == 403 and "four eyes" in refused.text, refused.text
            started = cli("runbook", DEPLOY, "--run-id", "by-cli", "--mock-llm")  # as tester
            assert started.returncode == 0, started.describe()
            # Recorded by the CLI, driven by the serving process to its approval.
            poll_run(svc, "by-cli", lambda r: r["approval"] is not None)
            decided = svc.post("/runs/by-cli/approve")  # lead is in group:leads
            assert decided.status_code == 200, decided.text
            assert decided.json()["approved_by"] == ["api:http"]  # one of the two it needs
    finally:
        server.stop()


def test_a_team_without_a_people_file_and_only_the_api_token_works_as_before(
    tmp_path: Path,
) -> None:
    workspace = make_cli_workspace(tmp_path / "ws")
    (workspace / "people.yaml").unlink()
    server = ServeProcess(
        workspace,
        tmp_path / "ops.sqlite",
        free_port(),
        LOOM_OPS_API_TOKEN="s3rvice",
        LOOM_OPS_APPROVERS="api:http",
    )
    try:
        server.start()
        with _client(server, "s3rvice") as svc, _client(server, "wrong") as wrong:
            assert wrong.get("/runs").status_code == 401
            _waiting(svc, DISK, "disk")
            decided = svc.post("/runs/disk/approve")
            assert decided.status_code == 200, decided.text
            assert decided.json()["message"] == "approved by api:http"
            assert poll_run(svc, "disk")["status"] == "succeeded"
    finally:
        server.stop()
