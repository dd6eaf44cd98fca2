"""The `loom-ops` command line: start, resume, decide, cancel, list and explain runs.

Exit codes: 0 when the run succeeded or waits for a decision; 1 when it failed, was rejected,
cancelled or expired (or was interrupted), or the machine failed (disk, network, database);
2 for bad usage or input. Errors are one line on stderr: a refusal's own text, its exit code
its kind's (`EXIT_CODES`).

Start-up is part of the interface (`loom-ops runs` in a shell loop): a command imports what it
needs when it runs, so listing runs never pays for pydantic, the runbook model, the kernel,
httpx or the views' templates.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import secrets
import shlex
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from agent.errors import (
    DeciderRefused,
    ErrorKind,
    LoomOpsError,
    RunbookError,
    RunNotFound,
    ServiceError,
    StoreError,
    kind_of,
)
from agent.events import RunInterrupted, parse
from agent.records import (
    CHILD_ROLES,
    ApiTokenRecord,
    ApprovalRecord,
    Decision,
    Effects,
    EventRecord,
    ProcessRecord,
    RunRecord,
    RunStatus,
)
from agent.runbook.request import MAX_REQUEST_BYTES
from agent.service.runs import (
    NO_POLICY,
    RunService,
    missing_store,
    probe_store,
    validate_run_id,
    validate_text,
)
from agent.settings import Settings, setting_name, switched_on

if TYPE_CHECKING:
    from agent.chain import ChainReport
    from agent.runbook.model import RunbookCatalog
    from agent.service.audit import TreeReport

EXIT_OK, EXIT_RUN_FAILED, EXIT_USAGE = 0, 1, 2
# The exit code of each kind of refusal: the input (or the state it met) was wrong, or the
# machine failed and trying again may work.
EXIT_CODES: dict[ErrorKind, int] = {
    ErrorKind.INVALID: EXIT_USAGE,
    ErrorKind.NOT_FOUND: EXIT_USAGE,
    ErrorKind.CONFLICT: EXIT_USAGE,
    ErrorKind.FORBIDDEN: EXIT_USAGE,
    ErrorKind.UNAVAILABLE: EXIT_RUN_FAILED,
    ErrorKind.BUSY: EXIT_RUN_FAILED,
}


class UsageError(LoomOpsError):
    """The command line's own refusal (arguments, files to write): one line, exit 2."""


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
    # Accepted everywhere, so a command line can be reused from one command to the next; it
    # changes nothing where no policy is asked (runs, explain, runbooks, ...).
    parser.add_argument(
        "--mock-llm", action="store_true", default=None, help="use the deterministic policy"
    )
    if run_flags:
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


