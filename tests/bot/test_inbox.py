"""No lost updates: `loom-ops telegram` as a real process, SIGKILLed right after Telegram (the
stand-in) took its confirmation of a batch, again and again; every `/run` still becomes exactly
one run, and each is answered. In webhook mode the 200 comes only after the update is stored.
An update is handled by one instance at a time however long its handler takes, one the store
cannot take holds up no other, and the webhook's 200 waits for nothing but the store."""

from __future__ import annotations

import asyncio
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from telegram import Update
from telegram.ext import Application, TypeHandler

from agent.http_server import HttpServer
from agent.run.leases import owner_is_dead
from agent.settings import Settings
from agent.store import RunStore
from bot.gateway import build_application
from bot.inbox import INBOX_RETENTION, Inbox, update_digest
from bot.settings import Webhook
from bot.standin import BotApiStandIn, StandInServer
from bot.starts import start_run_id
from bot.store import ChatStore, ReceivedUpdate
from bot.webhook import SECRET_HEADER, webhook_app
from tests.bot_harness import (
    ALICE,
    INCIDENTS,
    TOKEN,
    BotProcess,
    bot_env,
    from_bot,
    long_notes_runbook,
    make_standin,
    running_bot,
    standin_server,
    telegram_settings,
    wait_for,
)
from tests.support import raw_rows

SECRET = "inbox-secret_token"
RUNS_PER_ROUND = 3
# The issue lost `/run` messages killing the bot 0-30 ms after a confirmation.
MAX_KILL_DELAY = 0.030


def _env(server: Any, settings: Settings, **extra: str) -> dict[str, str]:
    """A bot that records runs and drives none (--no-worker keeps the machine quiet), with no
    /run rate or active-run cap in the way of the flood this test sends."""
    return bot_env(
        server, settings, TELEGRAM_RUN_RATE="0", LOOM_OPS_MAX_ACTIVE_RUNS="10000", **extra
    )


def _drill(settings: Settings) -> None:
    (settings.workspace / "runbooks" / "inbox-drill.yaml").write_text(
        long_notes_runbook(1, "inbox-drill", "inbox drill")
    )


def _expected_run_id(message: dict[str, Any]) -> str:
    """The run a `/run <runbook id>` message starts (its id derives from the message)."""
    return start_run_id(message["chat"]["id"], message["message_id"], message["date"], 0)


def _answered(standin: BotApiStandIn, run_ids: list[str]) -> list[str]:
    """The runs no bot message in the chat names yet."""
    texts = [m.get("text", "") for m in from_bot(standin, INCIDENTS)]
    return [run_id for run_id in run_ids if not any(run_id in text for text in texts)]


def _root_runs(db: str) -> list[str]:
    return [row[0] for row in raw_rows(db, "SELECT id FROM runs WHERE parent_id IS NULL")]


async def _kill_right_after_confirmations(settings: Settings, log: Path, kills: int) -> None:
    """Start the bot, send RUNS_PER_ROUND `/run`s, SIGKILL it 0-30 ms after the stand-in
    takes a confirmation, `kills` times; then start it once more and count."""
    _drill(settings)
    chance = random.Random(17)
    async with standin_server() as (standin, server):
        bot = BotProcess(_env(server, settings), settings.workspace, log)
        bot.extra_args = ["--no-worker"]
        armed = False
        loop = asyncio.get_running_loop()

        def kill() -> None:
            if bot.proc is not None and bot.proc.poll() is None:
                bot.proc.send_signal(signal.SIGKILL)

        def confirmed(offset: int) -> None:
            nonlocal armed
            if armed:
                armed = False
                delay = chance.choice([0.0, chance.uniform(0, MAX_KILL_DELAY)])
                if delay == 0:
                    kill()  # before the stand-in even answers the confirming request
                else:
                    loop.call_later(delay, kill)

        standin.on_confirm = confirmed
        sent: list[dict[str, Any]] = []
        try:
            for round_ in range(kills):
                bot.start()
                for n in range(RUNS_PER_ROUND):
                    text = f"/run inbox-drill round {round_} message {n}"
                    sent.append(standin.inject_message(INCIDENTS, ALICE, text))
                armed = True
                assert await bot.wait_killed() == -signal.SIGKILL, bot.output()
            standin.on_confirm = None
            bot.start()
            expected = [_expected_run_id(message) for message in sent]
            await wait_for(standin, lambda: not _answered(standin, expected), timeout=60)
        finally:
            if bot.proc is not None and bot.proc.poll() is None:
                assert bot.stop() == 0, bot.output()
    runs = _root_runs(settings.db)
    assert len(runs) == len(sent) == kills * RUNS_PER_ROUND, bot.output()
    assert sorted(runs) == sorted(expected)  # one run per /run: none lost, none twice
    requests = raw_rows(settings.db, "SELECT request FROM runs WHERE parent_id IS NULL")
    assert sorted(r[0] for r in requests) == sorted(m["text"][len("/run ") :] for m in sent)
    pending = raw_rows(settings.db, "SELECT COUNT(*) FROM telegram_inbox WHERE handled_at IS NULL")
    assert pending == [(0,)]


