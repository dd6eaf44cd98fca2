"""The inbox's store: a redelivered update is stored once, while an id reused by a Bot API that
restarted its numbering (the sandbox's stand-in, a fresh self-hosted server) is a new update;
pending updates are claimed, handled ones pruned; and the live bot over it."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from telegram import Bot, Update

from agent.store import RunStore
from agent.store.database import migrations
from agent.store.sqlite import split_sql
from bot.inbox import INBOX_RETENTION, update_digest
from bot.standin import StandInServer
from bot.store import ChatStore, ReceivedUpdate
from tests.bot_harness import (
    ALICE,
    INCIDENTS,
    TOKEN,
    from_bot,
    make_standin,
    running_bot,
    telegram_settings,
    wait_for,
)
from tests.support import raw_rows

BOT = 7000000001
OWNER = "host:1:ab@-.-.-"


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[RunStore]:
    """A fresh store over a new database of either engine."""
    opened = await RunStore.open(db_url)
    try:
        yield opened
    finally:
        await opened.close()


def _update(update_id: int, text: str, date: int, message_id: int = 1) -> Update:
    data: dict[str, Any] = {
        "update_id": update_id,
        "message": {
            "message_id": message_id,
            "date": date,
            "chat": {"id": INCIDENTS, "type": "supergroup", "title": "Incidents"},
            "from": {"id": ALICE, "is_bot": False, "first_name": "Alice", "username": "alice"},
            "text": text,
            "entities": [{"type": "bot_command", "offset": 0, "length": len(text.split()[0])}],
        },
    }
    return Update.de_json(data, Bot(TOKEN))


def _received(update: Update) -> ReceivedUpdate:
    return ReceivedUpdate(update.update_id, update_digest(update), update.to_dict())


async def _store(store: RunStore, bot_id: int, *updates: Update) -> list[int]:
    """Store a batch as one instance does; the update ids written (the new ones)."""
    stored = await ChatStore(store.db).store_updates(
        bot_id, [_received(u) for u in updates], OWNER, 30.0
    )
    return [entry.update_id for entry in stored]


async def test_a_redelivered_update_is_stored_once(store: RunStore) -> None:
    """The same id with the same content (Telegram redelivering, a standby polling the
    leader's batch again) is written to the inbox once, however often it comes."""
    update = _update(41, "/run incident: API latency spike", 1_700_000_000)
    assert await _store(store, BOT, update) == [41]
    assert await _store(store, BOT, update) == []
    assert await _store(store, BOT, update, _update(42, "/help", 1_700_000_001)) == [42]


async def test_a_reused_id_with_other_content_is_a_new_update(store: RunStore) -> None:
    """A Bot API that numbers from 1 again: id 1 with another message is stored (to be
    handled), and its own redelivery is not; another bot's update 1 is another update."""
    first = _update(1, "/help", 1_700_000_000)
    after_restart = _update(1, "/help", 1_700_000_060)
    assert update_digest(first) != update_digest(after_restart)
    assert await _store(store, BOT, first) == [1]
    assert await _store(store, BOT, after_restart) == [1]
    assert await _store(store, BOT, after_restart) == []
    assert await _store(store, BOT + 1, after_restart) == [1]


def _alive(owner: str) -> bool:
    return False


async def test_pending_updates_are_claimed_oldest_first_once_their_claim_is_over(
    store: RunStore,
) -> None:
    """Updates stored and not handled are there for any instance once their claim lapsed or
    its holder is over (proven dead), oldest first; handled ones for nobody."""
    chat = ChatStore(store.db)
    received = [_received(_update(n, f"/status tg-{n}", 1_700_000_000 + n)) for n in (5, 6, 7)]
    stored = await chat.store_updates(BOT, received, OWNER, 30.0)
    assert await chat.mark_update_handled(stored[1].id) is True
    assert await chat.mark_update_handled(stored[1].id) is False
    # Claimed by the live instance that stored them: nobody else takes them.
    assert await chat.claim_pending_updates(BOT, "other", 30.0, _alive) == []
    taken = await chat.claim_pending_updates(BOT, "poller", 0.0, lambda o: o == OWNER)
    assert [e.update_id for e in taken] == [5, 7]
    assert taken[0].payload["message"]["text"] == "/status tg-5"
    # The poller's claim (0 s) has lapsed: any instance may take them now.
    lapsed = await chat.claim_pending_updates(BOT, "other", 30.0, _alive)
    assert [e.update_id for e in lapsed] == [5, 7]
    assert await chat.claim_pending_updates(BOT + 1, "other", 30.0, _alive) == []


async def test_a_renewed_claim_keeps_an_update_from_others_and_a_released_one_frees_it(
    store: RunStore,
) -> None:
    """A claim renewed while its handler runs outlives its first time to live; renewal
    skips rows handled or held by another; a released claim is taken at once."""
    chat = ChatStore(store.db)
    received = [_received(_update(n, "/help", 1_700_000_000 + n)) for n in (1, 2, 3)]
    first, second, third = await chat.store_updates(BOT, received, OWNER, 0.0)
    await chat.mark_update_handled(third.id)
    renewed = await chat.renew_update_claims([first.id, second.id, third.id], OWNER, 30.0)
    assert renewed == [first.id, second.id]
    assert await chat.claim_pending_updates(BOT, "other", 30.0, _alive) == []
    assert await chat.renew_update_claims([first.id], "other", 30.0) == []
    assert await chat.release_update_claims([second.id], "other") == []
    assert await chat.release_update_claims([second.id], OWNER) == [second.id]
    taken = await chat.claim_pending_updates(BOT, "other", 30.0, _alive)
    assert [e.update_id for e in taken] == [2]


async def test_handled_updates_are_pruned_and_pending_ones_kept_however_old(
    store: RunStore, db_url: str
) -> None:
    """Pruning forgets handled updates older than the retention, never one not handled: a
    tap made while the bot was down is still a decision."""
    chat = ChatStore(store.db)
    old, fresh, pending = (_received(_update(n, "/help", 1_700_000_000 + n)) for n in (1, 2, 3))
    stored = await chat.store_updates(BOT, [old, fresh, pending], OWNER, 30.0)
    for entry in stored[:2]:
        await chat.mark_update_handled(entry.id)
    long_ago = time.time() - INBOX_RETENTION - 3600
    raw_rows(db_url, "UPDATE telegram_inbox SET received_at = ?", (long_ago,))
    raw_rows(db_url, "UPDATE telegram_inbox SET handled_at = ? WHERE update_id = 1", (long_ago,))
    assert await chat.prune_inbox(time.time() - INBOX_RETENTION) == 1
    rows = raw_rows(db_url, "SELECT update_id FROM telegram_inbox ORDER BY update_id")
    assert rows == [(2,), (3,)]


async def test_a_store_from_before_the_inbox_keeps_the_updates_it_handled(
    tmp_path: Path,
) -> None:
    """A SQLite file at schema 15 (first-sight table) upgrades: each remembered update with
    a digest becomes a handled inbox row, so its redelivery is still not handled; a row with
    no digest proves nothing and is dropped."""
    path = tmp_path / "v15.sqlite"
    conn = sqlite3.connect(path, isolation_level=None)
    for number, sql in migrations("agent.store.migrations"):
        if number <= 15:
            for statement in split_sql(sql):
                conn.execute(statement)
    conn.execute("PRAGMA user_version = 15")
    seen = _update(41, "/run api-latency-spike", 1_700_000_000)
    conn.executemany(
        "INSERT INTO telegram_updates (bot_id, update_id, digest, received_at) VALUES (?, ?, ?, ?)",
        [(BOT, 41, update_digest(seen), time.time()), (BOT, 40, None, time.time())],
    )
    conn.close()
    store = await RunStore.open(str(path))
    try:
        assert await _store(store, BOT, seen) == []  # handled before the upgrade
        assert await _store(store, BOT, _update(40, "/help", 1_700_000_000)) == [40]
        pending = await ChatStore(store.db).claim_pending_updates(
            BOT, OWNER, 30.0, lambda o: o == OWNER
        )
        assert [e.update_id for e in pending] == [40]
    finally:
        await store.close()
    tables = raw_rows(path, "SELECT name FROM sqlite_master WHERE name = 'telegram_updates'")
    assert tables == []


def test_the_digest_ignores_the_id_and_sees_the_content() -> None:
    """Same content under another id: same digest; another date, text or message: another."""
    base = update_digest(_update(1, "/help", 1_700_000_000))
    assert update_digest(_update(99, "/help", 1_700_000_000)) == base
    assert update_digest(_update(1, "/help", 1_700_000_001)) != base
    assert update_digest(_update(1, "/runs", 1_700_000_000)) != base
    assert update_digest(_update(1, "/help", 1_700_000_000, message_id=2)) != base


async def test_the_bot_handles_reused_ids_after_its_bot_api_numbers_from_1_again(
    settings: Any,
) -> None:
    """The real bot over one database and two fresh stand-ins, each numbering updates from 1
    (as a restarted local Bot API does; its chats' message ids go on, as Telegram's do): the
    second one's updates reuse ids 1-3 with other content, and every one is handled: each
    command answered, each `/run` a run."""
    for session in range(2):
        standin = make_standin(first_message_id=1 + 1000 * session)
        async with (
            StandInServer(standin) as server,
            running_bot(settings, telegram_settings(server)),
        ):
            for text in ("/help", f"/run api-latency-spike session {session}", "/help"):
                sent = standin.inject_message(INCIDENTS, ALICE, text)

                def answered(after: int = sent["message_id"], api: Any = standin) -> bool:
                    return any(m["message_id"] > after for m in from_bot(api, INCIDENTS))

                try:
                    await wait_for(standin, answered, timeout=10)
                except TimeoutError:  # say what was left unanswered, and the inbox then
                    inbox = raw_rows(
                        settings.db,
                        "SELECT id, update_id, claimed_by, claimed_until, handled_at "
                        "FROM telegram_inbox ORDER BY id",
                    )
                    waiting = raw_rows(
                        settings.db,
                        "SELECT id, kind, attempts, claimed_at FROM outbox "
                        "WHERE delivered_at IS NULL AND failed_at IS NULL",
                    )
                    leases = raw_rows(settings.db, "SELECT * FROM chat_leases")
                    raise AssertionError(
                        f"session {session}: {text!r} unanswered at {time.time():.3f}; "
                        f"inbox {inbox}; outbox waiting {waiting}; chat leases {leases}"
                    ) from None

            # The same update ids as the session before: 1, 2, 3, each confirmed by the poll
            # after the one that brought it (which may come after the last answer).
            def offsets(api: Any = standin) -> list[Any]:
                return [c.params.get("offset") for c in api.calls("getUpdates")]

            await wait_for(standin, lambda: offsets()[-1] == 4, timeout=10)
            assert max(o for o in offsets() if o is not None) == 4, offsets()
    rows = raw_rows(
        settings.db,
        "SELECT update_id, handled_at IS NOT NULL FROM telegram_inbox ORDER BY update_id, id",
    )
    assert rows == [(1, 1), (1, 1), (2, 1), (2, 1), (3, 1), (3, 1)]
    runs = raw_rows(settings.db, "SELECT request FROM runs WHERE parent_id IS NULL ORDER BY 1")
    assert runs == [("api-latency-spike session 0",), ("api-latency-spike session 1",)]


async def test_an_update_redelivered_to_a_restarted_bot_is_not_handled_again(
    settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Telegram never hears the bot's confirmation (its next offset is lost), so after a
    restart it delivers the same `/run` again, same id and content: the inbox knows it, no
    handler sees it, and there is still one run; the next message is handled as ever."""
    standin = make_standin()

    def handled() -> list[tuple[Any, ...]]:
        return raw_rows(settings.db, "SELECT 1 FROM telegram_inbox WHERE handled_at IS NOT NULL")

    async with StandInServer(standin) as server:
        standin.hold_confirmations = True
        async with running_bot(settings, telegram_settings(server)):
            standin.inject_message(INCIDENTS, ALICE, "/run api-latency-spike once only")
            await wait_for(standin, lambda: from_bot(standin, INCIDENTS), timeout=10)
            deadline = time.monotonic() + 10
            while not handled():
                assert time.monotonic() < deadline, "the /run was never marked handled"
                await asyncio.sleep(0.05)
        with caplog.at_level("INFO", logger="bot.inbox"):
            async with running_bot(settings, telegram_settings(server)):
                sent = standin.inject_message(INCIDENTS, ALICE, "/help")
                await wait_for(
                    standin,
                    lambda: any(
                        m["message_id"] > sent["message_id"] for m in from_bot(standin, INCIDENTS)
                    ),
                    timeout=10,
                )
    offsets = [c.params.get("offset") for c in standin.calls("getUpdates")]
    assert None in offsets[1:], "the restarted bot never asked for unconfirmed updates"
    logged = [r.getMessage() for r in caplog.records]
    assert "update 1 was taken already; skipping it" in logged
    assert not [line for line in logged if "handling update" in line]
    assert raw_rows(settings.db, "SELECT COUNT(*) FROM runs WHERE parent_id IS NULL") == [(1,)]
    assert raw_rows(settings.db, "SELECT update_id FROM telegram_inbox ORDER BY id") == [(1,), (2,)]


async def test_an_update_without_a_sender_is_ignored_with_a_log_line(
    settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A message with no `from` (as an anonymous channel posting in a group sends) reaches the
    real bot: one log line and nothing else (no answer, no traceback); the next command is
    served as ever."""
    standin = make_standin()
    chat = {"id": INCIDENTS, "type": "supergroup", "title": "Incidents"}
    senderless = {"message_id": 900, "date": int(time.time()), "chat": chat, "text": "/help"}
    async with StandInServer(standin) as server, running_bot(settings, telegram_settings(server)):
        with caplog.at_level("INFO", logger="bot.gateway"):
            standin.inject_update("message", senderless)
            sent = standin.inject_message(INCIDENTS, ALICE, "/help")
            await wait_for(
                standin,
                lambda: any(
                    m["message_id"] > sent["message_id"] for m in from_bot(standin, INCIDENTS)
                ),
                timeout=10,
            )
    ignored = [r.getMessage() for r in caplog.records if "no sender" in r.getMessage()]
    assert len(ignored) == 1 and "(message)" in ignored[0]
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert len(from_bot(standin, INCIDENTS)) == 1  # only the answer to Alice's /help


async def test_the_sender_of_a_plain_message_is_remembered_by_name(settings: Any) -> None:
    """Every early handler runs on every update: the check for a sender does not take the
    place of the one that learns people's names (a plain message, no command, is enough)."""
    standin = make_standin()
    async with StandInServer(standin) as server, running_bot(settings, telegram_settings(server)):
        standin.inject_message(INCIDENTS, ALICE, "looking at the dashboards now")
        deadline = time.monotonic() + 10
        while not raw_rows(settings.db, "SELECT display FROM chat_users"):
            assert time.monotonic() < deadline, "the sender's name was never stored"
            await asyncio.sleep(0.05)
    rows = raw_rows(settings.db, "SELECT identity, display FROM chat_users")
    assert rows == [(f"telegram:{ALICE}", "@alice")], rows


async def test_an_update_with_a_lone_surrogate_is_stored_with_its_batch(store: RunStore) -> None:
    """Valid JSON a Bot API may pass on (an escaped lone surrogate, which UTF-8 cannot
    encode) is stored with the rest of its batch and reads back as it came, on both engines."""
    chat = ChatStore(store.db)
    odd = _update(2, "/help \ud800", 1_700_000_000)
    assert await _store(store, BOT, _update(1, "/help", 1_700_000_000), odd) == [1, 2]
    pending = await chat.claim_pending_updates(BOT, "other", 30.0, lambda owner: owner == OWNER)
    assert pending[1].payload["message"]["text"] == "/help \ud800"
    assert await _store(store, BOT, odd) == []  # its redelivery is known


async def test_updates_sent_to_a_restarted_bot_api_while_the_bot_runs_are_all_handled(
    settings: Any,
) -> None:
    """A self-hosted Bot API restarts while the bot runs and numbers its updates from 1
    again; /run messages reach it before the bot's next poll. The bot's old offset would
    confirm them unseen: after the failed polls it asks from the lowest, and each is a run."""

    def started() -> list[tuple[Any, ...]]:
        return raw_rows(settings.db, "SELECT request FROM runs WHERE parent_id IS NULL ORDER BY 1")

    first = make_standin()
    server = StandInServer(first)
    await server.__aenter__()
    port = int(server.url.rsplit(":", 1)[1])
    try:
        async with running_bot(settings, telegram_settings(server)):
            for _ in range(3):
                sent = first.inject_message(INCIDENTS, ALICE, "/help")
                await wait_for(
                    first,
                    lambda s=sent: any(
                        m["message_id"] > s["message_id"] for m in from_bot(first, INCIDENTS)
                    ),
                )
            await server.stop()  # the Bot API restarts ...
            second = make_standin(first_message_id=1000)
            # ... and people write to it before the bot's next poll reaches it.
            for n in range(3):
                second.inject_message(INCIDENTS, ALICE, f"/run api-latency-spike after restart {n}")
            async with StandInServer(second, port=port):
                deadline = time.monotonic() + 30
                while len(started()) < 3:
                    assert time.monotonic() < deadline, f"runs: {started()}"
                    await asyncio.sleep(0.1)
    finally:
        await server.stop()
    assert started() == [(f"api-latency-spike after restart {n}",) for n in range(3)]