class _Version(argparse.Action):
    """`--version`: the installed package's version, looked up only when asked (importing
    importlib.metadata costs every other command about 10 ms of start-up)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **_: Any) -> None:
        super().__init__(
            option_strings,
            dest,
            nargs=0,
            default=argparse.SUPPRESS,
            help="show the version and exit",
        )

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        from importlib import metadata

        try:
            version = metadata.version("loom-ops")
        except metadata.PackageNotFoundError:  # a checkout run without `pip install`
            version = "unknown"
        print(f"loom-ops {version}")  # on stdout, as argparse's own version action does
        parser.exit()


def _run_id(parser: argparse.ArgumentParser, what: str) -> None:
    """A run id as the first word (`loom-ops explain inc-001`) or as `--run-id`."""
    parser.add_argument("run_id", nargs="?", metavar="RUN_ID", help=what)
    parser.add_argument(
        "--run-id", dest="run_id_flag", metavar="RUN_ID", help="the same, as a flag"
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = _Parser(prog="loom-ops", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    for name, help_text in (
        ("runbook", "start a runbook run from an incident message"),
        ("supervise", "plan, then execute and verify in parallel child runs (a run tree)"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument(
            "message",
            help='an incident ("API latency spike service=checkout") or a runbook id first '
            '("api-latency-spike service=checkout", or runbook=<id>)',
        )
        p.add_argument(
            "--run-id", help="the new run's id (default: a new one like inc-0605-k3m9, printed)"
        )
        p.add_argument(
            "--yes",
            action="store_true",
            help="with live shell or MCP on, start even though the message names no runbook "
            "id and the runbook is only matched from its words",
        )
        what = "run's" if name == "runbook" else "tree's"
        p.add_argument("--trace", type=Path, help=f"also write the {what} offline HTML trace here")
        _common(p, run_flags=True)

    p = sub.add_parser("resume", help="drive a run on from its checkpoint (all orphans if no id)")
    _run_id(p, "the run to resume (default: every run whose owner died)")
    _common(p, run_flags=True)

    for name, help_text in (("approve", "approve the pending request"), ("reject", "reject it")):
        p = sub.add_parser(name, help=help_text)
        _run_id(p, "the run (or the root of its tree) whose request is decided")
        p.add_argument("--note", help="why (recorded with the decision)")
        p.add_argument("--as", dest="as_user", help="decide as cli:<name> (default: OS user)")
        p.add_argument(
            "--approval",
            type=_positive_id,
            help="the request's number (#N), required once a run has had more than one",
        )
        p.add_argument(
            "--role",
            choices=CHILD_ROLES,
            help="decide in the run of this role below the one named (e.g. executor)",
        )
        if name == "approve":
            p.add_argument(
                "--skip",
                action="store_true",
                help="for a step that may or may not have run: treat it as done, do not rerun",
            )
        _common(p, run_flags=True)

    p = sub.add_parser("cancel", help="cancel a run")
    _run_id(p, "the run to cancel (with the runs below it)")
    p.add_argument("--as", dest="as_user", help="cancel as cli:<name>")
    _common(p)

    p = sub.add_parser(
        "status",
        help="a run's status, its pending request and its child runs (no id: live processes)",
    )
    _run_id(p, "the run to show")
    _common(p)

    p = sub.add_parser("runs", help="list incidents (root runs), newest first")
    p.add_argument(
        "--status",
        choices=[s.value for s in RunStatus],
        help="only incidents in this status (a tree waiting for a decision anywhere counts as "
        "waiting_approval)",
    )
    p.add_argument("--limit", type=_positive, default=50, help="at most this many (1-1000)")
    p.add_argument(
        "--all", action="store_true", help="every run, child runs included, each by its own status"
    )
    _common(p)

    p = sub.add_parser("explain", help="a run's timeline")
    _run_id(p, "the run to explain")
    _common(p)

    p = sub.add_parser("trace", help="write a run's self-contained HTML trace")
    _run_id(p, "the run (tree) to trace")
    p.add_argument("-o", "--output", type=Path, help="file to write (default: <run-id>.html)")
    _common(p)

    p = sub.add_parser("postmortem", help="a Markdown post-mortem draft of an incident")
    _run_id(p, "the run (incident) to write it for")
    p.add_argument("-o", "--output", type=Path, help="file to write (default: standard output)")
    _common(p)

    p = sub.add_parser(
        "audit", help="verify or export the chained journal of a run and the runs below it"
    )
    p.add_argument("action", choices=["verify", "export"])
    _run_id(p, "the run whose tree (it and every run below it) is verified or exported")
    p.add_argument(
        "--head",
        metavar="HEX",
        help="for verify: the tree's head published when the run ended (chat summary, export)",
    )
    p.add_argument(
        "--all", action="store_true", help="for verify: every run, and gaps in the run numbering"
    )
    p.add_argument(
        "--keyed-since",
        type=_positive_int,
        metavar="N",
        help="for verify: the first run written under an audit key (doctor prints it; "
        "default LOOM_OPS_AUDIT_KEYED_SINCE): later unkeyed runs are stripped ones",
    )
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

    p = sub.add_parser(
        "doctor",
        help="check the configuration end to end and print what to fix (exit 1 on an error)",
        description="Runbooks, the shell allowlist, binaries, MCP tools, the LLM (one tiny "
        "request unless --mock-llm), the Bot API (getMe, when TELEGRAM_BOT_TOKEN is set) and "
        "approver settings. Writes nothing.",
    )
    _common(p)

    p = sub.add_parser("tokens", help="create, list or revoke people's HTTP API tokens")
    actions = p.add_subparsers(dest="action", required=True, parser_class=_Parser)
    p = actions.add_parser(
        "create", help="a new token for a person of the people file, printed once"
    )
    p.add_argument("--person", required=True, help="the person's name in the people file")
    p.add_argument(
        "--name",
        help="the token's name; decisions are recorded as api:NAME (default: the person's "
        "name, a hyphen and 6 random hex digits, e.g. sam-3f9a0c)",
    )
    _common(p)
    p = actions.add_parser("list", help="every token: name, person, created, revoked (no secret)")
    _common(p)
    p = actions.add_parser("revoke", help="revoke a token: requests with it get 401 from now on")
    p.add_argument("name", help="the token's name (see tokens list)")
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
    from bot.settings import parse_host_port  # no Telegram packages, no pydantic

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
    except ValueError as exc:
        from pydantic import ValidationError  # imported only when a setting is refused

        if not isinstance(exc, ValidationError):  # the .env file could not be read
            raise UsageError(f"bad settings: {exc}") from None
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "?"
        # Named as the person gave it: the flag, else the environment variable.
        name = (
            f"--{field.replace('_', '-')}" if field in overrides else setting_name(Settings, field)
        )
        raise UsageError(f"bad setting {name}: {first['msg']}") from None


# -- output -------------------------------------------------------------------------------------


def _exit_code(run: RunRecord) -> int:
    if run.status in (RunStatus.SUCCEEDED, RunStatus.WAITING_APPROVAL, RunStatus.WAITING_CHILDREN):
        return EXIT_OK
    return EXIT_RUN_FAILED


async def _approved_by(service: RunService, approval: ApprovalRecord | None) -> list[str]:
    """Who approved a pending request that needs several approvals so far (the approvals
    that count, oldest first); empty for a request one decision ends."""
    if approval is None or approval.required < 2:
        return []
    request = await service.approval_request(approval.id)
    return [vote.decided_by for vote in request.votes if vote.decision == "approve"]


def _approval_json(
    approval: ApprovalRecord | None, approved_by: Sequence[str]
) -> dict[str, Any] | None:
    if approval is None:
        return None
    return {
        "id": approval.id,
        "number": approval.number,
        "kind": approval.kind,
        "step_id": approval.step_id,
        "action": approval.action,
        "reason": approval.reason,
        "rollback": approval.rollback,
        "deciders": approval.deciders,
        "status": approval.status,
        "decided_by": approval.decided_by,
        "deadline_at": approval.deadline_at,
        "mode": approval.mode,
        "runs_on": approval.runs_on,
        "evidence": approval.evidence,
        "required": approval.required,
        "approved_by": list(approved_by),
    }


def _deadline(at: float) -> str:
    """A deadline as people read it at 3 a.m.: "in 9 min (05:14 UTC)"."""
    left = at - time.time()
    clock = time.strftime("%H:%M UTC", time.gmtime(at))
    if left <= 0:
        return f"passed ({clock})"
    minutes = int(left // 60)
    if minutes < 1:
        return f"in {int(left)} s ({clock})"
    if minutes < 120:
        return f"in {minutes} min ({clock})"
    return f"in {minutes // 60} h {minutes % 60} min ({clock})"


def _as_hint(service: RunService, approval: ApprovalRecord) -> str | None:
    """The `--as` a pasted decision needs: none when this login may decide itself or may not
    act for others, else the first CLI login of a person the request admits."""
    me = f"cli:{service.settings.user}"
    try:
        people = service.people()
    except ServiceError:  # a bad people file: the decision itself will say so
        return None
    if not approval.deciders or not people.may_act_for_others(me):
        return None
    if people.admits(me, approval.deciders):
        return None
    logins = [d for d in approval.deciders if d.startswith("cli:")] + sorted(
        i for i in people.by_identity if i.startswith("cli:")
    )
    for login in logins:
        if people.admits(login, approval.deciders) and not (
            approval.four_eyes and people.same_person(login, approval.requested_by)
        ):
            return login.removeprefix("cli:")
    return None


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


async def _report(
    service: RunService,
    run: RunRecord,
    as_json: bool,
    extra: str = "",
    pending: ApprovalRecord | None = None,
) -> int:
    """Print where a run stands: its pending approval (`pending`, when the caller read it
    already), or its audit summary once final."""
    approval = pending or await service.pending_approval(run.id)
    approved_by = await _approved_by(service, approval)
    if as_json:
        payload = _run_json(run) | {"approval": _approval_json(approval, approved_by)}
        if extra:
            payload["message"] = extra
        print(json.dumps(payload, ensure_ascii=False))
        return _exit_code(run)
    if extra:
        print(extra)
    if approval is not None:
        kind = "a step that may or may not have run" if approval.kind == "in_doubt" else "approval"
        print(f"Run {run.id} is waiting for request #{approval.number} ({kind}).")
        print(f"  step:     {approval.step_id}")
        print(f"  action:   {approval.action}")
        if approval.mode:
            print(f"  mode:     {approval.mode.upper()}, on {approval.runs_on or 'this host'}")
        print(f"  why:      {approval.reason}")
        print(f"  rollback: {approval.rollback or '-'}")
        print(f"  who:      {', '.join(approval.deciders) or 'any approver'}")
        if approval.required > 1:
            so_far = f" ({', '.join(approved_by)})" if approved_by else ""
            print(f"  approvals: {len(approved_by)} of {approval.required} so far{so_far}")
        print(f"  deadline: {_deadline(approval.deadline_at)}")
        for entry in approval.evidence:
            first, *rest = entry.splitlines()
            print(f"  found:    {first}")
            for line in rest:
                print(f"            {line.strip()}")
        root = (await service.root(run.id)).id
        named = f"--run-id {root} --approval {approval.number}{_where(service)}"
        as_user = _as_hint(service, approval)
        named += f" --as {as_user}" if as_user else ""
        if approval.kind == "in_doubt":
            print(
                f"Decide with: loom-ops approve {named} (run it again) | "
                "approve --skip (it ran: treat as done) | reject (abort the run)"
            )
        else:
            print(f"Decide with: loom-ops approve {named}   (or: loom-ops reject {named})")
    elif run.status.is_terminal:
        from agent.views.summary import render_summary, summary_of  # jinja2: finished runs only

        print(render_summary(summary_of(await service.run_tree(run.id))), end="")
        if run.status == RunStatus.FAILED and run.error:
            # The summary is the record; the reason is the one line a person or script reads
            # first (e.g. which LLM setting to fix).
            print(f"loom-ops: run {run.id} failed: {' '.join(run.error.split())}", file=sys.stderr)
    else:
        reason = f": {run.error}" if run.error else ""
        goes_on = await _driven_on(service, run) or (
            f"continue with {_needs(service, run)}loom-ops resume --run-id {run.id}"
            f"{_where(service)}"
        )
        print(f"Run {run.id} is {run.status}{reason}; {goes_on}")
    return _exit_code(run)


# -- commands -----------------------------------------------------------------------------------


async def _cmd_runbook(service: RunService, args: argparse.Namespace) -> int:
    role = "supervisor" if args.command == "supervise" else "runbook"
    run_id = args.run_id
    if run_id is None:
        run_id = await _free_run_id(service)
        if not args.json:  # said first, so another terminal can follow or cancel it
            print(f"Run id: {run_id}", flush=True)
    drivers = await _drivers(service, service.settings.effects)  # a run started here acts so
    run = await service.start(
        run_id,
        args.message,
        role=role,
        requested_by=_cli_user(service, None),
        guess_confirmed=args.yes,
    )
    if args.trace:
        await _write_trace(service, run.id, args.trace)
    if run.status in (RunStatus.QUEUED, RunStatus.RUNNING):
        if drivers or run.lease_owner not in (None, service.owner):
            # Recorded, and driven by a live process (or taken by one as it started).
            where = _driven_by(drivers) if drivers else f"process {run.lease_owner}"
            message = (
                f"Run {run.id} started; {where} drives it. "
                f"Follow it with: loom-ops status {run.id}{_where(service)}"
            )
            if args.json:
                print(json.dumps(_run_json(run) | {"message": message}, ensure_ascii=False))
            else:
                print(message)
            return EXIT_OK
        return await _interrupted(service, run, args.json)
    return await _report(service, run, args.json)


async def _drivers(service: RunService, effects: Effects | None) -> list[ProcessRecord]:
    """The live processes that drive this store's runs and may act a run with `effects`;
    when there is one, a command records its start or decision and leaves the run to it (at
    once on PostgreSQL, within a second on SQLite) rather than race it for the run."""
    drivers = await service.drivers(effects)
    if drivers:
        service.executes_runs = False
    return drivers


async def _driven_on(service: RunService, run: RunRecord) -> str | None:
    """Who goes on with a run this process stopped or left, with no person needed: the live
    processes that drive runs and may act it ("the worker process … goes on with it"), or
    None."""
    drivers = await service.drivers(run.effects)
    return f"{_driven_by(drivers)} goes on with it" if drivers else None


def _driven_by(drivers: list[ProcessRecord]) -> str:
    """Who will drive a run: the one live process, or any of several (which one claims it
    is theirs to settle)."""
    if len(drivers) == 1:
        return f"the {drivers[0].kind} process {drivers[0].owner}"
    kinds = ", ".join(sorted({d.kind for d in drivers}))
    return f"one of {len(drivers)} live processes ({kinds})"


# Letters and digits that cannot be misread (no 0/o, 1/l/i): ids are read aloud and retyped.
_ID_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"


def _new_run_id() -> str:
    """A short, readable id: `inc-` + the UTC month and day + 4 random characters."""
    day = time.strftime("%m%d", time.gmtime())
    return f"inc-{day}-{''.join(secrets.choice(_ID_ALPHABET) for _ in range(4))}"


async def _free_run_id(service: RunService) -> str:
    """A new run id no run has (31^4 per day: a clash is rare, and then another is drawn)."""
    for _ in range(20):
        run_id = _new_run_id()
        try:
            await service.get(run_id)
        except RunNotFound:
            return run_id
    raise UsageError("could not draw a free run id; name one with --run-id")


async def _last_stop(service: RunService, run: RunRecord) -> str | None:
    """Why the run's last drive stopped without an end, when nothing happened to it since
    (its journal ends with the interruption); else None."""
    newest = await service.last_event(run.id)
    last = parse(newest) if newest is not None else None
    return last.error if isinstance(last, RunInterrupted) else None


async def _interrupted(service: RunService, run: RunRecord, as_json: bool) -> int:
    reason = await _last_stop(service, run)
    message = f"run {run.id} was interrupted: {reason or 'unknown reason'}"
    if as_json:
        print(json.dumps(_run_json(run) | {"error": message}))
    else:
        goes_on = await _driven_on(service, run) or (
            f"resume with {_needs(service, run)}loom-ops resume --run-id {run.id}"
        )
        print(f"loom-ops: {message}; {goes_on}", file=sys.stderr)
    return EXIT_RUN_FAILED


async def _cmd_resume(service: RunService, args: argparse.Namespace) -> int:
    if args.run_id:
        run = await service.resume(args.run_id)
        if run.status in (RunStatus.QUEUED, RunStatus.RUNNING):
            return await _interrupted(service, run, args.json)
        return await _report(service, run, args.json)
    runs = await service.recover()
    resumed = {r.id for r in runs if service.may_act(r)}  # the others are left to who may
    if args.json:
        listed = [_run_json(r) | {"resumed": r.id in resumed} for r in runs]
        print(json.dumps({"run_id": None, "status": "ok", "runs": listed}))
    else:
        for run in runs:
            resume = f"{_needs(service, run)}loom-ops resume --run-id {run.id}"
            note = "" if run.id in resumed else f" (not resumed here: run {resume})"
            print(f"{run.id}: {run.status}{note}")
        print(f"resumed {len(resumed)} run(s)")
    return EXIT_OK if all(_exit_code(r) == EXIT_OK for r in runs) else EXIT_RUN_FAILED


async def _cmd_decide(service: RunService, args: argparse.Namespace) -> int:
    if args.command == "reject":
        decision = Decision.REJECT
    else:
        decision = Decision.SKIP if args.skip else Decision.APPROVE
    decider = _cli_user(service, args.as_user)
    drivers = await _drivers(service, (await service.get(args.run_id)).effects)
    try:
        result = await service.decide(
            args.run_id, decision, decider, args.note, approval_number=args.approval
        )
    except DeciderRefused as exc:
        me = f"cli:{service.settings.user}"
        if service.people().may_act_for_others(me):
            hint = "decide for one of them with --as NAME (cli:NAME)"
        else:
            hint = f"this login is {me}; the people file says who may decide"
        raise UsageError(f"{exc}; {hint}", kind=exc.kind) from None
    if not result.changed:
        raise UsageError(f"run {args.run_id}: {result.message}")
    if drivers and not result.run.status.is_terminal:
        message = f"Decision: {result.message}; {_driven_by(drivers)} goes on with the run"
        if args.json:
            print(json.dumps(_run_json(result.run) | {"message": message}, ensure_ascii=False))
        else:
            print(message)
            print(f"Follow it with: loom-ops explain --run-id {args.run_id}{_where(service)}")
        return EXIT_OK
    # Decided through a parent: report on the run the operator named, which went on too.
    run = result.run if result.run.id == args.run_id else await service.get(args.run_id)
    return await _report(service, run, args.json, extra=f"Decision: {result.message}")


async def _cmd_cancel(service: RunService, args: argparse.Namespace) -> int:
    run = await service.cancel(args.run_id, _cli_user(service, args.as_user))
    return await _report(service, run, args.json)


async def _cmd_runs(service: RunService, args: argparse.Namespace) -> int:
    # So no request shows as pending past its deadline: recorded only, never driven here (a
    # rollback it queues is driven by a worker, `serve`/`telegram`, or `loom-ops resume`).
    await service.expire_overdue()
    wanted = RunStatus(args.status) if args.status else None
    if args.all:
        runs = await service.list(wanted, args.limit)
        rows = [(run, str(run.status), run.runbook_id) for run in runs]
    else:
        rows = await _incidents(service, wanted, args.limit)
    if args.json:
        listed = [
            _run_json(run) | {"tree_status": status, "tree_runbook_id": runbook_id}
            for run, status, runbook_id in rows
        ]
        print(json.dumps({"run_id": None, "status": "ok", "runs": listed}))
        return EXIT_OK
    if not rows:
        print("no runs")
        return EXIT_OK
    # Columns as wide as their longest value (a child's id is its root's and more).
    ids = max(24, *(len(run.id) for run, _, _ in rows))
    books = max(24, *(len(runbook_id or "-") for _, _, runbook_id in rows))
    print(f"{'RUN':<{ids}} {'STATUS':<17} {'STARTED (UTC)':<17} {'RUNBOOK':<{books}} REQUEST")
    for run, status, runbook_id in rows:
        started = time.strftime("%Y-%m-%d %H:%M", time.gmtime(run.created_at))
        print(
            f"{run.id:<{ids}} {status:<17} {started:<17} {runbook_id or '-':<{books}} "
            f"{' '.join(run.request.split())[:60]}"
        )
    return EXIT_OK


async def _incidents(
    service: RunService, wanted: RunStatus | None, limit: int
) -> list[tuple[RunRecord, str, str | None]]:
    """Root runs, newest first, as (run, the tree's status, its runbook): one per incident.

    The store lists every run; roots are picked page by page, so a tree of four runs still
    counts once against `limit`."""
    rows: list[tuple[RunRecord, str, str | None]] = []
    page = max(4 * limit, 200)
    offset = 0
    while len(rows) < limit:
        batch = await service.list(None, page, offset)
        for run in batch:
            if run.parent_id is not None:
                continue
            status = await _tree_status(service, run)
            if wanted is not None and status != wanted:
                continue
            rows.append((run, status, await _tree_runbook(service, run)))
            if len(rows) == limit:
                break
        if len(batch) < page:
            break
        offset += page
    return rows


async def _tree_status(service: RunService, run: RunRecord) -> str:
    """The root's status, but `waiting_approval` when a run below it waits for a person:
    that, not `waiting_children`, is what an operator has to act on."""
    if run.status == RunStatus.WAITING_CHILDREN and await service.pending_approval(run.id):
        return str(RunStatus.WAITING_APPROVAL)
    return str(run.status)


async def _tree_runbook(service: RunService, run: RunRecord) -> str | None:
    """The runbook of a run, or of the first child that chose one (a supervisor has none)."""
    if run.runbook_id is not None:
        return run.runbook_id
    for child in await service.children(run.id):
        if child.runbook_id is not None:
            return child.runbook_id
    return None


async def _cmd_status(service: RunService, args: argparse.Namespace) -> int:
    """One run: its status, its child runs one line each, and its pending request with the
    command that decides it."""
    if args.run_id is None:
        return await _print_processes(service, args.json)
    await service.expire_overdue()  # recorded only, as `runs` does
    run = await service.get(args.run_id)
    children = sorted(  # in the order they started
        (await service.run_tree(run.id, calls=False)).children,
        key=lambda child: (child.created_at, child.id),
    )
    approval = await service.pending_approval(run.id)
    # What nobody holds now: the run itself, else (a parent waiting for them) its children.
    waits = run.status in (RunStatus.QUEUED, RunStatus.RUNNING)
    unowned = [r for r in ([run] if waits else children) if _unowned(service, r)]
    # Why a queued run's last drive stopped, for the run and each of its children.
    stops = {
        r.id: await _last_stop(service, r) for r in (run, *children) if r.status == RunStatus.QUEUED
    }
    stopped = stops.get(run.id)
    # The live processes that drive runs, and those of them that may act this tree (what
    # it does live is the root's, and each child's).
    live = [p for p in await service.live_processes() if p.drives_runs]
    drivers = [p for p in live if p.may_act(run.effects)]
    now = time.time()
    if args.json:
        payload = _run_json(run) | {
            "approval": _approval_json(approval, await _approved_by(service, approval)),
            "children": [_run_json(c) | {"stopped": stops.get(c.id)} for c in children],
            "undriven": [r.id for r in unowned],  # what a monitor alerts on
            "drivers": [p.owner for p in drivers],  # none: nobody picks `undriven` up
            "stopped": stopped,  # why its last drive stopped, when it waits since
        }
        print(json.dumps(payload, ensure_ascii=False))
        return _exit_code(run)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(run.created_at))
    print(f"Run {run.id}: {run.status}")
    runbook_id = await _tree_runbook(service, run)
    if runbook_id:
        params = " ".join(f"{k}={v}" for k, v in sorted(run.params.items()))
        print(f"  runbook:  {runbook_id}" + (f" ({params})" if params else ""))
    print(f"  request:  {' '.join(run.request.split())[:100]}")
    print(f"  started:  {started} by {run.requested_by} ({run.policy or 'policy not recorded'})")
    outcome = run.error or run.summary
    if run.status.is_terminal and outcome:
        print(f"  outcome:  {' '.join(outcome.split())[:200]}")
    if stopped is not None:
        print(f"  stopped:  {' '.join(stopped.split())[:300]}")
    if children:
        print("  children:")
        width = max(len(child.id) for child in children)
        for child in children:
            stop = stops.get(child.id)
            detail = child.error or child.summary or (f"stopped: {stop}" if stop else "")
            print(
                f"    {child.id:<{width}}  {child.status:<17} {child.role:<9} "
                f"{' '.join(detail.split())[:80]}".rstrip()
            )
    if approval is not None:
        # The request and how to decide it, as everywhere.
        await _report(service, run, False, pending=approval)
        return _exit_code(run)
    if not unowned:
        return _exit_code(run)
    # It drives the whole tree, with the settings this shell lacks for what the run does live.
    resume = f"{_needs(service, run)}loom-ops resume {run.id}{_where(service)}"
    # A live process that drives runs picks up what nobody holds (after an outage's pause),
    # if its settings allow what the tree does live.
    acting = ", ".join(sorted({p.kind for p in drivers}))
    named = "it" if waits else ", ".join(r.id for r in unowned)
    if live and not drivers:
        kinds = sorted({p.kind for p in live})
        lack = "lacks" if len(kinds) == 1 else "lack"
        print(
            f"No live process may act {named}: the running {', '.join(kinds)} {lack} the "
            f"settings its live steps need. Resume it with them: {resume}"
        )
        return _exit_code(run)
    # A live process takes over a gone driver's run at once where it can tell the driver
    # died (on its host), else when the lease runs out; `resume` does at once.
    leases = [r.lease_expires_at or 0.0 for r in unowned if r.lease_owner]
    if drivers and max(leases, default=0.0) > now:
        at = time.strftime("%H:%M:%S UTC", time.gmtime(max(leases)))
        print(
            f"Waiting for the live {acting} to take {named} over, by {at} at the "
            f"latest, when the lease of its gone driver runs out (or now: {resume})"
        )
    elif drivers and any(stops.get(r.id) and not r.due(now) for r in unowned):
        # It stopped for a reason that may hold still (an outage), and is put off until its
        # next try: say so rather than promise it goes on. (A stop for a setting the process
        # lacked puts nothing off: a live driver that has it picks the run up.)
        print(
            f"The live {acting} will try {named} again after a pause, and may stop "
            f"for the same reason; or resume it where that reason does not hold: {resume}"
        )
    elif drivers:
        print(f"Waiting for the live {acting} to pick {named} up")
    elif waits and run.lease_owner:
        print(f"Its driver {run.lease_owner} is gone (dead, or its lease ran out): {resume}")
    else:
        print(f"Nobody drives {named} now: {resume}")
    return _exit_code(run)


def _unowned(service: RunService, run: RunRecord) -> bool:
    """A queued or running run that no process holds now (none claimed it, or its driver is
    gone): whoever drives runs next picks it up."""
    if run.status not in (RunStatus.QUEUED, RunStatus.RUNNING):
        return False
    return not run.lease_owner or service.driver_gone(run)


def _needs(service: RunService, run: RunRecord) -> str:
    """The settings a pasted `resume` needs that this process lacks to act the run live
    (`LOOM_OPS_ALLOW_SHELL=1 `), or "": without them it would stop at the first such step."""
    lacking = service.settings.effects.lacking(run.effects)
    return f"{switched_on(lacking)} " if lacking else ""


def _where(service: RunService) -> str:
    """The `--db`/`--workspace` a printed command needs to reach this store when pasted
    elsewhere than where this one ran: no `--db` where this shell's LOOM_OPS_DB (or the
    default) names the store already. A URL's password is never printed: `***` stands in."""
    settings = service.settings
    default = os.environ.get("LOOM_OPS_DB") or str(Settings.model_fields["db"].default)
    parts = []
    if str(settings.db) != default:
        parts.append(f" --db {shlex.quote(service.store_label)}")
    if Path(settings.workspace).resolve() != Path.cwd().resolve():
        parts.append(f" --workspace {shlex.quote(str(settings.workspace))}")
    return "".join(parts)


