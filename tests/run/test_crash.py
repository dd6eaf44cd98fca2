"""Crash tests: a real `loom-ops` process killed with SIGKILL at every step boundary and inside
a live tool call; after `loom-ops resume` (and a human's call where the kernel asks for one)
every run completes and every side effect happened exactly once. Every test runs on both
engines (`db_url`: a fresh SQLite file, then a fresh PostgreSQL schema)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.cli_helpers import CLI_USER, REPO
from tests.conftest import make_workspace, postgres_schema
from tests.http_harness import ServeProcess, free_port
from tests.support import raw_rows

LOOM_OPS = [sys.executable, "-m", "agent.frontends.cli"]


def _env(
    workspace: Path, db: str, failpoint: str | None = None, live: bool = True
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_OPS_")}
    env.update(
        LOOM_OPS_DB=str(db),
        LOOM_OPS_WORKSPACE=str(workspace),
        LOOM_OPS_MOCK_LLM="1",
        LOOM_OPS_ALLOW_SHELL="1" if live else "0",
        LOOM_OPS_USER=CLI_USER,  # the tests' people file lets this login act for others
        PYTHONPATH=str(REPO),
    )
    if failpoint:
        env["LOOM_OPS_FAILPOINT"] = failpoint
    return env


def _cli(
    workspace: Path, db: str, *args: str, failpoint: str | None = None, live: bool = True
) -> int:
    done = subprocess.run(
        [*LOOM_OPS, *args, "--json"],
        cwd=workspace,
        env=_env(workspace, db, failpoint, live),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode


def _one(db: str, sql: str, params: tuple[Any, ...] = ()) -> tuple[Any, ...] | None:
    """The first row of a query (`?` placeholders) on either engine, or None if there is none."""
    rows = raw_rows(db, sql, params)
    return rows[0] if rows else None


def _pending(db: str, run_id: str) -> tuple[int, str, str] | None:
    """(number, kind, step_id) of the run's oldest pending approval, or None."""
    row = _one(
        db,
        "SELECT number, kind, step_id FROM approvals WHERE run_id = ? AND status = 'pending' "
        "ORDER BY id",
        (run_id,),
    )
    return None if row is None else (row[0], row[1], row[2])


def _run_row(db: str, run_id: str) -> tuple[str, tuple[str, str] | None]:
    """The run's status and the (kind, step_id) of its pending approval, if any."""
    status = raw_rows(db, "SELECT status FROM runs WHERE id = ?", (run_id,))[0][0]
    pending = _pending(db, run_id)
    return status, None if pending is None else pending[1:]


def _lines(workspace: Path) -> list[str]:
    path = workspace / "out.txt"
    return path.read_text().splitlines() if path.exists() else []


def _slow_append_one(workspace: Path) -> None:
    """Make the drill's append-one sleep 3 s after its line, so a kill lands while it runs."""
    drill = workspace / "runbooks" / "crash-drill.yaml"
    drill.write_text(drill.read_text().replace("append.py one", "append.py one 3"))
    rules = json.loads((workspace / "ops.shell.allowlist.json").read_text())
    rules["rules"].append({"argv": [rules["rules"][0]["argv"][0], "append.py", "one", "3"]})
    (workspace / "ops.shell.allowlist.json").write_text(json.dumps(rules))


def _wait_for_line(workspace: Path, line: str, proc: subprocess.Popen[bytes]) -> None:
    """Wait until a live step wrote `line`, while its driver `proc` still runs."""
    deadline = time.monotonic() + 20
    while line not in _lines(workspace):
        assert time.monotonic() < deadline, "the step never started"
        assert proc.poll() is None
        time.sleep(0.01)