async def test_every_run_message_becomes_one_run_across_kills_after_confirmation(
    settings: Settings, db_url: str, tmp_path: Path
) -> None:
    """3 SIGKILLs, each 0-30 ms after Telegram took the bot's confirmation of a batch of
    `/run` messages: every one of them is one run after the restarts, and each is answered;
    on both engines (the soak below kills 60 times)."""
    settings = settings.model_copy(update={"db": db_url})
    await _kill_right_after_confirmations(settings, tmp_path / "bot.log", kills=3)


@pytest.mark.slow
async def test_every_run_message_becomes_one_run_across_many_kills_after_confirmation(
    settings: Settings, tmp_path: Path
) -> None:
    """The soak: 60 SIGKILLs right after a confirmation, 180 `/run` messages, 180 runs."""
    await _kill_right_after_confirmations(settings, tmp_path / "bot.log", kills=60)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_a_webhook_update_answered_200_is_handled_after_a_kill(
    settings: Settings, tmp_path: Path
) -> None:
    """Webhook mode: the bot is SIGKILLed the moment Telegram has its 200 for a `/run`, three
    times; each of those updates is handled after the restart (it was stored before the 200),
    once."""
    _drill(settings)
    port = _free_port()
    async with standin_server() as (standin, server):
        env = _env(
            server,
            settings,
            TELEGRAM_WEBHOOK_SECRET=SECRET,
            TELEGRAM_WEBHOOK_URL=f"http://127.0.0.1:{port}/telegram",
            TELEGRAM_WEBHOOK_LISTEN=f"127.0.0.1:{port}",
        )
        bot = BotProcess(env, settings.workspace, tmp_path / "bot.log")
        bot.extra_args = ["--no-worker"]
        armed = False

        def confirmed(offset: int) -> None:
            nonlocal armed
            if armed and bot.proc is not None and bot.proc.poll() is None:
                armed = False
                bot.proc.send_signal(signal.SIGKILL)  # the 200 has just arrived

        standin.on_confirm = confirmed
        sent: list[dict[str, Any]] = []
        try:
            for round_ in range(3):
                bot.start()
                armed = True
                sent.append(standin.inject_message(INCIDENTS, ALICE, f"/run inbox-drill {round_}"))
                assert await bot.wait_killed() == -signal.SIGKILL, bot.output()
                assert standin.webhook_deliveries[-1] == (round_ + 1, 200)
            standin.on_confirm = None
            bot.start()
            expected = [_expected_run_id(message) for message in sent]
            await wait_for(standin, lambda: not _answered(standin, expected), timeout=60)
        finally:
            if bot.proc is not None and bot.proc.poll() is None:
                assert bot.stop() == 0, bot.output()
    assert sorted(_root_runs(settings.db)) == sorted(expected), bot.output()
    delivered = [update_id for update_id, status in standin.webhook_deliveries if status == 200]
    assert delivered == [1, 2, 3]  # each taken once: none was delivered again


async def _until_handled(db: str, count: int) -> None:
    deadline = time.monotonic() + 15
    while raw_rows(db, "SELECT COUNT(*) FROM telegram_inbox WHERE handled_at IS NOT NULL") != [
        (count,)
    ]:
        assert time.monotonic() < deadline, raw_rows(db, "SELECT * FROM telegram_inbox")
        await asyncio.sleep(0.05)


