"""/metrics: a real scrape of a real `serve` passes Debian's `promtool check metrics`; label
values stay bounded whatever a model proposes; refused calls are counted but have no duration;
counters survive a restart of `serve` and two processes folding at once; LLM, MCP and chat
delivery are counted; a scrape reads no more when the store holds more finished runs."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.errors import PolicyMisconfigured, PolicyUnavailable
from agent.policy.base import PolicyContext, PolicyDecision
from agent.records import Decision, Origin, RunStatus
from agent.runbook.model import RunbookCatalog
from agent.settings import Settings
from agent.store import RunStore
from agent.store.metrics import Fold
from agent.views.metrics import render_metrics
from bot.store import ChatStore
from tests.cli_helpers import REPO
from tests.http_harness import ServeProcess, free_port, poll_run
from tests.support import DISK, LATENCY, ScriptedPolicy, call, final, open_service

ONCALL = "cli:oncall"  # an approver of the shipped runbooks


def samples(text: str) -> dict[str, float]:
    """The samples of a Prometheus text exposition, by name and labels as written."""
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            found[name] = float(value)
    return found


def counted(text: str) -> dict[str, float]:
    """The samples that only ever grow: counters and histograms."""
    growing = ("_total", "_bucket", "_count", "_sum")
    return {k: v for k, v in samples(text).items() if k.split("{")[0].endswith(growing)}


async def scrape(settings: Settings) -> str:
    """/metrics as the HTTP route renders it, over a service of its own."""
    async with open_service(settings) as service:
        return render_metrics(await service.metrics()).decode()


@pytest.fixture
def any_settings(workspace: Path, db_url: str) -> Settings:
    """Settings for a mock-LLM service over a fresh database of either engine."""
    return Settings(_env_file=None, db=db_url, workspace=workspace, mock_llm=True, user="tester")


# -- a real serve --------------------------------------------------------------------------------


def _approved_run(server: ServeProcess, run_id: str) -> str:
    """A run through its approval to the end over HTTP; the scrape after it."""
    with httpx.Client(base_url=server.url, timeout=10) as c:
        body = {"message": DISK, "run_id": run_id, "role": "runbook"}
        assert c.post("/runs", json=body).status_code == 201
        poll_run(c, run_id, lambda r: r["approval"] is not None)
        assert c.post(f"/runs/{run_id}/approve").status_code == 200
        assert poll_run(c, run_id)["status"] == "succeeded"
        response = c.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        return response.text


def test_a_scrape_of_serve_after_a_run_passes_promtool(tmp_path: Path, workspace: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool missing: apt-get install prometheus (.ci/run does)")
    server = ServeProcess(workspace, tmp_path / "ops.sqlite", free_port(), LOOM_OPS_API_USER=ONCALL)
    server.start()
    try:
        text = _approved_run(server, "inc-1")
    finally:
        server.stop()

    checked = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0 and checked.stdout + checked.stderr == "", checked
    values = samples(text)
    assert values['loom_ops_runs_finished_total{status="succeeded"}'] == 1
    assert values['loom_ops_runs{status="waiting_approval"}'] == 0
    assert values['loom_ops_approvals_decided_total{decision="approved"}'] == 1
    assert values['loom_ops_approval_wait_seconds_count{decision="approved"}'] == 1
    assert values['loom_ops_tool_call_duration_seconds_count{tool="execute_step"}'] > 0
    assert values['loom_ops_llm_calls_total{policy="mock"}'] > 0
    assert "# TYPE loom_ops_tool_calls_total counter" in text
    assert "# TYPE loom_ops_llm_tokens_total counter" in text
    assert "loom_ops_llm_tokens{" not in text  # a cumulative count is never a gauge again
    # The mock's answers use no tokens: the series is there at 0, so a rate over it is 0.
    assert values['loom_ops_llm_tokens_total{kind="prompt",policy="mock"}'] == 0
    assert values['loom_ops_llm_tokens_total{kind="completion",policy="mock"}'] == 0


def test_counters_survive_a_restart_of_serve(tmp_path: Path, workspace: Path) -> None:
    db = tmp_path / "ops.sqlite"
    first = ServeProcess(workspace, db, free_port(), LOOM_OPS_API_USER=ONCALL).start()
    try:
        before = counted(_approved_run(first, "before"))
    finally:
        first.stop()

    second = ServeProcess(workspace, db, free_port(), LOOM_OPS_API_USER=ONCALL).start()
    try:
        with httpx.Client(base_url=second.url, timeout=10) as c:
            again = counted(c.get("/metrics").text)
        after = counted(_approved_run(second, "after"))
    finally:
        second.stop()

    assert again == before  # nothing happened in between: the very same counts
    assert all(after.get(name, 0) >= value for name, value in before.items())
    assert before['loom_ops_runs_finished_total{status="succeeded"}'] == 1
    assert after['loom_ops_runs_finished_total{status="succeeded"}'] == 2


# -- what is counted, and under which labels -----------------------------------------------------


async def test_an_invented_tool_is_counted_as_other(settings: Settings) -> None:
    script = [
        PolicyDecision(calls=[call("kubectl_exec", cmd="delete pod")], prompt_tokens=120),
        final("failed", "nothing to do"),
    ]
    async with open_service(settings, ScriptedPolicy(script)) as service:
        await service.start("made-up", LATENCY)
        text = render_metrics(await service.metrics()).decode()

    values = samples(text)
    assert values['loom_ops_tool_calls_total{status="refused",tool="other"}'] == 1
    assert "kubectl_exec" not in text
    assert values['loom_ops_llm_calls_total{policy="other"}'] == 2  # "scripted" is no known one
    assert values['loom_ops_llm_call_duration_seconds_count{policy="other"}'] == 2
    assert values['loom_ops_llm_tokens_total{kind="prompt",policy="other"}'] == 120
    assert values['loom_ops_runs_finished_total{status="failed"}'] == 1


def test_a_status_role_or_decision_nobody_knows_is_counted_as_other() -> None:
    """What another version (or a damaged row) wrote adds no series either."""
    fold = Fold(known_tools=["execute_step"])
    nothing = dict.fromkeys(
        ("role", "status", "error", "policy", "prompt_tokens", "completion_tokens"), None
    )
    nothing |= dict.fromkeys(("latency_ms", "duration_ms", "mcp_tool", "mode", "tool"), None)
    for row in (
        {"type": "run_created", "ts": 1.0, **nothing, "role": "janitor"},
        {"type": "run_finished", "ts": 1.0, **nothing, "status": "vanished"},
        {"type": "tool_outcome", "ts": 1.0, **nothing, "status": "maybe", "tool": "execute_step"},
        {"type": "approval_decided", "ts": 1.0, **nothing, "status": "shrug", "requested_at": 0},
    ):
        fold.event(row)
    assert set(fold.deltas) == {
        ("runs_started", (("role", "other"),)),
        ("runs_finished", (("status", "other"),)),
        ("tool_calls", (("status", "other"), ("tool", "execute_step"))),
        ("approvals_decided", (("decision", "other"),)),
        ("approval_wait_seconds", (("decision", "other"), ("le", "10"))),
        ("approval_wait_seconds_sum", (("decision", "other"),)),
    }


async def test_a_refused_call_is_counted_but_not_timed(settings: Settings) -> None:
    """A step before any runbook is chosen is refused: it counts among the calls, and the
    duration histogram holds only the call that ran."""
    script = [
        PolicyDecision(calls=[call("execute_step", step_id="check-disk")]),
        PolicyDecision(calls=[call("read_runbook")]),
        final("failed", "stop"),
    ]
    async with open_service(settings, ScriptedPolicy(script)) as service:
        await service.start("refused", DISK)
        values = samples(render_metrics(await service.metrics()).decode())

    assert values['loom_ops_tool_calls_total{status="refused",tool="execute_step"}'] == 1
    assert 'loom_ops_tool_call_duration_seconds_count{tool="execute_step"}' not in values
    assert values['loom_ops_tool_calls_total{status="ok",tool="read_runbook"}'] == 1
    assert values['loom_ops_tool_call_duration_seconds_count{tool="read_runbook"}'] == 1


class FailingPolicy:
    """A policy that fails the way the LLM policy does: an outage, or a wrong setting."""

    name = "openai:test-model"

    def __init__(self, error: Exception) -> None:
        self.error = error

    def preflight(self, request: str, catalog: RunbookCatalog) -> None:
        """Accept every request."""

    async def decide(self, context: PolicyContext) -> PolicyDecision:
        """Fail."""
        raise self.error


async def test_llm_failures_are_counted_by_reason(settings: Settings) -> None:
    outage = PolicyUnavailable("LLM request failed: APIConnectionError: Connection error.")
    wrong = PolicyMisconfigured("LLM misconfigured: check OPENAI_API_KEY (HTTP 401 for …)")
    async with open_service(settings, FailingPolicy(outage)) as service:
        await service.start("down", LATENCY)  # interrupted: resumable once the LLM is back
    async with open_service(settings, FailingPolicy(wrong)) as service:
        assert (await service.start("wrong", LATENCY)).status == RunStatus.FAILED

    values = samples(await scrape(settings))
    assert values['loom_ops_llm_call_errors_total{reason="unavailable"}'] == 1
    assert values['loom_ops_llm_call_errors_total{reason="misconfigured"}'] == 1
    assert values["loom_ops_runs_interrupted_total"] == 1


MCP_RUNBOOK = """\
id: mcp-drill
title: MCP drill
triggers: [mcp drill]
steps:
  - id: act
    title: Call the tool
    mcp: {tool: restart_service, arguments: {service: api}}
  - id: probe
    title: Health through MCP
    check:
      mcp: {tool: probe}
