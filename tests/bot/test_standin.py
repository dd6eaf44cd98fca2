"""The Telegram Bot API stand-in, driven over HTTP by python-telegram-bot's real `telegram.Bot`."""

from __future__ import annotations

import asyncio
import datetime as dtm
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from telegram import (
    Bot,
    BotCommand,
    ForceReply,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    Message,
    MessageEntity,
    Update,
)
from telegram.error import BadRequest, Conflict, EndPointNotFound, InvalidToken, RetryAfter
from telegram.ext import (
    ApplicationBuilder,
    CallbackQueryHandler,
    CommandHandler,
    ContextTypes,
    MessageHandler,
    filters,
)

from bot.standin import BotApiStandIn, StandInServer

TOKEN = "123456789:stand-in-token"
ALICE = 4242  # a user, and therefore also the id of her private chat with the bot


def approve_keyboard() -> InlineKeyboardMarkup:
    """The one-button approval keyboard the tests send and press."""
    return InlineKeyboardMarkup([[InlineKeyboardButton("Approve", callback_data="approve:run-1")]])


@pytest.fixture(autouse=True)
def timedelta_retry_after(monkeypatch: pytest.MonkeyPatch) -> None:
    """Opt in to RetryAfter.retry_after as a timedelta (PTB 22.2+ warns about the int form)."""
    monkeypatch.setenv("PTB_TIMEDELTA", "true")


@pytest.fixture
def standin() -> BotApiStandIn:
    """A fresh stand-in per test."""
    return BotApiStandIn(TOKEN)


@pytest.fixture
async def server(standin: BotApiStandIn) -> AsyncIterator[StandInServer]:
    """The stand-in served on a free 127.0.0.1 port."""
    async with StandInServer(standin) as server:
        yield server


@pytest.fixture
async def bot(server: StandInServer) -> AsyncIterator[Bot]:
    """A real python-telegram-bot Bot pointed at the stand-in (initialised: getMe done)."""
    async with Bot(TOKEN, base_url=server.bot_base_url) as bot:
        yield bot


@pytest.fixture
def alice(standin: BotApiStandIn) -> int:
    """Alice has a private chat with the bot, so the bot may write to her."""
    standin.add_user(ALICE, "Alice", "alice")
    standin.add_chat(ALICE, "private")
    return ALICE


async def test_get_me_identifies_the_bot(bot: Bot, standin: BotApiStandIn) -> None:
    """getMe answers with the configured bot user, and the call is logged."""
    me = await bot.get_me()
    assert (me.id, me.username, me.is_bot) == (7000000001, "loom_ops_bot", True)
    # `async with bot` already called getMe once to initialize.
    assert [call.method for call in standin.calls()] == ["getMe", "getMe"]


async def test_edit_without_markup_removes_the_keyboard(
    bot: Bot, standin: BotApiStandIn, alice: int
) -> None:
    """As on Telegram, editing text without reply_markup drops the inline keyboard."""
    sent = await bot.send_message(alice, "Approve run 1?", reply_markup=approve_keyboard())
    assert sent.message_id == 1
    assert sent.from_user is not None and sent.from_user.id == bot.id
    assert sent.reply_markup is not None
    assert sent.reply_markup.inline_keyboard[0][0].callback_data == "approve:run-1"

    edited = await bot.edit_message_text("Run 1 approved", chat_id=alice, message_id=1)

    assert isinstance(edited, type(sent))
    assert edited.text == "Run 1 approved"
    assert edited.reply_markup is None
    assert edited.edit_date is not None
    [stored] = standin.messages(alice)
    assert stored["text"] == "Run 1 approved"
    assert "reply_markup" not in stored
    assert stored["edits"] == 1


