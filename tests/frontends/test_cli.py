"""The `loom-ops` CLI end to end: real processes of the console script over real SQLite files
(and PostgreSQL URLs, for what it prints about one).

Exit codes: 0 when a run succeeded or waits for a decision, 1 when it ended badly, 2 for bad
usage or input, which must leave one `loom-ops:` line on stderr and the database untouched.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import threading
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.errors import StoreError
from agent.frontends.cli import build_parser
from agent.store import RunStore
from tests.cli_helpers import (
    CLI_USER,
    LOOM_OPS,
    SHIPPED_RUNBOOKS,
    Cli,
    CliResult,
    assert_usage_error,
    cli_env,
    make_cli_workspace,
    snapshot,
)
from tests.conftest import postgres_dsn, postgres_schema

LATENCY = "incident: API latency spike"
LATENCY_STEPS = [
    step["id"]
    for step in yaml.safe_load((SHIPPED_RUNBOOKS / "api-latency-spike.yaml").read_text())["steps"]
]
SHIPPED_IDS = sorted(
    yaml.safe_load(path.read_text())["id"] for path in SHIPPED_RUNBOOKS.glob("*.yaml")
)

# A runbook whose only flaw is an unknown field on line 8.
BROKEN_RUNBOOK = """\
id: broken
title: Broken
description: A step with a field no runbook knows.
triggers: [broken]
steps:
  - id: first
    title: First step
    frobnicate: yes
