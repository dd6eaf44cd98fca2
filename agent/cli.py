"""The `loom-ops` command line: start, resume, decide, cancel, list and explain runs.

Exit codes: 0 when the run succeeded or waits for a decision; 1 when it failed, was rejected,
cancelled or expired (or was interrupted); 2 for bad usage or input. Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import httpx
from pydantic import ValidationError

from agent.approvals import Decision
from agent.database import driver_errors
from agent.explain import render_timeline
from agent.journal import verify_chain
from agent.records import ApprovalRecord, EventRecord, RunRecord, RunStatus
from agent.request import RequestError
from agent.runbook import RunbookError, load_catalog, load_runbook
from agent.service import RunService, ServiceError
from agent.settings import Settings
from agent.store import RunStore, StoreError
from agent.summary import build_summary, render_summary
from agent.trace import build_trace, render_trace

EXIT_OK, EXIT_RUN_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad usage or input: one line on stderr, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One clear line instead of argparse's usage dump.
        self.exit(EXIT_USAGE, f"loom-ops: {message} (see {self.prog} --help)\n")


def _common(parser: argparse.ArgumentParser, run_flags: bool = False) -> None:
    parser.add_argument(
        "--db",
        help="SQLite file or postgresql:// URL (LOOM_OPS_DB, default ops.sqlite)",
    )
    parser.add_argument(
        "--workspace", type=Path, help="workspace with runbooks/ (LOOM_OPS_WORKSPACE, default .)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    if run_flags:
        parser.add_argument(
            "--mock-llm", action="store_true", default=None, help="use the deterministic policy"
        )
        parser.add_argument("--max-steps", type=int, help="policy turns per run")
        parser.add_argument("--max-tool-calls", type=int, help="tool calls per run")


def _positive_id(text: str) -> int:
    if not text.lstrip("#").isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a request number")
    return int(text.lstrip("#"))


def _positive(text: str) -> int:
    value = int(text) if text.isdigit() else 0
    if not 1 <= value <= 1000:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from 1 to 1000")
    return value


def _port(text: str) -> int:
    value = int(text) if text.isdigit() else -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = _Parser(prog="loom-ops", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("runbook", help="start a runbook run from an incident message")
    p.add_argument("message", help='e.g. "incident: API latency spike service=checkout"')
    p.add_argument("--run-id", required=True)
    p.add_argument("--trace", type=Path, help="also write the run's offline HTML trace here")
    _common(p, run_flags=True)

    p = sub.add_parser(
        "supervise", help="plan, then execute and verify in parallel child runs (a run tree)"
    )
    p.add_argument("message", help='e.g. "incident: API latency spike service=checkout"')
    p.add_argument("--run-id", required=True)
    p.add_argument("--trace", type=Path, help="also write the tree's offline HTML trace here")
    _common(p, run_flags=True)

    p = sub.add_parser("resume", help="drive a run on from its checkpoint (all orphans if no id)")
    p.add_argument("--run-id")
    _common(p, run_flags=True)

    for name, help_text in (("approve", "approve the pending request"), ("reject", "reject it")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--run-id", required=True)
        p.add_argument("--note", help="why (recorded with the decision)")
        p.add_argument("--as", dest="as_user", help="decide as cli:<name> (default: OS user)")
        p.add_argument(
            "--approval",
            type=_positive_id,
            help="the request's number (#N), required once a run has had more than one",
        )
        if name == "approve":
            p.add_argument(
                "--skip",
                action="store_true",
                help="for a step that may or may not have run: treat it as done, do not rerun",
            )
        _common(p, run_flags=True)

    p = sub.add_parser("cancel", help="cancel a run")
    p.add_argument("--run-id", required=True)
    p.add_argument("--as", dest="as_user", help="cancel as cli:<name>")
    _common(p)

    p = sub.add_parser("runs", help="list runs, newest first")
    p.add_argument("--status", choices=[s.value for s in RunStatus])
    p.add_argument("--limit", type=_positive, default=50, help="at most this many (1-1000)")
    _common(p)

    p = sub.add_parser("explain", help="a run's timeline")
    p.add_argument("--run-id", required=True)
    _common(p)

    p = sub.add_parser("trace", help="write a run's self-contained HTML trace")
    p.add_argument("--run-id", required=True)
    p.add_argument("-o", "--output", type=Path, help="file to write (default: <run-id>.html)")
    _common(p)

    p = sub.add_parser("audit", help="verify or export a run's hash-chained journal")
    p.add_argument("action", choices=["verify", "export"])
    p.add_argument("--run-id", required=True)
    p.add_argument("--format", choices=["jsonl", "csv"], default="jsonl", help="for export")
    p.add_argument("-o", "--output", type=Path, help="export to this file (default: stdout)")
    _common(p)

    p = sub.add_parser(
        "serve",
        help="serve the HTTP API (and with --telegram the bot) until interrupted",
        description="Runs outlive connections; SSE streams resume with Last-Event-ID. "
        "Beyond loopback LOOM_OPS_API_TOKEN is required.",
    )
    p.add_argument("--host", help="address to bind (LOOM_OPS_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=_port, help="port (LOOM_OPS_PORT, default 8766)")
    p.add_argument("--telegram", action="store_true", help="also serve the Telegram bot")
    _no_worker(p)
    _common(p, run_flags=True)

    p = sub.add_parser(
        "sandbox",
        help="the real bot in a local Telegram-like chat page: no token, no key, offline",
        description="Starts the local Bot API stand-in, the bot pointed at it, and a chat "
        "page on 127.0.0.1; real TELEGRAM_* settings are ignored.",
    )
    p.add_argument("--port", type=_port, default=8780, help="page port (default 8780)")
    p.add_argument(
        "--script",
        choices=["incident"],
        help="play the flow by itself (/run, the approver's tap, the summary), print the "
        "transcript and exit",
    )
    _common(p, run_flags=True)

    p = sub.add_parser(
        "telegram",
        aliases=["bot"],
        help="serve the Telegram bot (long polling or webhook) until interrupted",
        description="Settings: TELEGRAM_BOT_TOKEN, TELEGRAM_ALLOWED_CHAT_IDS, "
        "TELEGRAM_APPROVER_IDS, TELEGRAM_API_BASE_URL (see .env.example). Several instances "
        "on PostgreSQL: one polls (the leader), the others stand by; or use a webhook.",
    )
    p.add_argument(
        "--webhook-url",
        help="take updates by webhook at this public https URL (TELEGRAM_WEBHOOK_URL); "
        "needs TELEGRAM_WEBHOOK_SECRET",
    )
    p.add_argument(
        "--listen",
        type=_host_port,
        help="where the webhook server binds, HOST:PORT (TELEGRAM_WEBHOOK_LISTEN, "
        "default 127.0.0.1:8443)",
    )
    _no_worker(p)
    _common(p, run_flags=True)

    p = sub.add_parser(
        "worker",
        help="claim runnable runs from the store and drive them, until interrupted",
        description="Any number of workers, on any machines sharing the database, take runs "
        "with leases; a dead worker's runs are taken over when its lease expires.",
    )
    p.add_argument(
        "--concurrency",
        type=_positive,
        help="runs driven at once (LOOM_OPS_WORKER_CONCURRENCY, default 16)",
    )
    _common(p, run_flags=True)

    p = sub.add_parser(
        "healthcheck",
        help="exit 0 when the store answers with a current schema (and --url answers 200)",
    )
    p.add_argument("--url", help="also GET this URL, e.g. http://127.0.0.1:8766/healthz")
    _common(p)

    p = sub.add_parser("runbooks", help="list or validate runbooks")
    p.add_argument("action", choices=["list", "validate"])
    p.add_argument("path", nargs="?", type=Path, help="file or directory (default: runbooks/)")
    _common(p)
    return parser


def _no_worker(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-worker",
        dest="no_worker",
        action="store_true",
        help="record starts and decisions only; `loom-ops worker` processes drive the runs",
    )


def _host_port(value: str) -> tuple[str, int]:
    from bot.settings import parse_host_port  # plain pydantic: no Telegram packages

    try:
        return parse_host_port(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    for name in ("db", "workspace", "mock_llm", "max_steps", "max_tool_calls"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise UsageError(f"bad setting {field}: {first['msg']}") from None


# -- output -------------------------------------------------------------------------------------


def _exit_code(run: RunRecord) -> int:
    if run.status in (RunStatus.SUCCEEDED, RunStatus.WAITING_APPROVAL, RunStatus.WAITING_CHILDREN):
        return EXIT_OK
    return EXIT_RUN_FAILED


def _approval_json(approval: ApprovalRecord | None) -> dict[str, Any] | None:
    if approval is None:
        return None
    return {
        "id": approval.id,
        "kind": approval.kind,
        "step_id": approval.step_id,
        "action": approval.action,
        "reason": approval.reason,
        "rollback": approval.rollback,
        "deciders": approval.deciders,
        "status": approval.status,
        "decided_by": approval.decided_by,
        "deadline_at": approval.deadline_at,
    }


def _run_json(run: RunRecord) -> dict[str, Any]:
    return {
        "run_id": run.id,
        "status": str(run.status),
        "role": run.role,
        "runbook_id": run.runbook_id,
        "params": run.params,
        "requested_by": run.requested_by,
        "policy": run.policy,
        "summary": run.summary,
        "error": run.error,
        "created_at": run.created_at,
        "finished_at": run.finished_at,
    }


async def _report(service: RunService, run: RunRecord, as_json: bool, extra: str = "") -> int:
    """Print where a run stands: its pending approval, or its audit summary once final."""
    approval = await service.pending_approval(run.id)
    if as_json:
        payload = _run_json(run) | {"approval": _approval_json(approval)}
        if extra:
            payload["message"] = extra
        print(json.dumps(payload, ensure_ascii=False))
        return _exit_code(run)
    if extra:
        print(extra)
    if approval is not None:
        where = f" in {approval.run_id}" if approval.run_id != run.id else ""
        print(f"Run {run.id} is waiting for approval #{approval.id} ({approval.kind}){where}.")
        print(f"  step:     {approval.step_id}")
        print(f"  action:   {approval.action}")
        print(f"  why:      {approval.reason}")
        print(f"  rollback: {approval.rollback or '-'}")
        print(f"  who:      {', '.join(approval.deciders) or 'any approver'}")
        named = f"--run-id {approval.run_id} --approval {approval.id}"
        if approval.kind == "in_doubt":
            print(
                f"Decide with: loom-ops approve {named} (run it again) | "
                "approve --skip (it ran: treat as done) | reject (abort the run)"
            )
        else:
            print(f"Decide with: loom-ops approve {named}   (or: loom-ops reject {named})")
    elif run.status.is_terminal:
        print(render_summary(await build_summary(service.store, run.id)), end="")
        if run.status == RunStatus.FAILED and run.error:
            # The summary is the record; the reason is the one line a person or script reads
            # first (e.g. which LLM setting to fix).
            print(f"loom-ops: run {run.id} failed: {' '.join(run.error.split())}", file=sys.stderr)
    else:
        reason = f": {run.error}" if run.error else ""
        print(
            f"Run {run.id} is {run.status}{reason}; continue with loom-ops resume --run-id {run.id}"
        )
    return _exit_code(run)


# -- commands -----------------------------------------------------------------------------------


async def _cmd_runbook(service: RunService, args: argparse.Namespace) -> int:
    role = "supervisor" if args.command == "supervise" else "runbook"
    run = await service.start(
        args.run_id, args.message, role=role, requested_by=_cli_user(service, None)
    )
    if args.trace:
        await _write_trace(service, run.id, args.trace)
    if run.status in (RunStatus.QUEUED, RunStatus.RUNNING):
        return await _interrupted(service, run, args.json)
    return await _report(service, run, args.json)


async def _interrupted(service: RunService, run: RunRecord, as_json: bool) -> int:
    events = await service.store.list_events(run.id)
    reason = next((e.data["error"] for e in reversed(events) if e.type == "run_interrupted"), None)
    message = f"run {run.id} was interrupted: {reason or 'unknown reason'}"
    if as_json:
        print(json.dumps(_run_json(run) | {"error": message}))
    else:
        print(
            f"loom-ops: {message}; resume with loom-ops resume --run-id {run.id}", file=sys.stderr
        )
    return EXIT_RUN_FAILED


async def _cmd_resume(service: RunService, args: argparse.Namespace) -> int:
    if args.run_id:
        run = await service.resume(args.run_id)
        if run.status in (RunStatus.QUEUED, RunStatus.RUNNING):
            return await _interrupted(service, run, args.json)
        return await _report(service, run, args.json)
    runs = await service.recover()
    if args.json:
        print(json.dumps({"run_id": None, "status": "ok", "runs": [_run_json(r) for r in runs]}))
    else:
        for run in runs:
            print(f"{run.id}: {run.status}")
        print(f"resumed {len(runs)} run(s)")
    return EXIT_OK if all(_exit_code(r) == EXIT_OK for r in runs) else EXIT_RUN_FAILED


async def _cmd_decide(service: RunService, args: argparse.Namespace) -> int:
    if args.command == "reject":
        decision = Decision.REJECT
    else:
        decision = Decision.SKIP if args.skip else Decision.APPROVE
    decider = _cli_user(service, args.as_user)
    result = await service.decide(
        args.run_id, decision, decider, args.note, approval_id=args.approval
    )
    if not result.changed:
        raise UsageError(f"run {args.run_id}: {result.message}")
    # Decided through a parent: report on the run the operator named, which went on too.
    run = result.run if result.run.id == args.run_id else await service.get(args.run_id)
    return await _report(service, run, args.json, extra=f"Decision: {result.message}")


async def _cmd_cancel(service: RunService, args: argparse.Namespace) -> int:
    run = await service.cancel(args.run_id, _cli_user(service, args.as_user))
    return await _report(service, run, args.json)


async def _cmd_runs(service: RunService, args: argparse.Namespace) -> int:
    runs = await service.list(RunStatus(args.status) if args.status else None, args.limit)
    if args.json:
        print(json.dumps({"run_id": None, "status": "ok", "runs": [_run_json(r) for r in runs]}))
        return EXIT_OK
    if not runs:
        print("no runs")
        return EXIT_OK
    print(f"{'RUN':<24} {'STATUS':<17} {'STARTED (UTC)':<17} {'RUNBOOK':<24} REQUEST")
    for run in runs:
        started = time.strftime("%Y-%m-%d %H:%M", time.gmtime(run.created_at))
        print(
            f"{run.id:<24} {run.status:<17} {started:<17} {run.runbook_id or '-':<24} "
            f"{run.request[:60]}"
        )
    return EXIT_OK


async def _cmd_explain(service: RunService, args: argparse.Namespace) -> int:
    run = await service.get(args.run_id)
    events = await service.store.list_events(run.id)
    if args.json:
        payload = _run_json(run) | {
            "events": [
                {"seq": e.seq, "ts": e.ts, "type": e.type, "data": e.data, "hash": e.hash}
                for e in events
            ]
        }
        print(json.dumps(payload, ensure_ascii=False))
    else:
        print(render_timeline(run, events), end="")
    return EXIT_OK


async def _write_trace(service: RunService, run_id: str, path: Path) -> None:
    html = render_trace(await build_trace(service.store, run_id))
    try:
        path.write_text(html, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None


async def _cmd_trace(service: RunService, args: argparse.Namespace) -> int:
    run = await service.get(args.run_id)
    path = args.output or Path(f"{run.id}.html")
    await _write_trace(service, run.id, path)
    if args.json:
        print(json.dumps({"run_id": run.id, "status": str(run.status), "trace": str(path)}))
    else:
        print(f"wrote {path}")
    return EXIT_OK


async def _cmd_audit(service: RunService, args: argparse.Namespace) -> int:
    run = await service.get(args.run_id)
    events = await service.store.list_events(run.id)
    if args.action == "export":
        return _export(events, args.format, args.output)
    head_hash, head_count = await service.store.chain_head(run.id)
    report = verify_chain(run.id, events, head_hash, head_count)
    if args.json:
        payload = {
            "run_id": run.id,
            "status": "intact" if report.intact else "tampered",
            "events": report.events,
            "first_bad_seq": report.broken.seq if report.broken else None,
            "problem": report.problem,
        }
        print(json.dumps(payload))
    elif report.intact:
        print(f"run {run.id}: journal intact ({report.events} events, head {head_hash[:16]}…)")
    else:
        print(f"run {run.id}: journal TAMPERED: {report.problem}")
    return EXIT_OK if report.intact else EXIT_RUN_FAILED


EXPORT_COLUMNS = ("seq", "run_id", "idx", "ts", "time_utc", "type", "data", "prev_hash", "hash")


def _export(events: list[EventRecord], fmt: str, output: Path | None) -> int:
    """Write the journal as JSON lines or CSV, one event per line, hashes included."""
    rows = [
        {
            "seq": e.seq,
            "run_id": e.run_id,
            "idx": e.idx,
            "ts": e.ts,
            "time_utc": datetime.fromtimestamp(e.ts, UTC).isoformat(timespec="microseconds"),
            "type": e.type,
            "data": e.data,
            "prev_hash": e.prev_hash,
            "hash": e.hash,
        }
        for e in events
    ]
    try:
        handle = output.open("w", newline="", encoding="utf-8") if output else sys.stdout
    except OSError as exc:
        raise UsageError(f"cannot write {output}: {exc.strerror or exc}") from None
    try:
        if fmt == "jsonl":
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        else:
            writer = csv.DictWriter(handle, fieldnames=EXPORT_COLUMNS)
            writer.writeheader()
            for row in rows:
                writer.writerow(row | {"data": json.dumps(row["data"], ensure_ascii=False)})
    finally:
        if output:
            handle.close()
    return EXIT_OK


def _cmd_runbooks(settings: Settings, args: argparse.Namespace) -> int:
    path: Path = args.path or settings.runbooks_dir
    # validate also renders every template with the params' defaults, against the bounds
    # a run renders within: slower (up to a second per bomb), so list does not.
    render = args.action == "validate"
    if path.is_file():
        try:
            runbooks, errors = [load_runbook(path, render_templates=render)], []
        except RunbookError as exc:
            runbooks, errors = [], [exc]
    elif path.is_dir():
        catalog = load_catalog(path, render_templates=render)
        runbooks, errors = list(catalog.runbooks.values()), catalog.errors
    else:
        raise UsageError(f"no such file or directory: {path}")
    if args.json:
        print(
            json.dumps(
                {
                    "run_id": None,
                    "status": "invalid" if errors else "ok",
                    "runbooks": [
                        {"id": r.id, "title": r.title, "steps": len(r.steps)} for r in runbooks
                    ],
                    "errors": [str(e) for e in errors],
                }
            )
        )
    else:
        for runbook in runbooks:
            gated = sum(1 for s in runbook.steps if s.needs_approval)
            if args.action == "list":
                print(
                    f"{runbook.id:<26} {len(runbook.steps)} steps, {gated} gated  {runbook.title}"
                )
            else:
                print(f"ok       {runbook.id}")
        for error in errors:
            print(f"loom-ops: {error}", file=sys.stderr)
    return EXIT_USAGE if errors else EXIT_OK


def _cli_user(service: RunService, name: str | None) -> str:
    return f"cli:{name or service.settings.user}"


COMMANDS: dict[str, Callable[[RunService, argparse.Namespace], Awaitable[int]]] = {
    "runbook": _cmd_runbook,
    "supervise": _cmd_runbook,
    "resume": _cmd_resume,
    "approve": _cmd_decide,
    "reject": _cmd_decide,
    "cancel": _cmd_cancel,
    "runs": _cmd_runs,
    "explain": _cmd_explain,
    "audit": _cmd_audit,
    "trace": _cmd_trace,
}


async def _serve(settings: Settings, args: argparse.Namespace) -> int:
    """`loom-ops serve` / `telegram`: check every setting before any network call, serve."""
    from agent import serving

    http = None
    if args.command == "serve":
        host = args.host if args.host is not None else settings.host
        port = args.port if args.port is not None else settings.port
        http = serving.HttpEndpoint(host, port)
    try:
        if http is not None:
            serving.check_http(settings, http)
        wants_bot = args.command in ("telegram", "bot") or getattr(args, "telegram", False)
        webhook = serving.WebhookOptions(
            getattr(args, "webhook_url", None), getattr(args, "listen", None)
        )
        telegram = serving.check_telegram(settings, webhook) if wants_bot else None
        return await serving.serve(settings, http, telegram, executes_runs=not args.no_worker)
    except serving.ServingRefused as exc:
        raise UsageError(str(exc)) from None


async def _run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.command == "runbooks":
        return _cmd_runbooks(settings, args)
    if args.command in ("telegram", "bot", "serve"):
        return await _serve(settings, args)
    if args.command == "worker":
        from agent.serving import serve_worker

        concurrency = args.concurrency or settings.worker_concurrency
        return await serve_worker(settings, concurrency)
    if args.command == "healthcheck":
        return await _healthcheck(settings, args.url)
    if args.command == "sandbox":
        from agent.serving import ServingRefused
        from bot.sandbox import run_sandbox  # the bot's packages, for this command only

        try:
            return await run_sandbox(settings, args.port, args.script)
        except ServingRefused as exc:
            raise UsageError(str(exc)) from None
    service = await RunService.open(settings)
    try:
        return await COMMANDS[args.command](service, args)
    finally:
        await service.close()


async def _healthcheck(settings: Settings, url: str | None) -> int:
    """What a container's or a load balancer's health probe runs: one line, exit 0 or 1."""
    try:
        async with await RunStore.open(settings.db, pool_size=1) as store:
            version = await store.schema_version()
    except (StoreError, OSError, *driver_errors()) as exc:
        print(f"loom-ops: unhealthy: {(str(exc).strip().splitlines() or [''])[0]}", file=sys.stderr)
        return EXIT_RUN_FAILED
    if url is not None:
        try:
            async with httpx.AsyncClient(timeout=5) as client:
                response = await client.get(url)
        except httpx.HTTPError as exc:
            print(f"loom-ops: unhealthy: {url}: {exc}", file=sys.stderr)
            return EXIT_RUN_FAILED
        if response.status_code != 200:
            print(f"loom-ops: unhealthy: {url} answered {response.status_code}", file=sys.stderr)
            return EXIT_RUN_FAILED
    print(f"ok: {store.label} at schema {version}")
    return EXIT_OK


class _OneLineFormatter(logging.Formatter):
    """Log lines without tracebacks: the journal keeps the detail, the terminal stays readable."""

    def formatException(self, ei: Any) -> str:
        return ""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).rstrip()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `loom-ops` console script."""
    handler = logging.StreamHandler()
    handler.setFormatter(_OneLineFormatter("loom-ops: %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(_run(args))
    except BrokenPipeError:  # e.g. `loom-ops audit export … | head`: the reader has enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except (UsageError, ServiceError, StoreError, RequestError, RunbookError) as exc:
        print(f"loom-ops: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, *driver_errors()) as exc:  # the machine, not the input: still one line
        detail = (str(exc).strip().splitlines() or [""])[0]
        print(f"loom-ops: {type(exc).__name__}: {detail}", file=sys.stderr)
        return EXIT_RUN_FAILED
    except KeyboardInterrupt:
        print("loom-ops: interrupted; resume with loom-ops resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