async def _print_processes(service: RunService | None, as_json: bool) -> int:
    """`loom-ops status` without a run id: the processes that serve the store (serve,
    telegram, sandbox, workers), live or gone (by their heartbeat, or killed on this host).
    `service` is None when the store does not exist yet (nothing serves it)."""
    now = time.time()
    processes = await service.processes() if service is not None else []
    live = {p.owner for p in await service.live_processes()} if service is not None else set()
    listed = [
        {
            "owner": p.owner,
            "kind": p.kind,
            "drives_runs": p.drives_runs,
            # What its settings let it act live (`shell`, `mcp`, `checks`); None: an older
            # version's process, which does not say.
            "acts_live": list(p.effects.live) if p.effects is not None else None,
            "live": p.owner in live,
            "started_at": p.started_at,
            "heartbeat_at": p.heartbeat_at,
        }
        for p in processes
    ]
    if as_json:
        print(json.dumps({"run_id": None, "status": "ok", "processes": listed}))
        return EXIT_OK
    if not listed:
        print(
            "No process serves this store: decisions made here drive the run in this process, "
            "where its settings allow what the run does live."
        )
    else:
        print(f"{'PROCESS':<16} {'STATE':<28} {'ROLE':<13} {'ACTS LIVE':<17} {'SINCE':<21} OWNER")
    for entry in listed:
        seen = f"{now - entry['heartbeat_at']:.0f} s ago"
        state = "running" if entry["live"] else f"gone (last seen {seen})"
        role = "drives runs" if entry["drives_runs"] else "records only"
        acts = entry["acts_live"]  # None: an older version, which does not say
        mode = "-" if acts is None else ", ".join(acts) or "nothing (dry)"
        started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(entry["started_at"]))
        print(
            f"{entry['kind']:<16} {state:<28} {role:<13} {mode:<17} {started:<21} {entry['owner']}"
        )
    here = service.settings.effects if service is not None else None
    drivers = [p for p in processes if p.owner in live and p.drives_runs]
    if here is not None and here.live and drivers and not any(p.may_act(here) for p in drivers):
        # What a person starting a run from this shell must know: nobody else will drive it.
        print(
            f"No running process that drives runs may act what a run started here does live "
            f"({switched_on(here.live)}): such a run is driven by the command that starts it."
        )
    print("loom-ops status RUN_ID shows one run; loom-ops runs lists them.")
    return EXIT_OK


