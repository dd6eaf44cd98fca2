"""The CLI as an operator meets it: exit codes, one-line errors, and a store left unchanged."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.request import RequestError, parse_request

TABLES = ("runs", "events", "tool_calls", "llm_calls", "approvals", "outbox")


def loom_ops(workspace: Path, db: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the real console entry point against this workspace and database."""
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args, "--db", str(db), "--workspace", str(workspace)],
        cwd=workspace,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).parent.parent)},
    )


def snapshot(db: Path) -> dict[str, list[tuple[object, ...]]]:
    """Every row of every table, to prove a refused command changed nothing."""
    with sqlite3.connect(db) as conn:
        return {t: conn.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in TABLES}


@pytest.fixture
def waiting_db(workspace: Path, tmp_path: Path) -> Path:
    """A database holding one run that waits for approval."""
    db = tmp_path / "cli.sqlite"
    done = loom_ops(
        workspace,
        db,
        "runbook",
        "incident: API latency spike",
        "--run-id",
        "w1",
        "--mock-llm",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] == "waiting_approval"
    return db


BAD_INPUT = [
    ("unknown run", ["resume", "--run-id", "nope"], "unknown run id"),
    ("approve unknown", ["approve", "--run-id", "nope", "--mock-llm"], "unknown run id"),
    ("explain unknown", ["explain", "--run-id", "nope"], "unknown run id"),
    ("duplicate id", ["runbook", "disk full", "--run-id", "w1", "--mock-llm"], "exists already"),
    ("bad id", ["runbook", "disk full", "--run-id", "bad id!", "--mock-llm"], "invalid run id"),
    ("oversized", ["runbook", "x" * 5000, "--run-id", "big", "--mock-llm"], "longer than 4096"),
    ("no match", ["runbook", "coffee machine", "--run-id", "c", "--mock-llm"], "no runbook"),
    ("bad param", ["runbook", "disk full mount=../etc", "--run-id", "p", "--mock-llm"], "mount"),
    ("unknown param", ["runbook", "disk full host=a", "--run-id", "p", "--mock-llm"], "host"),
    ("quote", ["runbook", 'disk "full', "--run-id", "q", "--mock-llm"], "quotation"),
    ("no policy", ["runbook", "disk full", "--run-id", "n"], "--mock-llm"),
    (
        "zero steps",
        ["runbook", "disk full", "--run-id", "z", "--mock-llm", "--max-steps", "0"],
        "max_steps",
    ),
    ("intruder", ["approve", "--run-id", "w1", "--as", "intruder", "--mock-llm"], "may not decide"),
    ("no run id", ["approve", "--mock-llm"], "--run-id"),
]


@pytest.mark.parametrize(("case", "args", "message"), BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(
    workspace: Path, waiting_db: Path, case: str, args: list[str], message: str
) -> None:
    before = snapshot(waiting_db)
    done = loom_ops(workspace, waiting_db, *args)
    assert done.returncode == 2, (case, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loom-ops:"), done.stderr
    assert message in lines[0]
    assert snapshot(waiting_db) == before


def test_the_operator_flow_and_exit_codes(workspace: Path, waiting_db: Path) -> None:
    approved = loom_ops(
        workspace,
        waiting_db,
        "approve",
        "--run-id",
        "w1",
        "--as",
        "oncall",
        "--note",
        "LGTM",
        "--mock-llm",
    )
    assert approved.returncode == 0, approved.stderr
    assert "SUCCEEDED" in approved.stdout and "approved by cli:oncall" in approved.stdout
    twice = loom_ops(
        workspace, waiting_db, "approve", "--run-id", "w1", "--as", "oncall", "--mock-llm"
    )
    assert twice.returncode == 2 and "already succeeded" in twice.stderr

    assert (
        loom_ops(
            workspace, waiting_db, "runbook", "disk full", "--run-id", "r1", "--mock-llm"
        ).returncode
        == 0
    )
    rejected = loom_ops(
        workspace, waiting_db, "reject", "--run-id", "r1", "--as", "oncall", "--mock-llm", "--json"
    )
    assert rejected.returncode == 1 and json.loads(rejected.stdout)["status"] == "rejected"

    assert (
        loom_ops(
            workspace, waiting_db, "runbook", "disk full", "--run-id", "c1", "--mock-llm"
        ).returncode
        == 0
    )
    cancelled = loom_ops(workspace, waiting_db, "cancel", "--run-id", "c1", "--json")
    assert cancelled.returncode == 1 and json.loads(cancelled.stdout)["status"] == "cancelled"
    assert loom_ops(workspace, waiting_db, "cancel", "--run-id", "c1").returncode == 2

    listed = json.loads(loom_ops(workspace, waiting_db, "runs", "--json").stdout)
    assert {r["run_id"]: r["status"] for r in listed["runs"]} == {
        "w1": "succeeded",
        "r1": "rejected",
        "c1": "cancelled",
    }
    explained = loom_ops(workspace, waiting_db, "explain", "--run-id", "w1")
    assert "approval #1 approved by cli:oncall" in explained.stdout
    for step in ("pods", "top", "logs", "scale-out", "rollout-wait", "verify", "handoff"):
        assert f'"step_id": "{step}"' in explained.stdout


def test_runbook_validation_names_file_line_and_field(workspace: Path, tmp_path: Path) -> None:
    bad = workspace / "runbooks" / "broken.yaml"
    bad.write_text(
        "id: broken\ntitle: Broken\nsteps:\n  - id: a\n    title: A\n    aproval: x\n    note: hi\n"
    )
    done = loom_ops(workspace, tmp_path / "v.sqlite", "runbooks", "validate", str(bad))
    assert done.returncode == 2
    assert "broken.yaml:6: steps[0].aproval" in done.stderr
    whole = loom_ops(workspace, tmp_path / "v.sqlite", "runbooks", "validate")
    assert whole.returncode == 2 and "ok       api-latency-spike" in whole.stdout


def test_a_newer_schema_or_a_foreign_file_is_refused(workspace: Path, tmp_path: Path) -> None:
    newer = tmp_path / "newer.sqlite"
    with sqlite3.connect(newer) as conn:
        conn.execute("PRAGMA user_version = 999")
    done = loom_ops(workspace, newer, "runs")
    assert done.returncode == 2 and "newer than" in done.stderr
    foreign = tmp_path / "foreign.sqlite"
    foreign.write_bytes(b"this is not a database" * 100)
    done = loom_ops(workspace, foreign, "runs")
    assert done.returncode == 2 and "not a loom-ops database" in done.stderr
    assert "Traceback" not in done.stderr


@given(st.text(max_size=300))
def test_parse_request_never_fails_unexpectedly(text: str) -> None:
    try:
        parsed = parse_request(text)
    except RequestError:
        return
    assert all(k.isidentifier() for k in parsed.params)


@given(
    st.dictionaries(
        st.from_regex(r"[a-z_][a-z0-9_]{0,31}", fullmatch=True),
        st.from_regex(r"[A-Za-z0-9._/:-]{0,40}", fullmatch=True),
        max_size=8,
    )
)
def test_key_value_words_round_trip(params: dict[str, str]) -> None:
    words = ["incident:", "latency", *(f"{k}={v}" for k, v in params.items())]
    parsed = parse_request(" ".join(words))
    assert parsed.params == params
    assert parsed.text == "incident: latency"
