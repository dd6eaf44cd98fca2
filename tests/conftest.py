"""Shared fixtures: a real workspace on disk, real settings, a real store and service."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest

from agent.service.runs import RunService
from agent.settings import Settings
from tests.cli_helpers import write_test_people

REPO = Path(__file__).resolve().parent.parent

# A runbook whose live steps append a line to a file: the side effect the crash tests count.
DRILL_RUNBOOK = """\
id: crash-drill
title: Crash drill
description: Appends lines to out.txt so tests can count side effects.
triggers: [crash drill]
approvers: [cli:approver]
steps:
  - id: prepare
    title: Say what is about to happen
    note: appending to out.txt
  - id: append-one
    title: Append line one
    run: "{python} append.py one"
  - id: append-two
    title: Append line two
    run: "{python} append.py two"
    approval: required
    rollback:
      run: "{python} append.py undo-two"
  - id: verify
    title: Health check
    check:
      url: http://127.0.0.1:9/healthz
"""

APPEND_SCRIPT = """\
import sys, time
with open("out.txt", "a") as handle:
    handle.write(sys.argv[1] + "\\n")
    handle.flush()
time.sleep(float(sys.argv[2]) if len(sys.argv) > 2 else 0)
"""


def make_workspace(root: Path) -> Path:
    """A workspace with the shipped runbooks, the crash drill, an allowlist for it, and the
    tests' people (tests.cli_helpers.TEST_PEOPLE)."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "runbooks", root / "runbooks", dirs_exist_ok=True)
    python = str(Path(sys.executable).absolute())
    (root / "runbooks" / "crash-drill.yaml").write_text(DRILL_RUNBOOK.format(python=python))
    (root / "append.py").write_text(APPEND_SCRIPT)
    allowlist = {
        "rules": [{"argv": [python, "append.py", "re:one|two|undo-two"]}],
        "path": [str(Path(python).parent)],
    }
    (root / "ops.shell.allowlist.json").write_text(json.dumps(allowlist))
    write_test_people(root)
    return root


PG_DSN_VARIABLE = "LOOM_OPS_TEST_PG_DSN"


def postgres_dsn() -> str:
    """The PostgreSQL server the PostgreSQL half of the tests uses, or a skip saying why not."""
    dsn = os.environ.get(PG_DSN_VARIABLE, "").strip()
    if not dsn:
        pytest.skip(f"PostgreSQL half: {PG_DSN_VARIABLE} is not set (.ci/run sets it)")
    return dsn


@contextlib.contextmanager
def postgres_schema() -> Iterator[str]:
    """A fresh, empty schema on the test server: the URL of a database whose search_path is
    that schema, so each test has its own tables. Dropped afterwards."""
    dsn = postgres_dsn()
    schema = f"loom_test_{secrets.token_hex(6)}"
    try:
        admin = psycopg.connect(dsn, autocommit=True, connect_timeout=5)
    except psycopg.Error as exc:
        pytest.fail(f"{PG_DSN_VARIABLE}={dsn} is set but unreachable: {exc}")
    with admin:
        admin.execute(f"CREATE SCHEMA {schema}")
        separator = "&" if "?" in dsn else "?"
        try:
            yield f"{dsn}{separator}options={quote(f'-csearch_path={schema}')}"
        finally:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The database of a test that runs on both engines: a fresh SQLite file, then a fresh
    PostgreSQL schema (skipped, with the reason, when no test server is configured)."""
    if request.param == "sqlite":
        yield str(tmp_path / "ops.sqlite")
        return
    with postgres_schema() as url:
        yield url


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A fresh workspace directory."""
    return make_workspace(tmp_path / "ws")


@pytest.fixture
def settings(workspace: Path, tmp_path: Path) -> Settings:
    """Settings for a mock-LLM, dry-run service over a fresh database file."""
    return Settings(
        _env_file=None,
        db=str(tmp_path / "ops.sqlite"),
        workspace=workspace,
        mock_llm=True,
        user="tester",
    )


@pytest.fixture
async def service(settings: Settings) -> AsyncIterator[RunService]:
    """An open RunService; closed after the test."""
    svc = await RunService.open(settings)
    try:
        yield svc
    finally:
        await svc.close()