"""


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    """A fresh workspace (the shipped runbooks) and a database file that does not exist yet."""
    return Cli(make_cli_workspace(tmp_path / "ws"), tmp_path / "ops.sqlite")


def _start_waiting(cli: Cli, run_id: str, *extra: str) -> CliResult:
    """Start the latency runbook; it must stop at its gated step and exit 0."""
    started = cli("runbook", LATENCY, "--run-id", run_id, "--mock-llm", *extra)
    assert started.returncode == 0, started.describe()
    return started


def _run_row(cli: Cli, run_id: str) -> dict[str, Any]:
    """The run as `runs --json` lists it."""
    listed = cli("runs", "--json")
    assert listed.returncode == 0, listed.describe()
    payload = listed.json()
    assert payload["status"] == "ok"
    rows = [r for r in payload["runs"] if r["run_id"] == run_id]
    assert len(rows) == 1, payload
    return rows[0]


# -- the happy path -----------------------------------------------------------------------------


def test_full_flow_runbook_approve_explain_list(cli: Cli) -> None:
    started = _start_waiting(cli, "inc-1")
    assert started.stderr == "", started.describe()
    assert "waiting for request #1" in started.stdout
    assert "scale-out" in started.stdout
    assert "who:      group:approvers" in started.stdout

    # As the README writes it: no --mock-llm here, the run remembers what drives it.
    approved = cli("approve", "--run-id", "inc-1", "--as", "oncall", "--note", "LGTM")
    assert approved.returncode == 0, approved.describe()
    assert approved.stderr == "", approved.describe()
    summary = approved.stdout
    assert "Run inc-1: SUCCEEDED" in summary
    assert "approved by cli:oncall" in summary
    assert "LGTM" in summary
    positions = [summary.find(f" {step} — ") for step in LATENCY_STEPS]
    assert -1 not in positions, summary
    assert positions == sorted(positions), "steps are listed in runbook order"

    explained = cli("explain", "--run-id", "inc-1")
    assert explained.returncode == 0, explained.describe()
    timeline = explained.stdout
    assert "status succeeded" in timeline
    for step in LATENCY_STEPS:
        assert f'{{"step_id": "{step}"}}' in timeline, f"step {step} missing from explain"
    assert "approved by cli:oncall" in timeline
    assert '"LGTM"' in timeline
    assert "finished succeeded" in timeline

    row = _run_row(cli, "inc-1")
    assert row["status"] == "succeeded"
    assert row["runbook_id"] == "api-latency-spike"
    assert row["requested_by"] == f"cli:{CLI_USER}"
    assert row["policy"] == "mock"
    assert "no LLM configured" not in timeline

    as_json = cli("explain", "--run-id", "inc-1", "--json")
    assert as_json.returncode == 0, as_json.describe()
    payload = as_json.json()
    assert (payload["run_id"], payload["status"]) == ("inc-1", "succeeded")
    decided = [e for e in payload["events"] if e["type"] == "approval_decided"]
    assert [e["data"]["decided_by"] for e in decided] == ["cli:oncall"]
    seqs = [e["seq"] for e in payload["events"]]
    assert seqs == sorted(seqs)

    # A second decision once the run is over changes nothing.
    before = snapshot(cli.db)
    again = cli("approve", "--run-id", "inc-1", "--as", "oncall", "--mock-llm")
    assert "already" in assert_usage_error(again, "inc-1")
    assert snapshot(cli.db) == before


def test_unauthorized_decider_is_refused_and_the_run_still_waits(cli: Cli) -> None:
    _start_waiting(cli, "inc-2")
    before = snapshot(cli.db)

    refused = cli("approve", "--run-id", "inc-2", "--mock-llm")  # as the OS user
    assert_usage_error(refused, f"cli:{CLI_USER}")
    assert snapshot(cli.db) == before
    assert _run_row(cli, "inc-2")["status"] == "waiting_approval"

    # The right person still can.
    approved = cli("approve", "--run-id", "inc-2", "--as", "oncall", "--mock-llm", "--json")
    assert approved.returncode == 0, approved.describe()
    payload = approved.json()
    assert (payload["run_id"], payload["status"]) == ("inc-2", "succeeded")
    assert payload["approval"] is None
    assert "approved by cli:oncall" in payload["message"]


def test_reject_ends_the_run_with_exit_1(cli: Cli) -> None:
    started = _start_waiting(cli, "inc-3", "--json")
    payload = started.json()
    assert (payload["run_id"], payload["status"]) == ("inc-3", "waiting_approval")
    assert payload["approval"]["step_id"] == "scale-out"
    assert payload["approval"]["deciders"] == ["group:approvers"]

    rejected = cli("reject", "--run-id", "inc-3", "--as", "oncall", "--note", "no", "--json")
    assert rejected.returncode == 1, rejected.describe()
    assert rejected.json()["status"] == "rejected"

    resumed = cli("resume", "--run-id", "inc-3", "--json")
    assert resumed.returncode == 1, resumed.describe()
    assert (resumed.json()["run_id"], resumed.json()["status"]) == ("inc-3", "rejected")


def test_cancel_a_waiting_run_then_cancel_again(cli: Cli) -> None:
    _start_waiting(cli, "inc-4")

    cancelled = cli("cancel", "--run-id", "inc-4", "--json")
    assert cancelled.returncode == 1, cancelled.describe()
    payload = cancelled.json()
    assert (payload["run_id"], payload["status"]) == ("inc-4", "cancelled")

    before = snapshot(cli.db)
    again = cli("cancel", "--run-id", "inc-4")
    assert_usage_error(again, "already cancelled")
    assert snapshot(cli.db) == before


# -- bad usage and input: exit 2, one line, the store unchanged --------------------------------


@pytest.fixture(scope="module")
def populated(tmp_path_factory: pytest.TempPathFactory) -> Cli:
    """A workspace and database shared by the bad-input cases: one run, waiting for approval."""
    root = tmp_path_factory.mktemp("bad-input")
    cli = Cli(make_cli_workspace(root / "ws"), root / "ops.sqlite")
    _start_waiting(cli, "inc-1")
    return cli


BAD_INPUT = [
    pytest.param(["resume", "--run-id", "nope"], "unknown run id", id="resume-unknown-run"),
    pytest.param(
        ["approve", "--run-id", "nope", "--as", "oncall"], "unknown run id", id="approve-unknown"
    ),
    pytest.param(
        ["reject", "--run-id", "nope", "--as", "oncall"], "unknown run id", id="reject-unknown"
    ),
    pytest.param(["cancel", "--run-id", "nope"], "unknown run id", id="cancel-unknown-run"),
    pytest.param(["explain", "--run-id", "nope"], "unknown run id", id="explain-unknown-run"),
    pytest.param(
        ["runbook", LATENCY, "--run-id", "inc-1", "--mock-llm"], "exists", id="duplicate-run-id"
    ),
    pytest.param(
        ["runbook", LATENCY, "--run-id", "bad id!", "--mock-llm"], "invalid run id", id="bad-id"
    ),
    pytest.param(
        ["runbook", LATENCY, "--run-id", "a" * 200, "--mock-llm"],
        "invalid run id",
        id="run-id-200-chars",
    ),
    pytest.param(
        ["runbook", "latency " + "x" * 4100, "--run-id", "big", "--mock-llm"],
        "4096 bytes",
        id="message-over-4kb",
    ),
    pytest.param(["runbook", "", "--run-id", "empty", "--mock-llm"], "empty", id="empty-message"),
    pytest.param(
        ["runbook", 'incident: latency "spike', "--run-id", "quote", "--mock-llm"],
        "quotation",
        id="unbalanced-quote",
    ),
    pytest.param(
        ["runbook", "hello world", "--run-id", "nomatch", "--mock-llm"],
        "no runbook matches",
        id="no-runbook-matches",
    ),
    pytest.param(
        ["runbook", "disk full host=x", "--run-id", "param", "--mock-llm"],
        "unknown param 'host'",
        id="unknown-param",
    ),
    pytest.param(
        ["runbook", "disk full mount=../etc", "--run-id", "pattern", "--mock-llm"],
        "does not match pattern",
        id="param-fails-pattern",
    ),
    pytest.param(
        ["runbook", "latency namespace=dev", "--run-id", "choices", "--mock-llm"],
        "not one of",
        id="param-fails-choices",
    ),
    pytest.param(
        ["explain", "inc-1", "--run-id", "inc-2"], "two run ids", id="two-different-run-ids"
    ),
    pytest.param(["explain"], "loom-ops explain RUN_ID", id="explain-without-run-id"),
    pytest.param(["audit", "verify"], "loom-ops audit verify RUN_ID", id="audit-without-run-id"),
    pytest.param(["status", "nope"], "unknown run id", id="status-unknown-run"),
    pytest.param(
        ["approve", "inc-1", "--role", "verifier", "--as", "oncall"],
        "no verifier run",
        id="approve-role-not-in-tree",
    ),
    pytest.param(
        ["runbook", "runbook=nope", "--run-id", "named", "--mock-llm"],
        "unknown runbook 'nope'",
        id="runbook-named-unknown",
    ),
    pytest.param(["frobnicate"], "invalid choice", id="unknown-subcommand"),
    pytest.param(["runbook", LATENCY, "--run-id", "nollm"], "--mock-llm", id="no-llm"),
    pytest.param(
        ["runbook", LATENCY, "--run-id", "steps", "--mock-llm", "--max-steps", "0"],
        "bad setting --max-steps",
        id="max-steps-0",
    ),
]


@pytest.mark.parametrize(("args", "needle"), BAD_INPUT)
def test_bad_input_exits_2_with_one_line_and_changes_nothing(
    populated: Cli, args: list[str], needle: str
) -> None:
    before = snapshot(populated.db)
    result = populated(*args, "--json")
    assert_usage_error(result, needle)
    assert snapshot(populated.db) == before


def test_database_path_that_is_a_directory(cli: Cli, tmp_path: Path) -> None:
    directory = tmp_path / "dbdir"
    directory.mkdir()
    result = cli("runs", db=directory)
    assert_usage_error(result, "cannot open database")
    assert list(directory.iterdir()) == []


def test_a_db_path_under_a_file_is_one_line(cli: Cli, tmp_path: Path) -> None:
    """A database path whose parent is a file: one usage line naming it, no traceback."""
    (tmp_path / "afile").write_text("")
    result = cli("runs", db=tmp_path / "afile" / "ops.sqlite")
    assert_usage_error(result, "ops.sqlite")


def test_database_path_that_is_not_sqlite(cli: Cli, tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    content = b"this is not a database\n" * 100
    junk.write_bytes(content)
    result = cli("runbook", LATENCY, "--run-id", "x", "--mock-llm", db=junk)
    assert_usage_error(result, "not a loom-ops database")
    assert junk.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.db", "ws"]


def test_database_newer_than_the_code(cli: Cli) -> None:
    async def create() -> None:
        store = await RunStore.open(cli.db)
        await store.close()

    asyncio.run(create())
    known = snapshot(cli.db)["user_version"]
    assert known >= 1
    conn = sqlite3.connect(cli.db)
    try:
        conn.execute(f"PRAGMA user_version = {known + 1}")
    finally:
        conn.close()
    before = snapshot(cli.db)

    result = cli("runs", "--json")
    line = assert_usage_error(result, "newer", f"schema version {known + 1}")
    assert "upgrade" in line
    assert snapshot(cli.db) == before


# -- runbooks list | validate ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def broken_workspace(tmp_path_factory: pytest.TempPathFactory) -> tuple[Cli, Path, CliResult]:
    """A workspace with the shipped runbooks plus one broken file, and the result of
    `runbooks validate <broken file>` (shared by the tests that judge it)."""
    root = tmp_path_factory.mktemp("broken")
    cli = Cli(make_cli_workspace(root / "ws"), root / "ops.sqlite")
    broken = cli.workspace / "runbooks" / "broken.yaml"
    broken.write_text(BROKEN_RUNBOOK)
    return cli, broken, cli("runbooks", "validate", str(broken))


def test_validate_malformed_file_names_file_line_and_field(
    broken_workspace: tuple[Cli, Path, CliResult],
) -> None:
    cli, broken, result = broken_workspace
    lines = result.stderr_lines()
    assert result.returncode == 2, result.describe()
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.describe()
    assert f"{broken}:8: steps[0].frobnicate" in lines[0]
    assert not cli.db.exists(), "validating runbooks does not touch the store"


def test_validate_malformed_file_error_line_has_the_loom_ops_prefix(
    broken_workspace: tuple[Cli, Path, CliResult],
) -> None:
    _, broken, result = broken_workspace
    assert_usage_error(result, f"{broken}:8: steps[0].frobnicate")


def test_validate_directory_with_one_bad_file_lists_the_good_ones(
    broken_workspace: tuple[Cli, Path, CliResult],
) -> None:
    cli, broken, _ = broken_workspace
    result = cli("runbooks", "validate")  # <workspace>/runbooks
    assert result.returncode == 2, result.describe()
    assert "Traceback" not in result.stderr
    assert sorted(line.split()[1] for line in result.stdout.splitlines()) == SHIPPED_IDS
    assert all(line.startswith("ok") for line in result.stdout.splitlines())
    assert len(result.stderr_lines()) == 1, result.describe()
    assert f"{broken}:8:" in result.stderr


def test_validate_shipped_runbooks(cli: Cli) -> None:
    result = cli("runbooks", "validate", str(SHIPPED_RUNBOOKS), "--json")
    assert result.returncode == 0, result.describe()
    payload = result.json()
    assert payload["status"] == "ok"
    assert payload["errors"] == []
    assert sorted(r["id"] for r in payload["runbooks"]) == SHIPPED_IDS


# -- odd input and settings: one line, never a traceback or a hang ---------------------------


def test_message_that_is_not_utf8_is_bad_input(populated: Cli) -> None:
    before = snapshot(populated.db)
    result = populated("runbook", "incident: latency \udcff", "--run-id", "utf8", "--mock-llm")
    assert_usage_error(result)
    assert snapshot(populated.db) == before


def test_top_level_usage_error_hint(cli: Cli) -> None:
    result = cli("frobnicate")
    line = assert_usage_error(result)
    assert line.endswith("(see loom-ops --help)"), line


def test_invalid_redact_pattern_is_a_usage_error(cli: Cli) -> None:
    try:
        result = cli("runs", env={"LOOM_OPS_REDACT_PATTERNS": "("}, timeout=3)
    except subprocess.TimeoutExpired:
        pytest.fail("loom-ops hung after failing to compile LOOM_OPS_REDACT_PATTERNS")
    assert_usage_error(result, "bad setting LOOM_OPS_REDACT_PATTERNS:", "invalid regex")


def test_a_bad_failpoint_setting_is_one_line(cli: Cli) -> None:
    """A malformed LOOM_OPS_FAILPOINT (the crash tests' hook) is a usage error, not a crash."""
    result = cli("runs", env={"LOOM_OPS_FAILPOINT": "bogus"})
    assert_usage_error(result, "failpoint")


def test_a_bad_postgres_url_is_one_line_without_the_password(tmp_path: Path) -> None:
    """`loom-ops runs` with a password whose `%` is not percent-encoding: one line, with the
    password hidden (the connection pool would log it on every attempt, then give up only
    after its 10 s timeout). The connect timeout is shortened to 1 s in the child to keep the
    test fast; nothing else is changed."""
    password = "Sup3r%zzSecret"
    env = cli_env(LOOM_OPS_DB=f"postgresql://loom:{password}@127.0.0.1:1/loom_ops")
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, agent.store.postgres as pg; pg.CONNECT_TIMEOUT = 1.0\n"
            "from agent.frontends.cli import main; sys.exit(main(['runs']))",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    lines = child.stderr.splitlines()
    assert child.returncode != 0 and lines, child.stderr
    assert password not in child.stderr, child.stderr
    assert len(lines) == 1, child.stderr


def test_a_database_that_does_not_answer_exits_1_and_one_that_refuses_the_login_2(
    tmp_path: Path,
) -> None:
    """Nothing listening is the machine failing (exit 1: try again); a server that answers
    that the database does not exist is a setting to fix (exit 2). One line each."""

    def runs_on(db: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [LOOM_OPS, "runs"],
            cwd=tmp_path,
            env=cli_env(LOOM_OPS_DB=db),
            capture_output=True,
            text=True,
            timeout=60,
        )

    nobody = runs_on("postgresql://postgres@127.0.0.1:1/loom_ops")
    assert nobody.returncode == 1, nobody.stderr
    assert nobody.stderr.splitlines() == [
        "loom-ops: cannot connect to database postgresql://postgres@127.0.0.1:1/loom_ops: "
        'connection failed: connection to server at "127.0.0.1", port 1 failed: '
        "Connection refused"
    ]
    server = postgres_dsn().rsplit("/", 1)[0]
    missing = runs_on(f"{server}/loom_ops_no_such_database")
    assert missing.returncode == 2, missing.stderr
    [line] = missing.stderr.splitlines()
    assert 'database "loom_ops_no_such_database" does not exist' in line


def test_a_password_in_the_url_query_is_not_printed(tmp_path: Path) -> None:
    """libpq takes `postgresql://host/db?password=…`; the database's label (what the
    healthcheck, a worker's start line and every 'cannot connect to database …' message print)
    must leave it out."""
    with postgres_schema() as url:
        child = subprocess.run(
            [LOOM_OPS, "healthcheck"],
            cwd=tmp_path,
            env=cli_env(LOOM_OPS_DB=f"{url}&password=hunter2-secret"),
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert child.returncode == 0, child.stderr
    assert "hunter2-secret" not in child.stdout + child.stderr, child.stdout


def test_an_unopenable_database_leaves_no_engine_thread(tmp_path: Path) -> None:
    """SQLite itself refuses the file (no file can be made in /proc): one StoreError, and the
    engine's thread ends with the attempt, quietly."""
    unopenable = Path("/proc/self/loom-ops.sqlite")
    errors: list[BaseException | None] = []
    workers: list[threading.Thread] = []
    previous = threading.excepthook
    threading.excepthook = lambda hook_args: errors.append(hook_args.exc_value)

    async def attempt() -> None:
        with pytest.raises(StoreError, match="cannot open database"):
            await RunStore.open(unopenable)
        workers.extend(t for t in threading.enumerate() if t.name.startswith("loom-ops-sqlite"))

    try:
        for _ in range(20):  # one asyncio.run per attempt, as in the CLI
            asyncio.run(attempt())
        for worker in workers:
            worker.join(timeout=5)
    finally:
        threading.excepthook = previous
    assert errors == []
    assert workers, "the attempts never reached SQLite"
    assert not any(worker.is_alive() for worker in workers)


# -- positional ids, --version, status, generated ids, runs per incident ---------------------

GENERATED_ID = re.compile(r"^inc-[0-9]{4}-[a-z2-9]{4}$")


def test_version_prints_the_installed_version(cli: Cli) -> None:
    result = cli("--version")
    assert result.returncode == 0, result.describe()
    assert result.stdout == f"loom-ops {metadata.version('loom-ops')}\n"
    assert not cli.db.exists()


def test_positional_run_id_answers_like_the_flag(cli: Cli, tmp_path: Path) -> None:
    _start_waiting(cli, "inc-p")
    for command in (["explain"], ["status"], ["audit", "verify"], ["audit", "export"]):
        flagged = cli(*command, "--run-id", "inc-p")
        positional = cli(*command, "inc-p")
        assert positional.returncode == flagged.returncode == 0, positional.describe()
        assert positional.stdout == flagged.stdout, command
    traced = cli("trace", "inc-p", "-o", str(tmp_path / "p.html"))
    assert traced.returncode == 0, traced.describe()
    assert "inc-p" in (tmp_path / "p.html").read_text()

    approved = cli("approve", "inc-p", "--as", "oncall", "--json")
    assert approved.returncode == 0, approved.describe()
    assert (approved.json()["run_id"], approved.json()["status"]) == ("inc-p", "succeeded")
    _start_waiting(cli, "inc-q")
    cancelled = cli("cancel", "inc-q", "--json")
    assert (cancelled.json()["run_id"], cancelled.json()["status"]) == ("inc-q", "cancelled")
    resumed = cli("resume", "inc-q", "--json")
    assert resumed.json()["status"] == "cancelled"


def test_generated_run_id_is_printed_first_and_works(cli: Cli) -> None:
    started = cli("runbook", LATENCY, "--mock-llm")
    assert started.returncode == 0, started.describe()
    first, second = started.stdout.splitlines()[:2]
    assert first.startswith("Run id: "), started.describe()
    run_id = first.removeprefix("Run id: ")
    assert GENERATED_ID.match(run_id), run_id
    assert second.startswith(f"Run {run_id} is waiting for request #1")

    status = cli("status", run_id, "--json")
    assert (status.json()["run_id"], status.json()["status"]) == (run_id, "waiting_approval")

    as_json = cli("supervise", LATENCY, "--mock-llm", "--json")
    other = as_json.json()["run_id"]  # one JSON object: no "Run id:" line before it
    assert GENERATED_ID.match(other) and other != run_id


def test_runs_shows_one_row_per_incident_and_all_adds_the_children(cli: Cli) -> None:
    assert cli("supervise", LATENCY, "--run-id", "tree", "--mock-llm").returncode == 0
    _start_waiting(cli, "single")

    incidents = cli("runs", "--json").json()["runs"]
    assert [r["run_id"] for r in incidents] == ["single", "tree"]
    tree = incidents[1]
    # The root waits for its children; the incident waits for a person, and says so.
    assert (tree["status"], tree["tree_status"]) == ("waiting_children", "waiting_approval")
    assert tree["tree_runbook_id"] == "api-latency-spike"

    table = cli("runs")
    assert table.returncode == 0, table.describe()
    rows = table.stdout.splitlines()[1:]
    assert [row.split()[:2] for row in rows] == [
        ["single", "waiting_approval"],
        ["tree", "waiting_approval"],
    ]
    waiting = cli("runs", "--status", "waiting_approval", "--json").json()["runs"]
    assert {r["run_id"] for r in waiting} == {"single", "tree"}
    assert cli("runs", "--status", "waiting_children", "--json").json()["runs"] == []

    everything = cli("runs", "--all", "--json").json()["runs"]
    assert {r["run_id"] for r in everything} == {
        "single",
        "tree",
        "tree:sub:planner",
        "tree:sub:executor",
        "tree:sub:verifier",
    }
    one = cli("runs", "--limit", "1", "--json").json()["runs"]
    assert [r["run_id"] for r in one] == ["single"]


def test_runs_all_aligns_its_columns_under_long_child_run_ids(cli: Cli) -> None:
    root = "incident-with-a-long-id"  # its children's ids are longer still
    assert cli("supervise", LATENCY, "--run-id", root, "--mock-llm").returncode == 0
    table = cli("runs", "--all")
    assert table.returncode == 0, table.describe()
    header, *rows = table.stdout.splitlines()
    assert len(rows) == 4 and any(len(row.split()[0]) > 24 for row in rows), rows
    for column in ("STATUS", "STARTED (UTC)", "RUNBOOK", "REQUEST"):
        at = header.index(column)
        for row in rows:  # each value starts where its heading does, after a space
            assert row[at - 1] == " " and row[at] != " ", (column, header, row)


def test_status_lists_children_and_a_decide_command_that_works_when_pasted(cli: Cli) -> None:
    assert cli("supervise", LATENCY, "--run-id", "st", "--mock-llm").returncode == 0
    status = cli("status", "st")
    assert status.returncode == 0, status.describe()
    text = status.stdout
    assert text.startswith("Run st: waiting_children\n"), text
    for child in ("st:sub:planner", "st:sub:executor", "st:sub:verifier"):
        assert sum(line.split()[0] == child for line in text.splitlines() if line.strip()) == 1
    decide = next(line for line in text.splitlines() if line.startswith("Decide with: "))
    command = decide.removeprefix("Decide with: ").split("   (or:")[0]
    argv = shlex.split(command)
    assert argv[:2] == ["loom-ops", "approve"], command

    # Pasted exactly as printed, in the workspace: the command names the store itself.
    assert "--db" in argv, command
    pasted = subprocess.run(
        [LOOM_OPS, *argv[1:]], cwd=cli.workspace, env=cli_env(), capture_output=True, text=True
    )
    assert pasted.returncode == 0, (pasted.stdout, pasted.stderr)
    done = cli("status", "st", "--json").json()
    assert done["status"] == "succeeded"
    assert done["approval"] is None
    assert {c["run_id"]: c["status"] for c in done["children"]} == {
        "st:sub:planner": "succeeded",
        "st:sub:executor": "succeeded",
        "st:sub:verifier": "succeeded",
    }


def test_a_printed_command_never_shows_the_database_password(cli: Cli) -> None:
    """The store's URL carries a password: a command `status` prints for pasting names the
    store with `***` in its place, and names none where LOOM_OPS_DB names it already."""
    with postgres_schema() as url:
        secret_url = url.replace("://postgres@", "://postgres:s3cret-pw@", 1)
        assert secret_url != url, url  # the server trusts 127.0.0.1: the password is ignored
        started = cli("runbook", LATENCY, "--run-id", "pw", "--mock-llm", db=secret_url)
        assert started.returncode == 0, started.describe()
        flagged = cli("status", "pw", db=secret_url)
        in_env = cli("status", "pw", db=secret_url, env={"LOOM_OPS_DB": secret_url})
    for result in (started, flagged, in_env):
        assert "s3cret-pw" not in result.stdout + result.stderr, result.describe()
    decide = next(line for line in flagged.stdout.splitlines() if line.startswith("Decide with"))
    assert "--db 'postgresql://postgres:***@" in decide, decide
    decide = next(line for line in in_env.stdout.splitlines() if line.startswith("Decide with"))
    assert "--db" not in decide, decide


def test_status_without_a_run_id_writes_nothing(cli: Cli) -> None:
    result = cli("status")
    assert result.returncode == 0, result.describe()
    assert "No process serves this store" in result.stdout
    assert not cli.db.exists()


def test_approve_role_decides_in_the_child_of_that_role(cli: Cli) -> None:
    assert cli("supervise", LATENCY, "--run-id", "ro", "--mock-llm").returncode == 0
    approved = cli("approve", "--run-id", "ro", "--role", "executor", "--as", "oncall", "--json")
    assert approved.returncode == 0, approved.describe()
    payload = approved.json()
    assert payload["run_id"] == "ro:sub:executor"
    assert payload["status"] == "succeeded"


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(name, id=name)
        for name in sorted(
            build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
        )
    ],
)
def test_every_command_accepts_mock_llm(command: str) -> None:
    # Parsing only: serve, telegram, worker and sandbox would run until interrupted.
    needs = {
        "audit": ["verify", "x"],
        "runbooks": ["list"],
        "runbook": ["m"],
        "supervise": ["m"],
        "tokens": ["list"],
    }
    args = build_parser().parse_args([command, *needs.get(command, []), "--mock-llm"])
    assert args.mock_llm is True