async def test_identical_edit_is_not_modified(bot: Bot, standin: BotApiStandIn, alice: int) -> None:
    """Editing to the same text and keyboard is Telegram's "message is not modified"."""
    sent = await bot.send_message(alice, "Status: ok", reply_markup=approve_keyboard())

    with pytest.raises(BadRequest, match="not modified"):
        await bot.edit_message_text(
            "Status: ok", chat_id=alice, message_id=sent.message_id, reply_markup=approve_keyboard()
        )
    with pytest.raises(BadRequest, match="not modified"):
        await bot.edit_message_reply_markup(
            chat_id=alice, message_id=sent.message_id, reply_markup=approve_keyboard()
        )
    with pytest.raises(BadRequest, match=r"(?i)message to edit not found"):
        await bot.edit_message_text("x", chat_id=alice, message_id=99)
    assert standin.messages(alice)[0]["edits"] == 0


async def test_injected_message_is_delivered_until_confirmed_by_offset(
    bot: Bot, standin: BotApiStandIn
) -> None:
    """Updates are redelivered until a getUpdates offset confirms them, then gone for good."""
    injected = standin.inject_message(ALICE, ALICE, "/status@loom_ops_bot web")

    first = await bot.get_updates(timeout=1)
    again = await bot.get_updates(timeout=0)

    assert [u.update_id for u in first] == [u.update_id for u in again]
    [update] = first
    assert update.message is not None
    assert update.message.message_id == injected["message_id"]
    assert update.message.text == "/status@loom_ops_bot web"
    assert update.message.from_user is not None and update.message.from_user.id == ALICE
    assert update.message.chat.type == "private"
    assert update.message.entities == (
        MessageEntity(MessageEntity.BOT_COMMAND, 0, len("/status@loom_ops_bot")),
    )

    assert await bot.get_updates(offset=update.update_id + 1, timeout=0) == ()
    assert (await bot.get_webhook_info()).pending_update_count == 0
    # Confirmed for good: even without an offset it does not come back.
    assert await bot.get_updates(timeout=0) == ()


async def test_long_poll_returns_as_soon_as_a_message_arrives(
    bot: Bot, standin: BotApiStandIn
) -> None:
    """A waiting long poll answers when a message is injected, not at its timeout."""
    poll = asyncio.create_task(bot.get_updates(timeout=10))
    await standin.wait_until(lambda: len(standin.calls("getUpdates")) == 1, timeout=2)
    assert not poll.done()

    started = time.monotonic()
    standin.inject_message(ALICE, ALICE, "hello")
    updates = await asyncio.wait_for(poll, timeout=3)

    assert time.monotonic() - started < 1
    assert [u.message.text for u in updates if u.message] == ["hello"]


async def test_long_poll_without_updates_waits_for_its_timeout(bot: Bot) -> None:
    """With nothing to deliver, a long poll waits out its timeout and answers empty."""
    started = time.monotonic()
    updates = await bot.get_updates(timeout=dtm.timedelta(milliseconds=300))
    elapsed = time.monotonic() - started

    assert updates == ()
    assert 0.25 <= elapsed < 2


async def test_newer_long_poll_ends_the_older_with_conflict(
    bot: Bot, server: StandInServer, standin: BotApiStandIn
) -> None:
    """A second poller ends the first with 409 Conflict, as two bot instances would."""
    older = asyncio.create_task(bot.get_updates(timeout=10))
    await standin.wait_until(lambda: len(standin.calls("getUpdates")) == 1, timeout=2)

    async with Bot(TOKEN, base_url=server.bot_base_url) as second_instance:
        newer = asyncio.create_task(second_instance.get_updates(timeout=10))
        with pytest.raises(Conflict, match="terminated by other getUpdates"):
            await asyncio.wait_for(older, timeout=3)
        standin.inject_message(ALICE, ALICE, "for the survivor")
        updates = await asyncio.wait_for(newer, timeout=3)

    assert [u.message.text for u in updates if u.message] == ["for the survivor"]


