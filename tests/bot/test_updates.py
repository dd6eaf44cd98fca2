"""Update dedup: a redelivered update is dropped, while an id reused by a Bot API that
restarted its numbering (the sandbox's stand-in, a fresh self-hosted server) is a new update."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from telegram import Bot, Update

from agent.store import RunStore
from bot.gateway import update_digest
from bot.standin import StandInServer
from bot.store import ChatStore
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


async def test_a_redelivered_update_is_still_dropped(store: RunStore) -> None:
    """The same id with the same content (Telegram redelivering, a standby polling the
    leader's batch again) is taken once, however often it comes."""
    digest = update_digest(_update(41, "/run incident: API latency spike", 1_700_000_000))
    assert await ChatStore(store.db).first_sight_of_update(BOT, 41, digest) is True
    assert await ChatStore(store.db).first_sight_of_update(BOT, 41, digest) is False
    assert await ChatStore(store.db).first_sight_of_update(BOT, 41, digest) is False


async def test_a_reused_id_with_other_content_is_a_new_update(store: RunStore) -> None:
    """A Bot API that numbers from 1 again: id 1 with another message is handled, and its own
    redelivery is dropped in turn; an earlier content never comes back as new."""
    first = update_digest(_update(1, "/help", 1_700_000_000))
    after_restart = update_digest(_update(1, "/help", 1_700_000_060))
    assert first != after_restart
    assert await ChatStore(store.db).first_sight_of_update(BOT, 1, first) is True
    assert await ChatStore(store.db).first_sight_of_update(BOT, 1, after_restart) is True
    assert await ChatStore(store.db).first_sight_of_update(BOT, 1, after_restart) is False
    # Another bot's update 1 is another update altogether.
    assert await ChatStore(store.db).first_sight_of_update(BOT + 1, 1, after_restart) is True


async def test_a_row_from_before_digests_gives_way_to_new_content(
    store: RunStore, db_url: str
) -> None:
    """A row recorded before digests were kept (digest NULL) cannot prove a duplicate: the
    next update with that id is handled, and then remembered with its digest."""
    assert (
        await ChatStore(store.db).first_sight_of_update(BOT, 7) is True
    )  # no digest: the old call
    assert (
        await ChatStore(store.db).first_sight_of_update(BOT, 7) is False
    )  # the id alone still counts
    digest = update_digest(_update(7, "/status", 1_700_000_000))
    assert await ChatStore(store.db).first_sight_of_update(BOT, 7, digest) is True
    assert await ChatStore(store.db).first_sight_of_update(BOT, 7, digest) is False
    rows = raw_rows(db_url, "SELECT digest FROM telegram_updates WHERE update_id = 7")
    assert rows == [(digest,)]


async def test_old_rows_are_still_cleaned_up(store: RunStore, db_url: str) -> None:
    """Every 500th id sweeps rows older than a week, as before digests."""
    digest = update_digest(_update(3, "/help", 1_700_000_000))
    assert await ChatStore(store.db).first_sight_of_update(BOT, 3, digest)
    week_ago = time.time() - 8 * 24 * 3600
    raw_rows(db_url, "UPDATE telegram_updates SET received_at = ?", (week_ago,))
    assert await ChatStore(store.db).first_sight_of_update(
        BOT, 500, update_digest(_update(500, "/x", 1))
    )
    rows = raw_rows(db_url, "SELECT update_id FROM telegram_updates ORDER BY update_id")
    assert rows == [(500,)]


def test_the_digest_ignores_the_id_and_sees_the_content() -> None:
    """Same content under another id: same digest; another date, text or message: another."""
    base = update_digest(_update(1, "/help", 1_700_000_000))
    assert update_digest(_update(99, "/help", 1_700_000_000)) == base
    assert update_digest(_update(1, "/help", 1_700_000_001)) != base
    assert update_digest(_update(1, "/runs", 1_700_000_000)) != base
    assert update_digest(_update(1, "/help", 1_700_000_000, message_id=2)) != base


async def test_the_bot_answers_after_its_bot_api_numbers_from_1_again(settings: Any) -> None:
    """The real bot over one database and two fresh stand-ins, each numbering updates from 1
    (as a restarted local Bot API does; its chats' message ids go on, as Telegram's do):
    every command to the second one is answered too."""
    for session in range(2):
        standin = make_standin(first_message_id=1 + 1000 * session)
        async with (
            StandInServer(standin) as server,
            running_bot(settings, telegram_settings(server)),
        ):
            for _ in range(3):
                sent = standin.inject_message(INCIDENTS, ALICE, "/help")

                def answered(after: int = sent["message_id"], api: Any = standin) -> bool:
                    return any(m["message_id"] > after for m in from_bot(api, INCIDENTS))

                await wait_for(standin, answered, timeout=10)
            # The same update ids as the session before: 1, 2, 3.
            assert [c.params.get("offset") for c in standin.calls("getUpdates")][-1] == 4
    rows = raw_rows(settings.db, "SELECT update_id FROM telegram_updates ORDER BY update_id")
    assert rows == [(1,), (2,), (3,)]


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