# -- nothing written on a usage error ---------------------------------------------------------

NO_STORE_YET = [
    pytest.param(["runbook", LATENCY, "--run-id", "bad id!", "--mock-llm"], id="bad-run-id"),
    pytest.param(["runbook", "hello world", "--mock-llm"], id="no-runbook-matches"),
    pytest.param(["runbook", "disk full host=x", "--mock-llm"], id="unknown-param"),
    pytest.param(["runbook", LATENCY], id="no-llm"),
    pytest.param(["supervise", "", "--mock-llm"], id="empty-message"),
    pytest.param(["explain", "inc-1"], id="explain-unknown"),
    pytest.param(["approve", "inc-1", "--as", "oncall"], id="approve-unknown"),
    pytest.param(["status", "inc-1"], id="status-unknown"),
    pytest.param(["audit", "verify"], id="audit-without-id"),
    pytest.param(["frobnicate"], id="unknown-command"),
]


@pytest.mark.parametrize("args", NO_STORE_YET)
def test_usage_error_before_any_run_creates_no_database(cli: Cli, args: list[str]) -> None:
    assert_usage_error(cli(*args))
    assert not cli.db.exists()
    assert sorted(p.name for p in cli.workspace.iterdir()) == ["people.yaml", "runbooks"]


def test_read_commands_before_any_run_answer_without_creating_the_database(cli: Cli) -> None:
    listed = cli("runs", "--mock-llm")
    assert (listed.returncode, listed.stdout) == (0, "no runs\n"), listed.describe()
    assert cli("runs", "--json").json()["runs"] == []
    resumed = cli("resume")
    assert (resumed.returncode, resumed.stdout) == (0, "resumed 0 run(s)\n"), resumed.describe()
    assert not cli.db.exists()


