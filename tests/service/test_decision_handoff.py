"""A decision or a start made in the CLI while a long-running process serves the store: the
CLI records it and the live process goes on with the run within about a second, never the
CLI itself.

Real processes: `loom-ops serve` on SQLite and on PostgreSQL (each test runs on both engines),
and `loom-ops approve`, `runbook` and `status` as processes of their own."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx

from tests.cli_helpers import Cli, make_cli_workspace
from tests.http_harness import ServeProcess, free_port
from tests.support import raw_rows

LATENCY = "incident: API latency spike"


def _wait(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _serve_registered(db_url: str) -> str:
    """Wait for the serving process to register (its first heartbeat is at once) saying it
    drives runs; returns its owner id."""
    _wait(
        lambda: raw_rows(db_url, "SELECT kind, drives_runs FROM processes"),
        10,
        "serve to register",
    )
    assert raw_rows(db_url, "SELECT kind, drives_runs FROM processes") == [("serve", 1)]
    return raw_rows(db_url, "SELECT owner FROM processes")[0][0]


def _claimed_by(db_url: str, run_id: str, since: float = 0.0) -> set[str]:
    """Who claimed the run (or one of its children) since `since`."""
    claims = raw_rows(
        db_url,
        "SELECT data FROM events WHERE (run_id = ? OR run_id LIKE ?) "
        "AND type = 'run_claimed' AND ts >= ?",
        (run_id, f"{run_id}:sub:%", since),
    )
    return {data.split('"owner":"')[1].split('"')[0] for (data,) in claims}


def test_a_cli_decision_hands_the_run_to_the_live_process(tmp_path: Path, db_url: str) -> None:
    workspace = make_cli_workspace(tmp_path / "ws")
    server = ServeProcess(workspace, db_url, free_port()).start()
    try:
        serve_owner = _serve_registered(db_url)
        started = httpx.post(
            f"{server.url}/runs", json={"run_id": "h1", "message": LATENCY}, timeout=10
        )
        assert started.status_code in (200, 201, 202), started.text
        _wait(
            lambda: raw_rows(db_url, "SELECT 1 FROM approvals WHERE status = 'pending'"),
            20,
            "the approval request",
        )

        decided_at = time.time()
        done = Cli(workspace, db_url)("approve", "--run-id", "h1", "--as", "oncall")
        assert done.returncode == 0, done.describe()
        assert "the serve process" in done.stdout and "goes on with the run" in done.stdout
        assert "Traceback" not in done.stderr

        _wait(
            lambda: (
                raw_rows(db_url, "SELECT status FROM runs WHERE id = 'h1'")[0][0] == "succeeded"
            ),
            20,
            "the run to finish",
        )
        owners = _claimed_by(db_url, "h1", decided_at)
        assert owners == {serve_owner}, (owners, serve_owner)  # never the CLI's
    finally:
        server.stop()
    assert raw_rows(db_url, "SELECT owner FROM processes") == []  # a clean exit says so


def test_a_cli_start_hands_the_run_to_the_live_process(tmp_path: Path, db_url: str) -> None:
    """`loom-ops runbook` while a live process drives the store's runs: the CLI records the
    start, says which process drives it and how to follow it, and exits 0; the live process
    alone claims the run and takes it to its approval (never a false "interrupted", which a
    race for the new run gave)."""
    workspace = make_cli_workspace(tmp_path / "ws")
    server = ServeProcess(workspace, db_url, free_port()).start()
    try:
        serve_owner = _serve_registered(db_url)
        started = Cli(workspace, db_url)("runbook", LATENCY, "--run-id", "h2", "--mock-llm")
        assert started.returncode == 0, started.describe()
        assert "Run h2 started; the serve process" in started.stdout, started.stdout
        assert "loom-ops status h2" in started.stdout
        assert "interrupted" not in started.stdout + started.stderr
        _wait(
            lambda: (
                raw_rows(db_url, "SELECT status FROM runs WHERE id = 'h2'")[0][0]
                == "waiting_approval"
            ),
            20,
            "serve to take the run to its approval",
        )
        owners = _claimed_by(db_url, "h2")
        assert owners == {serve_owner}, (owners, serve_owner)  # never the CLI's
    finally:
        server.stop()


def test_status_says_why_a_live_process_stopped_a_run_it_may_not_act(tmp_path: Path) -> None:
    """A live start (`LOOM_OPS_ALLOW_SHELL=1` in the CLI) handed to a `serve` without that
    setting: serve stops the run at its first command, and `status` says why and how to go
    on, rather than that serve will pick it up (it stops it again each time)."""
    workspace = make_cli_workspace(tmp_path / "ws")
    db = str(tmp_path / "ops.sqlite")
    server = ServeProcess(workspace, db, free_port()).start()
    cli = Cli(workspace, db)
    try:
        _serve_registered(db)
        started = cli(
            "runbook",
            "failed-deploy-rollback service=checkout-api namespace=production",
            "--run-id",
            "live-1",
            "--mock-llm",
            env={"LOOM_OPS_ALLOW_SHELL": "1"},
        )
        assert "Run live-1 started; the serve process" in started.stdout, started.describe()
        _wait(
            lambda: raw_rows(db, "SELECT 1 FROM events WHERE type = 'run_interrupted'"),
            20,
            "serve to stop the run",
        )
        status = cli("status", "live-1")
        shown = cli("status", "live-1", "--json")
    finally:
        server.stop()
    assert "Run live-1: queued" in status.stdout, status.describe()
    assert (
        "  stopped:  step 'history': this run runs commands live; this process has "
        "LOOM_OPS_ALLOW_SHELL off" in status.stdout
    ), status.describe()
    assert "will try it again after a pause, and may stop for the same reason" in status.stdout
    assert f"loom-ops resume live-1 --db {db}" in status.stdout, status.describe()
    assert "Waiting for the live serve to pick it up" not in status.stdout
    stopped = json.loads(shown.stdout)["stopped"]
    assert stopped.startswith("step 'history': this run runs commands live"), stopped


def test_a_supervised_child_a_live_process_may_not_act_is_stopped_once_per_try(
    tmp_path: Path,
) -> None:
    """The same live start as a supervised incident: serve stops the executor child at its
    first command and leaves it for its next try (a lease TTL later). Before, the parent's
    drive drove the queued child again at once, about 350 times a second, each time
    journaling a claim and a stop, for as long as serve ran."""
    workspace = make_cli_workspace(tmp_path / "ws")
    db = str(tmp_path / "ops.sqlite")
    server = ServeProcess(workspace, db, free_port()).start()
    try:
        _serve_registered(db)
        started = Cli(workspace, db)(
            "supervise",
            "failed-deploy-rollback service=checkout-api namespace=production",
            "--run-id",
            "sup-1",
            "--mock-llm",
            env={"LOOM_OPS_ALLOW_SHELL": "1"},
        )
        assert started.returncode == 0, started.describe()
        stops = "SELECT run_id FROM events WHERE type = 'run_interrupted'"
        _wait(lambda: raw_rows(db, stops), 20, "serve to stop the child")
        time.sleep(2)  # a loop would stop it hundreds of times meanwhile
        stopped = raw_rows(db, stops)
        claims = raw_rows(
            db,
            "SELECT COUNT(*) FROM events WHERE type = 'run_claimed' "
            "AND run_id = 'sup-1:sub:executor'",
        )[0][0]
        statuses = dict(raw_rows(db, "SELECT role, status FROM runs"))
        status = Cli(workspace, db)("status", "sup-1")
        shown = json.loads(Cli(workspace, db)("status", "sup-1", "--json").stdout)
    finally:
        server.stop()
    assert [run_id for (run_id,) in stopped] == ["sup-1:sub:executor"], stopped
    assert claims == 1, claims
    assert statuses == {
        "supervisor": "waiting_children",
        "planner": "succeeded",
        "executor": "queued",  # for its next try
        "verifier": "waiting_children",  # for the executor
    }, statuses
    # Its status says why the child stopped, and that serve may stop it again.
    why = "step 'history': this run runs commands live; this process has LOOM_OPS_ALLOW_SHELL off"
    child = next(line for line in status.stdout.splitlines() if "sup-1:sub:executor" in line)
    assert "queued" in child and "stopped: step 'history': this run runs" in child, status.stdout
    assert "The live serve will try sup-1:sub:executor again after a pause" in status.stdout
    assert f"loom-ops resume sup-1 --db {db}" in status.stdout, status.stdout
    stops = {c["run_id"]: c["stopped"] for c in shown["children"]}
    assert stops["sup-1:sub:executor"] == why, stops
    assert stops["sup-1:sub:planner"] is None and shown["stopped"] is None, shown


def test_status_lists_the_live_processes_and_the_gone_ones(tmp_path: Path) -> None:
    """`loom-ops status` without an id: a live `serve` is listed as live and driving runs;
    once SIGKILLed (no clean exit) its heartbeat goes stale and it shows as gone."""
    workspace = make_cli_workspace(tmp_path / "ws")
    db = str(tmp_path / "ops.sqlite")
    server = ServeProcess(workspace, db, free_port()).start()

    def status() -> dict:
        done = Cli(workspace, db)("status", "--json")
        assert done.returncode == 0, done.describe()
        return json.loads(done.stdout)

    try:
        _wait(lambda: status()["processes"], 10, "serve to register")
        (entry,) = status()["processes"]
        assert (entry["kind"], entry["live"], entry["drives_runs"]) == ("serve", True, True)
    finally:
        assert server.proc is not None
        server.proc.kill()
        server.proc.wait(10)
    _wait(lambda: not status()["processes"][0]["live"], 20, "the heartbeat to go stale")