def _drive_to_end(workspace: Path, db: str, run_id: str, failpoint: str | None) -> list[str]:
    """Start the drill, then act as the operator until the run ends; returns what was decided.

    The failpoint stays armed on every command until one process dies of it, since the point
    may lie beyond the first command (e.g. after the approval). In-doubt requests are decided
    as a human would: look at the world (out.txt) and retry if the line is missing, else skip.
    """
    armed = failpoint
    decisions: list[str] = []
    code = _cli(workspace, db, "runbook", "crash-drill", "--run-id", run_id, failpoint=armed)
    if code == -signal.SIGKILL:
        armed = None
    for _ in range(12):
        status, pending = _run_row(db, run_id)
        if status in ("succeeded", "failed", "rejected", "cancelled", "expired"):
            return decisions
        if status in ("queued", "running"):
            code = _cli(workspace, db, "resume", "--run-id", run_id, failpoint=armed)
        elif pending is not None:
            approval = _pending(db, run_id)
            assert approval is not None, (run_id, pending)
            approval_id, kind, step_id = approval
            if kind == "gate":
                decisions.append(f"approve {step_id}")
                args = ["approve", "--run-id", run_id, "--as", "approver"]
                args += ["--approval", str(approval_id)]
            else:
                line = step_id.removeprefix("append-")
                already = line in _lines(workspace)
                decisions.append(f"{'skip' if already else 'retry'} {step_id}")
                args = ["approve", "--run-id", run_id, "--as", "approver"]
                args += ["--approval", str(approval_id)]
                if already:
                    args.append("--skip")
            code = _cli(workspace, db, *args, failpoint=armed)
        else:
            raise AssertionError(f"run {run_id} stuck in {status}")
        if code == -signal.SIGKILL:
            armed = None
    raise AssertionError(f"run {run_id} did not finish")


BOUNDARIES = [
    "after_claim:1",
    "after_wait:1",
    *(
        f"{point}:{n}"
        for point in ("before_intent", "after_intent", "after_tool", "after_outcome")
        for n in (1, 2, 3)
    ),
]


# On each engine one boundary of each kind runs in the suite, the live append-one's on both
# sides of its side effect, and the rest in the soak (bench/soak.py): the other calls cross
# the same lines of the kernel and the store.
IN_SUITE = {
    "after_claim:1",
    "after_wait:1",
    "before_intent:2",
    "after_intent:3",
    "after_tool:3",
    "after_outcome:2",
}
BOUNDARY_CASES = [
    pytest.param(
        engine,
        point,
        id=f"{engine}-{point}",
        marks=() if point in IN_SUITE else pytest.mark.slow,
    )
    for engine in ("sqlite", "postgresql")
    for point in BOUNDARIES
]


@pytest.mark.parametrize(("engine", "failpoint"), BOUNDARY_CASES)
def test_sigkill_at_every_boundary_then_resume(tmp_path: Path, engine: str, failpoint: str) -> None:
    """Killed anywhere, the run completes with each line appended exactly once."""
    with contextlib.ExitStack() as stack:
        if engine == "sqlite":
            db = str(tmp_path / "ops.sqlite")
        else:
            db = stack.enter_context(postgres_schema())
        _every_boundary(make_workspace(tmp_path / "ws"), db, failpoint)


def _every_boundary(workspace: Path, db: str, failpoint: str) -> None:
    """Drive the drill to its end through a SIGKILL at `failpoint`, then check the world."""
    decisions = _drive_to_end(workspace, db, "drill", failpoint)

    status, _ = _run_row(db, "drill")
    assert status == "succeeded", (failpoint, decisions)
    assert _lines(workspace) == ["one", "two"], (failpoint, decisions)
    died = raw_rows(
        db, "SELECT COUNT(*) FROM events WHERE run_id = 'drill' AND type = 'run_claimed'"
    )[0][0]
    in_doubt = raw_rows(
        db, "SELECT step_id FROM approvals WHERE run_id = 'drill' AND kind = 'in_doubt'"
    )
    unfinished = raw_rows(
        db, "SELECT COUNT(*) FROM tool_calls WHERE run_id = 'drill' AND outcome_idx IS NULL"
    )[0][0]
    assert died >= 2, "the failpoint never fired: the test would prove nothing"
    assert unfinished == 0
    point = failpoint.split(":")[0]
    # A live, non-idempotent step caught between intent and outcome must go to a human. The
    # commit holding one call's outcome holds the next call's intent too: a kill right after
    # it (after_outcome) leaves that next call in doubt.
    if in_doubt:
        assert point in ("after_intent", "after_tool", "after_outcome"), (failpoint, in_doubt)
        assert any(d.startswith(("retry", "skip")) for d in decisions)