def test_healthcheck_calls_a_store_not_created_yet_unhealthy_and_creates_none(cli: Cli) -> None:
    probe = cli("healthcheck")
    assert probe.returncode == 1, probe.describe()
    assert probe.stderr_lines() == [
        f"loom-ops: unhealthy: no database at {cli.db} yet (a process that records runs creates it)"
    ], probe.describe()
    assert not cli.db.exists()
    _start_waiting(cli, "inc-1")
    probe = cli("healthcheck")
    assert (probe.returncode, probe.stderr) == (0, ""), probe.describe()
    assert probe.stdout.startswith(f"ok: {cli.db} at schema "), probe.describe()


def test_healthcheck_with_a_url_says_it_asked_it_too(cli: Cli) -> None:
    """`healthcheck --url` (a container's probe of `serve`): ok names the URL it asked, and
    an answer other than 200 is unhealthy."""

    class Healthz(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/healthz" else 503)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    _start_waiting(cli, "inc-1")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Healthz)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        healthy = cli("healthcheck", "--url", f"{base}/healthz")
        unhealthy = cli("healthcheck", "--url", f"{base}/down")
    finally:
        server.shutdown()
        server.server_close()
    assert healthy.returncode == 0, healthy.describe()
    assert re.fullmatch(
        rf"ok: {re.escape(str(cli.db))} at schema \d+; {base}/healthz answered 200\n",
        healthy.stdout,
    ), healthy.describe()
    assert unhealthy.returncode == 1, unhealthy.describe()
    assert unhealthy.stderr_lines() == [f"loom-ops: unhealthy: {base}/down answered 503"]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("mysql://db.internal/ops", "mysql://db.internal/ops"),
        ("Redis://127.0.0.1:6379", "Redis://127.0.0.1:6379"),
        ("postgresql+psycopg://loom:S3cret@db/ops", "postgresql+psycopg://loom:***@db/ops"),
    ],
)
def test_a_database_url_of_another_engine_is_refused_not_taken_for_a_path(
    cli: Cli, url: str, shown: str
) -> None:
    # Taken for a path, it made a directory `mysql:` with a fresh SQLite store in it.
    scheme = url.split("://")[0]
    runs = cli("runs", db=url)
    assert "Traceback" not in runs.stderr and runs.returncode == 2, runs.describe()
    assert runs.stderr_lines() == [
        f"loom-ops: {shown}: loom-ops stores runs in SQLite (a path, or sqlite:///path) or "
        f"PostgreSQL (postgresql://…), not {scheme}://"
    ], runs.describe()
    assert cli("healthcheck", db=url).returncode == 1
    assert not (cli.workspace / f"{scheme}:").exists()
    assert sorted(p.name for p in cli.workspace.iterdir()) == ["people.yaml", "runbooks"]