async def _decide_in(service: RunService, args: argparse.Namespace) -> int:
    """approve/reject: with `--role`, the request of that child of the named run (the seed's
    `approve --run-id exec-1 --role executor`)."""
    if args.role is not None:
        args.run_id = await _run_of_role(service, args.run_id, args.role)
    return await _cmd_decide(service, args)


async def _run_of_role(service: RunService, run_id: str, role: str) -> str:
    """The run of `role` in the tree below `run_id` (itself included); exactly one, or a
    usage error naming what is there."""
    tree = (await service.run_tree(run_id, calls=False)).runs
    found = [run.id for run in tree if run.role == role]
    if len(found) == 1:
        return found[0]
    if not found:
        roles = ", ".join(f"{run.id} ({run.role})" for run in tree)
        raise UsageError(f"no {role} run in the tree of {run_id} (runs: {roles})")
    raise UsageError(f"{len(found)} {role} runs below {run_id}: name one ({', '.join(found)})")


async def _cmd_explain(service: RunService, args: argparse.Namespace) -> int:
    run = await service.get(args.run_id)
    events = await service.events(run.id)
    if args.json:
        payload = _run_json(run) | {
            "events": [
                {"seq": e.seq, "ts": e.ts, "type": e.type, "data": e.data, "hash": e.hash}
                for e in events
            ]
        }
        print(json.dumps(payload, ensure_ascii=False))
    else:
        from agent.views.explain import render_timeline  # with the runbook model it reads

        print(render_timeline(run, events), end="")
    return EXIT_OK