async def test_a_run_message_handled_again_after_a_crash_starts_no_second_run(
    settings: Settings,
) -> None:
    """The bot died after a `/run`'s handler started its run and before the update was
    marked handled: the restarted bot handles the update again, finds the run the message
    started (its id derives from the message), and starts nothing, says nothing new."""
    _drill(settings)
    standin = make_standin()
    async with StandInServer(standin) as server:
        async with running_bot(settings, telegram_settings(server)):
            asked = standin.inject_message(INCIDENTS, ALICE, "/run inbox-drill just once")
            await wait_for(standin, lambda: from_bot(standin, INCIDENTS))  # the run's answer
            await _until_handled(settings.db, 1)
            started = _root_runs(settings.db)
        # The crash: the handler ran, the update is not marked handled, the claim lapsed.
        raw_rows(settings.db, "UPDATE telegram_inbox SET handled_at = NULL, claimed_until = 0")
        async with running_bot(settings, telegram_settings(server)):
            await _until_handled(settings.db, 1)  # handled again
            sent = standin.inject_message(INCIDENTS, ALICE, "/help")
            after = sent["message_id"]
            await wait_for(
                standin, lambda: any(m["message_id"] > after for m in from_bot(standin, INCIDENTS))
            )
    assert _root_runs(settings.db) == started == [_expected_run_id(asked)]
    texts = [m.get("text", "") for m in from_bot(standin, INCIDENTS)]
    assert not [t for t in texts if "Cannot start" in t], texts


# -- one instance at a time, whatever the store says ------------------------------------------


@asynccontextmanager
async def _application(
    server: StandInServer, calls: list[str], name: str, seconds: float
) -> AsyncIterator[Application]:  # type: ignore[type-arg]
    """A real Application over the stand-in whose one handler notes each update it handles
    and takes `seconds` (a reply held by the rate limiter, a long trace)."""
    application = build_application(TOKEN, telegram_settings(server))

    async def slow(update: Update, context: Any) -> None:
        calls.append(f"{name} starts {update.update_id}")
        await asyncio.sleep(seconds)
        calls.append(f"{name} ends {update.update_id}")

    application.add_handler(TypeHandler(Update, slow))
    async with application:
        yield application


def _update(application: Application, update_id: int, text: str) -> Update:  # type: ignore[type-arg]
    data = {
        "update_id": update_id,
        "message": {
            "message_id": update_id,
            "date": 1_700_000_000,
            "chat": {"id": INCIDENTS, "type": "supergroup", "title": "Incidents"},
            "from": {"id": ALICE, "is_bot": False, "first_name": "Alice"},
            "text": text,
        },
    }
    update = Update.de_json(data, application.bot)
    assert update is not None
    return update


