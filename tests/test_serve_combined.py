"""`loom-ops serve --telegram`: the HTTP API and the bot in one process over one store."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx

from agent.settings import Settings
from tests.bot_harness import (
    ALICE,
    INCIDENTS,
    BotProcess,
    approval_messages,
    bot_env,
    confirm_run,
    keyboard_data,
    run_id_of,
    standin_server,
    summaries,
    wait_for,
    wait_for_approval,
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def test_a_chat_run_is_approved_through_the_http_api(
    settings: Settings, tmp_path: Path
) -> None:
    """/run in the chat, approve through POST /runs/{id}/approve: the chat's buttons go, its
    summary arrives, and the API shows the run succeeded; SIGTERM ends both cleanly."""
    port = _free_port()
    async with standin_server() as (standin, server):
        env = bot_env(server, settings, LOOM_OPS_API_USER="cli:oncall")
        process = BotProcess(env, settings.workspace, tmp_path / "serve.log")
        process.command = "serve"
        process.extra_args = ["--telegram", "--port", str(port)]
        process.start()
        try:
            await confirm_run(standin, INCIDENTS, ALICE, "incident: API latency spike", timeout=20)
            request = await wait_for_approval(standin, INCIDENTS)
            run_id = run_id_of(request)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as api:
                answer = await api.post(f"/runs/{run_id}/approve", json={"note": "via API"})
                assert answer.status_code == 200, answer.text
                await wait_for(standin, lambda: summaries(standin, INCIDENTS, run_id), 20)
                run = (await api.get(f"/runs/{run_id}")).json()
            assert run["status"] == "succeeded"

            def edited() -> dict:
                [message] = approval_messages(standin, INCIDENTS)
                return message

            await wait_for(standin, lambda: not keyboard_data(edited()))
            assert "Approved by cli:oncall" in edited()["text"]
            assert "via API" in edited()["text"]
        finally:
            code = process.stop()
        assert code == 0, process.output()
