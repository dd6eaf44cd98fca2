"""The audit trail through the CLI: `audit verify` on intact, tampered and corrupted journals,
keyed (LOOM_OPS_AUDIT_KEY) and not, anchored (`--keyed-since`, LOOM_OPS_AUDIT_KEYED_SINCE) or
not, against a published tree head and over every run (each run judged, whatever another's
verdict), `audit export`, and what doctor says about the key."""

from __future__ import annotations

import csv
import io
import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from agent.chain import canonical_json, event_hash
from tests.cli_helpers import Cli, CliResult, make_cli_workspace

LATENCY = "incident: API latency spike"


def copied(template: Cli, root: Path) -> Cli:
    """A test's own copy of a template's workspace and database: each test tampers with its
    copy, and the runs behind it are made once per module (they take CLI processes)."""
    root.mkdir()
    shutil.copytree(template.workspace, root / "ws")
    with sqlite3.connect(template.db) as source, sqlite3.connect(root / "ops.sqlite") as target:
        source.backup(target)
    return Cli(root / "ws", root / "ops.sqlite")


@pytest.fixture(scope="module")
def finished_template(tmp_path_factory: pytest.TempPathFactory) -> Cli:
    root = tmp_path_factory.mktemp("finished")
    cli = Cli(make_cli_workspace(root / "ws"), root / "ops.sqlite")
    assert cli("runbook", LATENCY, "--run-id", "a1", "--mock-llm").returncode == 0
    done = cli("approve", "--run-id", "a1", "--as", "oncall", "--mock-llm")
    assert done.returncode == 0, done.describe()
    return cli


@pytest.fixture
def finished(finished_template: Cli, tmp_path: Path) -> Cli:
    """A database with one run that was approved and succeeded."""
    return copied(finished_template, tmp_path / "finished")


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
    assert [r["run_id"] for r in report["runs"]] == ["a1"]
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
    assert report["status"] == "tampered" and report["runs"][0]["first_bad_seq"] == seq
    text = finished("audit", "verify", "--run-id", "a1")
    assert f"event seq {seq} (#" in text.stdout and "approval_decided" in text.stdout


def test_events_removed_from_the_end_are_noticed(finished: Cli) -> None:
    last = _events(finished.db)[-1][0]
    _tamper(finished.db, "DELETE FROM events WHERE seq = ?", last)
    result = finished("audit", "verify", "--run-id", "a1", "--json")
    assert result.returncode == 1
    [run] = result.json()["runs"]
    assert run["first_bad_seq"] is None
    assert any("1 were removed from its end" in problem for problem in run["problems"])


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
    tree = finished("audit", "verify", "a1", "--json").json()
    assert head == {
        "type": "audit_head",
        "run_id": "a1",
        "run_no": 1,
        "runs": 1,
        "events": len(rows),
        "head": tree["head"],
        "key_ids": [],
    }

    out = tmp_path / "audit.csv"
    done = finished("audit", "export", "--run-id", "a1", "--format", "csv", "-o", str(out))
    assert done.returncode == 0, done.describe()
    assert done.stdout == f"wrote {out}: {len(rows)} events, tree head {head['head']}\n"
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

    def __call__(self, *args: str, key: str | None = KEY, since: int | None = None) -> CliResult:
        env = {"LOOM_OPS_AUDIT_KEY": key or ""}
        if since is not None:
            env["LOOM_OPS_AUDIT_KEYED_SINCE"] = str(since)
        return self.cli(*args, env=env)


@pytest.fixture
def keyed(keyed_template: Keyed, tmp_path: Path) -> Keyed:
    """A keyed database with two finished runs, a0 then a1 (approved by cli:oncall)."""
    run = Keyed(copied(keyed_template.cli, tmp_path / "keyed"))
    run.published = dict(keyed_template.published)
    return run