async def _until(condition: Callable[[], Any], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


@pytest.fixture
async def two_stores(db_url: str) -> AsyncIterator[tuple[RunStore, RunStore]]:
    """Two instances' stores over one database."""
    first, second = await RunStore.open(db_url), await RunStore.open(db_url)
    try:
        yield first, second
    finally:
        await first.close()
        await second.close()


async def test_a_handler_slower_than_its_claim_is_not_joined_by_another_instance(
    two_stores: tuple[RunStore, RunStore],
) -> None:
    """Instance A handles an update for three claim lifetimes; B's sweeper (webhook mode, or
    a standby poller) and B taking over as poll leader meanwhile start nothing: A's claim is
    renewed while its handler runs."""
    ttl = 1.0  # LOOM_OPS_LEASE_TTL, scaled down
    calls: list[str] = []
    async with (
        standin_server() as (_, server),
        _application(server, calls, "A", 3 * ttl) as app_a,
        _application(server, calls, "B", 3 * ttl) as app_b,
    ):
        a = Inbox(app_a, ChatStore(two_stores[0].db), "owner-a", ttl, owner_is_dead)
        b = Inbox(app_b, ChatStore(two_stores[1].db), "owner-b", ttl, owner_is_dead)
        sweeping = asyncio.create_task(b.sweep())
        try:
            await a.take([_update(app_a, 1, "/trace inc-1")])
            await asyncio.sleep(2 * ttl)  # the first claim has lapsed by now
            assert await b.take_pending(left_by_me=True) == []  # B becomes poll leader
            await _until(lambda: "A ends 1" in calls, "A's handler never ended")
        finally:
            sweeping.cancel()
            await asyncio.gather(sweeping, return_exceptions=True)
            await a.close()
            await b.close()
    assert calls == ["A starts 1", "A ends 1"]


async def test_updates_left_by_a_dead_instance_are_handled_before_their_claim_lapses(
    two_stores: tuple[RunStore, RunStore],
) -> None:
    """An instance stored updates and died (a real process, gone): the next instance takes
    them at once, its owner being proven dead, without waiting for the claim to lapse."""
    dead = subprocess.run(
        [sys.executable, "-c", "from agent.run.leases import new_owner_id; print(new_owner_id())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    calls: list[str] = []
    async with standin_server() as (_, server), _application(server, calls, "B", 0) as app:
        # What the dead instance did: stored an update, claimed for an hour, no more.
        await ChatStore(two_stores[0].db).store_updates(
            app.bot.id, [_received(_update(app, 7, "/help"))], dead, 3600.0
        )
        b = Inbox(app, ChatStore(two_stores[1].db), "owner-b", 3600.0, owner_is_dead)
        handling = await b.take_pending()
        await asyncio.gather(*handling)
        await b.close()
    assert calls == ["B starts 7", "B ends 7"]


def _received(update: Update) -> ReceivedUpdate:
    return ReceivedUpdate(update.update_id, update_digest(update), update.to_dict())


async def test_an_update_the_store_cannot_take_does_not_hold_up_its_batch(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A batch holds an update whose id no store column can hold: the others are stored and
    handled, the bad one is dropped with an error line, and the batch is not refused."""
    store = await RunStore.open(db_url)
    calls: list[str] = []
    try:
        async with standin_server() as (_, server), _application(server, calls, "A", 0) as app:
            inbox = Inbox(app, ChatStore(store.db), "owner-a", 30.0, owner_is_dead)
            bad = _update(app, 2**63, "/help")
            stored = await inbox.take([_update(app, 1, "/help"), bad, _update(app, 2, "/help")])
            await inbox.close()
    finally:
        await store.close()
    assert [entry.update_id for entry in stored] == [1, 2]
    assert sorted(calls) == ["A ends 1", "A ends 2", "A starts 1", "A starts 2"]
    dropped = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert [line.split(":")[0] for line in dropped] == [f"dropped update {2**63}"]


async def test_the_webhook_answers_without_pruning_and_says_store_unavailable_only_for_the_store(
    tmp_path: Path,
) -> None:
    """A webhook POST is stored and answered; pruning old handled updates happens in the
    sweeper, not on the request's way. An update the store refuses for its content is a
    500, not a "store unavailable" 503 (that is for a store that does not answer)."""
    db = str(tmp_path / "webhook.sqlite")
    store = await RunStore.open(db)
    try:
        calls: list[str] = []
        async with standin_server() as (_, server), _application(server, calls, "A", 0) as app:
            chat = ChatStore(store.db)
            inbox = Inbox(app, chat, "owner-a", 30.0, owner_is_dead)
            old = await chat.store_updates(
                app.bot.id, [_received(_update(app, 1, "/help"))], "owner-a", 30.0
            )
            await chat.mark_update_handled(old[0].id)
            long_ago = time.time() - INBOX_RETENTION - 60
            raw_rows(db, "UPDATE telegram_inbox SET handled_at = ?", (long_ago,))
            webhook = Webhook("http://127.0.0.1/telegram", "127.0.0.1", 0, SECRET)
            receiver = webhook_app(inbox, app.bot, webhook, chat.schema_version)
            async with HttpServer(receiver) as listening, httpx.AsyncClient() as client:

                async def post(update: Update) -> httpx.Response:
                    return await client.post(
                        f"{listening.url}/telegram",
                        json=update.to_dict(),
                        headers={SECRET_HEADER: SECRET},
                    )

                answer = await post(_update(app, 2, "/help"))
                assert (answer.status_code, answer.json()) == (200, {"ok": True})
                assert raw_rows(db, "SELECT update_id FROM telegram_inbox ORDER BY id") == [
                    (1,),
                    (2,),
                ]
                sweeping = asyncio.create_task(inbox.sweep())
                try:
                    await _until(
                        lambda: raw_rows(db, "SELECT update_id FROM telegram_inbox") == [(2,)],
                        "the sweeper never pruned the old handled update",
                    )
                finally:
                    sweeping.cancel()
                    await asyncio.gather(sweeping, return_exceptions=True)
                refused = await post(_update(app, 2**63, "/help"))
                assert (refused.status_code, refused.json()) == (
                    500,
                    {"error": "could not take the update"},
                )
            await inbox.close()
    finally:
        await store.close()
