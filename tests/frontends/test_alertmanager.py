"""Debian's real Prometheus Alertmanager notifies `loom-ops serve --telegram` through its
webhook receiver (basic auth, a token as the password): the card in the chat (the Bot API
stand-in), a tap on ▶ Start starts one run, a re-fire updates that run, the resolve is
journaled on it, and [Silence 1h] creates a silence Alertmanager's own API shows."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.settings import Settings
from tests.bot_harness import (
    ALICE,
    BOB,
    INCIDENTS,
    BotProcess,
    bot_env,
    from_bot,
    keyboard_data,
    standin_server,
    wait_for,
)
from tests.http_harness import free_port

ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
API_TOKEN = "alertmanager-test-token-0123456789"
JSON = dict[str, Any]

pytestmark = pytest.mark.skipif(
    ALERTMANAGER is None,
    reason="prometheus-alertmanager missing: apt-get install prometheus-alertmanager "
    "(.ci/run does)",
)

CONFIG = """\
route:
  receiver: loom-ops
  group_by: [alertname]
  group_wait: 1s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: loom-ops
    webhook_configs:
      - url: http://127.0.0.1:{serve_port}/alerts/alertmanager
        send_resolved: true
        http_config:
          basic_auth:
            username: alertmanager
            password: {token}
"""


@contextlib.contextmanager
def alertmanager(tmp_path: Path, serve_port: int) -> Iterator[str]:
    """Alertmanager on a free loopback port, clustering off, its webhook at `serve`; its URL."""
    assert ALERTMANAGER is not None
    config = tmp_path / "alertmanager.yml"
    config.write_text(CONFIG.format(serve_port=serve_port, token=API_TOKEN))
    port = free_port()
    log = (tmp_path / "alertmanager.log").open("w")
    proc = subprocess.Popen(
        [
            ALERTMANAGER,
            f"--config.file={config}",
            f"--storage.path={tmp_path / 'alertmanager-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            assert proc.poll() is None, (tmp_path / "alertmanager.log").read_text()
            assert time.monotonic() < deadline, "alertmanager did not come up"
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def _rfc3339(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


async def fire(
    am: httpx.AsyncClient, alertname: str, *instances: str, resolved: bool = False
) -> None:
    """Post alerts to Alertmanager's API v2, as Prometheus does (resolved: ended a minute ago)."""
    now = datetime.now(UTC)
    alerts = []
    for instance in instances:
        alert: JSON = {
            "labels": {"alertname": alertname, "service": "checkout-api", "instance": instance},
            "annotations": {"summary": f"p99 over 2 s on {instance}"},
            "startsAt": _rfc3339(now - timedelta(minutes=5)),
        }
        if resolved:
            alert["endsAt"] = _rfc3339(now - timedelta(minutes=1))
        alerts.append(alert)
    answer = await am.post("/api/v2/alerts", json=alerts)
    assert answer.status_code == 200, answer.text


def journal_types(db: str, run_id: str, kind: str) -> list[str]:
    """The run's journal events of one type (read from the store's file)."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute(
            "SELECT type FROM events WHERE run_id = ? AND type = ? ORDER BY seq", (run_id, kind)
        )
        return [row[0] for row in rows]


def alert_cards(standin: Any, alertname: str) -> list[JSON]:
    """The bot's alert cards of one alert in the incident chat."""
    return [
        m for m in from_bot(standin, INCIDENTS) if m.get("text", "").startswith(f"🚨 {alertname}")
    ]


@contextlib.asynccontextmanager
async def bench(settings: Settings, tmp_path: Path) -> AsyncIterator[tuple[Any, str, str]]:
    """The stand-in, `loom-ops serve --telegram` and Alertmanager: (stand-in, serve's URL,
    Alertmanager's URL)."""
    serve_port = free_port()
    async with standin_server() as (standin, server):
        with alertmanager(tmp_path, serve_port) as am_url:
            env = bot_env(
                server,
                settings,
                LOOM_OPS_API_TOKEN=API_TOKEN,
                LOOM_OPS_ALERTMANAGER_URL=am_url,
                TELEGRAM_ALERT_CHAT_ID=str(INCIDENTS),
            )
            process = BotProcess(env, settings.workspace, tmp_path / "serve.log")
            process.command = "serve"
            process.extra_args = ["--telegram", "--port", str(serve_port)]
            process.start()
            try:
                yield standin, f"http://127.0.0.1:{serve_port}", am_url
            finally:
                code = process.stop()
            assert code == 0, process.output()