# -- a live run never starts from a guess ------------------------------------------------------

LIVE = {"LOOM_OPS_ALLOW_SHELL": "1"}
MCP_LIVE = {"LOOM_OPS_ALLOW_MCP": "1"}


def test_live_run_from_a_fuzzy_match_is_refused_naming_runbook_params_and_yes(
    cli: Cli,
) -> None:
    refused = cli("runbook", "deploy check", "--run-id", "rb-shell", "--mock-llm", env=LIVE)
    line = assert_usage_error(refused, "failed-deploy-rollback", "--yes")
    assert "service=checkout-api" in line and "namespace=production" in line, line
    assert "LOOM_OPS_ALLOW_SHELL=1" in line
    assert not cli.db.exists()

    # The named form it offers, the live setting included (pasted without it, the run would
    # be a dry run), is accepted as it stands: here it fails at the allowlist, as a live run
    # does (the test workspace has none, which is what makes it safe to start).
    offered = shlex.split(line.split("to run exactly that: ")[1].removesuffix(" (or add --yes)"))
    assert offered[:3] == ["LOOM_OPS_ALLOW_SHELL=1", "loom-ops", "runbook"], offered
    setting, value = offered[0].split("=")
    named = cli(*offered[2:], env={setting: value})
    assert named.returncode == 1, named.describe()
    assert "command denied" in named.stderr
    assert _run_row(cli, "rb-shell")["runbook_id"] == "failed-deploy-rollback"


