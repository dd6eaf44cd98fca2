"""The OpenAI policy: the real `openai` client against a local OpenAI-compatible stand-in."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agent.errors import ServiceError
from agent.records import Decision, RunStatus
from agent.service.runs import RunService
from agent.settings import SecretStr, Settings
from tests.cli_helpers import REPO, Cli, make_cli_workspace
from tests.openai_standin import html_page, http_error, serve, tool_reply

KEY = "sk-test-0123456789abcdefghijklmnop"

LLM_DRILL = """\
id: llm-drill
title: LLM drill
triggers: [llm drill]
approvers: [cli:approver]
steps:
  - id: look
    title: Look around
    note: looking
  - id: act
    title: Do the risky thing
    run: echo acting
    approval: required
"""

SCRIPT = [
    tool_reply(("read_runbook", {"runbook_id": "llm-drill"})),
    tool_reply(("execute_step", "{not json")),  # malformed: refused, the model sees why
    http_error(429, retry_after_ms=10),  # the client retries by itself
    tool_reply(("execute_step", {"step_id": "look"})),
    http_error(500),
    tool_reply(("await_approval", {"step_id": "act", "reason": "scale it"})),
    tool_reply(("execute_step", {"step_id": "act"})),
    tool_reply(("record_audit", {"entry": "llm drill done"})),
    tool_reply(("finish_run", {"outcome": "succeeded", "summary": "all good"})),
]


def _settings(settings: Settings, workspace: Path, base_url: str) -> Settings:
    (workspace / "runbooks" / "llm-drill.yaml").write_text(LLM_DRILL)
    return settings.model_copy(
        update={
            "mock_llm": False,
            "openai_api_key": SecretStr(KEY),
            "openai_base_url": base_url,
            "openai_model": "stand-in-1",
            "llm_max_retries": 2,
        }
    )


async def test_a_run_through_the_real_client(settings: Settings, workspace: Path) -> None:
    with serve(SCRIPT) as stand_in:
        llm = _settings(settings, workspace, stand_in.base_url)
        service = await RunService.open(llm)
        try:
            run = await service.start("llm", "incident: llm drill password=hunter2secret")
            assert run.status == RunStatus.WAITING_APPROVAL
            result = await service.decide("llm", Decision.APPROVE, "cli:approver")
            assert result.run.status == RunStatus.SUCCEEDED
            assert result.run.summary == "all good"
            calls = await service.store.list_tool_calls("llm")
            turns = await service.store.list_policy_turns("llm")
        finally:
            await service.close()

    # 9 scripted answers, two of them errors the client retried: 9 requests, 7 answers kept.
    assert len(stand_in.requests) == 9
    assert [t.turn for t in turns] == list(range(7))
    assert all(t.policy == "openai:stand-in-1" for t in turns)
    assert all((t.prompt_tokens, t.completion_tokens) == (100, 20) for t in turns)
    # The trace's material: where the prompt ended, and how long the model took.
    assert turns[0].response["prompt_excerpt"].startswith("user: ")
    assert turns[2].response["prompt_excerpt"].startswith("tool: ")
    assert all(t.response["latency_ms"] > 0 for t in turns)
    malformed = calls[1]
    assert malformed.status == "refused"
    assert "invalid arguments" in malformed.outcome["refused"]
    # The model was told: the refusal is the tool result of that call in the next request.
    # Every request: the role's instructions as system, then the incident as a user message
    # (some models' chat templates refuse a chat without one), then the turns so far.
    for request in stand_in.requests:
        system, user = request["messages"][:2]
        assert system["role"] == "system" and "incident: llm drill" not in system["content"]
        assert user["role"] == "user" and "incident: llm drill" in user["content"]
    replies = [m for m in stand_in.requests[2]["messages"] if m["role"] == "tool"]
    assert "invalid arguments" in replies[-1]["content"]
    # Tool schemas come from the argument models; role restriction applies.
    names = {t["function"]["name"] for t in stand_in.requests[0]["tools"]}
    assert names == {
        "read_runbook",
        "execute_step",
        "await_approval",
        "check_health",
        "record_audit",
        "finish_run",
    }
    step_args = next(
        t for t in stand_in.requests[0]["tools"] if t["function"]["name"] == "execute_step"
    )
    assert step_args["function"]["parameters"]["required"] == ["step_id"]
    # Secrets never leave: not the request's password, not the API key itself.
    sent = json.dumps(stand_in.requests)
    assert "hunter2secret" not in sent and KEY not in sent
    assert "[REDACTED]" in sent


async def test_a_dead_llm_interrupts_the_run_which_resumes_later(
    settings: Settings, workspace: Path
) -> None:
    with serve([http_error(500), http_error(500), http_error(500)]) as stand_in:
        llm = _settings(settings, workspace, stand_in.base_url)
        service = await RunService.open(llm)
        try:
            run = await service.start("down", "incident: llm drill")
            assert run.status == RunStatus.QUEUED  # interrupted, not failed: resumable
            events = await service.store.list_events("down")
            assert events[-1].type == "run_interrupted"
            assert "LLM request failed" in events[-1].data["error"]
        finally:
            await service.close()
    assert len(stand_in.requests) == 3  # one try and the client's two retries


async def test_no_key_and_no_mock_is_a_clear_error(settings: Settings) -> None:
    service = await RunService.open(settings.model_copy(update={"mock_llm": False}))
    try:
        with pytest.raises(ServiceError, match="set OPENAI_API_KEY"):
            await service.start("nokey", "incident: API latency spike")
    finally:
        await service.close()


def test_a_resume_never_asks_again_for_an_answered_turn(workspace: Path, tmp_path: Path) -> None:
    (workspace / "runbooks" / "llm-drill.yaml").write_text(LLM_DRILL)
    db = tmp_path / "kill.sqlite"
    with serve(SCRIPT[:2] + SCRIPT[3:4] + SCRIPT[5:6]) as stand_in:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LOOM_OPS_", "OPENAI_"))}
        env.update(
            OPENAI_API_KEY=KEY,
            OPENAI_BASE_URL=stand_in.base_url,
            OPENAI_MODEL="stand-in-1",
            LOOM_OPS_DB=str(db),
            LOOM_OPS_WORKSPACE=str(workspace),
            PYTHONPATH=str(REPO),
        )
        cmd = [sys.executable, "-m", "agent.frontends.cli"]
        # Killed right after the second answer's first call is journaled as intent.
        killed = subprocess.run(
            [*cmd, "runbook", "incident: llm drill", "--run-id", "k"],
            env=env | {"LOOM_OPS_FAILPOINT": "after_intent:2"},
            cwd=workspace,
            capture_output=True,
            timeout=60,
        )
        assert killed.returncode == -signal.SIGKILL
        assert len(stand_in.requests) == 2
        resumed = subprocess.run(
            [*cmd, "resume", "--run-id", "k", "--json"],
            env=env,
            cwd=workspace,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert resumed.returncode == 0, resumed.stderr
        assert json.loads(resumed.stdout)["status"] == "waiting_approval"
    # Turn 1 (the malformed call) was answered before the kill and is not asked again:
    # after the resume only turns 2 and 3 were new requests.
    assert len(stand_in.requests) == 4


@pytest.mark.parametrize("role", ["runbook", "supervisor", "planner", "executor", "verifier"])
async def test_every_role_has_its_instructions_and_the_incident_as_the_user_turn(
    settings: Settings, workspace: Path, role: str
) -> None:
    from agent.policy.base import PolicyContext
    from agent.policy.llm import OpenAIPolicy, tool_schemas
    from agent.redaction import Redactor
    from agent.runbook.model import load_catalog
    from agent.tools.toolbox import tools_for_role

    llm = _settings(settings, workspace, "http://127.0.0.1:9/v1")
    policy = OpenAIPolicy(llm, Redactor())
    catalog = load_catalog(workspace / "runbooks")
    context = PolicyContext(
        run_id="r",
        role=role,
        request="incident: llm drill",
        catalog_loader=lambda: catalog,
        runbook=catalog.get("llm-drill") if role in ("executor", "verifier") else None,
        params={},
        history=[],
        tools=tools_for_role(role),
    )
    system, user = policy.messages(context)[:2]
    assert system["role"] == "system" and user["role"] == "user"
    assert f"the {role}" in system["content"] or role == "runbook"
    assert "incident: llm drill" in user["content"]
    names = {t["function"]["name"] for t in tool_schemas(tools_for_role(role))}
    assert names == {*tools_for_role(role), "finish_run"}


async def test_a_model_cannot_finish_before_seeing_its_calls(
    settings: Settings, workspace: Path
) -> None:
    script = [
        tool_reply(("read_runbook", {"runbook_id": "llm-drill"})),
        # Calls and a premature "succeeded" in one answer: the final answer is set aside.
        tool_reply(
            ("execute_step", {"step_id": "nope"}),
            ("finish_run", {"outcome": "succeeded", "summary": "too early"}),
        ),
        tool_reply(("finish_run", {"outcome": "failed", "summary": "the step was refused"})),
    ]
    with serve(script) as stand_in:
        llm = _settings(settings, workspace, stand_in.base_url)
        service = await RunService.open(llm)
        try:
            run = await service.start("early", "incident: llm drill")
        finally:
            await service.close()
    assert run.status == RunStatus.FAILED and run.summary == "the step was refused"
    assert len(stand_in.requests) == 3


# -- a misconfigured LLM fails the run at once; an outage leaves it resumable ----------------------

MISCONFIGURED = {
    "400-model-not-found": (
        http_error(400, message="The model `stand-in-1` does not exist", code="model_not_found"),
        "OPENAI_MODEL",
    ),
    "401": (http_error(401, message="Incorrect API key provided"), "OPENAI_API_KEY"),
    "403": (http_error(403, message="You have no access to this project"), "OPENAI_API_KEY"),
    "404-model-not-found": (
        http_error(404, message='model "stand-in-1" not found, try pulling it first'),
        "OPENAI_MODEL",
    ),
    "422": (http_error(422, message="tools are not supported"), "tools are not supported"),
}


@pytest.mark.parametrize("case", list(MISCONFIGURED))
async def test_a_misconfigured_llm_fails_the_run_at_once_naming_the_setting(
    settings: Settings, workspace: Path, case: str
) -> None:
    answer, setting = MISCONFIGURED[case]
    with serve([answer]) as stand_in:
        llm = _settings(settings, workspace, stand_in.base_url)
        service = await RunService.open(llm)
        try:
            run = await service.start("bad", "incident: llm drill")
            events = await service.store.list_events("bad")
        finally:
            await service.close()
    assert run.status == RunStatus.FAILED, run
    assert run.error is not None and setting in run.error
    assert "\n" not in run.error
    assert f"HTTP {answer['status']}" in run.error
    assert run.lease_owner is None  # nobody holds a failed run
    assert events[-1].type == "run_finished"
    assert events[-1].data == {"status": "failed", "summary": None, "error": run.error}
    assert not [e for e in events if e.type == "run_interrupted"]
    assert len(stand_in.requests) == 1  # neither the client nor a worker asked again


async def test_a_base_url_answering_a_web_page_fails_naming_it(
    settings: Settings, workspace: Path
) -> None:
    """A 200 that is no chat completion (a web UI's page) is a wrong URL, not an outage."""
    with serve([html_page()]) as stand_in:
        llm = _settings(settings, workspace, stand_in.base_url)
        service = await RunService.open(llm)
        try:
            run = await service.start("page", "incident: llm drill")
        finally:
            await service.close()
    assert run.status == RunStatus.FAILED, run
    assert run.error is not None and "check OPENAI_BASE_URL" in run.error
    assert "not a chat completion" in run.error and "\n" not in run.error
    assert len(stand_in.requests) == 1


async def test_a_wrong_base_url_fails_naming_it_and_the_url_used(
    settings: Settings, workspace: Path
) -> None:
    with serve([]) as stand_in:
        root = stand_in.base_url.removesuffix("/v1")
        llm = _settings(settings, workspace, root)
        service = await RunService.open(llm)
        try:
            run = await service.start("nov1", "incident: llm drill")
        finally:
            await service.close()
    assert run.status == RunStatus.FAILED
    assert run.error == (
        f"LLM misconfigured: check OPENAI_BASE_URL, POST {root}/chat/completions answered "
        f"HTTP 404 (OPENAI_BASE_URL is {root}; OpenAI-compatible servers usually end in /v1)"
    )
    assert stand_in.paths == ["/chat/completions"]  # once: a 404 is not retried


async def test_any_other_400_fails_with_the_servers_message_redacted(
    settings: Settings, workspace: Path
) -> None:
    said = "messages too long for context window (request had password=hunter2secret)"
    with serve([http_error(400, message=said)]) as stand_in:
        llm = _settings(settings, workspace, stand_in.base_url)
        service = await RunService.open(llm)
        try:
            run = await service.start("long", "incident: llm drill")
        finally:
            await service.close()
    assert run.status == RunStatus.FAILED
    assert run.error is not None
    assert run.error.startswith("LLM rejected the request (HTTP 400 for POST ")
    assert "messages too long for context window" in run.error
    assert "hunter2secret" not in run.error and "[REDACTED]" in run.error
    assert "OPENAI_" not in run.error  # no setting to blame: the request itself was refused
    assert len(stand_in.requests) == 1


async def test_a_misconfigured_llm_fails_a_child_and_then_its_supervisor(
    settings: Settings, workspace: Path
) -> None:
    script = [
        tool_reply(("delegate_subagent", {"role": "planner"})),
        http_error(401, message="Incorrect API key provided"),  # the planner child's first turn
        http_error(401, message="Incorrect API key provided"),  # the woken supervisor's turn
    ]
    with serve(script) as stand_in:
        llm = _settings(settings, workspace, stand_in.base_url)
        service = await RunService.open(llm)
        try:
            root = await service.start("tree", "incident: llm drill", role="supervisor")
            child = await service.store.get_run("tree:sub:planner")
        finally:
            await service.close()
    assert child.status == RunStatus.FAILED
    assert child.error is not None and "OPENAI_API_KEY" in child.error
    assert root.status == RunStatus.FAILED  # woken by its child's end, not left waiting
    assert root.error is not None and "OPENAI_API_KEY" in root.error
    assert len(stand_in.requests) == 3


async def test_a_rate_limited_llm_interrupts_the_run_which_stays_resumable(
    settings: Settings, workspace: Path
) -> None:
    limited = http_error(429, retry_after_ms=10, message="Rate limit reached")
    with serve([limited, limited, limited]) as stand_in:
        llm = _settings(settings, workspace, stand_in.base_url)
        service = await RunService.open(llm)
        try:
            run = await service.start("busy", "incident: llm drill")
            events = await service.store.list_events("busy")
        finally:
            await service.close()
    assert run.status == RunStatus.QUEUED and run.error is None
    assert events[-1].type == "run_interrupted"
    assert "RateLimitError" in events[-1].data["error"]
    assert len(stand_in.requests) == 3  # one try and the client's two retries


async def test_an_unreachable_llm_interrupts_the_run_which_stays_resumable(
    settings: Settings, workspace: Path
) -> None:
    with socket.socket() as probe:  # a port nothing listens on once the probe is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    llm = _settings(settings, workspace, f"http://127.0.0.1:{port}/v1")
    service = await RunService.open(llm.model_copy(update={"llm_max_retries": 0}))
    try:
        run = await service.start("refused", "incident: llm drill")
        events = await service.store.list_events("refused")
    finally:
        await service.close()
    assert run.status == RunStatus.QUEUED and run.error is None
    assert events[-1].type == "run_interrupted"
    assert "APIConnectionError" in events[-1].data["error"]


def test_the_cli_ends_a_run_against_a_wrong_base_url_with_one_line(tmp_path: Path) -> None:
    workspace = make_cli_workspace(tmp_path / "ws")
    (workspace / "runbooks" / "llm-drill.yaml").write_text(LLM_DRILL)
    cli = Cli(workspace, tmp_path / "cli.sqlite")
    with serve([]) as stand_in:
        root = stand_in.base_url.removesuffix("/v1")
        env = {"OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": root, "OPENAI_MODEL": "stand-in-1"}
        result = cli("runbook", "incident: llm drill", "--run-id", "cli-bad", env=env)
        as_json = cli("runbook", "incident: llm drill", "--run-id", "cli-json", "--json", env=env)
    assert result.returncode == 1, result.describe()
    assert "Traceback" not in result.stderr + result.stdout, result.describe()
    lines = result.stderr_lines()
    assert len(lines) == 1, result.describe()
    assert lines[0].startswith("loom-ops: run cli-bad failed: LLM misconfigured: "), lines
    assert f"check OPENAI_BASE_URL, POST {root}/chat/completions answered HTTP 404" in lines[0]
    assert as_json.returncode == 1, as_json.describe()
    payload = as_json.json()
    assert payload["status"] == "failed" and "OPENAI_BASE_URL" in payload["error"]
    assert stand_in.paths == ["/chat/completions"] * 2  # one request per run, no retries


async def test_a_run_keeps_the_model_it_started_with_when_another_process_resumes_it(
    settings: Settings, workspace: Path
) -> None:
    """Started with the LLM, decided by a process configured with the mock (and another
    model): the run goes on with the model it started with."""
    script = [
        tool_reply(("read_runbook", {"runbook_id": "llm-drill"})),
        tool_reply(("execute_step", {"step_id": "look"})),
        tool_reply(("await_approval", {"step_id": "act", "reason": "go"})),
        tool_reply(("execute_step", {"step_id": "act"})),
        tool_reply(("finish_run", {"outcome": "succeeded", "summary": "done"})),
    ]
    with serve(script) as stand_in:
        llm = _settings(settings, workspace, stand_in.base_url)
        first = await RunService.open(llm)
        try:
            run = await first.start("kept", "incident: llm drill")
        finally:
            await first.close()
        assert run.status == RunStatus.WAITING_APPROVAL and run.policy == "openai:stand-in-1"
        other = llm.model_copy(update={"mock_llm": True, "openai_model": "another-model"})
        second = await RunService.open(other)
        try:
            decided = await second.decide("kept", Decision.APPROVE, "cli:approver")
        finally:
            await second.close()
    assert decided.run.status == RunStatus.SUCCEEDED, decided.run.error
    assert len(stand_in.requests) == 5
    assert {body["model"] for body in stand_in.requests} == {"stand-in-1"}
