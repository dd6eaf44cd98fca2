"""`loom-ops doctor` end to end: the real console script against a real workspace, with an
OpenAI-compatible stand-in and the Bot API stand-in on 127.0.0.1 (nothing leaves the machine).

The doctor prints one line per finding (`<severity> <check> <message>`) and a summary, exits 1
when any finding is an error, and writes nothing.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli_helpers import REPO, TEST_PEOPLE, Cli, CliResult, cli_env, make_cli_workspace
from tests.openai_standin import http_error
from tests.openai_standin import serve as serve_llm

BOT_TOKEN = "123456789:AAHdoctorTestTokenSecretPart00000"


SHIPPED_BINARIES = ("df", "du", "journalctl", "kubectl")


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    """The shipped runbooks and allowlist rules in a fresh workspace, no database yet; the
    allowlist's path is a directory of stand-in binaries, so what is found does not depend on
    what this machine has installed."""
    workspace = make_cli_workspace(tmp_path / "ws")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in SHIPPED_BINARIES:
        (bin_dir / name).write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / name).chmod(0o755)
    allowlist = json.loads((REPO / "ops.shell.allowlist.json").read_text())
    allowlist["path"] = [str(bin_dir)]
    (workspace / "ops.shell.allowlist.json").write_text(json.dumps(allowlist))
    return Cli(workspace, tmp_path / "ops.sqlite")


def findings(result: CliResult, severity: str, check: str) -> list[str]:
    """The messages of the printed findings of one severity and check."""
    found = []
    for line in result.stdout.splitlines()[:-1]:  # the last line is the summary
        level, kind, message = line.split(maxsplit=2)
        assert level in ("error", "warning", "ok"), line
        if (level, kind) == (severity, check):
            found.append(message)
    return found


def errors(result: CliResult) -> list[str]:
    """Every error line."""
    return [line for line in result.stdout.splitlines() if line.startswith("error")]


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_doctor_on_the_shipped_workspace_with_the_mock_finds_no_error(cli: Cli) -> None:
    result = cli("doctor", "--mock-llm")
    assert result.returncode == 0, result.describe()
    assert errors(result) == []
    assert findings(result, "ok", "runbooks") == ["3 of 3 runbook(s) valid"]
    assert findings(result, "ok", "llm") == ["the mock policy (--mock-llm): no LLM is asked"]
    assert findings(result, "ok", "binaries") == [f"found: {', '.join(SHIPPED_BINARIES)}"]
    assert result.stdout.splitlines()[-1].startswith("doctor: 0 errors")
    assert result.stderr == ""
    # Nothing written: no database, nothing new in the workspace.
    assert not cli.db.exists()
    assert sorted(p.name for p in cli.workspace.iterdir()) == [
        "ops.shell.allowlist.json",
        "people.yaml",
        "runbooks",
    ]


GAPS = """\
id: gaps
title: A command no rule admits, a binary nowhere
triggers: [gaps]
params:
  target: {default: api}
steps:
  - id: restart
    title: Restart
    run: no-such-binary-zz --restart {{ target }}
  - id: usage
    title: Usage
    run: df -h /var
"""


def test_allowlist_gap_and_missing_binary_are_errors_with_live_shell(cli: Cli) -> None:
    (cli.workspace / "runbooks" / "gaps.yaml").write_text(GAPS)

    dry = cli("doctor", "--mock-llm")
    assert dry.returncode == 0, dry.describe()  # dry-run: nothing fails yet, only warnings
    [gap] = findings(dry, "warning", "allowlist")
    assert "gaps.yaml:9: steps[0].run" in gap
    assert '["no-such-binary-zz", "--restart", "api"]' in gap
    [binary] = findings(dry, "warning", "binaries")
    assert binary.startswith("no-such-binary-zz is not an executable in the allowlist's path")

    live = cli("doctor", "--mock-llm", env={"LOOM_OPS_ALLOW_SHELL": "1"})
    assert live.returncode == 1, live.describe()
    assert findings(live, "error", "allowlist") == [gap]
    assert findings(live, "error", "binaries") == [binary]
    # The warnings left: the tests' sam has only a Telegram id, and no bot token is set; no
    # audit key is set.
    assert live.stdout.splitlines()[-1] == "doctor: 2 errors, 2 warnings"


def test_missing_allowlist_is_one_finding(cli: Cli) -> None:
    (cli.workspace / "ops.shell.allowlist.json").unlink()
    result = cli("doctor", "--mock-llm", env={"LOOM_OPS_ALLOW_SHELL": "1"})
    assert result.returncode == 1, result.describe()
    [missing] = findings(result, "error", "allowlist")
    assert missing.startswith("no allowlist at ")


OPS_SERVER = REPO / "tests" / "mcp_servers" / "ops_server.py"
MCP_RUNBOOK = """\
id: mcp-drill
title: Restart through MCP
triggers: [mcp]
steps:
  - id: restart
    title: Restart
    mcp: {tool: restart_service, arguments: {service: api}}