async def test_allowed_updates_filters_and_is_remembered(
    bot: Bot, standin: BotApiStandIn, alice: int
) -> None:
    """allowed_updates filters delivery, sticks until changed, and [] restores the default."""
    sent = await bot.send_message(alice, "Approve?", reply_markup=approve_keyboard())
    standin.inject_message(alice, alice, "chatter")
    query_id = standin.inject_callback(alice, sent.message_id, alice, "approve:run-1")

    [only] = await bot.get_updates(allowed_updates=["callback_query"], timeout=0)
    assert only.callback_query is not None and only.callback_query.id == query_id
    assert only.message is None

    # The list is remembered: a later poll without allowed_updates still skips messages.
    standin.inject_message(alice, alice, "more chatter")
    assert await bot.get_updates(offset=only.update_id + 1, timeout=0) == ()
    assert standin.calls("getUpdates")[-1].params["offset"] == only.update_id + 1

    # An empty list restores the default (everything but a few opt-in types).
    await bot.get_updates(allowed_updates=[], timeout=0)
    standin.inject_message(alice, alice, "heard again")
    [update] = await bot.get_updates(timeout=0)
    assert update.message is not None and update.message.text == "heard again"


async def test_fail_next_429_raises_retry_after_then_recovers(
    bot: Bot, standin: BotApiStandIn, alice: int
) -> None:
    """An injected 429 reaches python-telegram-bot as RetryAfter; the next call succeeds."""
    standin.fail_next("sendMessage", retry_after=3)

    with pytest.raises(RetryAfter) as raised:
        await bot.send_message(alice, "first try")
    sent = await bot.send_message(alice, "second try")

    assert raised.value.retry_after == dtm.timedelta(seconds=3)
    assert sent.text == "second try"
    assert [c.params["text"] for c in standin.calls("sendMessage")] == ["first try", "second try"]
    assert [m["text"] for m in standin.messages(alice)] == ["second try"]


async def test_fail_next_other_errors_and_counts(
    bot: Bot, standin: BotApiStandIn, alice: int
) -> None:
    """fail_next takes any error code and description, for `count` calls."""
    standin.fail_next("sendMessage", 400, description="Bad Request: chat is deactivated", count=2)

    for _ in range(2):
        with pytest.raises(BadRequest, match=r"(?i)chat is deactivated"):
            await bot.send_message(alice, "hi")
    assert (await bot.send_message(alice, "hi")).message_id == 1


async def test_callback_answer_is_recorded_once(
    bot: Bot, standin: BotApiStandIn, alice: int
) -> None:
    """A button press arrives as a callback_query; its answer is recorded; a second is refused."""
    sent = await bot.send_message(alice, "Approve?", reply_markup=approve_keyboard())
    query_id = standin.inject_callback(alice, sent.message_id, alice, "approve:run-1")

    [update] = await bot.get_updates(timeout=1)
    query = update.callback_query
    assert query is not None
    assert (query.id, query.data, query.from_user.id) == (query_id, "approve:run-1", alice)
    assert query.message is not None and query.message.message_id == sent.message_id
    assert query.message.reply_markup == approve_keyboard()
    assert standin.callback_answer(query_id) is None

    assert await bot.answer_callback_query(query_id, text="Approved", show_alert=True) is True
    answer = standin.callback_answer(query_id)
    assert answer is not None
    assert (answer["text"], answer["show_alert"]) == ("Approved", True)

    with pytest.raises(BadRequest, match=r"(?i)query is too old"):
        await bot.answer_callback_query(query_id, text="again")
    with pytest.raises(BadRequest, match=r"(?i)query ID is invalid"):
        await bot.answer_callback_query("no-such-query")


async def test_inject_callback_refuses_what_no_client_could_send(
    bot: Bot, standin: BotApiStandIn, alice: int
) -> None:
    """No press of a missing message or of a button that is no longer there."""
    sent = await bot.send_message(alice, "Approve?", reply_markup=approve_keyboard())
    await bot.edit_message_text("Done", chat_id=alice, message_id=sent.message_id)

    with pytest.raises(ValueError, match="not found"):
        standin.inject_callback(alice, 99, alice, "approve:run-1")
    with pytest.raises(ValueError, match="no inline button"):
        standin.inject_callback(alice, sent.message_id, alice, "approve:run-1")
    assert standin.inject_callback(
        alice, sent.message_id, alice, "approve:run-1", require_button=False
    )