def test_in_doubt_step_is_not_rerun_without_a_decision(tmp_path: Path, db_url: str) -> None:
    """Killed after the side effect but before its outcome: resume asks, and does not rerun."""
    workspace = make_workspace(tmp_path / "ws")
    db = db_url
    # The third intent of the first process is append-one (read_runbook, prepare, append-one).
    code = _cli(workspace, db, "runbook", "crash-drill", "--run-id", "d", failpoint="after_tool:3")
    assert code == -signal.SIGKILL
    assert _lines(workspace) == ["one"]
    assert _cli(workspace, db, "resume", "--run-id", "d") == 0  # waiting is exit 0
    status, pending = _run_row(db, "d")
    assert status == "waiting_approval"
    assert pending == ("in_doubt", "append-one")
    assert _lines(workspace) == ["one"], "the in-doubt step ran again without a decision"
    # Resuming again changes nothing: the run waits for a human.
    assert _cli(workspace, db, "resume", "--run-id", "d") == 0
    assert _lines(workspace) == ["one"]
    assert _cli(workspace, db, "approve", "--run-id", "d", "--as", "approver", "--skip") == 0
    assert _run_row(db, "d") == ("waiting_approval", ("gate", "append-two"))
    assert _lines(workspace) == ["one"]


def test_an_in_doubt_step_is_decided_over_http_and_unknown_fields_are_refused(
    tmp_path: Path, db_url: str
) -> None:
    """`loom-ops serve` offers what the CLI and the chat offer on a step in doubt: approve
    with `skip` (it ran: treat as done) marks it done without running it again. A body with a
    field the API does not know is a 422 that changes nothing, never a decision that ignored
    the field; `skip` with reject is refused too."""
    workspace = make_workspace(tmp_path / "ws")
    code = _cli(
        workspace, db_url, "runbook", "crash-drill", "--run-id", "h", failpoint="after_tool:3"
    )
    assert code == -signal.SIGKILL
    assert _cli(workspace, db_url, "resume", "--run-id", "h") == 0
    assert _run_row(db_url, "h") == ("waiting_approval", ("in_doubt", "append-one"))

    serve = ServeProcess(workspace, db_url, free_port()).start(
        LOOM_OPS_ALLOW_SHELL="1", LOOM_OPS_API_USER="cli:approver"
    )
    try:
        with httpx.Client(base_url=serve.url, timeout=15) as client:
            for path, body in (
                ("approve", {"approval_id": 1, "skip": True}),  # `approval` is the field
                ("reject", {"skip": True}),
            ):
                refused = client.post(f"/runs/h/{path}", json=body)
                assert refused.status_code == 422, refused.text
                assert set(refused.json()) == {"error"}, refused.text
                assert _run_row(db_url, "h") == ("waiting_approval", ("in_doubt", "append-one"))
            skipped = client.post("/runs/h/approve", json={"approval": 1, "skip": True})
            assert skipped.status_code == 200, skipped.text
            deadline = time.monotonic() + 15  # serve drives the run on, to the next gate
            while _run_row(db_url, "h") != ("waiting_approval", ("gate", "append-two")):
                assert time.monotonic() < deadline, _run_row(db_url, "h")
                time.sleep(0.05)
    finally:
        serve.stop()
    assert _lines(workspace) == ["one"], "the skipped step ran again"
    decided = raw_rows(
        db_url, "SELECT status, decided_by FROM approvals WHERE run_id = 'h' ORDER BY id"
    )[0]
    assert decided == ("skipped", "cli:approver")