@pytest.mark.parametrize(
    ("message", "env"),
    [
        pytest.param("deploy check", {"LOOM_OPS_ALLOW_MCP": "1"}, id="allow-mcp"),
        pytest.param("incident: API latency spike", LIVE, id="supervise-too"),
    ],
)
def test_live_guess_is_refused_with_mcp_and_for_supervise(
    cli: Cli, message: str, env: dict[str, str]
) -> None:
    command = "supervise" if "latency" in message else "runbook"
    assert_usage_error(cli(command, message, "--mock-llm", env=env), "--yes")
    assert not cli.db.exists()


@pytest.mark.parametrize(
    ("message", "extra"),
    [
        pytest.param("deploy check", ["--yes"], id="confirmed-with-yes"),
        pytest.param("failed-deploy-rollback namespace=staging", [], id="id-as-first-word"),
        pytest.param("runbook=failed-deploy-rollback namespace=staging", [], id="runbook-key"),
    ],
)
def test_live_run_starts_from_an_exact_id_or_yes(cli: Cli, message: str, extra: list[str]) -> None:
    started = cli("runbook", message, "--run-id", "go", "--mock-llm", *extra, env=LIVE)
    assert "Traceback" not in started.stderr, started.describe()
    assert started.returncode == 1, started.describe()  # started: denied at its first command
    assert _run_row(cli, "go")["runbook_id"] == "failed-deploy-rollback"