async def _write_trace(service: RunService, run_id: str, path: Path) -> None:
    from agent.views.trace import render_trace, trace_of  # jinja2: this command's only

    html = render_trace(trace_of(await service.run_tree(run_id, calls=False, events=True)))
    try:
        path.write_text(html, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None


async def _cmd_postmortem(service: RunService, args: argparse.Namespace) -> int:
    from agent.service.alerts import AlertService
    from agent.views.postmortem import postmortem_of

    run = await service.root(args.run_id)
    tree = await service.run_tree(run.id, calls=False, events=True)
    draft = postmortem_of(tree, await AlertService(service).incident_of_run(run.id))
    if args.output is None:
        print(
            json.dumps({"run_id": run.id, "postmortem": draft}) + "\n" if args.json else draft,
            end="",
        )
        return EXIT_OK
    try:
        args.output.write_text(draft, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write {args.output}: {exc.strerror or exc}") from None
    if args.json:
        print(json.dumps({"run_id": run.id, "postmortem": str(args.output)}))
    else:
        print(f"wrote {args.output}")
    return EXIT_OK


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
    if args.all:
        if args.action != "verify" or args.run_id is not None or args.head is not None:
            raise UsageError("--all verifies every run: loom-ops audit verify --all")
        return await _verify_all(service, args.keyed_since, args.json)
    if args.action == "export":
        if args.head is not None or args.keyed_since is not None:
            raise UsageError(
                "--head and --keyed-since are for verify: loom-ops audit verify RUN_ID"
            )
        tree = await service.run_tree(args.run_id, calls=False, events=True)
        return _export(tree.runs, list(tree.events), args.format, args.output)
    report = await service.verify_audit(args.run_id, _published(args.head), args.keyed_since)
    if args.json:
        print(json.dumps(_tree_json(report)))
    else:
        for line in _tree_verdict(report):
            print(line)
    return EXIT_OK if report.intact else EXIT_RUN_FAILED


def _positive_int(value: str) -> int:
    """A run number: a whole number from 1."""
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"a run number (1 or more), not {value!r}")
    return int(value)


def _published(value: str | None) -> str | None:
    """`--head` as given, checked: hex digits, enough of them to compare."""
    from agent.chain import published_head

    if value is None:
        return None
    try:
        return published_head(value)
    except ValueError as exc:
        raise UsageError(f"--head: {exc}") from None


def _tree_verdict(report: TreeReport) -> list[str]:
    """A tree's verdict for a person: a line per run that is not intact, then the tree's."""
    from agent.chain import SHOWN_HEX

    lines = [f"run {r.run_id} (#{r.run_no}): {_verdict(r)}" for r in report.runs if not r.intact]
    if report.published_problem:
        lines.append(f"run {report.run_id}: TAMPERED: {report.published_problem}")
    runs = len(report.runs)
    size = f"tree of {runs} run{'s' if runs > 1 else ''}, {report.events} events"
    if not report.intact:
        tampered = bool(report.published_problem) or any(r.problems for r in report.runs)
        verdict = "TAMPERED" if tampered else "NOT VERIFIED"
        bad = sum(1 for r in report.runs if not r.intact)
        lines.append(f"run {report.run_id}: {verdict} ({size}; {bad} run(s) with findings)")
        return lines
    said = f"run {report.run_id}: journal intact ({size}, head {report.head[:SHOWN_HEX]}"
    keys = sorted({r.key_id for r in report.runs if r.key_id})
    said += f", key {', '.join(keys)})" if keys else ")"
    unkeyed = sum(r.unkeyed for r in report.runs)
    if unkeyed == report.events:
        said += " but UNKEYED: a store writer could have recomputed it"
        said += " (written before the key was in force)" if report.keyed else ""
        said += "" if report.keyed else " (set LOOM_OPS_AUDIT_KEY)"
    elif unkeyed:
        said += f"; {unkeyed} of its events were written before the audit key was in force"
    if report.published is not None:
        said += "; it ends at the published head"
    return [*lines, said]


def _verdict(report: ChainReport) -> str:
    """One run's finding in one line: how it was tampered with, or why it was not verified."""
    if report.problems:
        return f"journal TAMPERED: {report.problem}"
    if report.unverified:
        return f"NOT VERIFIED: {report.unverified}"
    return "journal intact"


def _report_json(report: ChainReport) -> dict[str, Any]:
    status = "intact" if report.intact else "tampered" if report.problems else "unverified"
    return {
        "run_id": report.run_id,
        "run_no": report.run_no,
        "status": status,
        "events": report.events,
        "unkeyed_events": report.unkeyed,
        "head": report.head,
        "key_id": report.key_id,
        "first_bad_seq": report.broken.seq if report.broken else None,
        "problems": list(report.problems),
        "unverified": report.unverified,
    }


def _overall(intact: bool, tampered: bool) -> str:
    """A whole verdict's status: intact, tampered (any finding), or unverified (only runs the
    keys held could not judge)."""
    return "intact" if intact else "tampered" if tampered else "unverified"


def _tree_json(report: TreeReport) -> dict[str, Any]:
    tampered = bool(report.published_problem) or any(r.problems for r in report.runs)
    return {
        "run_id": report.run_id,
        "status": _overall(report.intact, tampered),
        "runs": [_report_json(r) for r in report.runs],
        "events": report.events,
        "head": report.head,
        "published_head": report.published,
        "published_problem": report.published_problem,
    }


async def _verify_all(service: RunService, keyed_since: int | None, as_json: bool) -> int:
    """`audit verify --all`: every run's journal, then the global run numbering."""
    report = await service.verify_all_audit(keyed_since)
    reports, numbering = report.runs, report.numbering
    bad = [r for r in reports if not r.intact]
    if as_json:
        tampered = not numbering.intact or any(r.problems for r in reports)
        payload = {
            "status": _overall(report.intact, tampered),
            "runs": len(reports),
            "events": sum(r.events for r in reports),
            "unkeyed_runs": sum(1 for r in reports if r.unkeyed == r.events),
            "tampered": [_report_json(r) for r in bad if r.problems],
            "unverified": [_report_json(r) for r in bad if not r.problems],
            "numbering": numbering.problems(),
        }
        print(json.dumps(payload))
        return EXIT_OK if report.intact else EXIT_RUN_FAILED
    for run in bad:
        print(f"run {run.run_id} (#{run.run_no}): {_verdict(run)}")
    for line in numbering.problems():
        print(f"TAMPERED: {line}")
    events = sum(r.events for r in reports)
    unkeyed = sum(1 for r in reports if r.unkeyed == r.events and r.events)
    if not reports and report.intact:
        print("no runs to verify")
    elif report.intact:
        said = f"all {len(reports)} runs intact ({events} events, numbered 1-{numbering.highest})"
        if unkeyed:
            said += f"; {unkeyed} of them UNKEYED: a store writer could have recomputed those"
        print(said)
    else:
        tampered = sum(1 for r in bad if r.problems)
        numbered = "intact" if numbering.intact else "not intact"
        print(
            f"{tampered} of {len(reports)} runs tampered, {len(bad) - tampered} not verified; "
            f"run numbering {numbered}"
        )
    return EXIT_OK if report.intact else EXIT_RUN_FAILED


EXPORT_COLUMNS = (
    "seq", "run_id", "idx", "ts", "time_utc", "type", "data", "prev_hash", "hash", "key_id"
)  # fmt: skip


def _export(
    runs: Sequence[RunRecord], events: list[EventRecord], fmt: str, output: Path | None
) -> int:
    """Write the journal of a run's tree as JSON lines or CSV, one event per line in written
    order, links included, and last the tree's head (`type` audit_head): a copy kept elsewhere
    is a published head (`audit verify RUN --head`)."""
    import csv
    from datetime import UTC, datetime

    from agent.chain import journal_tree_head

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
            "key_id": e.key_id,
        }
        for e in events
    ]
    root = runs[0]
    head = {
        "run_id": root.id,
        "run_no": root.run_no,
        "runs": len(runs),
        "events": len(events),
        "head": journal_tree_head(runs, events),
        "key_ids": sorted({e.key_id for e in events if e.key_id}),
    }
    try:
        handle = output.open("w", newline="", encoding="utf-8") if output else sys.stdout
    except OSError as exc:
        raise UsageError(f"cannot write {output}: {exc.strerror or exc}") from None
    try:
        if fmt == "jsonl":
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            handle.write(json.dumps({"type": "audit_head", **head}) + "\n")
        else:
            writer = csv.DictWriter(handle, fieldnames=EXPORT_COLUMNS)
            writer.writeheader()
            for row in rows:
                writer.writerow(row | {"data": json.dumps(row["data"], ensure_ascii=False)})
            writer.writerow(
                {
                    "run_id": root.id,
                    "idx": len(events),
                    "type": "audit_head",
                    "data": json.dumps(head),
                    "hash": head["head"],
                }
            )
    finally:
        if output:
            handle.close()
    if output:  # as `trace -o` says; and the head, which is what a person publishes
        print(f"wrote {output}: {len(events)} events, tree head {head['head']}")
    return EXIT_OK


