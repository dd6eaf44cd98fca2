"""The audit trail through the CLI: `audit verify` on intact, tampered and corrupted journals,
keyed (LOOM_OPS_AUDIT_KEY) and not, against a published head and over every run, and
`audit export`."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from pathlib import Path

import pytest

from agent.chain import canonical_json, event_hash
from tests.cli_helpers import Cli, CliResult, make_cli_workspace

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


def test_export_jsonl_and_csv_hold_every_event_with_its_hashes_and_end_at_the_head(
    finished: Cli, tmp_path: Path
) -> None:
    expected = _events(finished.db)
    lines = finished("audit", "export", "--run-id", "a1").stdout.splitlines()
    *rows, head = [json.loads(line) for line in lines]
    assert [(r["seq"], r["type"]) for r in rows] == expected
    assert all(r["hash"] and r["time_utc"].endswith("+00:00") for r in rows)
    assert rows[1]["prev_hash"] == rows[0]["hash"]
    assert head == {
        "type": "audit_head",
        "run_id": "a1",
        "run_no": 1,
        "events": len(rows),
        "head": rows[-1]["hash"],
        "key_id": None,
    }

    out = tmp_path / "audit.csv"
    done = finished("audit", "export", "--run-id", "a1", "--format", "csv", "-o", str(out))
    assert done.returncode == 0 and done.stdout == ""
    *table, last = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [(int(r["seq"]), r["type"]) for r in table] == expected
    assert json.loads(table[0]["data"])["request"] == LATENCY
    assert (last["type"], last["hash"], int(last["idx"])) == ("audit_head", head["head"], len(rows))


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


# -- a keyed chain -----------------------------------------------------------------------------

KEY = "audit-key-for-cli-tests-0123456789"


class Keyed:
    """The CLI with LOOM_OPS_AUDIT_KEY set (or another key, or none) on one database."""

    def __init__(self, cli: Cli) -> None:
        self.cli = cli
        self.db = cli.db
        self.published: dict[str, str] = {}  # run id -> the head its summary ended with

    def __call__(self, *args: str, key: str | None = KEY) -> CliResult:
        return self.cli(*args, env={"LOOM_OPS_AUDIT_KEY": key or ""})


@pytest.fixture
def keyed(tmp_path: Path) -> Keyed:
    """A keyed database with two finished runs, a0 then a1 (approved by cli:oncall)."""
    run = Keyed(Cli(make_cli_workspace(tmp_path / "keyed"), tmp_path / "keyed.sqlite"))
    for n, run_id in enumerate(("a0", "a1"), start=1):
        assert run("runbook", LATENCY, "--run-id", run_id, "--mock-llm").returncode == 0
        done = run("approve", "--run-id", run_id, "--as", "oncall", "--mock-llm")
        assert done.returncode == 0, done.describe()
        # The audit summary printed as the run ended (the chat gets the same one) ends with
        # the head it publishes.
        last = done.stdout.rstrip().splitlines()[-1]
        assert last.startswith(f"audit: run #{n}, ") and "(key k:" in last, last
        run.published[run_id] = last.split(" head ")[1].split()[0]
    return run


def _recompute_plain(db: Path, run_id: str) -> None:
    """The attack of issue 17 by someone who can write the file but lacks the key: drop the
    triggers, change the decider, recompute every link with the keyless formula and the
    run's recorded head."""
    with sqlite3.connect(db) as conn:
        conn.execute("DROP TRIGGER events_no_update")
        conn.execute("DROP TRIGGER events_no_delete")
        rows = conn.execute(
            "SELECT seq, idx, ts, type, data FROM events WHERE run_id = ? ORDER BY idx",
            (run_id,),
        ).fetchall()
        prev = ""
        for seq, idx, ts, type_, data in rows:
            data = canonical_json(json.loads(data.replace("cli:oncall", "cli:mallory")))
            digest = event_hash(prev, run_id, idx, ts, type_, data)
            conn.execute(
                "UPDATE events SET data = ?, prev_hash = ?, hash = ? WHERE seq = ?",
                (data, prev, digest, seq),
            )
            prev = digest
        conn.execute("UPDATE runs SET last_hash = ? WHERE id = ?", (prev, run_id))
    conn.close()


def test_the_issue_17_rewrite_passes_an_unkeyed_chain_but_not_a_keyed_one(
    finished: Cli, keyed: Keyed
) -> None:
    _recompute_plain(finished.db, "a1")
    unkeyed = finished("audit", "verify", "a1")
    assert unkeyed.returncode == 0  # what the issue found: a plain chain can be recomputed,
    assert "UNKEYED: a store writer could have recomputed it" in unkeyed.stdout  # and says so

    _recompute_plain(keyed.db, "a1")
    result = keyed("audit", "verify", "a1")
    assert result.returncode == 1, result.describe()
    assert "journal TAMPERED" in result.stdout and "(#1, run_created)" in result.stdout
    assert keyed("audit", "verify", "a0").returncode == 0