def test_dry_run_from_a_fuzzy_match_starts_as_before(cli: Cli) -> None:
    started = cli("runbook", "deploy check", "--run-id", "dry", "--mock-llm")
    assert started.returncode == 0, started.describe()
    assert _run_row(cli, "dry")["runbook_id"] == "failed-deploy-rollback"


# -- the seed page's commands, as written ---------------------------------------------------


def _seed(workspace: Path, *argv: str, env: dict[str, str] | None = None) -> CliResult:
    """Run a command exactly as the seed page writes it (its own --db/--workspace), in the
    workspace directory."""
    done = subprocess.run(
        [LOOM_OPS, *argv],
        cwd=workspace,
        env=cli_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=60,
    )
    return CliResult(tuple(argv), done.returncode, done.stdout, done.stderr)


def test_seed_page_commands_work_as_written(cli: Cli) -> None:
    ws = cli.workspace
    common = ["--db", "ops.sqlite", "--workspace", "."]
    supervised = _seed(ws, "supervise", LATENCY, "--run-id", "inc-001", "--mock-llm", *common)
    assert supervised.returncode == 0, supervised.describe()
    explained = _seed(ws, "explain", "--run-id", "inc-001:sub:verifier", *common)
    assert explained.returncode == 0, explained.describe()
    assert "role verifier" in explained.stdout
    walked = _seed(ws, "runbook", LATENCY, "--run-id", "rb-001", "--mock-llm", *common)
    assert walked.returncode == 0, walked.describe()

    # `approve ... --role executor`: the executor below the named run. The seed's `exec-1`
    # is a run of its own tests; here the run is inc-001, decided by its runbook's approver.
    approver = {"LOOM_OPS_USER": "oncall"}
    approved = _seed(
        ws,
        *["approve", "--run-id", "inc-001", "--note", "LGTM", "--role", "executor"],
        *["--mock-llm", *common],
        env=approver,
    )
    assert approved.returncode == 0, approved.describe()
    assert "approved by cli:oncall" in approved.stdout
    unknown = _seed(ws, "approve", "--run-id", "exec-1", "--role", "executor", *common)
    assert_usage_error(unknown, "unknown run id 'exec-1'")

    before = snapshot(ws / "ops.sqlite")
    shell = _seed(ws, "runbook", "deploy check", "--run-id", "rb-shell", "--mock-llm", *common,
                  env=LIVE)  # fmt: skip
    assert_usage_error(shell, "failed-deploy-rollback", "--yes")
    assert snapshot(ws / "ops.sqlite") == before

    listed = _seed(ws, "runs", "--mock-llm", *common)
    assert listed.returncode == 0, listed.describe()
    assert [row.split()[0] for row in listed.stdout.splitlines()[1:]] == ["rb-001", "inc-001"]


# -- runbooks validate: every error of every file, and the allowlist -------------------------

THREE_TYPOS = """\
id: {id}
title: Three typos
triggers: [typo]
steps:
  - id: one
    titel: First
    note: first
  - id: two
    title: Second
    note: "{{{{ nope }}}}"
  - id: three
    title: Third
    check: {{url: "http://127.0.0.1/", expect_status: "200"}}
"""


def test_validate_reports_every_error_of_every_file_in_one_pass(cli: Cli) -> None:
    for name in ("typos-a", "typos-b"):
        (cli.workspace / "runbooks" / f"{name}.yaml").write_text(THREE_TYPOS.format(id=name))
    result = cli("runbooks", "validate")
    assert result.returncode == 2, result.describe()
    lines = result.stderr_lines()
    for name in ("typos-a", "typos-b"):
        path = cli.workspace / "runbooks" / f"{name}.yaml"
        assert [line.split(": ", 2)[1] for line in lines if str(path) in line] == [
            f"{path}:5",  # the step without a title...
            f"{path}:6",  # ...because of the typo in it
            f"{path}:10",
            f"{path}:13",
        ], lines
    assert all(line.startswith("loom-ops: ") for line in lines)
    assert sorted(line.split()[1] for line in result.stdout.splitlines()) == SHIPPED_IDS


ALLOWLIST = {"rules": [{"argv": ["df", "-h", "*"]}]}
GAPPY = """\
id: gappy
title: Commands the allowlist does not cover
triggers: [gappy]
params:
  mount: {default: /var}
steps:
  - id: usage
    title: Usage
    run: df -h {{ mount }}
  - id: wipe
    title: Wipe
    run: rm -rf {{ mount }}
    rollback: {run: "df -i {{ mount }}"}
"""


@pytest.fixture
def gappy(cli: Cli) -> Cli:
    """A workspace whose one runbook has three commands, of which the allowlist admits one."""
    shutil.rmtree(cli.workspace / "runbooks")
    (cli.workspace / "runbooks").mkdir()
    (cli.workspace / "runbooks" / "gappy.yaml").write_text(GAPPY)
    (cli.workspace / "ops.shell.allowlist.json").write_text(json.dumps(ALLOWLIST))
    return cli