async def _cmd_runbooks(settings: Settings, args: argparse.Namespace) -> int:
    from agent.runbook.model import load_catalog, load_runbook

    path: Path = args.path or settings.runbooks_dir
    if not path.is_file() and not path.is_dir():
        raise UsageError(f"no such file or directory: {path}")
    if args.action == "validate":
        return await _validate(settings, path, args.json)
    if path.is_file():
        try:
            runbooks, errors = [load_runbook(path)], []
        except RunbookError as exc:
            runbooks, errors = [], [exc]
    else:
        catalog = load_catalog(path)
        runbooks, errors = list(catalog.runbooks.values()), catalog.errors
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
            print(f"{runbook.id:<26} {len(runbook.steps)} steps, {gated} gated  {runbook.title}")
        for error in errors:
            print(f"loom-ops: {error}", file=sys.stderr)
    return EXIT_USAGE if errors else EXIT_OK


async def _validate(settings: Settings, path: Path, as_json: bool) -> int:
    """`runbooks validate`: every error of every file in one pass (templates rendered with
    the params' defaults, within the bounds), commands no allowlist rule admits (errors when
    LOOM_OPS_ALLOW_SHELL=1, warnings otherwise), and MCP tools no configured server offers
    (the servers used are started for their `tools/list`: see agent.tools.mcp_check); a
    runbook an MCP error fails is listed as `error <id>: <reason>` beside the `ok` ones.
    An allowlist file that is missing or unreadable is named as doctor names it: an error
    when LOOM_OPS_ALLOW_SHELL=1, else a warning, except that dry-run needs no allowlist."""
    from agent.runbook.model import validate_runbooks
    from agent.tools.allowlist import read_allowlist
    from agent.tools.mcp_check import check_mcp_tools, mcp_uses

    live = settings.allow_shell
    errors: list[str] = []
    warnings: list[str] = []
    allowlist, problem = read_allowlist(settings.allowlist_path)  # doctor's words, and...
    missing = allowlist is not None and not allowlist.found
    if problem is not None and (live or not missing):  # ...but dry-run needs no allowlist
        (errors if live else warnings).append(problem)
    if missing:
        allowlist = None  # one line above, not one per command
    reports = validate_runbooks(path, allowlist, live_shell=live)
    for report in reports:
        errors += [str(e) for e in report.errors]
        warnings += [str(e) for e in report.warnings]
    valid = [r.runbook for r in reports if r.runbook is not None and not r.errors]
    uses = mcp_uses(valid, settings.allow_mcp, settings.live_checks)
    mcp_broken: dict[str, list[str]] = {}  # runbook id -> the MCP errors about it: not "ok"
    for finding in await check_mcp_tools(settings.mcp_config_path, uses):
        if finding.severity == "error":
            errors.append(finding.message)
            for runbook_id in finding.runbooks:
                mcp_broken.setdefault(runbook_id, []).append(finding.message)
        elif finding.severity == "warning":
            warnings.append(finding.message)
    valid = [r for r in valid if r.id not in mcp_broken]
    if as_json:
        payload = {
            "run_id": None,
            "status": "invalid" if errors else "ok",
            "runbooks": [{"id": r.id, "title": r.title, "steps": len(r.steps)} for r in valid],
            "errors": errors,
            "warnings": warnings,
        }
        print(json.dumps(payload, ensure_ascii=False))
    else:
        fine = {id(r) for r in valid}
        for report in reports:
            if report.runbook is not None and id(report.runbook) in fine:
                noted = f" ({len(report.warnings)} warning(s))" if report.warnings else ""
                print(f"ok       {report.runbook.id}{noted}")
            elif report.runbook is not None:  # valid as a file, but its MCP tools fail it
                for reason in mcp_broken.get(report.runbook.id, []):
                    print(f"error    {report.runbook.id}: {reason}")
        for error in errors:
            print(f"loom-ops: {error}", file=sys.stderr)
        for warning in warnings:
            print(f"loom-ops: warning: {warning}", file=sys.stderr)
    return EXIT_USAGE if errors else EXIT_OK