async def test_send_document_round_trips_bytes(
    bot: Bot, standin: BotApiStandIn, alice: int
) -> None:
    """A multipart upload keeps its name, type and bytes; the caption's HTML is parsed."""
    content = bytes(range(256)) * 8

    sent = await bot.send_document(
        alice,
        document=content,
        filename="run-1.log",
        caption="<b>Run 1</b> log",
        parse_mode="HTML",
        message_thread_id=5,
    )

    document = sent.document
    assert document is not None
    assert (document.file_name, document.file_size) == ("run-1.log", len(content))
    assert document.mime_type == "application/octet-stream"
    assert sent.caption == "Run 1 log"
    assert sent.caption_entities == (MessageEntity(MessageEntity.BOLD, 0, 5),)
    assert sent.message_thread_id == 5
    assert standin.document_bytes(document.file_id) == content
    [stored] = standin.messages(alice)
    assert stored["document"]["file_id"] == document.file_id
    [call] = standin.calls("sendDocument")
    assert call.params["document"] == {
        "filename": "run-1.log",
        "mime_type": "application/octet-stream",
        "size": len(content),
    }


async def test_html_is_parsed_into_entities(bot: Bot, alice: int) -> None:
    """Telegram HTML becomes plain text plus UTF-16 entities, which PTB renders back."""
    sent = await bot.send_message(
        alice,
        '<b>Deploy</b> &amp; <a href="https://example.com/run/1">run 1</a> '
        '<tg-spoiler>s</tg-spoiler> <pre><code class="language-sh">ls</code></pre>',
        parse_mode="HTML",
    )

    assert sent.text == "Deploy & run 1 s ls"
    assert sent.entities == (
        MessageEntity(MessageEntity.BOLD, 0, 6),
        MessageEntity(MessageEntity.TEXT_LINK, 9, 5, url="https://example.com/run/1"),
        MessageEntity(MessageEntity.SPOILER, 15, 1),
        MessageEntity(MessageEntity.PRE, 17, 2, language="sh"),
    )
    assert sent.text_html.startswith("<b>Deploy</b> &amp; ")


@pytest.mark.parametrize(
    ("text", "detail"),
    [
        ("<b>bold", 'Can\'t find end tag corresponding to start tag "b"'),
        ("<b>bold</i>", 'expected "</b>", found "</i>"'),
        ("done</b>", "Unexpected end tag"),
        ("<blink>x</blink>", 'Unsupported start tag "blink"'),
        ("1 < 2", "Unexpected end of name token at byte offset 2"),
    ],
)
async def test_bad_html_is_a_bad_request(
    bot: Bot, standin: BotApiStandIn, alice: int, text: str, detail: str
) -> None:
    """Malformed or unsupported HTML is refused with Telegram's "can't parse entities"."""
    with pytest.raises(BadRequest, match=r"(?i)can't parse entities") as raised:
        await bot.send_message(alice, text, parse_mode="HTML")

    # python-telegram-bot strips "Bad Request: " and capitalize()s the rest, lowering its case.
    assert detail.lower() in raised.value.message.lower()
    assert standin.messages(alice) == []


async def test_text_length_limits(bot: Bot, alice: int) -> None:
    """Text over 4096 characters, blank text and unknown chats are bad requests."""
    with pytest.raises(BadRequest, match=r"(?i)message is too long"):
        await bot.send_message(alice, "x" * 4097)
    with pytest.raises(BadRequest, match=r"(?i)message text is empty"):
        await bot.send_message(alice, "  ")
    with pytest.raises(BadRequest, match=r"(?i)chat not found"):
        await bot.send_message(-1001, "nobody introduced the bot here")

    assert len((await bot.send_message(alice, "x" * 4096)).text or "") == 4096


async def test_force_reply_answer_arrives_as_a_reply(
    bot: Bot, standin: BotApiStandIn, alice: int
) -> None:
    """The user's answer to a ForceReply prompt carries the prompt as reply_to_message."""
    prompt = await bot.send_message(alice, "Reason for rollback?", reply_markup=ForceReply())
    standin.inject_message(alice, alice, "disk full", reply_to_message_id=prompt.message_id)

    [update] = await bot.get_updates(timeout=1)

    assert update.message is not None
    assert update.message.reply_to_message is not None
    assert update.message.reply_to_message.message_id == prompt.message_id
    assert update.message.reply_to_message.text == "Reason for rollback?"
    # ForceReply is not part of Telegram's Message JSON, but the transcript keeps it.
    assert prompt.reply_markup is None
    assert standin.messages(alice)[0]["ui_markup"] == {"force_reply": True}