def test_validate_warns_of_allowlist_gaps_while_commands_are_dry_run(gappy: Cli) -> None:
    result = gappy("runbooks", "validate")
    assert result.returncode == 0, result.describe()
    assert result.stdout == "ok       gappy (2 warning(s))\n"
    path = gappy.workspace / "runbooks" / "gappy.yaml"
    assert result.stderr_lines() == [
        f"loom-ops: warning: {path}:12: steps[1].run: step 'wipe': no rule of "
        f"{gappy.workspace / 'ops.shell.allowlist.json'} admits "
        '["rm", "-rf", "/var"] (rendered with mount=/var)',
        f"loom-ops: warning: {path}:13: steps[1].rollback.run: step 'wipe' rollback: no rule "
        f"of {gappy.workspace / 'ops.shell.allowlist.json'} admits "
        '["df", "-i", "/var"] (rendered with mount=/var)',
    ]
    payload = gappy("runbooks", "validate", "--json").json()
    assert (payload["status"], payload["errors"], len(payload["warnings"])) == ("ok", [], 2)


def test_validate_refuses_allowlist_gaps_when_live_shell_is_on(gappy: Cli) -> None:
    result = gappy("runbooks", "validate", env=LIVE)
    assert result.returncode == 2, result.describe()
    assert result.stdout == ""
    lines = result.stderr_lines()
    assert len(lines) == 2 and all("no rule of" in line for line in lines), lines
    assert not any("warning" in line for line in lines)
    (gappy.workspace / "ops.shell.allowlist.json").unlink()
    missing = gappy("runbooks", "validate", env=LIVE)
    assert missing.returncode == 2
    assert "no allowlist at" in missing.stderr_lines()[0]


MCP_TEST_SERVER = Path(__file__).resolve().parents[1] / "mcp_servers" / "ops_server.py"
REFUSING = """\
id: refusing
title: Calls a tool that refuses
triggers: [refusing]
steps:
  - id: ask
    title: Ask the tool
    mcp: {tool: ops.refuse, arguments: {reason: disk full}}
"""


def test_a_failed_mcp_tools_error_is_listed_once(cli: Cli) -> None:
    (cli.workspace / "runbooks" / "refusing.yaml").write_text(REFUSING)
    server = {"command": sys.executable, "args": [str(MCP_TEST_SERVER)]}
    (cli.workspace / "ops.mcp.json").write_text(json.dumps({"mcpServers": {"ops": server}}))
    result = cli("runbook", "refusing", "--run-id", "mcp-1", "--mock-llm", env=MCP_LIVE)
    assert result.returncode == 1, result.describe()
    errors = result.stdout.split("\nErrors:\n")[1].split("\n\n")[0].splitlines()
    assert len(errors) == 1 and errors[0].startswith("  - execute_step ask: MCP server ops"), errors
    assert errors[0].endswith(": Error executing tool refuse"), errors  # the server's words


def test_a_token_made_without_a_name_is_named_as_its_help_says(cli: Cli) -> None:
    helped = subprocess.run(
        [LOOM_OPS, "tokens", "create", "--help"], capture_output=True, text=True, check=True
    )
    assert "the person's name, a hyphen and 6 random hex digits" in " ".join(helped.stdout.split())
    made = cli("tokens", "create", "--person", "sam", "--json")
    assert made.returncode == 0, made.describe()
    assert re.fullmatch(r"sam-[0-9a-f]{6}", made.json()["token"]["name"]), made.stdout


def _doctor_says(cli: Cli, check: str, env: dict[str, str] | None = None) -> list[str]:
    payload = cli("doctor", "--json", "--mock-llm", env=env).json()
    return [f["message"] for f in payload["findings"] if f["check"] == check]


def test_validate_names_a_missing_or_unreadable_allowlist_in_doctors_words(gappy: Cli) -> None:
    allowlist = gappy.workspace / "ops.shell.allowlist.json"
    allowlist.unlink()
    [missing] = _doctor_says(gappy, "allowlist", env=LIVE)
    live = gappy("runbooks", "validate", env=LIVE)
    assert live.returncode == 2 and live.stderr_lines() == [f"loom-ops: {missing}"], live.describe()
    dry = gappy("runbooks", "validate")  # dry-run needs no allowlist: nothing to say
    assert (dry.returncode, dry.stderr) == (0, ""), dry.describe()

    allowlist.write_text("{not json")
    [unreadable] = _doctor_says(gappy, "allowlist")
    dry = gappy("runbooks", "validate")
    assert dry.returncode == 0 and dry.stderr_lines() == [f"loom-ops: warning: {unreadable}"]
    live = gappy("runbooks", "validate", env=LIVE)
    assert live.returncode == 2 and live.stderr_lines() == [f"loom-ops: {unreadable}"]


def test_a_bad_setting_is_named_by_its_environment_variable(cli: Cli) -> None:
    """What a person set is what the error names: LOOM_OPS_MAX_STEPS, not `max_steps`."""
    result = cli("runs", env={"LOOM_OPS_MAX_STEPS": "0"})
    assert_usage_error(result, "bad setting LOOM_OPS_MAX_STEPS:")


def test_an_env_file_that_is_no_text_is_one_line(cli: Cli) -> None:
    (cli.workspace / ".env").write_bytes(b"LOOM_OPS_DB=\xff\xfe\n")
    result = cli("runs")
    assert_usage_error(result, "bad settings: cannot read .env:", "can't decode")


def test_an_approver_setting_naming_nobody_is_refused(cli: Cli) -> None:
    """`LOOM_OPS_APPROVERS=cli:$USER` with $USER unset is `cli:`: one line, not a silent
    narrowing to nobody."""
    result = cli("runs", env={"LOOM_OPS_APPROVERS": "cli:"})
    assert_usage_error(result, "bad setting LOOM_OPS_APPROVERS:", "'cli:' must be an identity")
