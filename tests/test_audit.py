"""The audit trail: `audit verify` on intact and tampered journals, `audit export`, and the
summary template's plain-text and Telegram-HTML variants."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from pathlib import Path

import pytest

from agent.service.runs import RunService
from agent.views.summary import render_summary, summary_of
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


async def test_the_html_variant_escapes_everything_but_its_own_tags(service: RunService) -> None:
    await service.start("h1", "incident: API latency spike <script>alert(1)</script> & more")
    summary = summary_of(await service.run_tree("h1"))
    html = render_summary(summary, html=True)
    text = render_summary(summary)
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in html
    assert "<b>Run h1: WAITING_APPROVAL</b>" in html
    assert "<code>api-latency-spike</code>" in html
    assert "<script>alert(1)</script> & more" in text and "<b>" not in text