"""


def test_mcp_tool_missing_from_the_config(cli: Cli) -> None:
    (cli.workspace / "runbooks" / "mcp-drill.yaml").write_text(MCP_RUNBOOK)
    config = {
        "servers": {"ops": {"command": sys.executable, "args": [str(OPS_SERVER)]}},
        "tools": {"scale_service": {"server": "ops", "tool": "scale"}},
    }
    (cli.workspace / "ops.mcp.json").write_text(json.dumps(config))

    dry = cli("doctor", "--mock-llm")
    assert dry.returncode == 0, dry.describe()
    [missing] = findings(dry, "warning", "mcp")
    assert "'restart_service' (used by mcp-drill/restart)" in missing
    assert '"tools" (mapped: scale_service)' in missing

    live = cli("doctor", "--mock-llm", env={"LOOM_OPS_ALLOW_MCP": "1"})
    assert live.returncode == 1, live.describe()
    assert findings(live, "error", "mcp") == [missing]

    config["tools"]["restart_service"] = {"server": "ops", "tool": "restart"}
    (cli.workspace / "ops.mcp.json").write_text(json.dumps(config))
    fixed = cli("doctor", "--mock-llm", env={"LOOM_OPS_ALLOW_MCP": "1"})
    assert fixed.returncode == 0, fixed.describe()
    assert findings(fixed, "ok", "mcp") == [
        f"{cli.workspace / 'ops.mcp.json'}: every MCP tool used is offered: "
        "restart_service (ops.restart)"
    ]


# -- the LLM ----------------------------------------------------------------------------------


def _llm_env(base_url: str, model: str = "stand-in-model") -> dict[str, str]:
    return {
        "OPENAI_API_KEY": "sk-doctor-secret",
        "OPENAI_BASE_URL": base_url,
        "OPENAI_MODEL": model,
    }


def test_llm_that_answers_is_ok_and_asked_once(cli: Cli) -> None:
    with serve_llm([{"content": "ok"}]) as llm:
        result = cli("doctor", env=_llm_env(llm.base_url))
        assert result.returncode == 0, result.describe()
        assert findings(result, "ok", "llm") == [
            f"model 'stand-in-model' answers at {llm.base_url}"
        ]
        assert len(llm.requests) == 1
        assert llm.requests[0]["model"] == "stand-in-model"
        assert llm.requests[0]["max_tokens"] == 1


@pytest.mark.parametrize(
    ("answer", "setting"),
    [
        pytest.param(http_error(401, message="Incorrect API key"), "OPENAI_API_KEY", id="401"),
        pytest.param(
            http_error(404, message="The model `gpt-9` does not exist", code="model_not_found"),
            "OPENAI_MODEL",
            id="404-model",
        ),
    ],
)
def test_misconfigured_llm_names_the_setting(
    cli: Cli, answer: dict[str, object], setting: str
) -> None:
    with serve_llm([answer]) as llm:
        result = cli("doctor", env=_llm_env(llm.base_url))
    assert result.returncode == 1, result.describe()
    [line] = findings(result, "error", "llm")
    assert line.startswith(f"check {setting}"), line
    assert "sk-doctor-secret" not in result.stdout + result.stderr


def test_llm_url_without_v1_is_a_base_url_error(cli: Cli) -> None:
    with serve_llm([]) as llm:
        result = cli("doctor", env=_llm_env(llm.base_url.removesuffix("/v1")))
    [line] = findings(result, "error", "llm")
    assert line.startswith("check OPENAI_BASE_URL"), line
    assert "usually end in /v1" in line


def test_unreachable_llm_is_an_error_within_the_timeout(cli: Cli) -> None:
    started = time.monotonic()
    result = cli("doctor", env=_llm_env(f"http://127.0.0.1:{free_port()}/v1"))
    assert time.monotonic() - started < 20
    assert result.returncode == 1, result.describe()
    [line] = findings(result, "error", "llm")
    assert line.startswith("LLM unreachable at http://127.0.0.1:"), line


def test_mock_llm_asks_no_llm(cli: Cli) -> None:
    with serve_llm([{"content": "ok"}]) as llm:
        result = cli("doctor", "--mock-llm", env=_llm_env(llm.base_url))
        assert result.returncode == 0, result.describe()
        assert llm.requests == [] and llm.paths == []


# -- the Bot API ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bot_api() -> Iterator[str]:
    """The Bot API stand-in as its own process, accepting BOT_TOKEN; its base URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bot.standin", "--token", BOT_TOKEN],
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()  # the base URL to set, ending in /bot
        assert url.startswith("http://127.0.0.1:") and url.endswith("/bot"), url
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def _bot_env(base_url: str, token: str = BOT_TOKEN, **extra: str) -> dict[str, str]:
    env = {
        "TELEGRAM_BOT_TOKEN": token,
        "TELEGRAM_API_BASE_URL": base_url,
        "TELEGRAM_ALLOWED_CHAT_IDS": "-1001",
        "TELEGRAM_APPROVER_IDS": "100000001",
    }
    return env | extra