async def poll(check: Any, timeout: float = 30) -> Any:
    """Poll an async check until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.2)


async def test_alertmanager_to_card_to_one_run_refire_resolve_and_silence(
    settings: Settings, tmp_path: Path
) -> None:
    async with (
        bench(settings, tmp_path) as (standin, serve_url, am_url),
        httpx.AsyncClient(
            base_url=serve_url, headers={"authorization": f"Bearer {API_TOKEN}"}, timeout=15
        ) as api,
        httpx.AsyncClient(base_url=am_url, timeout=15) as am,
    ):
        # The alert fires: Alertmanager notifies serve, whose bot posts the card.
        await fire(am, "HighLatency", "a")
        await wait_for(standin, lambda: alert_cards(standin, "HighLatency"), 30)
        card = alert_cards(standin, "HighLatency")[0]
        assert "api-latency-spike" in card["text"]
        assert "service=checkout-api" in card["text"]
        start, _ignore, _silence = keyboard_data(card)
        assert (await api.get("/runs")).json()["runs"] == []  # start: ask

        # ▶ Start as Alice: one run, hers.
        standin.inject_callback(INCIDENTS, card["message_id"], ALICE, start)
        await wait_for(
            standin, lambda: "Started by @alice" in alert_cards(standin, "HighLatency")[0]["text"]
        )

        async def the_run() -> JSON | None:
            runs = (await api.get("/runs")).json()["runs"]
            return runs[0] if runs and runs[0]["status"] == "waiting_approval" else None

        run = await poll(the_run)
        run_id = run["run_id"]
        assert run["requested_by"] == f"telegram:{ALICE}"
        assert run["runbook_id"] == "api-latency-spike"

        async def journal(kind: str) -> list[str]:
            return journal_types(settings.db, run_id, kind)

        # A re-fire (another instance in the group) updates that run; no second run.
        await fire(am, "HighLatency", "a", "b")
        await poll(lambda: journal("alert_updated"))
        await wait_for(
            standin, lambda: "2 alert(s) firing" in alert_cards(standin, "HighLatency")[0]["text"]
        )

        # The resolve (endsAt in the past) is journaled on the run and shown on the card.
        await fire(am, "HighLatency", "a", "b", resolved=True)
        await poll(lambda: journal("alert_resolved"))
        await wait_for(
            standin, lambda: "Resolved at" in alert_cards(standin, "HighLatency")[0]["text"]
        )
        assert [r["run_id"] for r in (await api.get("/runs")).json()["runs"]] == [run_id]
        assert len(alert_cards(standin, "HighLatency")) == 1
        assert len(await journal("alert_received")) == 1

        # Another alert: [Silence 1h] as Bob creates the silence in Alertmanager.
        await fire(am, "KubeDeploymentRolloutStuck", "a")
        await wait_for(standin, lambda: alert_cards(standin, "KubeDeploymentRolloutStuck"), 30)
        stuck = alert_cards(standin, "KubeDeploymentRolloutStuck")[0]
        silence = next(d for d in keyboard_data(stuck) if d.endswith(":m"))
        standin.inject_callback(INCIDENTS, stuck["message_id"], BOB, silence)
        await wait_for(
            standin,
            lambda: (
                "Silenced by @bob" in alert_cards(standin, "KubeDeploymentRolloutStuck")[0]["text"]
            ),
        )
        silences = (await am.get("/api/v2/silences")).json()
        [made] = [s for s in silences if s["status"]["state"] == "active"]
        assert made["createdBy"] == f"telegram:{BOB}"
        assert "loom-ops" in made["comment"] and "KubeDeploymentRolloutStuck" in made["comment"]
        assert {"name": "alertname", "value": "KubeDeploymentRolloutStuck"}.items() <= {
            k: v for k, v in made["matchers"][0].items()
        }.items()
        assert made["id"] in alert_cards(standin, "KubeDeploymentRolloutStuck")[0]["text"]
        assert [r["run_id"] for r in (await api.get("/runs")).json()["runs"]] == [run_id]