@pytest.fixture(scope="module")
def keyed_template(tmp_path_factory: pytest.TempPathFactory) -> Keyed:
    root = tmp_path_factory.mktemp("keyed")
    run = Keyed(Cli(make_cli_workspace(root / "keyed"), root / "keyed.sqlite"))
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
        conn.execute("DROP TRIGGER IF EXISTS events_no_update")
        conn.execute("DROP TRIGGER IF EXISTS events_no_delete")
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


def _decider_row(db: Path, run_id: str) -> None:
    """The rest of the issue 17 rewrite: the rows say the new decider too."""
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE approvals SET decided_by = 'cli:mallory' WHERE run_id = ?", (run_id,))
        conn.execute(
            "UPDATE approval_votes SET decided_by = 'cli:mallory' WHERE approval_id IN "
            "(SELECT id FROM approvals WHERE run_id = ?)",
            (run_id,),
        )
    conn.close()


def test_a_rewrite_with_recomputed_hashes_passes_an_unkeyed_chain_but_not_a_keyed_one(
    finished: Cli, keyed: Keyed
) -> None:
    _recompute_plain(finished.db, "a1")
    half = finished("audit", "verify", "a1")  # the journal rewritten, the rows not (yet)
    assert half.returncode == 1 and "approvals[1].decided_by is 'cli:oncall'" in half.stdout
    _decider_row(finished.db, "a1")
    unkeyed = finished("audit", "verify", "a1")
    assert unkeyed.returncode == 0  # what the issue found: a plain chain can be recomputed,
    assert "UNKEYED: a store writer could have recomputed it" in unkeyed.stdout  # and says so
    assert "(set LOOM_OPS_AUDIT_KEY)" in unkeyed.stdout

    _recompute_plain(keyed.db, "a1")
    _decider_row(keyed.db, "a1")
    result = keyed("audit", "verify", "a1")
    assert result.returncode == 1, result.describe()
    assert "journal TAMPERED" in result.stdout and "(#1, run_created)" in result.stdout
    assert keyed("audit", "verify", "a0").returncode == 0


def test_a_keyed_journal_verifies_with_its_key_and_names_it(keyed: Keyed) -> None:
    result = keyed("audit", "verify", "a1", "--json")
    assert result.returncode == 0, result.describe()
    [report] = result.json()["runs"]
    assert report["status"] == "intact" and report["unkeyed_events"] == 0
    assert report["key_id"].startswith("k:") and report["run_no"] == 2
    text = keyed("audit", "verify", "a1").stdout
    assert f"key {report['key_id']})" in text and "UNKEYED" not in text


def test_verify_without_the_key_says_in_one_line_that_it_is_needed(keyed: Keyed) -> None:
    result = keyed("audit", "verify", "a1", key=None)
    assert result.returncode == 1, result.describe()
    assert "Traceback" not in result.stderr and "TAMPERED" not in result.stdout
    first, _ = result.stdout.splitlines()
    assert first.startswith("run a1 (#2): NOT VERIFIED: written with audit key k:")
    assert "set LOOM_OPS_AUDIT_KEY" in first
    every = keyed("audit", "verify", "--all", key=None)  # each run says so; none is skipped
    assert every.returncode == 1 and every.stdout.count("NOT VERIFIED") == 2


def test_verify_with_another_key_names_both_keys(keyed: Keyed) -> None:
    key_id = keyed("audit", "verify", "a1", "--json").json()["runs"][0]["key_id"]
    result = keyed("audit", "verify", "a1", key="some-other-key-0123456789")
    assert result.returncode == 1, result.describe()
    said = f"NOT VERIFIED: written with key {key_id}, which the verifier does not hold (it "
    assert said + "holds k:" in result.stdout and "TAMPERED" not in result.stdout


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
    assert report["status"] == "tampered" and report["tampered"] == [] == report["unverified"]
    assert report["numbering"] == ["run number(s) 2 missing: runs were deleted"]