def test_bot_api_that_answers_getme_is_ok(cli: Cli, bot_api: str) -> None:
    result = cli("doctor", "--mock-llm", env=_bot_env(bot_api))
    assert result.returncode == 0, result.describe()
    assert findings(result, "ok", "telegram") == [f"@loom_ops_bot answers at {bot_api}"]


def test_bot_api_refusing_the_token_names_it_without_printing_it(cli: Cli, bot_api: str) -> None:
    wrong = "987654321:AAHsomeOtherTokenThatIsNotAccepted0"
    result = cli("doctor", "--mock-llm", env=_bot_env(bot_api, token=wrong))
    assert result.returncode == 1, result.describe()
    [line] = findings(result, "error", "telegram")
    assert line.startswith("check TELEGRAM_BOT_TOKEN"), line
    assert "HTTP 401" in line
    assert wrong not in result.stdout + result.stderr
    assert wrong.split(":")[1] not in result.stdout + result.stderr


def test_unreachable_bot_api_is_an_error(cli: Cli) -> None:
    base = f"http://127.0.0.1:{free_port()}/bot"
    result = cli("doctor", "--mock-llm", env=_bot_env(base))
    assert result.returncode == 1, result.describe()
    [line] = findings(result, "error", "telegram")
    assert line.startswith(f"Bot API unreachable at {base}<token>/getMe"), line
    assert BOT_TOKEN.split(":")[1] not in result.stdout


def test_bot_settings_the_bot_would_refuse_are_an_error(cli: Cli, bot_api: str) -> None:
    env = _bot_env(bot_api, TELEGRAM_ALLOWED_CHAT_IDS="")
    result = cli("doctor", "--mock-llm", env=env)
    assert result.returncode == 1, result.describe()
    [line] = findings(result, "error", "telegram")
    assert line.startswith("TELEGRAM_ALLOWED_CHAT_IDS is not set"), line


# -- approvers --------------------------------------------------------------------------------


def test_approvers_no_runbook_accepts(cli: Cli) -> None:
    # The settings' approvers are group:approvers, which the shipped runbooks name: here the
    # runbooks name a group nobody is in instead.
    for path in (cli.workspace / "runbooks").glob("*.yaml"):
        text = re.sub(r"^approvers: .*$", "approvers: [group:nobody]", path.read_text(), flags=re.M)
        path.write_text(text)
    env = {"LOOM_OPS_APPROVERS": "cli:bob", "TELEGRAM_APPROVER_IDS": "42"}
    result = cli("doctor", "--mock-llm", env=env)
    assert result.returncode == 1, result.describe()
    warned = findings(result, "warning", "approvers")
    assert any(
        line.startswith("cli:bob (LOOM_OPS_APPROVERS) is accepted by no runbook") for line in warned
    ), warned
    assert any(
        line.startswith("telegram:42 (TELEGRAM_APPROVER_IDS) is accepted by no runbook")
        for line in warned
    ), warned
    blocked = findings(result, "error", "approvers")
    assert sorted(line.split()[4] for line in blocked) == [
        "api-latency-spike's",
        "disk-almost-full's",
        "failed-deploy-rollback's",
    ]


