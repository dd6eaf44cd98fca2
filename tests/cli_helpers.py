"""Helpers for the CLI tests: run the real `loom-ops` console script, snapshot its database."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SHIPPED_RUNBOOKS = REPO / "runbooks"
TABLES = ("runs", "events", "tool_calls", "approvals", "outbox")
CLI_USER = "tester"  # what getpass.getuser() answers in the child: the "OS user" of the tests


def find_loom_ops() -> str:
    """The installed `loom-ops` console script: next to this interpreter, else on PATH."""
    beside = Path(sys.executable).parent / "loom-ops"
    if beside.exists():
        return str(beside)
    found = shutil.which("loom-ops")
    if found is None:
        raise RuntimeError("the loom-ops console script is not installed (pip install -e .)")
    return found


LOOM_OPS = find_loom_ops()


def cli_env(**extra: str) -> dict[str, str]:
    """The child's environment: no LOOM_OPS_* leaking in from the caller, a fixed OS user."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_OPS_")}
    # getpass.getuser() reads LOGNAME/USER first, so the "OS user" is the same on every machine.
    env.update(LOGNAME=CLI_USER, USER=CLI_USER, PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


# The people of the tests' workspaces. The tests' login (CLI_USER) is a shared operations
# account, so `--as oncall` decides as oncall; oncall and sam (telegram:100000001) are in the
# group the shipped runbooks name, lead (failed-deploy-rollback's second pair of eyes) leads.
TEST_PEOPLE = f"""\
people:
  - name: {CLI_USER}
    cli: {CLI_USER}
    may_act_for_others: true
  - name: oncall
    cli: oncall
    groups: [approvers]
  - name: sam
    telegram: 100000001
    groups: [approvers]
  - name: lead
    cli: lead
    telegram: 100000002
    groups: [leads]
"""


def write_test_people(workspace: Path) -> None:
    """Give a workspace the tests' people file (see TEST_PEOPLE)."""
    (workspace / "people.yaml").write_text(TEST_PEOPLE)


def make_cli_workspace(root: Path) -> Path:
    """A workspace directory holding a copy of the shipped runbooks and the tests' people."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(SHIPPED_RUNBOOKS, root / "runbooks", dirs_exist_ok=True)
    write_test_people(root)
    return root


@dataclass(frozen=True)
class CliResult:
    """What one `loom-ops` process did: its exit code and its two output streams."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def stderr_lines(self) -> list[str]:
        """The non-empty lines written to stderr."""
        return [line for line in self.stderr.splitlines() if line.strip()]

    def json(self) -> dict[str, Any]:
        """The one JSON object on stdout; fails unless stdout is exactly one object with
        `run_id` and `status`."""
        assert self.stdout.endswith("\n") and self.stdout.count("\n") == 1, (
            f"expected one line of JSON on stdout, got {self.stdout!r}"
        )
        payload = json.loads(self.stdout)  # raises on a second object ("Extra data")
        assert isinstance(payload, dict), payload
        assert "run_id" in payload and "status" in payload, payload
        return payload

    def describe(self) -> str:
        """The whole result, for assertion messages."""
        return (
            f"argv={list(self.argv)!r}\nexit={self.returncode}\n"
            f"stdout={self.stdout!r}\nstderr={self.stderr!r}"
        )


def assert_usage_error(result: CliResult, *needles: str) -> str:
    """Check exit 2 with exactly one `loom-ops:` line on stderr (no traceback, nothing on
    stdout) that contains every needle; returns that line."""
    lines = result.stderr_lines()
    assert result.returncode == 2, result.describe()
    assert "Traceback" not in result.stderr, result.describe()
    assert len(lines) == 1, result.describe()
    assert lines[0].startswith("loom-ops: "), result.describe()
    assert result.stdout == "", result.describe()
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


class Cli:
    """Runs `loom-ops` commands against one workspace and one database file."""

    def __init__(self, workspace: Path, db: Path | str) -> None:
        self.workspace = workspace
        self.db = db

    def __call__(
        self,
        *args: str,
        db: Path | str | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 60,
    ) -> CliResult:
        """Run `loom-ops ARGS --workspace W --db D` in the workspace and wait for it."""
        argv = (
            LOOM_OPS,
            *args,
            "--workspace",
            str(self.workspace),
            "--db",
            str(db if db is not None else self.db),
        )
        done = subprocess.run(
            argv,
            cwd=self.workspace,  # no .env of the developer's checkout is read
            env=cli_env(**(env or {})),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return CliResult(argv[1:], done.returncode, done.stdout, done.stderr)


def snapshot(db: Path) -> dict[str, Any]:
    """Every row of every table (and the schema version) of a loom-ops database."""
    conn = sqlite3.connect(db)
    try:
        state: dict[str, Any] = {"user_version": conn.execute("PRAGMA user_version").fetchone()[0]}
        for table in TABLES:
            state[table] = conn.execute(f"SELECT * FROM {table} ORDER BY rowid").fetchall()
    finally:
        conn.close()
    return state
