"""Benchmark of a CLI decision handed to the live process: from `loom-ops approve` starting to
the run's next step starting in the process that serves the store.

Prints p50 and p95 per kind of owner; asserts nothing. Run with `python bench/decision.py
[--runs 20]`. For each owner:

- `serve` on SQLite: `loom-ops serve` drives its runs; it learns of a decision made by another
  process at its next look (every half second);
- `serve` on PostgreSQL: the same, woken by NOTIFY;
- `worker` on PostgreSQL: `loom-ops serve --no-worker` records the runs, one `loom-ops worker`
  drives them;
- `sandbox` on SQLite: `loom-ops sandbox`, the Telegram bot against its Bot API stand-in, the
  runs started by `/run api-latency-spike` messages sent through its page's API. Its bot keeps
  the real bot's /run quota (TELEGRAM_RUN_RATE's default per user and window), so this row
  has at most that many runs.

Each run is the shipped api-latency-spike runbook (mock policy, dry-run) started over HTTP; it
waits for its approval. Then, one at a time, `loom-ops approve` decides it as a separate
process, and the figures are read from the journal: `cli` is the CLI's wall time (mostly its
start-up), `decision -> step` the time from the decision's commit to the next step's intent
(what the live process adds), `approve -> step` from the CLI's start to that intent.

PostgreSQL: LOOM_OPS_BENCH_PG_DSN, else LOOM_OPS_TEST_PG_DSN, else
postgresql://postgres@127.0.0.1/test; without a reachable server those rows are skipped.
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != BENCH]

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import secrets  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sqlite3  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from typing import Any  # noqa: E402
from urllib.parse import quote  # noqa: E402

import httpx  # noqa: E402
import psycopg  # noqa: E402

from bot.settings import TelegramSettings  # noqa: E402

LOOM_OPS = str(Path(sys.executable).parent / "loom-ops")
MESSAGE = "incident: API latency spike"
# The sandbox's incident group and its requester (bot/sandbox.py); a runbook id starts at once.
SANDBOX_CHAT, SANDBOX_USER, SANDBOX_RUN = -100777, 200000001, "/run api-latency-spike"


def rows(db: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """A query (`?` placeholders) on either engine, through a connection of its own."""
    if db.startswith("postgresql://"):
        with psycopg.connect(db, autocommit=True) as pg:
            return [tuple(r) for r in pg.execute(sql.replace("?", "%s"), params).fetchall()]
    # Read-only: the bench must not create the file before the process under test does.
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def env(workspace: Path, db: str) -> dict[str, str]:
    """The child processes' environment: mock policy, this workspace and store."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_OPS_")}
    return base | {
        "LOOM_OPS_MOCK_LLM": "1",
        "LOOM_OPS_DB": db,
        "LOOM_OPS_WORKSPACE": str(workspace),
        "LOOM_OPS_APPROVERS": "cli:oncall",  # the group the shipped runbooks name
        "LOGNAME": "bench",
        "USER": "bench",
    }


