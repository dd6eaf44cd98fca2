"""The audit trail through the CLI: `audit verify` on intact, tampered and corrupted journals,
and `audit export`."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from pathlib import Path

import pytest

from tests.cli_helpers import Cli, make_cli_workspace

LATENCY = "incident: API latency spike"


@pytest.fixture
def finished(tmp_path: Path) -> Cli:
    """A database with one run that was approved and succeeded."""
    cli = Cli(make_cli_workspace(tmp_path / "ws"), tmp_path / "ops.sqlite")
    assert cli("runbook", LATENCY, "--run-id", "a1", "--mock-llm").returncode == 0
    done = cli("approve", "--run-id", "a1", "--as", "oncall", "--mock-llm")
    assert done.returncode == 0, done.describe()
    return cli


def _events(db: Path) -> list[tuple[int, str]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT seq, type FROM events WHERE run_id = 'a1' ORDER BY seq"
        ).fetchall()


def _tamper(db: Path, sql: str, *params: object) -> None:
    """Change the journal behind the store's back, as an attacker with file access could."""
    with sqlite3.connect(db) as conn:
        conn.execute("DROP TRIGGER events_no_update")
        conn.execute("DROP TRIGGER events_no_delete")
        conn.execute(sql, params)
    conn.close()


def test_an_intact_journal_verifies(finished: Cli) -> None:
    result = finished("audit", "verify", "--run-id", "a1", "--json")
    assert result.returncode == 0, result.describe()
    report = result.json()
    assert report["status"] == "intact" and report["events"] == len(_events(finished.db))
    text = finished("audit", "verify", "--run-id", "a1")
    assert "journal intact" in text.stdout


def test_a_changed_event_is_named(finished: Cli) -> None:
    seq = next(seq for seq, kind in _events(finished.db) if kind == "approval_decided")
    _tamper(
        finished.db,
        "UPDATE events SET data = replace(data, 'cli:oncall', 'cli:mallory') WHERE seq = ?",
        seq,
    )
    result = finished("audit", "verify", "--run-id", "a1", "--json")
    assert result.returncode == 1, result.describe()
    report = result.json()
    assert report["status"] == "tampered" and report["first_bad_seq"] == seq
    text = finished("audit", "verify", "--run-id", "a1")
    assert f"event seq {seq} (#" in text.stdout and "approval_decided" in text.stdout


def test_events_removed_from_the_end_are_noticed(finished: Cli) -> None:
    last = _events(finished.db)[-1][0]
    _tamper(finished.db, "DELETE FROM events WHERE seq = ?", last)
    result = finished("audit", "verify", "--run-id", "a1", "--json")
    assert result.returncode == 1
    assert result.json()["first_bad_seq"] is None
    assert "removed from its end" in result.json()["problem"]


def test_verify_of_an_unknown_run_is_a_usage_error(finished: Cli) -> None:
    result = finished("audit", "verify", "--run-id", "nope")
    assert result.returncode == 2 and "unknown run id" in result.stderr


def test_export_jsonl_and_csv_hold_every_event_with_its_hashes(
    finished: Cli, tmp_path: Path
) -> None:
    expected = _events(finished.db)
    lines = finished("audit", "export", "--run-id", "a1").stdout.splitlines()
    rows = [json.loads(line) for line in lines]
    assert [(r["seq"], r["type"]) for r in rows] == expected
    assert all(r["hash"] and r["time_utc"].endswith("+00:00") for r in rows)
    assert rows[1]["prev_hash"] == rows[0]["hash"]

    out = tmp_path / "audit.csv"
    done = finished("audit", "export", "--run-id", "a1", "--format", "csv", "-o", str(out))
    assert done.returncode == 0 and done.stdout == ""
    table = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [(int(r["seq"]), r["type"]) for r in table] == expected
    assert json.loads(table[0]["data"])["request"] == LATENCY


def test_undecodable_event_data_is_reported_as_tampered(finished: Cli) -> None:
    """An event whose data is no longer JSON: `audit verify` says TAMPERED (exit 1), no
    traceback."""
    seq = _events(finished.db)[-1][0]
    with sqlite3.connect(finished.db) as conn:
        conn.execute("DROP TRIGGER events_no_update")
        conn.execute("UPDATE events SET data = '{\"broken' WHERE seq = ?", (seq,))
    conn.close()
    result = finished("audit", "verify", "--run-id", "a1")
    assert "Traceback" not in result.stderr, result.stderr[-400:]
    assert result.returncode == 1
    assert "TAMPERED" in result.stdout