"""


async def test_live_mcp_calls_are_counted_and_timed(settings: Settings, workspace: Path) -> None:
    (workspace / "runbooks" / "mcp-drill.yaml").write_text(MCP_RUNBOOK)
    server = REPO / "tests" / "mcp_servers" / "ops_server.py"
    config = {
        "servers": {"ops": {"command": sys.executable, "args": [str(server)]}},
        "tools": {
            "restart_service": {"server": "ops", "tool": "restart"},
            "probe": {"server": "ops", "tool": "healthy"},
        },
    }
    (workspace / "ops.mcp.json").write_text(json.dumps(config))
    live = settings.model_copy(update={"allow_mcp": True, "live_checks": True})
    async with open_service(live) as service:
        assert (await service.start("m", "mcp-drill")).status == RunStatus.SUCCEEDED
        values = samples(render_metrics(await service.metrics()).decode())

    assert values['loom_ops_mcp_calls_total{mode="live",status="ok"}'] == 2
    assert values['loom_ops_mcp_call_duration_seconds_count{status="ok"}'] == 2
    assert values['loom_ops_mcp_call_duration_seconds_sum{status="ok"}'] > 0


async def test_chat_deliveries_are_counted(db_url: str) -> None:
    """Queued, delivered, retried and given up, on both engines (each has its triggers)."""
    from tests.store.test_runstore import _claimed_run

    store = await RunStore.open(db_url)
    try:
        await _claimed_run(store, "chat", Origin(kind="telegram", chat_id=42))
        await _claimed_run(store, "chat-2", Origin(kind="telegram", chat_id=43))
        chat = ChatStore(store.db)
        first, second = await chat.undelivered_messages()
        await chat.record_delivery_failure(first.id, "timed out", retry_at=0.0)
        assert await chat.mark_delivered(first.id, 1001)
        assert not await chat.mark_delivered(first.id, 1002)  # recorded once, counted once
        await chat.record_delivery_failure(second.id, "Forbidden: bot was blocked", None)
        snapshot = await store.metrics_snapshot()
    finally:
        await store.close()

    assert snapshot.value("outbox_delivered") == 1
    assert snapshot.value("outbox_delivery_failures", outcome="retry") == 1
    assert snapshot.value("outbox_delivery_failures", outcome="gave_up") == 1
    values = samples(render_metrics(snapshot).decode())
    assert values["loom_ops_outbox_queued_total"] == 2 + snapshot.outbox_pending


# -- what a scrape costs -------------------------------------------------------------------------


class Recorder:
    """Wraps a store's database: every statement a transaction runs, and the rows it read."""

    def __init__(self, db: Any) -> None:
        self.db = db
        self.statements: list[tuple[str, Sequence[Any]]] = []
        self.rows = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)

    def _wrap(self, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        recorder = self

        class Conn:
            def __init__(self, conn: Any) -> None:
                self.conn = conn

            def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
                recorder.statements.append((sql, params))
                return Cursor(self.conn.execute(sql, params))

            def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> Any:
                rows = list(rows)
                recorder.statements.append((sql, rows[0] if rows else ()))
                return self.conn.executemany(sql, rows)

        class Cursor:
            def __init__(self, cursor: Any) -> None:
                self.cursor = cursor

            def fetchone(self) -> Any:
                recorder.rows += 1
                return self.cursor.fetchone()

            def fetchall(self) -> list[Any]:
                rows = self.cursor.fetchall()
                recorder.rows += len(rows)
                return rows

        return lambda conn: fn(Conn(conn))

    async def transaction(
        self, fn: Callable[[Any], Any], durable: bool = False, brief: bool = False
    ) -> Any:
        return await self.db.transaction(self._wrap(fn), durable, brief)

    async def read(self, fn: Callable[[Any], Any]) -> Any:
        return await self.db.read(self._wrap(fn))


async def _cost_of_a_scrape(store: RunStore, db: str) -> tuple[list[str], int]:
    """The statements of a scrape with nothing new to fold, and the rows it read besides the
    counter series: one row each, a bounded set that more runs need not grow, but may (a
    histogram's bucket appears when an observation first falls in it, say a step slower
    than the ones before on a loaded machine)."""
    await store.metrics_snapshot()  # fold what is new
    recorder = Recorder(store.db)
    store.db = recorder  # type: ignore[assignment]
    try:
        await store.metrics_snapshot()
    finally:
        store.db = recorder.db
    with sqlite3.connect(db) as conn:
        series = conn.execute("SELECT COUNT(*) FROM metric_counters").fetchone()[0]
    return [sql for sql, _ in recorder.statements], recorder.rows - series


async def _finish_runs(settings: Settings, names: Iterable[str]) -> None:
    async with open_service(settings) as service:
        for name in names:
            await service.start(name, DISK)
            await service.decide(name, Decision.APPROVE, ONCALL)


async def test_a_scrape_reads_no_more_when_more_runs_have_finished(settings: Settings) -> None:
    await _finish_runs(settings, ["r0"])
    store = await RunStore.open(settings.db)
    try:
        statements, rows = await _cost_of_a_scrape(store, settings.db)
        await _finish_runs(settings, [f"r{n}" for n in range(1, 6)])
        assert (await _cost_of_a_scrape(store, settings.db)) == (statements, rows)
        await _finish_runs(settings, ["r6"])
        recorder = Recorder(store.db)
        store.db = recorder  # type: ignore[assignment]
        try:
            await store.metrics_snapshot()  # the scrape that folds one more run's events
        finally:
            store.db = recorder.db
    finally:
        await store.close()

    # Every statement a scrape runs, folding included, finds its rows through an index: none
    # walks the runs, the journal, the calls, the approvals or the delivered messages.
    conn = sqlite3.connect(settings.db)
    try:
        for sql, params in {(sql, tuple(p)) for sql, p in recorder.statements}:
            if sql.startswith(("SELECT", "WITH")):
                plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params)]
                scans = [step for step in plan if step.startswith("SCAN ")]
                assert all(
                    s.startswith(("SCAN metric_counters", "SCAN outbox USING INDEX outbox_undeliv"))
                    for s in scans
                ), (sql, plan)
    finally:
        conn.close()


async def test_two_processes_scraping_at_once_count_each_event_once(
    any_settings: Settings,
) -> None:
    """Two stores (as two `serve` processes would have) fold the same new events at once; each
    event is counted once, and neither sees a counter go down."""
    await _finish_runs(any_settings, ["a", "b"])
    db = any_settings.db
    one, two = await RunStore.open(db), await RunStore.open(db)
    try:
        first, second = await asyncio.gather(one.metrics_snapshot(), two.metrics_snapshot())
        last = await one.metrics_snapshot()
    finally:
        await one.close()
        await two.close()
    for snapshot in (first, second, last):
        assert snapshot.value("runs_finished", status="succeeded") == 2
        assert snapshot.value("runs_started", role="runbook") == 2