async def test_commands_and_chat_actions(bot: Bot, standin: BotApiStandIn, alice: int) -> None:
    """setMyCommands is stored and validated; sendChatAction is logged with its params."""
    assert await bot.set_my_commands([BotCommand("status", "Show run status")]) is True
    assert await bot.get_my_commands() == (BotCommand("status", "Show run status"),)
    assert standin.commands() == [{"command": "status", "description": "Show run status"}]
    with pytest.raises(BadRequest, match=r"(?i)BOT_COMMAND_INVALID"):
        await bot.set_my_commands([BotCommand("Bad Command", "nope")])

    assert await bot.send_chat_action(alice, "typing") is True
    assert standin.calls("sendChatAction")[0].params == {"chat_id": alice, "action": "typing"}


async def test_subscribers_see_messages_edits_and_answers(
    bot: Bot, standin: BotApiStandIn, alice: int
) -> None:
    """A subscriber queue sees new and edited messages and callback answers, in order."""
    events = standin.subscribe()
    sent = await bot.send_message(alice, "Approve?", reply_markup=approve_keyboard())
    query_id = standin.inject_callback(alice, sent.message_id, alice, "approve:run-1")
    await bot.answer_callback_query(query_id)
    await bot.edit_message_text("Approved", chat_id=alice, message_id=sent.message_id)
    standin.unsubscribe(events)
    await bot.send_message(alice, "unseen")

    seen = [events.get_nowait() for _ in range(events.qsize())]
    assert [e["type"] for e in seen] == ["message", "callback_answer", "edited_message"]
    assert seen[0]["message"]["text"] == "Approve?"
    assert seen[1]["callback_query_id"] == query_id
    assert (seen[2]["message"]["text"], seen[2]["message"]["edits"]) == ("Approved", 1)