def test_approvers_every_runbook_accepts_are_fine(cli: Cli) -> None:
    env = {
        # Three: failed-deploy-rollback needs two approvals, neither the requester's.
        "LOOM_OPS_APPROVERS": "cli:oncall,telegram:100000001,cli:lead",
        "TELEGRAM_APPROVER_IDS": "100000001",
    }
    result = cli("doctor", "--mock-llm", env=env)
    assert result.returncode == 0, result.describe()
    assert findings(result, "warning", "approvers") == []
    assert len(findings(result, "ok", "approvers")) == 1


def test_json_is_one_object_with_every_finding(cli: Cli) -> None:
    (cli.workspace / "runbooks" / "gaps.yaml").write_text(GAPS)
    result = cli("doctor", "--mock-llm", "--json", env={"LOOM_OPS_ALLOW_SHELL": "1"})
    assert result.returncode == 1
    payload = result.json()
    assert payload["status"] == "error"
    kinds = {(f["severity"], f["check"]) for f in payload["findings"]}
    assert {("error", "allowlist"), ("error", "binaries"), ("ok", "llm")} <= kinds


# -- people ----------------------------------------------------------------------------------

GATED = """\
id: {id}
title: A gated note
triggers: [{id}]
approvers: {approvers}
starters: {starters}
four_eyes: {four_eyes}
steps:
  - id: gated
    title: Gated
    note: nothing happens
    approval: required
"""


def _runbook(
    cli: Cli,
    runbook_id: str,
    approvers: str = "[group:approvers]",
    starters: str = "[]",
    four_eyes: bool = False,
) -> None:
    text = GATED.format(
        id=runbook_id, approvers=approvers, starters=starters, four_eyes=str(four_eyes).lower()
    )
    (cli.workspace / "runbooks" / f"{runbook_id}.yaml").write_text(text)


def _people(cli: Cli, text: str) -> None:
    (cli.workspace / "people.yaml").write_text(text)


def test_a_group_no_person_is_in_is_named_and_a_list_left_with_nobody_is_an_error(
    cli: Cli,
) -> None:
    _runbook(cli, "ghost-drill", approvers="[group:ghosts]", starters="[group:phantoms]")
    _runbook(cli, "mixed-drill", approvers="[group:ghosts, group:approvers]")
    result = cli("doctor", "--mock-llm")
    assert result.returncode == 1, result.describe()
    assert [w for w in findings(result, "warning", "people") if w.startswith("group:")] == [
        "group:ghosts is named by ghost-drill (approvers), mixed-drill (approvers) but no "
        f"person is in it: add it to a person's groups in {cli.workspace / 'people.yaml'}",
        "group:phantoms is named by ghost-drill (starters) but no person is in it: add it to "
        f"a person's groups in {cli.workspace / 'people.yaml'}",
    ]
    # mixed-drill's other group has people: only ghost-drill is left with nobody.
    assert findings(result, "error", "approvers") == [
        "nobody may decide runbook ghost-drill's requests: no configured person is in its "
        "approvers (group:ghosts); add someone to them"
    ]
    assert findings(result, "error", "starters") == [
        "nobody may start runbook ghost-drill: no configured person is in its starters "
        "(group:phantoms)"
    ]


ESCALATING = """\
id: escalating-drill
title: Escalates to a group
triggers: [escalating drill]
escalation: {escalate_after: 10m, escalate_to: [group:nightshift, cli:oncall]}
steps:
  - id: gated
    title: Gated
    note: nothing happens
    approval: required
"""


def test_an_escalation_to_a_group_nobody_is_in_is_named(cli: Cli) -> None:
    (cli.workspace / "runbooks" / "escalating-drill.yaml").write_text(ESCALATING)
    escalation = {"LOOM_OPS_ESCALATE_AFTER": "30m", "LOOM_OPS_ESCALATE_TO": "group:dayshift"}
    result = cli("doctor", "--mock-llm", env=escalation)
    where = cli.workspace / "people.yaml"
    assert [w for w in findings(result, "warning", "people") if "shift " in w] == [
        "group:dayshift is named by LOOM_OPS_ESCALATE_TO but no person is in it: add it to a "
        f"person's groups in {where}",
        "group:nightshift is named by escalating-drill (escalation.escalate_to) but no person "
        f"is in it: add it to a person's groups in {where}",
    ]