def test_a_deleted_last_event_is_caught_against_the_published_head(keyed: Keyed) -> None:
    published = keyed.published["a1"]
    assert keyed("audit", "verify", "a1", "--head", published).returncode == 0
    with sqlite3.connect(keyed.db) as conn:  # its end, and the run's row wound back with it
        conn.execute("DROP TRIGGER events_no_delete")
        conn.execute("DELETE FROM events WHERE seq = (SELECT MAX(seq) FROM events)")
        conn.execute(
            "UPDATE runs SET event_count = event_count - 1, last_hash = (SELECT hash FROM "
            "events WHERE run_id = 'a1' ORDER BY idx DESC LIMIT 1), status = 'running', "
            "error = NULL, summary = NULL, finished_at = NULL WHERE id = 'a1'"
        )
    conn.close()
    assert keyed("audit", "verify", "a1").returncode == 0  # the store alone cannot tell
    result = keyed("audit", "verify", "a1", "--head", published)
    assert result.returncode == 1, result.describe()
    assert f"the published head {published} is not this tree's" in result.stdout
    assert "removed from its end" in result.stdout


def test_the_export_carries_the_head_a_verifier_compares_with(keyed: Keyed) -> None:
    *_, head = keyed("audit", "export", "a1").stdout.splitlines()
    record = json.loads(head)
    assert record["type"] == "audit_head" and record["key_ids"][0].startswith("k:")
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
    assert "warning  audit      the journal is chained under audit key k:" in with_key.stdout
    assert KEY not in with_key.stdout + with_key.stderr


def _strip_macs(db: Path, run_id: str) -> None:
    """Every link of the run recomputed as a plain hash and its key ids removed: it poses as
    a run written before the key."""
    _recompute_plain(db, run_id)
    with sqlite3.connect(db) as conn:
        conn.execute("DROP TRIGGER IF EXISTS events_no_update")
        conn.execute("UPDATE events SET key_id = NULL WHERE run_id = ?", (run_id,))
        conn.execute("UPDATE runs SET key_id = NULL WHERE id = ?", (run_id,))
    conn.close()
    _decider_row(db, run_id)


def test_stripping_the_macs_of_every_run_fails_verify_with_the_key(keyed: Keyed) -> None:
    """No keyed run is left for the store to say the key was ever used: with a key, verify
    accepts no unkeyed run unless the operator anchors the key, and then names them."""
    for run_id in ("a0", "a1"):
        _strip_macs(keyed.db, run_id)
    unanchored = keyed("audit", "verify", "--all")
    assert unanchored.returncode == 1, unanchored.describe()
    assert "run a1 (#2): NOT VERIFIED: " in unanchored.stdout
    assert "--keyed-since N" in unanchored.stdout and "set LOOM_OPS_AUDIT_KEY)" not in (
        unanchored.stdout
    )
    assert keyed("audit", "verify", "a1").returncode == 1
    anchored = keyed("audit", "verify", "--all", "--keyed-since", "1")
    assert anchored.returncode == 1, anchored.describe()
    assert "run a1 (#2): journal TAMPERED: its first event is unkeyed though the key is in " in (
        anchored.stdout
    )
    assert keyed("audit", "verify", "a0", since=1).returncode == 1  # the setting, the same
    report = json.loads(keyed("audit", "verify", "--all", "--json", since=1).stdout)
    assert report["status"] == "tampered" and len(report["tampered"]) == 2
    bad = keyed("audit", "verify", "--all", "--keyed-since", "0")
    assert bad.returncode == 2 and "a run number (1 or more)" in bad.stderr


