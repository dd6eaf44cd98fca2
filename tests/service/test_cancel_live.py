"""`loom-ops cancel` against a live command whose driver is frozen: the cancel itself finds the
command's guard by its attempt marker and kills it, so nothing acts after CANCELLED. Real
processes throughout: a `loom-ops runbook` driver, SIGSTOP, and a `loom-ops cancel` process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.cli_helpers import REPO
from tests.conftest import make_workspace
from tests.support import allow, lines, raw_rows, write_runbook

LOOM_OPS = [sys.executable, "-m", "agent.frontends.cli"]
DELAY = 3.0  # the command acts this long after it starts; its step's timeout is 60 s

CANCEL_DRILL = """\
id: cancel-drill
title: Cancel drill
triggers: [cancel drill]
approvers: [cli:approver]
steps:
  - id: act
    title: Say it started, then act a few seconds later
    run: "{python} act.py"
  - id: done
    title: Done
    note: done
"""

# Ignores SIGALRM, as a command that fights containment would.
ACT_SCRIPT = f"""\
import os, signal, time
signal.signal(signal.SIGALRM, signal.SIG_IGN)
with open("act.pid.tmp", "w") as handle:
    handle.write(str(os.getpid()))
os.rename("act.pid.tmp", "act.pid")
with open("out.txt", "a") as handle:
    handle.write("start\\n")
time.sleep({DELAY})
with open("out.txt", "a") as handle:
    handle.write("effect\\n")
"""


def _env(workspace: Path, db: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_OPS_")}
    env.update(
        LOOM_OPS_DB=db,
        LOOM_OPS_WORKSPACE=str(workspace),
        LOOM_OPS_MOCK_LLM="1",
        LOOM_OPS_ALLOW_SHELL="1",
        PYTHONPATH=str(REPO),
    )
    return env


def _alive(pid: int) -> bool:
    """True if pid exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_cancel_kills_the_command_of_a_frozen_driver(tmp_path: Path, db_url: str) -> None:
    workspace = make_workspace(tmp_path / "ws")
    write_runbook(workspace, "cancel-drill", CANCEL_DRILL)
    (workspace / "act.py").write_text(ACT_SCRIPT)
    allow(workspace, "act.py")
    env = _env(workspace, db_url)
    driver = subprocess.Popen(
        [*LOOM_OPS, "runbook", "cancel-drill", "--run-id", "c"],
        cwd=workspace,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while "start" not in lines(workspace) or not (workspace / "act.pid").exists():
            assert time.monotonic() < deadline, "the command never started"
            assert driver.poll() is None
            time.sleep(0.02)
        started = time.monotonic()
        command = int((workspace / "act.pid").read_text())
        driver.send_signal(signal.SIGSTOP)  # it can neither notice the cancel nor stop anything

        cancel = subprocess.run(
            [*LOOM_OPS, "cancel", "--run-id", "c", "--json"],
            cwd=workspace,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

        assert cancel.returncode == 1, cancel.stderr  # 1: the run ended cancelled
        assert "Traceback" not in cancel.stderr
        assert not _alive(command), "the command outlived the cancel of its run"
        assert raw_rows(db_url, "SELECT status FROM runs WHERE id = 'c'") == [("cancelled",)]
        time.sleep(max(0.0, started + DELAY + 1.0 - time.monotonic()))
        assert lines(workspace) == ["start"], "the command acted after its run was cancelled"
    finally:
        driver.send_signal(signal.SIGCONT)
        try:
            _, stderr = driver.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            driver.kill()
            _, stderr = driver.communicate()
    assert "Traceback" not in stderr, stderr