def test_a_keyed_journal_verifies_with_its_key_and_names_it(keyed: Keyed) -> None:
    result = keyed("audit", "verify", "a1", "--json")
    assert result.returncode == 0, result.describe()
    report = result.json()
    assert report["status"] == "intact" and report["unkeyed_events"] == 0
    assert report["key_id"].startswith("k:") and report["run_no"] == 2
    text = keyed("audit", "verify", "a1").stdout
    assert f"key {report['key_id']})" in text and "UNKEYED" not in text


def test_verify_without_the_key_says_in_one_line_that_it_is_needed(keyed: Keyed) -> None:
    result = keyed("audit", "verify", "a1", key=None)
    assert result.returncode == 2, result.describe()
    assert result.stdout == "" and "Traceback" not in result.stderr
    [line] = result.stderr_lines()
    assert "written with audit key k:" in line and "set LOOM_OPS_AUDIT_KEY" in line


def test_verify_with_another_key_names_both_keys(keyed: Keyed) -> None:
    key_id = keyed("audit", "verify", "a1", "--json").json()["key_id"]
    result = keyed("audit", "verify", "a1", key="some-other-key-0123456789")
    assert result.returncode == 2, result.describe()
    [line] = result.stderr_lines()
    assert f"written with key {key_id}, you gave k:" in line and "TAMPERED" not in line


def test_a_deleted_run_shows_as_a_gap_in_the_numbering(keyed: Keyed) -> None:
    assert keyed("runbook", LATENCY, "--run-id", "a2", "--mock-llm").returncode == 0
    assert keyed("audit", "verify", "--all").returncode == 0
    with sqlite3.connect(keyed.db) as conn:  # foreign keys are off on a plain connection
        conn.execute("DROP TRIGGER events_no_delete")
        for table in ("events", "tool_calls", "approvals", "outbox", "run_runbooks"):
            conn.execute(f"DELETE FROM {table} WHERE run_id = 'a1'")
        conn.execute("DELETE FROM runs WHERE id = 'a1'")
    conn.close()
    result = keyed("audit", "verify", "--all")
    assert result.returncode == 1, result.describe()
    assert "TAMPERED: run number(s) 2 missing: runs were deleted" in result.stdout
    report = json.loads(keyed("audit", "verify", "--all", "--json").stdout)
    assert report["status"] == "tampered" and report["tampered"] == []
    assert report["numbering"] == ["run number(s) 2 missing: runs were deleted"]


def test_a_deleted_last_event_is_caught_against_the_published_head(keyed: Keyed) -> None:
    published = keyed.published["a1"]
    assert keyed("audit", "verify", "a1", "--head", published).returncode == 0
    with sqlite3.connect(keyed.db) as conn:  # the last event, and the run's head wound back
        conn.execute("DROP TRIGGER events_no_delete")
        conn.execute("DELETE FROM events WHERE seq = (SELECT MAX(seq) FROM events)")
        conn.execute(
            "UPDATE runs SET event_count = event_count - 1, last_hash = (SELECT hash FROM "
            "events WHERE run_id = 'a1' ORDER BY idx DESC LIMIT 1) WHERE id = 'a1'"
        )
    conn.close()
    assert keyed("audit", "verify", "a1").returncode == 0  # the store alone cannot tell
    result = keyed("audit", "verify", "a1", "--head", published)
    assert result.returncode == 1, result.describe()
    assert f"the published head {published} is not the journal's" in result.stdout
    assert "removed from its end" in result.stdout


def test_the_export_carries_the_head_a_verifier_compares_with(keyed: Keyed) -> None:
    *_, head = keyed("audit", "export", "a1").stdout.splitlines()
    record = json.loads(head)
    assert record["type"] == "audit_head" and record["key_id"].startswith("k:")
    assert record["head"].startswith(keyed.published["a1"])
    assert keyed("audit", "verify", "a1", "--head", record["head"]).returncode == 0
    bad = keyed("audit", "verify", "a1", "--head", "xyz")
    assert bad.returncode == 2 and "--head: a published head is at least 8 hex" in bad.stderr
    assert keyed("audit", "verify", "--all", "--head", record["head"]).returncode == 2


def test_doctor_warns_when_no_audit_key_is_set(keyed: Keyed) -> None:
    without = keyed("doctor", "--mock-llm", key=None)
    assert any(
        line.startswith("warning  audit") and "no LOOM_OPS_AUDIT_KEY" in line
        for line in without.stdout.splitlines()
    ), without.describe()
    with_key = keyed("doctor", "--mock-llm")
    assert "ok       audit      the journal is chained under audit key k:" in with_key.stdout
    assert KEY not in with_key.stdout + with_key.stderr