async def test_application_polling_round_trip(
    server: StandInServer, standin: BotApiStandIn
) -> None:
    """The whole python-telegram-bot stack: Updater long polling, command, button, ForceReply."""

    async def status(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        assert update.effective_message is not None
        await update.effective_message.reply_text("Run 1 waits", reply_markup=approve_keyboard())

    async def pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        query = update.callback_query
        assert query is not None and isinstance(query.message, Message)
        await query.answer("Approved")
        await query.edit_message_text("Run 1 approved")
        await query.message.reply_text("Why?", reply_markup=ForceReply())

    async def reason(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        assert update.effective_message is not None
        await update.effective_message.reply_text(f"Noted: {update.effective_message.text}")

    app = ApplicationBuilder().token(TOKEN).base_url(server.bot_base_url).build()
    app.add_handler(CommandHandler("status", status))
    app.add_handler(CallbackQueryHandler(pressed))
    app.add_handler(MessageHandler(filters.REPLY, reason))

    def texts() -> list[str]:
        return [m.get("text", "") for m in standin.messages(ALICE)]

    async with app:
        await app.start()
        assert app.updater is not None
        await app.updater.start_polling(timeout=5, drop_pending_updates=True)
        standin.inject_message(ALICE, ALICE, "/status")
        await standin.wait_until(lambda: "Run 1 waits" in texts(), timeout=3)
        query_id = standin.inject_callback(ALICE, 2, ALICE, "approve:run-1")
        await standin.wait_until(lambda: "Why?" in texts(), timeout=3)
        standin.inject_message(ALICE, ALICE, "disk full", reply_to_message_id=3)
        await standin.wait_until(lambda: "Noted: disk full" in texts(), timeout=3)
        await app.updater.stop()
        await app.stop()

    assert texts() == ["/status", "Run 1 approved", "Why?", "disk full", "Noted: disk full"]
    assert standin.messages(ALICE)[1]["edits"] == 1
    assert "reply_markup" not in standin.messages(ALICE)[1]
    assert (standin.callback_answer(query_id) or {}).get("text") == "Approved"
    assert standin.calls("deleteWebhook")[0].params == {"drop_pending_updates": True}


async def test_wait_until_times_out_with_a_clear_message(standin: BotApiStandIn) -> None:
    """wait_until gives up with a TimeoutError naming the condition."""
    with pytest.raises(TimeoutError, match=r"still false after 0.05s"):
        await standin.wait_until(lambda: bool(standin.messages(ALICE)), timeout=0.05)


async def test_control_api_injects_messages_and_reports(
    server: StandInServer, bot: Bot, standin: BotApiStandIn
) -> None:
    """Another process can inject a group-topic message over HTTP and read the transcript."""
    async with httpx.AsyncClient(base_url=server.url) as http:
        injected = await http.post(
            "/standin/messages",
            json={
                "chat_id": -1001234567890,
                "user_id": ALICE,
                "text": "/deploy web",
                "thread_id": 7,
                "first_name": "Alice",
                "chat_type": "supergroup",
                "chat_title": "Ops",
            },
        )
        [update] = await bot.get_updates(timeout=1)
        listed = await http.get("/standin/chats/-1001234567890/messages")
        reply = await bot.send_message(-1001234567890, "Deploying", message_thread_id=7)
        calls = await http.get("/standin/calls", params={"method": "sendMessage"})

    assert injected.status_code == 200
    assert injected.json()["text"] == "/deploy web"
    message = update.message
    assert message is not None
    assert (message.chat.type, message.chat.title, message.message_thread_id) == (
        "supergroup",
        "Ops",
        7,
    )
    assert message.from_user is not None and message.from_user.first_name == "Alice"
    assert [m["text"] for m in listed.json()["messages"]] == ["/deploy web"]
    assert reply.message_id == 2
    [call] = calls.json()["calls"]
    assert call["params"] == {
        "chat_id": -1001234567890,
        "text": "Deploying",
        "message_thread_id": 7,
    }


async def test_control_api_callbacks_and_faults(
    server: StandInServer, bot: Bot, standin: BotApiStandIn, alice: int
) -> None:
    """Button presses, answers and faults work through the HTTP control API too."""
    sent = await bot.send_message(alice, "Approve?", reply_markup=approve_keyboard())
    async with httpx.AsyncClient(base_url=server.url) as http:
        pressed = await http.post(
            "/standin/callbacks",
            json={
                "chat_id": alice,
                "message_id": sent.message_id,
                "user_id": alice,
                "data": "approve:run-1",
            },
        )
        query_id = pressed.json()["callback_query_id"]
        await bot.answer_callback_query(query_id, text="ok")
        answer = await http.get(f"/standin/callbacks/{query_id}")
        fault = await http.post("/standin/faults", json={"method": "sendMessage", "retry_after": 2})
        with pytest.raises(RetryAfter):
            await bot.send_message(alice, "throttled")

    assert pressed.status_code == 200
    assert answer.json()["answer"]["text"] == "ok"
    assert fault.status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/standin/messages", {"chat_id": 1, "user_id": 1}, 400),
        ("POST", "/standin/messages", {"chat_id": "one", "user_id": 1, "text": "x"}, 400),
        ("POST", "/standin/messages", {"chat_id": True, "user_id": 1, "text": "x"}, 400),
        ("POST", "/standin/messages", [1, 2], 400),
        ("POST", "/standin/messages", "not json", 400),
        ("POST", "/standin/messages", {"chat_id": 5, "user_id": 6, "text": "x"}, 400),
        (
            "POST",
            "/standin/messages",
            {"chat_id": 1, "user_id": 1, "text": "x", "chat_type": "x"},
            400,
        ),
        (
            "POST",
            "/standin/callbacks",
            {"chat_id": 1, "message_id": 9, "user_id": 1, "data": "x"},
            400,
        ),
        ("GET", "/standin/chats/abc/messages", None, 400),
        ("GET", "/standin/callbacks/unknown", None, 404),
        ("POST", "/standin/faults", {"method": "sendMessage", "count": 0}, 400),
        ("POST", "/standin/faults", {"error_code": 429}, 400),
    ],
)
async def test_control_api_rejects_bad_input_with_json(
    server: StandInServer, method: str, path: str, body: object, status: int
) -> None:
    """Bad control input is a 4xx with a JSON error, never a 500."""
    async with httpx.AsyncClient(base_url=server.url) as http:
        if isinstance(body, str):
            response = await http.request(method, path, content=body)
        else:
            response = await http.request(method, path, json=body)

    assert response.status_code == status
    assert isinstance(response.json()["error"], str)