def test_the_approver_settings_fill_group_approvers(cli: Cli) -> None:
    _people(cli, "people:\n  - name: lee\n    cli: lee\n    groups: [leads]\n")
    alone = cli("doctor", "--mock-llm")
    assert alone.returncode == 1, alone.describe()
    [empty] = [w for w in findings(alone, "warning", "people") if "group:approvers" in w]
    assert empty.endswith("or set LOOM_OPS_APPROVERS or TELEGRAM_APPROVER_IDS"), empty
    assert sorted(line.split()[4] for line in findings(alone, "error", "approvers")) == [
        "api-latency-spike's",
        "disk-almost-full's",
        "needs",  # failed-deploy-rollback also names group:leads, but lee alone is not two
    ]

    filled = cli("doctor", "--mock-llm", env={"LOOM_OPS_APPROVERS": "cli:bob,cli:lee"})
    assert filled.returncode == 0, filled.describe()
    assert findings(filled, "warning", "people") == []
    assert errors(filled) == []


def test_four_eyes_that_only_one_person_may_satisfy(cli: Cli) -> None:
    _people(cli, "people:\n  - name: sam\n    cli: sam\n    groups: [approvers]\n")
    _runbook(cli, "anyone-starts", four_eyes=True)
    _runbook(cli, "sam-starts", starters="[cli:sam]", four_eyes=True)
    result = cli("doctor", "--mock-llm")
    assert result.returncode == 1, result.describe()
    # Someone else may start anyone-starts, and sam may decide that run: only sam's own runs
    # wait in vain. sam-starts only sam may start: every run waits.
    assert [w for w in findings(result, "warning", "approvers") if "anyone-starts" in w] == [
        "runbook anyone-starts asks for four eyes, but only sam may decide its requests: "
        "nobody may decide a run sam starts; add a second person to its approvers "
        "(group:approvers)"
    ]
    assert [e for e in findings(result, "error", "approvers") if "sam-starts" in e] == [
        "runbook sam-starts asks for four eyes, but only sam may decide its requests: nobody "
        "may decide a run sam starts; add a second person to its approvers (group:approvers)"
    ]

    _people(cli, TEST_PEOPLE)  # oncall and sam are both approvers: four eyes can be met
    fine = cli("doctor", "--mock-llm")
    assert [f for f in findings(fine, "warning", "approvers") if "four eyes" in f] == []
    assert [f for f in findings(fine, "error", "approvers") if "four eyes" in f] == []


PEOPLE_OFF_FRONT_ENDS = """\
people:
  - name: oncall
    cli: oncall
    groups: [approvers, leads]
  - name: tess
    telegram: 5550001
    groups: [approvers]
  - name: ghost
    groups: [approvers]
"""


def test_people_nobody_can_act_as_here(cli: Cli, bot_api: str) -> None:
    _people(cli, PEOPLE_OFF_FRONT_ENDS)
    where = cli.workspace / "people.yaml"
    env = {"TELEGRAM_BOT_TOKEN": "", "TELEGRAM_APPROVER_IDS": "42"}
    result = cli("doctor", "--mock-llm", env=env)
    assert result.returncode == 0, result.describe()  # warnings only: someone may still act
    # A person with no cli: or telegram: identity may act through an API token, which doctor
    # does not open the store to see; the others act on a front end another process runs.
    assert findings(result, "warning", "people") == [
        f"ghost in {where} has no cli: or telegram: identity: they can act only through an "
        "API token (loom-ops tokens create --person ghost); give them a cli: login or a "
        "telegram: user id, or remove them",
        "tess has no identity on a front end this process runs: only telegram:5550001, and "
        f"TELEGRAM_BOT_TOKEN is not set (set it, or give them a cli: login in {where})",
        "telegram:42 (TELEGRAM_APPROVER_IDS) has no identity on a front end this process runs: "
        "only telegram:42, and TELEGRAM_BOT_TOKEN is not set (set it, or give them a cli: "
        f"login in {where})",
    ]
    assert findings(result, "error", "people") == []

    with_bot = cli("doctor", "--mock-llm", env=_bot_env(bot_api))
    assert [f.split(" in ")[0] for f in findings(with_bot, "warning", "people")] == ["ghost"]


def test_an_unreadable_people_file_is_one_error_line(cli: Cli) -> None:
    _people(cli, "people:\n  - name: sam\n    cli: sam\n    grups: [approvers]\n")
    result = cli("doctor", "--mock-llm")
    assert result.returncode == 1, result.describe()
    [line] = [f for f in result.stdout.splitlines() if " people " in f or " approvers " in f]
    assert line.startswith("error    people"), line
    assert f"{cli.workspace / 'people.yaml'}:4" in line and "grups" in line, line