async def _cmd_doctor(settings: Settings, args: argparse.Namespace) -> int:
    """`loom-ops doctor`: one line per finding, exit 1 when any is an error."""
    from agent.frontends.doctor import as_json, diagnose, summary

    findings = await diagnose(settings)
    if args.json:
        print(json.dumps(as_json(findings), ensure_ascii=False))
    else:
        for finding in findings:
            print(finding.line())
        print(summary(findings))
    return EXIT_RUN_FAILED if any(f.severity == "error" for f in findings) else EXIT_OK


def _cli_user(service: RunService, name: str | None) -> str:
    """Who a CLI command acts as: the login (`cli:<login>`), or the person `--as` names once
    `_check_acting_for_others` allowed it."""
    return f"cli:{name or service.settings.user}"


def _check_acting_for_others(settings: Settings, name: str) -> None:
    """`--as NAME` is refused (before the store is opened) unless the people file lets this
    login act for others: a shared operations account. The login is who decides otherwise."""
    from agent.people import load_people

    me = f"cli:{settings.user}"
    if name == settings.user:
        return  # acting as oneself
    if not load_people(settings).may_act_for_others(me):
        raise UsageError(
            f"--as {name}: {me} may not act for others (only a login the people file "
            f"{settings.people_path} marks may_act_for_others: true); decide without --as",
            kind=ErrorKind.FORBIDDEN,
        )


def _check_token_person(settings: Settings, person: str, name: str | None) -> None:
    """`tokens create --person NAME` is refused (before the store is opened, so nothing is
    written) unless the people file names that person, a token acts as its person, and the
    token's name is a valid one."""
    from agent.people import TOKEN_NAME_PATTERN, load_people

    if name is not None and not re.fullmatch(TOKEN_NAME_PATTERN, name):
        raise UsageError(f"token name {name!r} must match {TOKEN_NAME_PATTERN}")
    people = load_people(settings)
    if person not in people.by_name:
        if people.source is None:  # no file: say so, rather than name one that is not there
            raise UsageError(
                f"--person {person}: there is no people file at {settings.people_path} "
                "(a token acts as a person it names)"
            )
        raise UsageError(
            f"--person {person}: no person of that name in the people file {people.source}"
        )


async def _cmd_tokens(service: RunService, args: argparse.Namespace) -> int:
    """`loom-ops tokens create|list|revoke`: people's tokens for the HTTP API."""
    if args.action == "create":
        record, secret = await service.create_token(args.person, args.name)
        if args.json:
            payload = {"run_id": None, "status": "ok", "token": _token_json(record)}
            print(json.dumps(payload | {"secret": secret}))
        else:
            # The token alone on stdout (`TOKEN=$(loom-ops tokens create …)`); the rest is
            # for the person reading the terminal.
            print(secret)
            print(
                f"API token {record.name} for {record.person}: decisions with it are recorded "
                f"as {record.identity}. It is shown only now: the store keeps its hash.",
                file=sys.stderr,
            )
        return EXIT_OK
    if args.action == "list":
        return _print_tokens(await service.list_tokens(), args.json)
    record = await service.revoke_token(args.name)
    if args.json:
        print(json.dumps({"run_id": None, "status": "ok", "token": _token_json(record)}))
    else:
        print(f"revoked API token {record.name} ({record.person}) at {_utc(record.revoked_at)}")
    return EXIT_OK


def _utc(at: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(at)) if at is not None else "-"


def _token_json(record: ApiTokenRecord) -> dict[str, Any]:
    return {
        "name": record.name,
        "person": record.person,
        "identity": record.identity,
        "created_at": record.created_at,
        "revoked_at": record.revoked_at,
    }


def _print_tokens(tokens: Sequence[ApiTokenRecord], as_json: bool) -> int:
    if as_json:
        listed = [_token_json(token) for token in tokens]
        print(json.dumps({"run_id": None, "status": "ok", "tokens": listed}))
        return EXIT_OK
    if not tokens:
        print("no API tokens")
        return EXIT_OK
    print(f"{'NAME':<24} {'PERSON':<20} {'CREATED (UTC)':<17} REVOKED (UTC)")
    for token in tokens:
        print(
            f"{token.name:<24} {token.person:<20} {_utc(token.created_at):<17} "
            f"{_utc(token.revoked_at)}"
        )
    return EXIT_OK


COMMANDS: dict[str, Callable[[RunService, argparse.Namespace], Awaitable[int]]] = {
    "runbook": _cmd_runbook,
    "supervise": _cmd_runbook,
    "resume": _cmd_resume,
    "approve": _decide_in,
    "reject": _decide_in,
    "cancel": _cmd_cancel,
    "status": _cmd_status,
    "runs": _cmd_runs,
    "explain": _cmd_explain,
    "audit": _cmd_audit,
    "trace": _cmd_trace,
    "postmortem": _cmd_postmortem,
    "tokens": _cmd_tokens,
}