async def test_wrong_token_and_unknown_method(
    server: StandInServer, standin: BotApiStandIn
) -> None:
    """A wrong token is 401 (PTB: InvalidToken); an unknown method is 404 (EndPointNotFound)."""
    with pytest.raises(InvalidToken, match="rejected"):
        async with Bot("999:wrong-token", base_url=server.bot_base_url):
            pass
    assert standin.calls() == []

    async with Bot(TOKEN, base_url=server.bot_base_url) as bot:
        with pytest.raises(EndPointNotFound):
            await bot.do_api_request("noSuchMethod")
    assert standin.calls()[-1].method == "noSuchMethod"

    async with httpx.AsyncClient(base_url=server.url) as http:
        unauthorized = await http.post("/botnope/getMe")
        missing = await http.post(f"/bot{TOKEN}/noSuchMethod")
    assert (unauthorized.status_code, unauthorized.json()) == (
        401,
        {"ok": False, "error_code": 401, "description": "Unauthorized"},
    )
    assert (missing.status_code, missing.json()) == (
        404,
        {"ok": False, "error_code": 404, "description": "Not Found"},
    )


async def test_json_bodies_are_accepted(
    server: StandInServer, standin: BotApiStandIn, alice: int
) -> None:
    """JSON request bodies work as well as forms, and errors keep Telegram's shape."""
    keyboard = approve_keyboard().to_dict()
    async with httpx.AsyncClient(base_url=f"{server.bot_base_url}{TOKEN}") as http:
        sent = await http.post(
            "/sendMessage", json={"chat_id": alice, "text": "hi", "reply_markup": keyboard}
        )
        standin.fail_next("sendMessage", retry_after=7)
        flooded = await http.post("/sendMessage", json={"chat_id": alice, "text": "hi"})

    assert sent.json()["result"]["reply_markup"] == keyboard
    assert flooded.status_code == 429
    assert flooded.json() == {
        "ok": False,
        "error_code": 429,
        "description": "Too Many Requests: retry after 7",
        "parameters": {"retry_after": 7},
    }


async def test_server_only_binds_locally_and_stops_while_polled(standin: BotApiStandIn) -> None:
    """Only local hosts are allowed, and shutdown releases a pending long poll at once."""
    with pytest.raises(ValueError, match=r"127\.0\.0\.1"):
        StandInServer(standin, host="0.0.0.0")

    async with StandInServer(standin, host="localhost") as server:
        assert server.url.startswith("http://127.0.0.1:")
        bot = Bot(TOKEN, base_url=server.bot_base_url)
        await bot.initialize()
        poll = asyncio.create_task(bot.get_updates(timeout=30))
        await standin.wait_until(lambda: bool(standin.calls("getUpdates")), timeout=2)
        started = time.monotonic()
    # Leaving the block released the long poll instead of waiting 30 seconds for it.
    assert time.monotonic() - started < 2
    assert await asyncio.wait_for(poll, timeout=2) == ()
    await bot.shutdown()


def test_standalone_entry_point_prints_the_base_url_the_bot_needs() -> None:
    """`python -m bot.standin` prints what TELEGRAM_API_BASE_URL should say (ending in /bot),
    serves, and stops cleanly on SIGTERM."""
    command = [sys.executable, "-m", "bot.standin", "--port", "0", "--token", TOKEN]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            url = process.stdout.readline().strip()
            me = httpx.post(f"{url}{TOKEN}/getMe", timeout=5).json()
        finally:
            process.terminate()
            process.wait(timeout=5)

    assert url.startswith("http://127.0.0.1:") and url.endswith("/bot")
    assert me["result"]["username"] == "loom_ops_bot"
    # SIGTERM is a clean stop, not a crash.
    assert process.returncode == 0