def test_one_forged_key_id_does_not_hide_the_other_runs_findings(keyed: Keyed) -> None:
    """a0's first key id forged (nothing else); a1's decider rewritten under its MACs: both
    are reported, each for what it is, and the verdict fails."""
    with sqlite3.connect(keyed.db) as conn:
        conn.execute("DROP TRIGGER events_no_update")
        conn.execute("UPDATE events SET key_id = 'k:00000000' WHERE run_id = 'a0' AND idx = 1")
        conn.execute(
            "UPDATE events SET data = replace(data, 'cli:oncall', 'cli:mallory') "
            "WHERE run_id = 'a1' AND type = 'approval_decided'"
        )
    conn.close()
    result = keyed("audit", "verify", "--all")
    assert result.returncode == 1, result.describe()
    assert "run a0 (#1): NOT VERIFIED: written with key k:00000000" in result.stdout
    assert "run a1 (#2): journal TAMPERED: event seq" in result.stdout
    assert "1 of 2 runs tampered, 1 not verified" in result.stdout
    report = json.loads(keyed("audit", "verify", "--all", "--json").stdout)
    assert [r["run_id"] for r in report["tampered"]] == ["a1"]
    assert [r["run_id"] for r in report["unverified"]] == ["a0"]


def test_doctor_names_the_run_the_key_is_in_force_from(tmp_path: Path) -> None:
    """A store with runs written before the key: doctor names the number to record; with it
    recorded, the old runs verify as unkeyed (never asking to set the key that is set), the
    keyed ones as keyed, and doctor is satisfied."""
    run = Keyed(Cli(make_cli_workspace(tmp_path / "ws"), tmp_path / "ops.sqlite"))
    assert run("runbook", LATENCY, "--run-id", "old", "--mock-llm", key=None).returncode == 0
    assert run("approve", "old", "--as", "oncall", "--mock-llm", key=None).returncode == 0
    doctor = run("doctor", "--mock-llm")
    assert "record LOOM_OPS_AUDIT_KEYED_SINCE=2 with the key" in doctor.stdout, doctor.describe()
    assert run("runbook", LATENCY, "--run-id", "new", "--mock-llm").returncode == 0
    assert "LOOM_OPS_AUDIT_KEYED_SINCE=2 " in run("doctor", "--mock-llm").stdout  # still 2

    assert run("audit", "verify", "--all").returncode == 1  # no anchor: old could be stripped
    every = run("audit", "verify", "--all", since=2)
    assert every.returncode == 0, every.describe()
    assert "1 of them UNKEYED" in every.stdout
    old = run("audit", "verify", "old", since=2)
    assert old.returncode == 0 and "UNKEYED" in old.stdout, old.describe()
    assert "written before the key was in force" in old.stdout
    assert "set LOOM_OPS_AUDIT_KEY" not in old.stdout
    anchored = run("doctor", "--mock-llm", since=2)
    assert "ok       audit      the journal is chained under audit key k:" in anchored.stdout
    assert "in force since run #2" in anchored.stdout


def test_a_supervised_tree_is_exported_and_verified_whole(tmp_path: Path) -> None:
    """`audit export` of a supervised run holds every run of its tree, and ends at the tree
    head its summary published; the CLI's verify against it passes."""
    run = Keyed(Cli(make_cli_workspace(tmp_path / "ws"), tmp_path / "ops.sqlite"))
    started = run("supervise", LATENCY, "--run-id", "inc", "--mock-llm")
    assert started.returncode == 0, started.describe()
    done = run("approve", "inc", "--as", "oncall", "--mock-llm")
    assert done.returncode == 0, done.describe()
    last = done.stdout.rstrip().splitlines()[-1]
    assert last.startswith("audit: run #1, tree of 4 runs, "), last
    published = last.split(" head ")[1].split()[0]
    *rows, head = [json.loads(line) for line in run("audit", "export", "inc").stdout.splitlines()]
    assert len({r["run_id"] for r in rows}) == 4 and head["runs"] == 4
    assert head["head"].startswith(published)
    verified = run("audit", "verify", "inc", "--head", published, since=1)
    assert verified.returncode == 0, verified.describe()
    assert "tree of 4 runs" in verified.stdout and "ends at the published head" in verified.stdout
