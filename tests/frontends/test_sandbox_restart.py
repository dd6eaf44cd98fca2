"""A restarted `loom-ops sandbox` on the same database answers every message: its Bot API
stand-in numbers updates from 1 again on each start, and the bot's dedup must tell a new
message from a redelivered one by its content, not by its id alone."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from agent.frontends.sandbox import APPROVER, INCIDENT_CHAT, REQUESTER, Person
from agent.settings import Settings

JSON = dict[str, Any]


class Sandbox:
    """`loom-ops sandbox --mock-llm --db <file> --port 0` as a real process, and its page."""

    def __init__(self, settings: Settings, log: Path) -> None:
        self._settings = settings
        self._log = log
        self.proc: asyncio.subprocess.Process | None = None
        self.url = ""

    async def start(self) -> None:
        """Start it and read the page's URL from its first line."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TELEGRAM_", "LOOM_OPS_"))}
        with self._log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "agent.frontends.cli",
                "sandbox",
                "--mock-llm",
                "--db",
                self._settings.db,
                "--port",
                "0",
                "--workspace",
                str(self._settings.workspace),
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
            )
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 60)
        found = re.search(r"open (http://127\.0\.0\.1:\d+)", line.decode())
        assert found, (line, self._log.read_text(errors="replace")[-2000:])
        self.url = found.group(1)

    async def stop(self) -> int:
        """SIGTERM, as Ctrl-C would; its exit code."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), 30)

    async def messages(self, page: httpx.AsyncClient) -> list[JSON]:
        """The incident chat's messages as the page sees them now."""
        state = (await page.get("/sandbox/state")).json()
        [chat] = [c for c in state["chats"] if c["id"] == INCIDENT_CHAT]
        messages: list[JSON] = chat["messages"]
        return messages

    async def ask(
        self, page: httpx.AsyncClient, person: Person, text: str, answer: Callable[[str], bool]
    ) -> str:
        """`person` says `text` in the incident chat; the bot's first answer after it that
        satisfies `answer` (a run's own messages arrive in the same chat)."""
        said = await page.post(
            "/sandbox/say",
            json={"chat_id": INCIDENT_CHAT, "user_id": person.user_id, "text": text},
        )
        said.raise_for_status()
        after = said.json()["message_id"]
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            for message in await self.messages(page):
                from_bot = message.get("from", {}).get("is_bot")
                if from_bot and message["message_id"] > after and answer(message["text"]):
                    return str(message["text"])
            await asyncio.sleep(0.05)
        raise AssertionError(f"no answer to {text!r} within 15 s: {await self.messages(page)}")


async def test_a_restarted_sandbox_answers_every_message(
    settings: Settings, tmp_path: Path
) -> None:
    """Started, used, stopped and started again twice on one database: after each restart
    /help and /status are answered every time, and the run started in the first session is
    still there to approve."""
    log = tmp_path / "sandbox.log"
    run_id = ""
    for session in range(3):
        sandbox = Sandbox(settings, log)
        await sandbox.start()
        try:
            async with httpx.AsyncClient(base_url=sandbox.url, timeout=10) as page:
                if session == 0:
                    card = await sandbox.ask(
                        page,
                        REQUESTER,
                        "/run api-latency-spike",
                        lambda t: "Approval needed #1" in t,
                    )
                    run_id = card.split("Run: ", 1)[1].split()[0]
                for _ in range(3):
                    await sandbox.ask(page, REQUESTER, "/help", lambda t: "/runbooks" in t)
                    status = await sandbox.ask(
                        page, REQUESTER, f"/status {run_id}", lambda t, r=run_id: r in t
                    )
                    assert "waiting for approval" in status.splitlines()[0], status
        finally:
            code = await sandbox.stop()
        assert code == 0, log.read_text(errors="replace")[-3000:]

    # The request made in the first session is decided in a fourth one, by text.
    sandbox = Sandbox(settings, log)
    await sandbox.start()
    try:
        async with httpx.AsyncClient(base_url=sandbox.url, timeout=10) as page:
            await sandbox.ask(
                page, APPROVER, f"/approve {run_id} #1", lambda t: t.startswith("Approved")
            )
            deadline = time.monotonic() + 30
            while not any(
                m["text"].startswith(f"Run {run_id}: SUCCEEDED")
                for m in await sandbox.messages(page)
            ):
                assert time.monotonic() < deadline, await sandbox.messages(page)
                await asyncio.sleep(0.1)
    finally:
        assert await sandbox.stop() == 0