async def _serve(settings: Settings, args: argparse.Namespace) -> int:
    """`loom-ops serve` / `telegram`: check every setting before any network call, serve."""
    from agent.frontends import serving

    http = None
    if args.command == "serve":
        host = args.host if args.host is not None else settings.host
        port = args.port if args.port is not None else settings.port
        http = serving.HttpEndpoint(host, port)
    if http is not None:
        serving.check_http(settings, http)
    wants_bot = args.command in ("telegram", "bot") or getattr(args, "telegram", False)
    webhook = serving.WebhookOptions(
        getattr(args, "webhook_url", None), getattr(args, "listen", None)
    )
    telegram = serving.check_telegram(settings, webhook) if wants_bot else None
    return await serving.serve(settings, http, telegram, executes_runs=not args.no_worker)


async def _run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _merge_run_id(args)
    if args.command == "runbooks":
        return await _cmd_runbooks(settings, args)
    if args.command == "doctor":
        return await _cmd_doctor(settings, args)
    if args.command in ("telegram", "bot", "serve"):
        return await _serve(settings, args)
    if args.command == "worker":
        from agent.frontends.serving import serve_worker

        concurrency = args.concurrency or settings.worker_concurrency
        return await serve_worker(settings, concurrency)
    if args.command == "healthcheck":
        return await _healthcheck(settings, args.url)
    if args.command == "sandbox":
        from agent.frontends.sandbox import run_sandbox  # the bot's packages, for this command only

        return await run_sandbox(settings, args.port, args.script)
    # Whatever can be refused without the store is refused before it is opened: opening
    # creates the database, and a usage error must leave nothing behind.
    if getattr(args, "as_user", None) is not None:
        _check_acting_for_others(settings, args.as_user)
    if args.command == "tokens" and args.action == "create":
        _check_token_person(settings, args.person, args.name)  # a new token creates the store
    elif args.command in ("runbook", "supervise"):
        _check_start(settings, args)
    elif (missing := missing_store(settings)) is not None:
        return await _without_store(missing, args)
    service = await RunService.open(settings)
    try:
        return await COMMANDS[args.command](service, args)
    finally:
        await service.close()


# Commands that act on one named run (resume and status also work without one).
_NEEDS_RUN_ID = frozenset(
    {"approve", "reject", "cancel", "explain", "trace", "postmortem", "audit"}
)


def _merge_run_id(args: argparse.Namespace) -> None:
    """One run id from the positional and `--run-id`; a usage error when two differ or a
    command that needs one has none. Its form is checked here, before any store is opened."""
    if not hasattr(args, "run_id_flag"):
        if getattr(args, "run_id", None) is not None:  # runbook/supervise: the new run's id
            validate_run_id(args.run_id)
        return
    given, flag = args.run_id, args.run_id_flag
    if given is not None and flag is not None and given != flag:
        raise UsageError(f"two run ids given: {given} and --run-id {flag}")
    args.run_id = given if given is not None else flag
    if args.run_id is None and args.command in _NEEDS_RUN_ID and not getattr(args, "all", False):
        command = f"audit {args.action}" if args.command == "audit" else args.command
        raise UsageError(f"which run? loom-ops {command} RUN_ID (or --run-id RUN_ID)")
    if args.run_id is not None:
        validate_run_id(args.run_id)


def _check_start(settings: Settings, args: argparse.Namespace) -> None:
    """What `runbook`/`supervise` refuses anyway (the message, the policy, the runbook and
    its params, a live run from a guess), refused before the store exists."""
    from agent.policy.mock import MockPolicy
    from agent.runbook.model import current_catalog

    validate_text("message", args.message, MAX_REQUEST_BYTES)
    if not args.message.strip():
        raise UsageError("message is empty")
    catalog = current_catalog(settings.runbooks_dir)
    key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else ""
    if settings.mock_llm:
        MockPolicy().preflight(args.message, catalog)  # RequestError, ParamError: one line
    elif not key:
        raise UsageError(NO_POLICY)
    _refuse_live_guess(settings, args, catalog)


def _refuse_live_guess(
    settings: Settings, args: argparse.Namespace, catalog: RunbookCatalog
) -> None:
    """The service's rule (a live run starts only from a runbook the message names, or with
    --yes), checked before the store exists and said with the command line that runs exactly
    the guess."""
    from agent.runbook.matching import live_guess_refusal

    refused = (
        None if args.yes else live_guess_refusal(settings.live_switches, catalog, args.message)
    )
    if refused is None:
        return
    why, guess = refused
    if guess.runbook is None:
        raise UsageError(f"{why}; put a runbook id first, or add --yes to let the policy choose")
    # With the settings that made it live, or the pasted command would start a dry run.
    retyped = f"{switched_on(settings.effects.live)} {_retyped(args, guess.named())}"
    raise UsageError(f"{why}; to run exactly that: {retyped} (or add --yes)")


def _retyped(args: argparse.Namespace, message: str) -> str:
    """The command line as typed, with `message` in place of the incident text."""
    argv = list(getattr(args, "argv", None) or [args.command, args.message])
    if args.message in argv:
        argv[argv.index(args.message)] = message
    return shlex.join(["loom-ops", *argv])


async def _without_store(where: str, args: argparse.Namespace) -> int:
    """A command on runs before any run exists (no SQLite file at `where`): answered without
    creating the database."""
    if args.command == "runs":
        if args.json:
            print(json.dumps({"run_id": None, "status": "ok", "runs": []}))
        else:
            print("no runs")
        return EXIT_OK
    if args.command == "status" and args.run_id is None:
        return await _print_processes(None, args.json)
    if args.command == "tokens":
        if args.action == "list":
            return _print_tokens([], args.json)
        raise UsageError(f"no API token is named {args.name!r}: there is no database at {where}")
    if args.command == "resume" and args.run_id is None:
        if args.json:
            print(json.dumps({"run_id": None, "status": "ok", "runs": []}))
        else:
            print("resumed 0 run(s)")
        return EXIT_OK
    raise UsageError(f"unknown run id {args.run_id!r}: there is no database at {where} (--db)")


async def _healthcheck(settings: Settings, url: str | None) -> int:
    """What a container's or a load balancer's health probe runs: one line, exit 0 or 1."""
    try:
        label, version = await probe_store(settings)
    except StoreError as exc:
        print(f"loom-ops: unhealthy: {(str(exc).strip().splitlines() or [''])[0]}", file=sys.stderr)
        return EXIT_RUN_FAILED
    if url is not None:
        import httpx  # this probe's only

        try:
            async with httpx.AsyncClient(timeout=5) as client:
                response = await client.get(url)
        except httpx.HTTPError as exc:
            print(f"loom-ops: unhealthy: {url}: {exc}", file=sys.stderr)
            return EXIT_RUN_FAILED
        if response.status_code != 200:
            print(f"loom-ops: unhealthy: {url} answered {response.status_code}", file=sys.stderr)
            return EXIT_RUN_FAILED
    answered = f"; {url} answered 200" if url is not None else ""  # say all that was checked
    print(f"ok: {label} at schema {version}{answered}")
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
    args.argv = list(sys.argv[1:] if argv is None else argv)  # to retype it in a hint
    try:
        return asyncio.run(_run(args))
    except BrokenPipeError:  # e.g. `loom-ops audit export … | head`: the reader has enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        print("loom-ops: interrupted; resume with loom-ops resume", file=sys.stderr)
        return 130
    except Exception as exc:
        kind = kind_of(exc)
        if kind is None:
            raise  # a bug: its traceback is what a report needs
        if isinstance(exc, LoomOpsError):
            print(f"loom-ops: {exc}", file=sys.stderr)
        else:  # the machine's, not ours: its type says what broke
            detail = (str(exc).strip().splitlines() or [""])[0]
            print(f"loom-ops: {type(exc).__name__}: {detail}", file=sys.stderr)
        return EXIT_CODES[kind]


if __name__ == "__main__":
    sys.exit(main())
