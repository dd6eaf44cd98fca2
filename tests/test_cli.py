"""The `loom-ops` CLI end to end: real processes of the console script over real SQLite files.

Exit codes: 0 when a run succeeded or waits for a decision, 1 when it ended badly, 2 for bad
usage or input, which must leave one `loom-ops:` line on stderr and the database untouched.
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.store import RunStore, StoreError
from tests.cli_helpers import (
    CLI_USER,
    SHIPPED_RUNBOOKS,
    Cli,
    CliResult,
    assert_usage_error,
    make_cli_workspace,
    snapshot,
)

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
    assert "waiting for approval" in started.stdout
    assert "scale-out" in started.stdout
    assert "cli:oncall" in started.stdout

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
    assert payload["approval"]["deciders"] == ["cli:oncall", "telegram:100000001"]

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
    pytest.param(["runbook", LATENCY, "--mock-llm"], "--run-id", id="missing-run-id"),
    pytest.param(["frobnicate"], "invalid choice", id="unknown-subcommand"),
    pytest.param(["runbook", LATENCY, "--run-id", "nollm"], "--mock-llm", id="no-llm"),
    pytest.param(
        ["runbook", LATENCY, "--run-id", "steps", "--mock-llm", "--max-steps", "0"],
        "max_steps",
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
    # Only the exit code and the message: the whole one-line contract is held back by the
    # aiosqlite worker-thread race, see test_unopenable_database_leaves_no_worker_thread.
    assert result.returncode == 2, result.describe()
    assert "loom-ops: cannot open database" in result.stderr, result.describe()
    assert list(directory.iterdir()) == []


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


# -- agent/ bugs, documented ------------------------------------------------------------------


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
    assert_usage_error(result, "redact")


def test_unopenable_database_leaves_no_worker_thread(tmp_path: Path) -> None:
    directory = tmp_path / "dbdir"
    directory.mkdir()
    errors: list[BaseException | None] = []
    workers: list[threading.Thread] = []
    previous = threading.excepthook
    threading.excepthook = lambda hook_args: errors.append(hook_args.exc_value)

    async def attempt() -> None:
        with pytest.raises(StoreError, match="cannot open database"):
            await RunStore.open(directory)
        workers.extend(t for t in threading.enumerate() if "_connection_worker_thread" in t.name)

    try:
        # One asyncio.run per attempt, as in the CLI; 2-90 % of attempts lose the race here.
        for _ in range(300):
            asyncio.run(attempt())
        for worker in workers:
            worker.join(timeout=5)
    finally:
        threading.excepthook = previous
    assert errors == []
