"""Helpers shared across the suite: the shipped runbooks' request texts and a two-gate runbook,
services over real SQLite files, extra runbooks and allowlist rules written into the test
workspace, scripted policies, and raw reads of the database."""

from __future__ import annotations

import json
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg

from agent.policy.base import (
    FinalAnswer,
    Observation,
    Policy,
    PolicyContext,
    PolicyDecision,
    ToolCall,
)
from agent.policy.mock import MockPolicy
from agent.runbook.model import RunbookCatalog
from agent.service.runs import RunService
from agent.settings import Settings
from agent.store import RunStore

PYTHON = str(Path(sys.executable).absolute())
LATENCY = "incident: API latency spike"
DISK = "disk almost full on /var"
DEPLOY = "failed deploy of checkout-api"

# Two gated steps one after the other: a decision meant for the first must not open the second.
TWO_GATES = """\
id: two-gates
title: Two gates
triggers: [two gates]
approvers: [cli:approver]
steps:
  - id: first
    title: First gated step
    run: echo first
    approval: required
  - id: second
    title: Second gated step
    run: echo second
    approval: required
"""


@asynccontextmanager
async def open_service(
    settings: Settings, policy: Policy | None = None
) -> AsyncIterator[RunService]:
    """A RunService over the settings' database file (its own connection), closed on exit."""
    service = RunService(await RunStore.open(settings.db), settings, policy=policy)
    try:
        yield service
    finally:
        await service.close()


# One live step that takes a minute: keeps a run `running` (allow `append.py slow 60`).
SLOW_RUNBOOK = """\
id: slow-drill
title: Slow drill
description: One long live step, to keep a run running.
triggers: [slow drill]
approvers: [cli:oncall]
steps:
  - id: slow
    title: Take a while
    run: "{python} append.py slow 60"
    timeout: 120
"""


def write_runbook(workspace: Path, runbook_id: str, text: str) -> Path:
    """Write a runbook YAML into the workspace; `{python}` in `text` becomes this interpreter."""
    path = workspace / "runbooks" / f"{runbook_id}.yaml"
    path.write_text(text.replace("{python}", PYTHON))
    return path


def allow(workspace: Path, *argv: str) -> None:
    """Add one allowlist rule (argv tokens after the interpreter) to the workspace allowlist."""
    path = workspace / "ops.shell.allowlist.json"
    rules = json.loads(path.read_text())
    rules["rules"].append({"argv": [PYTHON, *argv]})
    path.write_text(json.dumps(rules))


def lines(workspace: Path, name: str = "out.txt") -> list[str]:
    """The lines a live step appended to a file in the workspace (none if it does not exist)."""
    path = workspace / name
    return path.read_text().splitlines() if path.exists() else []


def call(name: str, **args: Any) -> ToolCall:
    """A tool call as a policy would propose it."""
    return ToolCall(name=name, args=dict(args))


def turn(*calls: ToolCall) -> PolicyDecision:
    """One policy turn proposing `calls`."""
    return PolicyDecision(calls=list(calls))


def final(outcome: str = "failed", summary: str = "scripted end") -> PolicyDecision:
    """A policy turn that ends the run."""
    return PolicyDecision(final=FinalAnswer(outcome=outcome, summary=summary))  # type: ignore[arg-type]


def turns_seen(history: Sequence[Observation]) -> int:
    """How many distinct policy turns have finished calls in `history` (from the call keys)."""
    return len({obs.call_key.rsplit("#", 1)[1].split(".")[0] for obs in history})


class ScriptedPolicy:
    """A policy that plays a fixed script: turn N is `script[N]`, N counted from the journal.

    Counting turns from the history (not from calls made) keeps the script aligned when a
    different process resumes the run with a fresh instance. `asked` counts `decide` calls.
    """

    name = "scripted"

    def __init__(self, script: Sequence[PolicyDecision]) -> None:
        self.script = list(script)
        self.asked = 0

    def preflight(self, request: str, catalog: RunbookCatalog) -> None:
        """Accept every request: the script decides what happens."""

    async def decide(self, context: PolicyContext) -> PolicyDecision:
        """The scripted answer for the next turn; past the end, a failed final answer."""
        self.asked += 1
        index = turns_seen(context.history)
        return self.script[index] if index < len(self.script) else final("failed", "script over")


class CountingPolicy:
    """The real mock policy, counting how often the kernel asks it (and optionally failing once).

    `fail_on` names the 1-based `decide` calls that raise instead of answering, like an LLM
    outage; the message carries a secret so tests can see whether it reaches the journal.
    """

    name = "mock"

    def __init__(self, fail_on: Sequence[int] = (), error: str = "LLM outage") -> None:
        self.inner = MockPolicy()
        self.asked = 0
        self.fail_on = set(fail_on)
        self.error = error

    def preflight(self, request: str, catalog: RunbookCatalog) -> None:
        """Delegate to the mock policy."""
        self.inner.preflight(request, catalog)

    async def decide(self, context: PolicyContext) -> PolicyDecision:
        """Count, fail when told to, else answer as the mock policy."""
        self.asked += 1
        if self.asked in self.fail_on:
            raise RuntimeError(self.error)
        return await self.inner.decide(context)


def raw_rows(db: str | Path, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Rows of a query (`?` placeholders) through a separate plain connection: sqlite3 for a
    file, psycopg for a `postgresql://` URL."""
    if str(db).startswith("postgresql://"):
        with psycopg.connect(str(db), autocommit=True) as pg:
            cursor = pg.execute(sql.replace("?", "%s"), tuple(params))  # type: ignore[arg-type]
            return [tuple(row) for row in cursor.fetchall()] if cursor.description else []
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute(sql, tuple(params)).fetchall()
        conn.commit()
        return rows
    finally:
        conn.close()


def table_text(db: str | Path, tables: Sequence[str]) -> dict[str, str]:
    """Every row of each table rendered as text, to search for strings that must not be there."""
    return {table: repr(raw_rows(db, f"SELECT * FROM {table}")) for table in tables}


Factory = Callable[[], Policy]
