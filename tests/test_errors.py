"""Errors: one base class whose kind each front end maps (the CLI to an exit code, the HTTP API
to a status) without touching the text; and the import contracts that keep front ends on the
service's one door and `agent.errors` at the bottom."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import agent
import bot
from agent.errors import ApprovalAmbiguous, ErrorKind, LoomOpsError, ServiceError, kind_of
from agent.frontends.cli import EXIT_CODES
from agent.frontends.http_api import STATUS, create_app
from agent.http_server import HttpServer
from agent.records import Decision
from agent.service.runs import RunService
from agent.settings import Settings
from tests.cli_helpers import REPO, Cli, assert_usage_error, make_cli_workspace
from tests.support import LATENCY, TWO_GATES, write_runbook

# Not loom-ops's errors: the Bot API stand-in answers as Telegram's server does.
NOT_OURS = {"bot.standin.BotApiError"}
# Public error classes that may live beside what raises them rather than in agent.errors:
# the command line's own usage refusals, and the bot's (bot/ owns its errors).
BESIDE_THEIR_RAISER = {"agent.frontends.cli.UsageError"}


def _exception_classes() -> Iterator[tuple[str, type[BaseException]]]:
    """Every public exception class defined in a module of agent/ or bot/, by full name."""
    for package in (agent, bot):
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            module = importlib.import_module(info.name)
            for name, value in vars(module).items():
                if (
                    inspect.isclass(value)
                    and issubclass(value, BaseException)
                    and value.__module__ == info.name
                    and not name.startswith("_")
                ):
                    yield f"{info.name}.{name}", value


def test_every_error_class_of_agent_and_bot_derives_from_loomopserror() -> None:
    found = dict(_exception_classes())
    assert "agent.errors.RunNotFound" in found  # the walk reached the modules
    strays = [name for name, cls in found.items() if not issubclass(cls, LoomOpsError)]
    assert sorted(strays) == sorted(NOT_OURS)


def test_agent_raises_errors_from_one_module() -> None:
    elsewhere = [
        name
        for name, _ in _exception_classes()
        if name.startswith("agent.") and not name.startswith("agent.errors.")
    ]
    assert sorted(elsewhere) == sorted(BESIDE_THEIR_RAISER)


def test_each_kind_maps_to_the_documented_exit_code_and_http_status() -> None:
    assert EXIT_CODES == {
        ErrorKind.INVALID: 2,
        ErrorKind.NOT_FOUND: 2,
        ErrorKind.CONFLICT: 2,
        ErrorKind.FORBIDDEN: 2,
        ErrorKind.UNAVAILABLE: 1,  # the machine, not the input: trying again may work
        ErrorKind.BUSY: 1,
    }
    assert STATUS == {
        ErrorKind.INVALID: 422,
        ErrorKind.NOT_FOUND: 404,
        ErrorKind.CONFLICT: 409,
        ErrorKind.FORBIDDEN: 403,
        ErrorKind.UNAVAILABLE: 503,
        ErrorKind.BUSY: 429,
    }


def test_a_kind_is_the_classs_unless_the_raiser_names_one() -> None:
    assert ServiceError("no").kind == ErrorKind.INVALID
    named = ServiceError("decided already", kind=ErrorKind.CONFLICT)
    assert named.kind == ErrorKind.CONFLICT and str(named) == "decided already"
    assert ServiceError("no").kind == ErrorKind.INVALID  # the class's default is untouched
    assert kind_of(sqlite3.OperationalError("disk I/O error")) == ErrorKind.UNAVAILABLE
    assert kind_of(OSError("no space left")) == ErrorKind.UNAVAILABLE
    assert kind_of(KeyError("a bug")) is None


async def test_a_decision_naming_no_request_says_which_are_open(
    workspace: Path, service: RunService
) -> None:
    """A front end phrases "say which" its own way from the numbers, not from the text."""
    write_runbook(workspace, "two-gates", TWO_GATES)
    await service.start("gates", "two-gates")
    assert (await service.decide("gates", Decision.APPROVE, "cli:approver")).changed
    with pytest.raises(ApprovalAmbiguous) as refused:
        await service.decide("gates", Decision.APPROVE, "cli:approver")
    assert refused.value.open_numbers == (2,)
    assert refused.value.kind == ErrorKind.CONFLICT


# -- the front ends map kinds -------------------------------------------------------------------


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    """A fresh workspace (the shipped runbooks) and a database file that does not exist yet."""
    return Cli(make_cli_workspace(tmp_path / "ws"), tmp_path / "ops.sqlite")


def _drop_runs_table(db: Path) -> None:
    """Break the database under a running store: what a corrupted or hand-edited file does."""
    conn = sqlite3.connect(db)
    try:
        conn.execute("PRAGMA foreign_keys = OFF")
        conn.execute("DROP TABLE runs")
        conn.commit()
    finally:
        conn.close()


def test_the_cli_exits_with_each_kinds_code_saying_the_refusers_words(cli: Cli) -> None:
    started = cli("runbook", LATENCY, "--run-id", "inc-1", "--mock-llm")
    assert started.returncode == 0, started.describe()
    assert_usage_error(cli("approve", "nope"), "unknown run id 'nope'")  # not found
    assert_usage_error(cli("approve", "inc-1", "--as", "intruder"), "--as NAME")  # forbidden
    assert cli("cancel", "inc-1").returncode == 1  # cancelled: the run's own exit code
    assert_usage_error(cli("cancel", "inc-1"), "already cancelled")  # conflict

    _drop_runs_table(cli.db)
    broken = cli("runs")  # unavailable: the machine failed, one line, no traceback
    assert broken.returncode == 1, broken.describe()
    assert broken.stderr.splitlines() == ["loom-ops: OperationalError: no such table: runs"]


async def test_the_http_api_answers_each_kind_with_its_status_and_the_refusers_words(
    settings: Settings,
) -> None:
    import httpx

    service = await RunService.open(settings)
    app = create_app(service)

    async def refuse(kind: ErrorKind) -> None:
        raise LoomOpsError(f"refused as {kind}", kind=kind)

    app.add_api_route("/refuse/{kind}", refuse)
    try:
        async with HttpServer(app) as server, httpx.AsyncClient(base_url=server.url) as client:
            for kind, status in STATUS.items():
                answer = await client.get(f"/refuse/{kind}")
                assert (answer.status_code, answer.json()) == (
                    status,
                    {"error": f"refused as {kind}"},
                )
            # The same table for refusals from every layer, and for the machine's failures.
            answer = await client.get("/runs/nope")
            assert (answer.status_code, answer.json()) == (404, {"error": "unknown run id 'nope'"})
            _drop_runs_table(Path(settings.db))
            answer = await client.get("/runs")
            assert answer.status_code == 503, answer.text
            assert answer.json() == {"error": "OperationalError: no such table: runs"}
    finally:
        await service.close()


# -- one door, and what a command pays to start ----------------------------------------------


def test_the_import_contracts_hold() -> None:
    """Layers never import upwards; front ends and the bot never import the store or kernel."""
    lint = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run(
        [str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Front ends use the service only" in done.stdout


HEAVY = ("httpx", "jinja2", "openai", "mcp", "uvicorn", "starlette", "telegram", "yaml")
DRIVING = ("agent.run.kernel", "agent.runbook.model", "agent.tools.toolbox", "agent.views.jinja")


@pytest.mark.parametrize("command", [["runs"], ["approve", "nope"], ["status"]])
def test_a_command_that_drives_no_run_imports_neither_the_kernel_nor_heavy_packages(
    tmp_path: Path, command: list[str]
) -> None:
    """`loom-ops runs` and `approve` start fast because they import what they need only."""
    cli = Cli(make_cli_workspace(tmp_path / "ws"), tmp_path / "ops.sqlite")
    assert cli("runbook", LATENCY, "--run-id", "inc-1", "--mock-llm").returncode == 0
    probe = (
        "import sys\n"
        "from agent.frontends.cli import main\n"
        f"code = main({[*command, '--db', str(cli.db), '--workspace', str(cli.workspace)]!r})\n"
        f"print(sorted(m for m in {HEAVY + DRIVING!r} if m in sys.modules), code)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=cli.workspace, capture_output=True, text=True
    )
    assert done.stdout.splitlines()[-1] in ("[] 0", "[] 2"), done.stdout + done.stderr