@contextlib.contextmanager
def processes(argvs: list[list[str]], workspace: Path, db: str) -> Iterator[None]:
    """Run the owner's processes for the block; SIGTERM them after."""
    procs = [
        subprocess.Popen(
            argv,
            cwd=workspace,
            env=env(workspace, db),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for argv in argvs
    ]
    try:
        yield
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


def wait_for(predicate: Any, timeout: float) -> None:
    """Poll `predicate` until it is true; raise after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("timed out")
        time.sleep(0.02)


def measure(owner: str, db: str, runs: int) -> dict[str, list[float]] | str:
    """Start `runs` runs under `owner`, decide each from the CLI, return the latencies."""
    root = Path(tempfile.mkdtemp(prefix="loom-bench-decision-"))
    workspace = root / "ws"
    workspace.mkdir()
    shutil.copytree(REPO / "runbooks", workspace / "runbooks")
    port = free_port()
    serve = [LOOM_OPS, "serve", "--host", "127.0.0.1", "--port", str(port)]
    argvs = {
        "serve": [serve],
        "worker": [[*serve, "--no-worker"], [LOOM_OPS, "worker"]],
        "sandbox": [[LOOM_OPS, "sandbox", "--mock-llm", "--port", str(port)]],
    }[owner]
    figures: dict[str, list[float]] = {"cli": [], "decision -> step": [], "approve -> step": []}
    try:
        with processes(argvs, workspace, db):
            url = f"http://127.0.0.1:{port}"
            wait_for(lambda: _healthy(url, owner), 30)
            wait_for(lambda: _registered(db) == len(argvs), 30)
            for i in range(runs):
                if owner == "sandbox":
                    say = {"chat_id": SANDBOX_CHAT, "user_id": SANDBOX_USER, "text": SANDBOX_RUN}
                    httpx.post(f"{url}/sandbox/say", json=say, timeout=30)
                else:
                    body = {"run_id": f"d{i:02d}", "message": MESSAGE}
                    httpx.post(f"{url}/runs", json=body, timeout=30)
            wait_for(
                lambda: (
                    rows(db, "SELECT COUNT(*) FROM approvals WHERE status = 'pending'")[0][0]
                    == runs
                ),
                120,
            )
            for (run_id,) in rows(db, "SELECT id FROM runs WHERE parent_id IS NULL ORDER BY id"):
                figures_of(run_id, workspace, db, figures)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return figures


def _registered(db: str) -> int:
    """How many processes have registered; 0 while the store is not there or not migrated
    (the sandbox serves its page before it opens the store)."""
    with contextlib.suppress(sqlite3.Error, psycopg.Error):
        return len(rows(db, "SELECT owner FROM processes"))
    return 0


def _healthy(url: str, owner: str) -> bool:
    path = "/sandbox/state" if owner == "sandbox" else "/healthz"
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{url}{path}", timeout=1).status_code == 200
    return False


def figures_of(run_id: str, workspace: Path, db: str, figures: dict[str, list[float]]) -> None:
    """Decide one run from the CLI and read when its next step started."""
    started = time.time()
    subprocess.run(
        [LOOM_OPS, "approve", "--run-id", run_id, "--json"],
        cwd=workspace,
        env=env(workspace, db) | {"LOOM_OPS_USER": "oncall"},  # the approver's login
        capture_output=True,
        check=True,
        timeout=60,
    )
    figures["cli"].append(time.time() - started)
    child = rows(
        db,
        "SELECT run_id FROM approvals WHERE run_id = ? OR run_id LIKE ?",
        (run_id, f"{run_id}:sub:%"),
    )[0][0]
    decided = rows(
        db, "SELECT ts FROM events WHERE run_id = ? AND type = 'approval_decided'", (child,)
    )[0][0]

    def next_intent() -> list[tuple[Any, ...]]:
        return rows(
            db,
            "SELECT MIN(ts) FROM events WHERE run_id = ? AND type = 'tool_intent' AND ts > ? "
            "HAVING MIN(ts) IS NOT NULL",
            (child, decided),
        )

    wait_for(next_intent, 30)
    step = next_intent()[0][0]
    figures["decision -> step"].append(step - decided)
    figures["approve -> step"].append(step - started)


@contextlib.contextmanager
def pg_schema(dsn: str) -> Iterator[str | None]:
    """A fresh schema on the server (dropped after), or None when it is unreachable."""
    try:
        admin = psycopg.connect(dsn, autocommit=True, connect_timeout=3)
    except psycopg.Error:
        yield None
        return
    schema = f"loom_bench_{secrets.token_hex(4)}"
    with admin:
        admin.execute(f"CREATE SCHEMA {schema}")
        separator = "&" if "?" in dsn else "?"
        try:
            yield f"{dsn}{separator}options={quote(f'-csearch_path={schema}')}"
        finally:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    dsn = os.environ.get("LOOM_OPS_BENCH_PG_DSN") or os.environ.get(
        "LOOM_OPS_TEST_PG_DSN", "postgresql://postgres@127.0.0.1/test"
    )
    print(f"loom-ops decision hand-off ({args.runs} runs per owner; seconds, p50 / p95)")
    print(f"  {'owner':<26}{'cli':>16}{'decision -> step':>22}{'approve -> step':>22}")
    report: dict[str, Any] = {}
    for label, owner, engine in (
        ("serve, SQLite", "serve", "sqlite"),
        ("serve, PostgreSQL", "serve", "postgresql"),
        ("worker, PostgreSQL", "worker", "postgresql"),
        ("sandbox (bot), SQLite", "sandbox", "sqlite"),
    ):
        with contextlib.ExitStack() as stack:
            if engine == "sqlite":
                directory = stack.enter_context(tempfile.TemporaryDirectory())
                db: str | None = str(Path(directory) / "ops.sqlite")
            else:
                db = stack.enter_context(pg_schema(dsn))
            if db is None:
                print(f"  {label:<26}skipped: no PostgreSQL at {dsn}")
                continue
            runs = args.runs
            if owner == "sandbox":  # one requester: the rest would be refused by the quota
                runs = min(runs, TelegramSettings.model_fields["run_rate"].default)
            figures = measure(owner, db, runs)
        assert isinstance(figures, dict)
        cells = [f"{percentile(v, 50):.3f} / {percentile(v, 95):.3f}" for v in figures.values()]
        shown = label if runs == args.runs else f"{label.split(',')[0]}, {runs} runs"
        print(f"  {shown:<26}{cells[0]:>16}{cells[1]:>22}{cells[2]:>22}")
        report[label] = {k: statistics.median(v) for k, v in figures.items()}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