def test_sigkill_inside_a_running_command(tmp_path: Path, db_url: str) -> None:
    """An external SIGKILL while the command runs: the step is in doubt; retry runs it again."""
    workspace = make_workspace(tmp_path / "ws")
    db = db_url
    _slow_append_one(workspace)  # the kill lands while the child process is still running

    proc = subprocess.Popen(
        [*LOOM_OPS, "runbook", "crash-drill", "--run-id", "k"],
        cwd=workspace,
        env=_env(workspace, db),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_for_line(workspace, "one", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)

    assert _cli(workspace, db, "resume", "--run-id", "k") == 0
    status, pending = _run_row(db, "k")
    assert (status, pending) == ("waiting_approval", ("in_doubt", "append-one"))
    # A human who decides to retry gets the step run once more: a second "one" line.
    assert _cli(workspace, db, "approve", "--run-id", "k", "--as", "approver") == 0
    assert _lines(workspace) == ["one", "one"]
    assert _run_row(db, "k") == ("waiting_approval", ("gate", "append-two"))
    attempt = _one(db, "SELECT attempt, status FROM tool_calls WHERE step_id = 'append-one'")
    assert attempt == (2, "ok")


def test_in_doubt_is_judged_by_the_settings_of_the_intent(tmp_path: Path, db_url: str) -> None:
    """A live step caught mid-call stays in doubt even if the resume runs in dry-run mode."""
    workspace = make_workspace(tmp_path / "ws")
    db = db_url
    code = _cli(workspace, db, "runbook", "crash-drill", "--run-id", "m", failpoint="after_tool:3")
    assert code == -signal.SIGKILL
    assert _cli(workspace, db, "resume", "--run-id", "m", live=False) == 0
    assert _run_row(db, "m") == ("waiting_approval", ("in_doubt", "append-one"))
    assert _lines(workspace) == ["one"]


def test_resume_without_an_id_picks_up_every_orphan(tmp_path: Path, db_url: str) -> None:
    """Two runs whose process died: a bare `loom-ops resume` drives both on."""
    workspace = make_workspace(tmp_path / "ws")
    db = db_url
    for run_id in ("o1", "o2"):
        code = _cli(
            workspace, db, "runbook", "crash-drill", "--run-id", run_id, failpoint="after_outcome:1"
        )
        assert code == -signal.SIGKILL
        assert _run_row(db, run_id)[0] == "running"
    assert _cli(workspace, db, "resume") == 0
    for run_id in ("o1", "o2"):
        assert _run_row(db, run_id) == ("waiting_approval", ("gate", "append-two"))
    assert _lines(workspace) == ["one", "one"]


ORPHAN_DRILL = """\
id: orphan-drill
title: Orphan drill
triggers: [orphan drill]
approvers: [cli:approver]
steps:
  - id: act
    title: Start, then make effects a little later (one from a setsid grandchild)
    run: "{python} orphan.py"
  - id: done
    title: Done
    note: done
"""

# Writes "start" at once; 1.5 s later the command writes "effect" and its grandchild, which
# left the process group and session with setsid, writes "grandchild".
ORPHAN_SCRIPT = """\
import os, sys, time
def line(text):
    with open("out.txt", "a") as handle:
        handle.write(text + "\\n")
if os.fork() == 0:
    os.setsid()
    time.sleep(1.5)
    line("grandchild")
    os._exit(0)
line("start")
time.sleep(1.5)
line("effect")
"""


def test_a_killed_drivers_command_dies_and_resume_proves_it_before_asking(
    tmp_path: Path, db_url: str
) -> None:
    """SIGKILL of `loom-ops` while its command runs: the command and its setsid grandchild
    die with their driver (the attempt's guard kills them), the next driver proves nothing of
    the attempt is left before it opens the in-doubt request; no effect ever lands."""
    workspace = make_workspace(tmp_path / "ws")
    db = db_url
    python = str(Path(sys.executable).absolute())
    (workspace / "runbooks" / "orphan-drill.yaml").write_text(
        ORPHAN_DRILL.replace("{python}", python)
    )
    (workspace / "orphan.py").write_text(ORPHAN_SCRIPT)
    rules = json.loads((workspace / "ops.shell.allowlist.json").read_text())
    rules["rules"].append({"argv": [python, "orphan.py"]})
    (workspace / "ops.shell.allowlist.json").write_text(json.dumps(rules))

    proc = subprocess.Popen(
        [*LOOM_OPS, "runbook", "orphan-drill", "--run-id", "o"],
        cwd=workspace,
        env=_env(workspace, db),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_for_line(workspace, "start", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)

    assert _cli(workspace, db, "resume", "--run-id", "o") == 0
    assert _run_row(db, "o") == ("waiting_approval", ("in_doubt", "act"))
    reason = _one(db, "SELECT reason FROM approvals WHERE run_id = 'o' AND kind = 'in_doubt'")
    # The command's guard killed it and its setsid grandchild when the driver died; the resume
    # proves nothing of the attempt is left before it asks a person.
    assert reason is not None and "no process of attempt 1 is left" in reason[0], reason
    time.sleep(2.5)  # past the moment both would have acted
    assert _lines(workspace) == ["start"]


def _unshare_works() -> bool:
    try:
        done = subprocess.run(
            ["unshare", "--pid", "--fork", "--mount-proc", "true"],
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def test_a_driver_in_another_pid_namespace_is_not_declared_dead(
    tmp_path: Path, db_url: str
) -> None:
    """Two drivers share a hostname but not a PID namespace (host-networked containers): the
    second must not take the run over while the first one's command still runs."""
    if not _unshare_works():
        pytest.skip("`unshare --pid --fork --mount-proc` is missing or not permitted here")
    workspace = make_workspace(tmp_path / "ws")
    db = db_url
    _slow_append_one(workspace)
    # Inside, pids are used up first so that the driver's pid (about 500) names no process out
    # here: an owner check by hostname and pid alone would declare it dead. `; true` keeps the
    # shell as the namespace's pid 1 rather than exec'ing the driver.
    burn = "i=0; while [ $i -lt 500 ]; do /bin/true; i=$((i+1)); done"
    driver = " ".join([*LOOM_OPS, "runbook", "crash-drill", "--run-id", "ns"])
    inner = f"{burn}; {driver}; true"
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", inner],
        cwd=workspace,
        env=_env(workspace, db),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_line(workspace, "one", proc)
        owner = _one(db, "SELECT lease_owner FROM runs WHERE id = 'ns'")
        assert owner is not None, owner
        inner_pid = int(owner[0].split(":")[1])
        assert not Path(f"/proc/{inner_pid}").exists(), f"pid {inner_pid} exists out here too"

        resumed = subprocess.run(
            [*LOOM_OPS, "resume", "--run-id", "ns"],
            cwd=workspace,
            env=_env(workspace, db),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert resumed.returncode != 0, resumed.stdout
        assert "is being driven by" in resumed.stderr, resumed.stderr
        assert "Traceback" not in resumed.stderr
        assert _lines(workspace) == ["one"]
    finally:
        proc.wait(timeout=30)
    assert _run_row(db, "ns") == ("waiting_approval", ("gate", "append-two"))
    assert _lines(workspace) == ["one"]


TWO_PERSON_DRILL = """\
id: two-person-drill
title: Two-person drill
triggers: [two person drill]
steps:
  - id: append-one
    title: Append line one
    run: "{python} append.py one"
    approval: {{required: 2, from: [group:approvers, group:leads]}}
"""


def test_retrying_an_in_doubt_step_needs_as_many_people_as_running_it(
    tmp_path: Path, db_url: str
) -> None:
    """A step needs two people; the driver dies just before its command starts, so the step
    is in doubt. Running it again is the same act: one person's retry is counted and the
    run waits; the second person's runs the step, once."""
    workspace = make_workspace(tmp_path / "ws")
    python = str(Path(sys.executable).absolute())
    drill = workspace / "runbooks" / "two-person-drill.yaml"
    drill.write_text(TWO_PERSON_DRILL.format(python=python))
    assert _cli(workspace, db_url, "runbook", "two-person-drill", "--run-id", "tp") == 0
    assert _cli(workspace, db_url, "approve", "--run-id", "tp", "--as", "oncall") == 0
    killed = _cli(
        workspace, db_url, "approve", "--run-id", "tp", "--as", "lead", failpoint="before_effect:1"
    )
    assert killed == -signal.SIGKILL
    assert _cli(workspace, db_url, "resume", "--run-id", "tp") == 0
    assert _pending(db_url, "tp") == (2, "in_doubt", "append-one")
    assert _one(db_url, "SELECT required FROM approvals WHERE number = 2") == (2,)

    approve = ["approve", "--run-id", "tp", "--approval", "2"]
    assert _cli(workspace, db_url, *approve, "--as", "oncall") == 0

    assert _run_row(db_url, "tp") == ("waiting_approval", ("in_doubt", "append-one"))
    assert _lines(workspace) == [], "one person retried a step that needs two"
    assert _cli(workspace, db_url, *approve, "--as", "lead") == 0
    assert _run_row(db_url, "tp") == ("succeeded", None)
    assert _lines(workspace) == ["one"]
