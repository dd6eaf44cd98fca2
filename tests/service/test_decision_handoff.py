"""A decision or a start made in the CLI while a long-running process serves the store: the
CLI records it and the live process goes on with the run within about a second, never the
CLI itself.

Real processes: `loom-ops serve` on SQLite and on PostgreSQL (each test runs on both engines),
and `loom-ops approve`, `runbook` and `status` as processes of their own."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx

from agent.records import Decision, RunStatus
from agent.service.runs import RunService
from agent.settings import Settings
from agent.store import RunStore
from tests.cli_helpers import Cli, make_cli_workspace
from tests.conftest import make_workspace
from tests.http_harness import ServeProcess, free_port
from tests.support import open_service, raw_rows

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


def test_a_live_run_is_left_to_a_process_that_may_act_it(tmp_path: Path, db_url: str) -> None:
    """A live start (`LOOM_OPS_ALLOW_SHELL=1` in the CLI) while a `serve` without that
    setting drives the store's runs: the CLI drives the run itself, and serve never claims
    it. Before, the CLI handed it to serve, which stopped it at its first command and again
    once per lease TTL, for as long as it ran. A decision made in serve leaves the run for
    a process that may act it and says so; `status` says what to run, and that ends it."""
    workspace = make_workspace(tmp_path / "ws")
    server = ServeProcess(workspace, db_url, free_port(), LOOM_OPS_API_USER="cli:approver").start()
    live = {"LOOM_OPS_ALLOW_SHELL": "1"}
    cli = Cli(workspace, db_url)
    try:
        serve_owner = _serve_registered(db_url)
        started = cli("runbook", "crash-drill", "--run-id", "live-1", "--mock-llm", env=live)
        # Driven here to its approval: the CLI never said serve drives it.
        assert "Run live-1 is waiting for request #1" in started.stdout, started.describe()
        decided = httpx.post(f"{server.url}/runs/live-1/approve", json={}, timeout=10)
        assert decided.status_code == 200, decided.text
        time.sleep(1.5)  # serve, woken by its own decision, would have claimed the run by now
        status = cli("status", "live-1")
        shown = cli("status", "live-1", "--json").json()
        # `resume` without an id leaves what this process may not act, and says how to go on.
        recovered = cli("resume")
        stops = raw_rows(db_url, "SELECT 1 FROM events WHERE type = 'run_interrupted'")
        # Resumed by name where the setting is off, it stops at the command, saying so.
        stopped = cli("resume", "--run-id", "live-1")
        resumed = cli("resume", "--run-id", "live-1", env=live)
    finally:
        server.stop()
    assert decided.json()["message"] == (
        "approved by cli:approver; the run waits for a process with LOOM_OPS_ALLOW_SHELL=1: "
        "no live process that drives runs has it"
    )
    assert "Run live-1: queued" in status.stdout, status.describe()
    assert (
        "No live process may act it: the running serve lacks the settings its live steps "
        "need. Resume it with them: LOOM_OPS_ALLOW_SHELL=1 loom-ops resume live-1 --db "
    ) in status.stdout, status.describe()
    assert (shown["undriven"], shown["drivers"]) == (["live-1"], []), shown
    assert recovered.stdout == (
        "live-1: queued (not resumed here: run LOOM_OPS_ALLOW_SHELL=1 loom-ops resume --run-id "
        "live-1)\nresumed 0 run(s)\n"
    ), recovered.describe()
    assert stops == []  # nothing stopped it before that
    assert stopped.returncode == 1, stopped.describe()
    assert stopped.stderr == (
        "loom-ops: run live-1 was interrupted: step 'append-two': this run runs commands live; "
        "this process has LOOM_OPS_ALLOW_SHELL off; resume with LOOM_OPS_ALLOW_SHELL=1 "
        "loom-ops resume --run-id live-1\n"
    ), stopped.describe()
    assert resumed.returncode == 0 and "SUCCEEDED" in resumed.stdout, resumed.describe()
    assert serve_owner not in _claimed_by(db_url, "live-1")
    out = (workspace / "out.txt").read_text().splitlines()
    assert out == ["one", "two"], out  # each live step ran once, by the CLI


def test_what_a_cli_says_goes_on_with_a_live_run_it_may_not_act(tmp_path: Path) -> None:
    """A live run approved and then resumed by name in a shell without
    LOOM_OPS_ALLOW_SHELL: the decision leaves it and says what it waits for; the resume
    stops it at its command and prints the resume that acts it. Beside a live worker (its
    heartbeat, as `loom-ops worker` writes it), `status` and a resume say that the worker
    goes on with it when it may act it, and what to run when it may not; an outage's pause
    is told apart from a stop for a setting."""
    workspace = make_workspace(tmp_path / "ws")
    db = str(tmp_path / "ops.sqlite")
    cli = Cli(workspace, db)
    started = cli(
        "runbook", "crash-drill", "--run-id", "d1", "--mock-llm", env={"LOOM_OPS_ALLOW_SHELL": "1"}
    )
    assert "Run d1 is waiting for request #1" in started.stdout, started.describe()
    approved = cli("approve", "--run-id", "d1", "--as", "approver")
    assert approved.stdout.splitlines() == [
        "Decision: approved by cli:approver; the run waits for a process with "
        "LOOM_OPS_ALLOW_SHELL=1: no live process that drives runs has it",
        f"Run d1 is queued; continue with LOOM_OPS_ALLOW_SHELL=1 loom-ops resume --run-id d1 "
        f"--db {db}",
    ], approved.describe()
    stopped = cli("resume", "--run-id", "d1")
    assert stopped.stderr.endswith(
        "this process has LOOM_OPS_ALLOW_SHELL off; resume with LOOM_OPS_ALLOW_SHELL=1 "
        "loom-ops resume --run-id d1\n"
    ), stopped.describe()

    def worker(effects: str | None) -> None:
        raw_rows(db, "DELETE FROM processes")
        raw_rows(
            db,
            "INSERT INTO processes (owner, kind, drives_runs, started_at, heartbeat_at, effects) "
            "VALUES ('elsewhere:1:w', 'worker', 1, ?, ?, ?)",
            (time.time(), time.time(), effects),
        )

    def said() -> str:
        return cli("status", "d1").stdout.splitlines()[-1]

    worker('{"shell":true,"mcp":false,"checks":false}')
    assert said() == "Waiting for the live worker to pick it up"
    again = cli("resume", "--run-id", "d1")  # stopped again, and the worker goes on
    assert again.stderr.endswith("; the worker process elsewhere:1:w goes on with it\n"), again
    raw_rows(db, "UPDATE runs SET not_before = ?", (time.time() + 60,))  # an outage's pause
    assert said().startswith("The live worker will try it again after a pause"), said()
    worker(None)  # a worker of an older version says nothing: it is taken to act all
    assert said().startswith("The live worker will try it again after a pause"), said()
    worker('{"shell":false,"mcp":false,"checks":false}')
    assert said() == (
        "No live process may act it: the running worker lacks the settings its live steps "
        f"need. Resume it with them: LOOM_OPS_ALLOW_SHELL=1 loom-ops resume d1 --db {db}"
    )


async def test_a_decision_where_no_live_process_drives_runs_says_the_run_waits(
    tmp_path: Path,
) -> None:
    """A front end that drives nothing (`--no-worker`) records a decision while no live
    process drives runs: its answer says the run waits for one."""
    settings = Settings(
        _env_file=None,
        db=str(tmp_path / "ops.sqlite"),
        workspace=make_workspace(tmp_path / "ws"),
        mock_llm=True,
        user="tester",
    )
    async with open_service(settings) as starter:
        started = await starter.start("f1", "crash-drill")
    assert started.status == RunStatus.WAITING_APPROVAL
    front = RunService(await RunStore.open(settings.db), settings, executes_runs=False)
    try:
        result = await front.decide("f1", Decision.APPROVE, "cli:approver")
    finally:
        await front.close()
    assert result.run.status == RunStatus.QUEUED
    assert result.message == (
        "approved by cli:approver; the run waits for a process that drives runs: none is live "
        "(`loom-ops worker`)"
    )


def test_status_lists_the_live_processes_and_the_gone_ones(tmp_path: Path) -> None:
    """`loom-ops status` without an id: a live `serve` is listed as live and driving runs,
    with what it may act live; once SIGKILLed (no clean exit) its heartbeat goes stale and
    it shows as gone."""
    workspace = make_workspace(tmp_path / "ws")
    db = str(tmp_path / "ops.sqlite")
    server = ServeProcess(workspace, db, free_port(), LOOM_OPS_ALLOW_SHELL="1").start()

    def status() -> dict:
        done = Cli(workspace, db)("status", "--json")
        assert done.returncode == 0, done.describe()
        return json.loads(done.stdout)

    try:
        _wait(lambda: status()["processes"], 10, "serve to register")
        (entry,) = status()["processes"]
        assert (entry["kind"], entry["live"], entry["drives_runs"]) == ("serve", True, True)
        assert entry["acts_live"] == ["shell"], entry
        shown = Cli(workspace, db)("status").stdout
        assert re.search(r"^PROCESS +STATE +ROLE +ACTS LIVE +SINCE +OWNER$", shown, re.M), shown
        assert re.search(r"^serve +running +drives runs +shell +20", shown, re.M), shown
        # A shell without the setting may start runs the serve drives: nothing more to say.
        assert "No running process that drives runs may act" not in shown, shown
        both = {"LOOM_OPS_ALLOW_SHELL": "1", "LOOM_OPS_ALLOW_MCP": "1"}
        shown = Cli(workspace, db)("status", env=both).stdout
        assert (
            "No running process that drives runs may act what a run started here does live "
            "(LOOM_OPS_ALLOW_SHELL=1 LOOM_OPS_ALLOW_MCP=1): such a run is driven by the command "
            "that starts it."
        ) in shown, shown
    finally:
        assert server.proc is not None
        server.proc.kill()
        server.proc.wait(10)
    _wait(lambda: not status()["processes"][0]["live"], 20, "the heartbeat to go stale")
