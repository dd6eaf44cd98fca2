"""A local, in-memory stand-in for the Telegram Bot API, served over HTTP by Starlette + uvicorn.

It speaks the wire format python-telegram-bot uses (form-encoded or multipart bodies, JSON-encoded
complex values, `{"ok": ..., "result": ...}` answers, Telegram's error descriptions), keeps every
chat, message, update and Bot API call in memory, and lets tests or the sandbox page play the
user's side: inject messages and button presses, inject faults, and watch what the bot did.
A supergroup may be a forum (`add_chat(..., is_forum=True)`): its topics are opened, edited,
closed and listed like Telegram's, and a message sent to a topic must name an open one.

Not thread-safe: drive it from the event loop that serves it. Run it standalone with
`python -m bot.standin --token T [--port N]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import hashlib
import hmac
import html
import json
import logging
import math
import re
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from html.parser import HTMLParser
from http import HTTPStatus
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from agent.http_server import HttpServer
from agent.records import record

log = logging.getLogger(__name__)

JSON = dict[str, Any]

# Telegram's documented limits, counted after entity parsing.
MAX_TEXT_LENGTH = 4096
MAX_CAPTION_LENGTH = 1024
MAX_CALLBACK_DATA_BYTES = 64
MAX_DOCUMENT_BYTES = 50 * 1024 * 1024
MAX_UPDATES_PER_POLL = 100
MAX_TOPIC_NAME_LENGTH = 128
# The colours a forum topic's icon may have (createForumTopic), the first one the default.
TOPIC_ICON_COLORS = (0x6FB9F0, 0xFFD67E, 0xCB86DB, 0x8EEE98, 0xFF93B2, 0xFB6F5F)

CHAT_TYPES = frozenset({"private", "group", "supergroup"})
# An empty or never-given allowed_updates list means "all except these", as in Telegram.
OPT_IN_UPDATE_TYPES = frozenset({"chat_member", "message_reaction", "message_reaction_count"})
CHAT_ACTIONS = frozenset(
    {
        "typing",
        "upload_photo",
        "record_video",
        "upload_video",
        "record_voice",
        "upload_voice",
        "upload_document",
        "choose_sticker",
        "find_location",
        "record_video_note",
        "upload_video_note",
    }
)

_SUPERGROUP_ID_CEILING = -1_000_000_000_000
_SUBSCRIBER_BACKLOG = 1000
_BOT_COMMAND = re.compile(r"/[A-Za-z0-9_]{1,32}(?:@[A-Za-z0-9_]{3,32})?(?![A-Za-z0-9_@/])")
_COMMAND_NAME = re.compile(r"[a-z0-9_]{1,32}")

_NOT_MODIFIED = (
    "message is not modified: specified new message content and reply markup of "
    "the specified message are exactly the same as a current content and reply markup of the "
    "message"
)
_QUERY_INVALID = "query is too old and response timeout expired or query ID is invalid"
_WEBHOOK_CONFLICT = (
    "Conflict: can't use getUpdates method while webhook is active; use deleteWebhook to "
    "delete the webhook first"
)
WEBHOOK_RETRY_DELAY = 0.5
_POLL_CONFLICT = (
    "Conflict: terminated by other getUpdates request; "
    "make sure that only one bot instance is running"
)


class BotApiError(Exception):
    """A Bot API failure, answered as Telegram does: `{"ok": false, "error_code", ...}`."""

    def __init__(self, error_code: int, description: str, retry_after: int | None = None) -> None:
        super().__init__(description)
        self.error_code = error_code
        self.description = description
        self.retry_after = retry_after

    def to_json(self) -> JSON:
        """The response body Telegram sends for this error."""
        body: JSON = {"ok": False, "error_code": self.error_code, "description": self.description}
        if self.retry_after is not None:
            body["parameters"] = {"retry_after": self.retry_after}
        return body


def _bad_request(detail: str) -> BotApiError:
    return BotApiError(400, f"Bad Request: {detail}")


@record
class ApiCall:
    """One Bot API call as received: canonical method name, decoded params, monotonic time."""

    method: str
    params: JSON
    at: float


@record
class UploadedFile:
    """A file part of a multipart request: what the bot uploaded."""

    filename: str
    content: bytes
    mime_type: str

    def summary(self) -> JSON:
        """What the call log keeps of the upload (the bytes stay in the file store)."""
        return {"filename": self.filename, "mime_type": self.mime_type, "size": len(self.content)}


@dataclass
class _Fault:
    error: BotApiError
    remaining: int


@dataclass
class _Topic:
    """A forum topic: its thread id is the id of the service message that opened it."""

    thread_id: int
    name: str
    icon_color: int
    closed: bool = False


@dataclass
class _Chat:
    id: int
    type: str
    title: str | None
    next_message_id: int = 1
    is_forum: bool = False
    topics: dict[int, _Topic] = field(default_factory=dict)


@dataclass
class _Record:
    """A stored message plus what the Telegram JSON does not carry."""

    message: JSON
    edits: int = 0
    # ReplyKeyboardMarkup / ForceReply / ReplyKeyboardRemove act on the chat's input field and
    # are never echoed in Telegram's Message JSON, but a transcript still needs to show them.
    ui_markup: JSON | None = None


@dataclass
class _Query:
    chat_id: int
    message_id: int
    answer: JSON | None = None


# --- Telegram HTML ------------------------------------------------------------------------------

_SIMPLE_TAGS = {
    "b": "bold",
    "strong": "bold",
    "i": "italic",
    "em": "italic",
    "u": "underline",
    "ins": "underline",
    "s": "strikethrough",
    "strike": "strikethrough",
    "del": "strikethrough",
    "tg-spoiler": "spoiler",
    "code": "code",
    "pre": "pre",
}
_NAMED_ENTITIES = {"lt": "<", "gt": ">", "amp": "&", "quot": '"'}


def _utf16_len(text: str) -> int:
    # Telegram measures entity offsets and lengths in UTF-16 code units.
    return len(text.encode("utf-16-le")) // 2


@dataclass
class _OpenTag:
    tag: str
    entity_type: str | None
    offset: int
    extra: JSON


class _TelegramHtml(HTMLParser):
    """Turns Telegram-flavoured HTML into plain text plus MessageEntity dicts, or refuses it."""

    def __init__(self, source: str) -> None:
        # Character references are handled by hand so that a bare "&" stays text, as in Telegram.
        super().__init__(convert_charrefs=False)
        self._source = source
        self._line_starts = [0] + [m.end() for m in re.finditer("\n", source)]
        self._parts: list[str] = []
        self._length = 0
        self._open: list[_OpenTag] = []
        self.entities: list[JSON] = []

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def _fail(self, detail: str) -> BotApiError:
        return _bad_request(f"can't parse entities: {detail}")

    def _byte_offset(self, extra_chars: int = 0) -> int:
        line, column = self.getpos()
        index = self._line_starts[line - 1] + column + extra_chars
        return len(self._source[:index].encode("utf-8"))

    def _append(self, text: str) -> None:
        self._parts.append(text)
        self._length += _utf16_len(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        entity_type: str | None = _SIMPLE_TAGS.get(tag)
        extra: JSON = {}
        if tag == "span" and attributes.get("class") == "tg-spoiler":
            entity_type = "spoiler"
        elif tag == "a":
            href = attributes.get("href")
            entity_type, extra = ("text_link", {"url": href}) if href else (None, {})
        elif tag == "blockquote":
            entity_type = "expandable_blockquote" if "expandable" in attributes else "blockquote"
        elif tag == "code" and self._open and self._open[-1].tag == "pre":
            # <pre><code class="language-x"> is one pre entity carrying a language.
            language = (attributes.get("class") or "").removeprefix("language-")
            if language:
                self._open[-1].extra["language"] = language
            entity_type = None
        elif entity_type is None:
            raise self._fail(f'Unsupported start tag "{tag}" at byte offset {self._byte_offset()}')
        self._open.append(_OpenTag(tag, entity_type, self._length, extra))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        raise self._fail(f'Unsupported start tag "{tag}" at byte offset {self._byte_offset()}')

    def handle_endtag(self, tag: str) -> None:
        if not self._open:
            raise self._fail(f"Unexpected end tag at byte offset {self._byte_offset()}")
        opened = self._open.pop()
        if opened.tag != tag:
            raise self._fail(
                f"Unmatched end tag at byte offset {self._byte_offset()}, "
                f'expected "</{opened.tag}>", found "</{tag}>"'
            )
        length = self._length - opened.offset
        if opened.entity_type is not None and length > 0:
            entity = {"type": opened.entity_type, "offset": opened.offset, "length": length}
            self.entities.append(entity | opened.extra)

    def handle_data(self, data: str) -> None:
        # html.parser lets a stray "<" through as text; Telegram refuses it.
        if "<" in data:
            offset = self._byte_offset(data.index("<"))
            raise self._fail(f"Unexpected end of name token at byte offset {offset}")
        self._append(data)

    def handle_entityref(self, name: str) -> None:
        # Telegram knows only these four named entities; anything else stays literal text.
        self._append(_NAMED_ENTITIES.get(name, f"&{name};"))

    def handle_charref(self, name: str) -> None:
        self._append(html.unescape(f"&#{name};"))

    def handle_comment(self, data: str) -> None:
        raise self._fail(f"Unsupported comment at byte offset {self._byte_offset()}")

    def handle_decl(self, decl: str) -> None:
        raise self._fail(f"Unsupported declaration at byte offset {self._byte_offset()}")

    def handle_pi(self, data: str) -> None:
        raise self._fail(f"Unsupported instruction at byte offset {self._byte_offset()}")

    def unknown_decl(self, data: str) -> None:
        raise self._fail(f"Unsupported declaration at byte offset {self._byte_offset()}")

    def finish(self) -> tuple[str, list[JSON]]:
        """Flush the input and return (plain text, entities sorted as Telegram sorts them)."""
        self.close()
        if self._open:
            raise self._fail(
                f'Can\'t find end tag corresponding to start tag "{self._open[0].tag}"'
            )
        entities = sorted(self.entities, key=lambda e: (e["offset"], -e["length"]))
        return self.text, entities


def _parse_html(source: str) -> tuple[str, list[JSON]]:
    parser = _TelegramHtml(source)
    parser.feed(source)
    return parser.finish()


# --- Request parameters -------------------------------------------------------------------------

# python-telegram-bot sends every non-string value JSON-encoded ("123", "true", "[...]"), so the
# stand-in decodes by parameter name; everything not listed here stays a string.
_JSON_PARAMS = frozenset(
    {
        "reply_markup",
        "reply_parameters",
        "allowed_updates",
        "commands",
        "scope",
        "entities",
        "caption_entities",
        "link_preview_options",
    }
)
_INT_PARAMS = frozenset(
    {
        "message_id",
        "message_thread_id",
        "reply_to_message_id",
        "offset",
        "limit",
        "cache_time",
        "user_id",
        "icon_color",
    }
)
_NUMBER_PARAMS = frozenset({"timeout"})
_BOOL_PARAMS = frozenset(
    {
        "show_alert",
        "disable_notification",
        "protect_content",
        "allow_sending_without_reply",
        "drop_pending_updates",
        "disable_web_page_preview",
        "disable_content_type_detection",
        "allow_paid_broadcast",
    }
)
_BOOL_WORDS = {"true": True, "1": True, "false": False, "0": False}


def _decode_value(name: str, value: Any) -> Any:
    """Best-effort decoding of one wire value; what cannot be decoded is kept for validation."""
    if not isinstance(value, str):
        return value
    try:
        if name in _JSON_PARAMS:
            return json.loads(value)
        if name in _INT_PARAMS or name == "chat_id":
            return int(value)
        if name in _NUMBER_PARAMS:
            number = float(value)
            if not math.isfinite(number):
                return value
            return int(number) if number.is_integer() else number
    except ValueError:
        return value
    if name in _BOOL_PARAMS:
        return _BOOL_WORDS.get(value.lower(), value)
    return value


class _Params:
    """One call's decoded parameters, with getters that fail the way the Bot API does."""

    def __init__(self, values: Mapping[str, Any], files: Mapping[str, UploadedFile]) -> None:
        self.values = dict(values)
        self.files = dict(files)

    def get_int(self, name: str) -> int | None:
        value = self.values.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad_request(f'field "{name}" must be an Integer')
        return value

    def get_number(self, name: str) -> float | None:
        value = self.values.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _bad_request(f'field "{name}" must be a Number')
        return float(value)

    def get_str(self, name: str) -> str | None:
        value = self.values.get(name)
        if value is None:
            return None
        if not isinstance(value, str):
            raise _bad_request(f'field "{name}" must be a String')
        return value

    def get_bool(self, name: str) -> bool:
        value = self.values.get(name, False)
        if not isinstance(value, bool):
            raise _bad_request(f'field "{name}" must be a Boolean')
        return value

    def get_object(self, name: str, error: str | None = None) -> JSON | None:
        value = self.values.get(name)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise _bad_request(error or f"can't parse {name} JSON object")
        return value

    def get_list(self, name: str) -> list[Any] | None:
        value = self.values.get(name)
        if value is None:
            return None
        if not isinstance(value, list):
            raise _bad_request(f"can't parse {name} JSON array")
        return value


# --- The stand-in -------------------------------------------------------------------------------


class _ChangeSignal:
    """Wakes every waiter on each state change; callable from plain (non-async) code.

    An asyncio.Condition would need its lock held to notify, which synchronous methods such as
    inject_message cannot take; swapping a fresh Event per change gives the same wake-all.
    """

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        """Return after the next change, or after `timeout` seconds, whichever comes first."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout)


class BotApiStandIn:
    """All Bot API state in memory, the Bot API methods over it, and a Python API for the user side.

    `call_method` runs one Bot API method; `build_app` serves it over HTTP.
    """

    def __init__(
        self,
        token: str,
        bot_id: int = 7000000001,
        bot_username: str = "loom_ops_bot",
        *,
        bot_name: str | None = None,
        first_message_id: int = 1,
    ) -> None:
        self.token = token
        # Telegram never reuses a chat's message ids; a stand-in started again (the sandbox's)
        # can start its chats past the ids it handed out before.
        self._first_message_id = first_message_id
        self.bot_id = bot_id
        self.bot_username = bot_username
        default_name = bot_username.removesuffix("_bot").replace("_", " ").title()
        self.bot_name = bot_name or default_name or bot_username
        self._users: dict[int, JSON] = {}
        self._chats: dict[int, _Chat] = {}
        self._messages: dict[int, dict[int, _Record]] = {}
        self._files: dict[str, UploadedFile] = {}
        self._updates: list[JSON] = []
        self._next_update_id = 1
        # Test control: getUpdates' offsets stop confirming (see _get_updates).
        self.hold_confirmations = False
        # Test hook: called with the offset of a getUpdates that confirmed updates, before it
        # answers, and after a webhook delivery was answered 2xx (a crash test kills the bot
        # there: right after a confirmation).
        self.on_confirm: Callable[[int], None] | None = None
        self.webhook_url: str | None = None
        self._webhook_secret: str | None = None
        self._webhook_task: asyncio.Task[None] | None = None
        # Test hook: called with every Bot API call before it runs (after it is logged); a
        # BotApiError it raises fails the call (a crash test kills the bot there).
        self.on_call: Callable[[ApiCall], None] | None = None
        # (update_id, HTTP status or 0 for no answer) of every webhook delivery attempt.
        self.webhook_deliveries: list[tuple[int, int]] = []
        self._allowed_updates: list[str] | None = None
        self._poll_generation = 0
        self._long_polls_released = False
        self._commands: dict[tuple[str, str], list[JSON]] = {}
        self._queries: dict[str, _Query] = {}
        self._calls: list[ApiCall] = []
        self._faults: dict[str, deque[_Fault]] = {}
        self._subscribers: list[asyncio.Queue[JSON]] = []
        self._changes = _ChangeSignal()
        self._methods: dict[str, tuple[str, Callable[[_Params], Any]]] = {
            name.lower(): (name, handler)
            for name, handler in {
                "getMe": self._get_me,
                "setWebhook": self._set_webhook,
                "deleteWebhook": self._delete_webhook,
                "getWebhookInfo": self._get_webhook_info,
                "setMyCommands": self._set_my_commands,
                "getMyCommands": self._get_my_commands,
                "deleteMyCommands": self._delete_my_commands,
                "getUpdates": self._get_updates,
                "getChat": self._get_chat,
                "sendMessage": self._send_message,
                "editMessageText": self._edit_message_text,
                "editMessageReplyMarkup": self._edit_message_reply_markup,
                "answerCallbackQuery": self._answer_callback_query,
                "sendDocument": self._send_document,
                "sendChatAction": self._send_chat_action,
                "deleteMessage": self._delete_message,
                "createForumTopic": self._create_forum_topic,
                "editForumTopic": self._edit_forum_topic,
                "closeForumTopic": self._close_forum_topic,
                "reopenForumTopic": self._reopen_forum_topic,
            }.items()
        }

    # --- Python API: the user's side -------------------------------------------------------------

    @property
    def bot_user(self) -> JSON:
        """The bot as a Telegram User object (the `from` of every bot-sent message)."""
        return {
            "id": self.bot_id,
            "is_bot": True,
            "first_name": self.bot_name,
            "username": self.bot_username,
        }

    def add_user(self, user_id: int, first_name: str, username: str | None = None) -> JSON:
        """Create or update a user; returns its Telegram User JSON."""
        user: JSON = {"id": user_id, "is_bot": False, "first_name": first_name}
        if username:
            user["username"] = username
        self._users[user_id] = user
        self._changed()
        return dict(user)

    def add_chat(
        self, chat_id: int, type: str, title: str | None = None, *, is_forum: bool = False
    ) -> JSON:
        """Create or update a chat ("private", "group" or "supergroup"; a supergroup may be a
        forum, whose messages live in topics); returns its Chat JSON."""
        if type not in CHAT_TYPES:
            raise ValueError(f"chat type must be one of {sorted(CHAT_TYPES)}, not {type!r}")
        if type == "private" and chat_id <= 0:
            raise ValueError("a private chat's id is its user's id, a positive number")
        if type != "private" and chat_id >= 0:
            raise ValueError("group and supergroup chat ids are negative")
        if is_forum and type != "supergroup":
            raise ValueError("only a supergroup can be a forum")
        chat = self._chats.get(chat_id)
        if chat is None:
            chat = self._chats[chat_id] = _Chat(chat_id, type, title, self._first_message_id)
            self._messages[chat_id] = {}
        else:
            chat.type, chat.title = type, title
        chat.is_forum = is_forum
        self._changed()
        return self._chat_json(chat_id)

    def open_topic(self, chat_id: int, name: str, user_id: int) -> int:
        """A person opens a topic in a forum chat; returns its message_thread_id."""
        chat = self._chats.get(chat_id)
        if chat is None or not chat.is_forum:
            raise ValueError(f"chat {chat_id} is not a forum")
        return self._create_topic(chat, name, TOPIC_ICON_COLORS[0], self._ensure_user(user_id))

    def close_topic(self, chat_id: int, thread_id: int, user_id: int) -> None:
        """A person closes a forum topic: nobody without the right to manage topics (the
        bot included, here) may write in it until it is reopened."""
        chat = self._chats.get(chat_id)
        topic = chat.topics.get(thread_id) if chat else None
        if chat is None or topic is None or topic.closed:
            raise ValueError(f"chat {chat_id} has no open topic {thread_id}")
        topic.closed = True
        person = self._ensure_user(user_id)
        self._topic_service_message(chat, topic, "forum_topic_closed", {}, person)

    def topics(self, chat_id: int) -> list[JSON]:
        """A forum chat's topics in creation order: thread id, name, icon colour, closed."""
        chat = self._chats.get(chat_id)
        return [
            {
                "message_thread_id": topic.thread_id,
                "name": topic.name,
                "icon_color": topic.icon_color,
                "is_closed": topic.closed,
            }
            for topic in (chat.topics.values() if chat else ())
        ]

    def chats(self) -> list[JSON]:
        """Every known chat as Telegram Chat JSON, in creation order."""
        return [self._chat_json(chat_id) for chat_id in self._chats]

    def inject_message(
        self,
        chat_id: int,
        user_id: int,
        text: str,
        *,
        thread_id: int | None = None,
        reply_to_message_id: int | None = None,
    ) -> JSON:
        """Store a user's text message in the chat and queue it as a `message` update.

        Unknown users and chats are created on the fly (positive ids are private chats).
        """
        if not isinstance(text, str) or not text.strip():
            raise ValueError("message text is empty")
        if _utf16_len(text) > MAX_TEXT_LENGTH:
            raise ValueError("message is too long")
        known = self._chats.get(chat_id)
        chat_type = known.type if known else _default_chat_type(chat_id)
        if chat_type == "private" and chat_id != user_id:
            raise ValueError(f"only user {chat_id} can write in private chat {chat_id}")
        reply_to = None
        if reply_to_message_id is not None:
            reply_to = self._messages.get(chat_id, {}).get(reply_to_message_id)
            if reply_to is None:
                raise ValueError(f"message {reply_to_message_id} not found in chat {chat_id}")
        user = self._ensure_user(user_id)
        chat = self._ensure_chat(chat_id)
        if chat.is_forum and thread_id is not None:
            topic = chat.topics.get(thread_id)
            if topic is None or topic.closed:
                raise ValueError(f"chat {chat_id} has no open topic {thread_id}")
        message = self._new_message(chat, user, thread_id, reply_to)
        message["text"] = text
        command = _BOT_COMMAND.match(text)
        if command:
            # python-telegram-bot's CommandHandler only looks at a bot_command entity at offset 0.
            length = _utf16_len(command.group())
            message["entities"] = [{"type": "bot_command", "offset": 0, "length": length}]
        record = self._store(chat, message)
        self._queue_update("message", copy.deepcopy(message))
        return self._record_json(record)

    def inject_update(self, kind: str, payload: JSON) -> None:
        """Queue an update as given (`kind`: `message`, `channel_post`, …), for updates the
        other inject methods do not build, such as one without a sender; nothing is stored."""
        self._queue_update(kind, copy.deepcopy(payload))

    def inject_callback(
        self, chat_id: int, message_id: int, user_id: int, data: str, *, require_button: bool = True
    ) -> str:
        """Press an inline button: queue a `callback_query` update; returns the query id.

        Refuses (ValueError) an unknown message and, unless `require_button` is False, data
        that no button of the message's current keyboard carries, since no client could send it.
        """
        record = self._messages.get(chat_id, {}).get(message_id)
        if record is None:
            raise ValueError(f"message {message_id} not found in chat {chat_id}")
        chat = self._chats.get(chat_id)
        if chat is not None and chat.type == "private" and chat_id != user_id:
            raise ValueError(f"only user {chat_id} can tap buttons in private chat {chat_id}")
        if require_button and data not in _callback_data(record.message.get("reply_markup")):
            raise ValueError(f"message {message_id} has no inline button with data {data!r}")
        user = self._ensure_user(user_id)
        query_id = f"{self.bot_id}{len(self._queries) + 1:08d}"
        self._queries[query_id] = _Query(chat_id, message_id)
        digest = hashlib.sha256(f"{self.bot_id}:{chat_id}".encode()).hexdigest()
        self._queue_update(
            "callback_query",
            {
                "id": query_id,
                "from": dict(user),
                "message": copy.deepcopy(record.message),
                "chat_instance": str(int(digest[:15], 16)),
                "data": data,
            },
        )
        return query_id

    # --- Python API: what the bot did ------------------------------------------------------------

    def messages(self, chat_id: int) -> list[JSON]:
        """The chat's current messages in order, user's and bot's, each with an `edits` count."""
        return [self._record_json(record) for record in self._messages.get(chat_id, {}).values()]

    def document_bytes(self, file_id: str) -> bytes:
        """The bytes of a document the bot sent; KeyError for an unknown file_id."""
        try:
            return self._files[file_id].content
        except KeyError:
            raise KeyError(f"no document with file_id {file_id!r}") from None

    def has_callback_query(self, query_id: str) -> bool:
        """Whether `query_id` was issued by inject_callback."""
        return query_id in self._queries

    def callback_answer(self, query_id: str) -> JSON | None:
        """How the bot answered a callback query, or None while it has not."""
        query = self._queries.get(query_id)
        return dict(query.answer) if query and query.answer else None

    def commands(self, scope: JSON | None = None, language_code: str = "") -> list[JSON]:
        """The command list the bot registered for a scope (default scope when None)."""
        return copy.deepcopy(self._commands.get(_command_key(scope, language_code), []))

    def calls(self, method: str | None = None) -> list[ApiCall]:
        """Every Bot API call so far, optionally only those of one method (case-insensitive)."""
        if method is None:
            return list(self._calls)
        return [call for call in self._calls if call.method.lower() == method.lower()]

    def fail_next(
        self,
        method: str,
        error_code: int = 429,
        retry_after: int | None = 1,
        description: str | None = None,
        count: int = 1,
    ) -> None:
        """Make the next `count` calls of `method` fail with `error_code` (flood control default).

        A 429 carries `retry_after`, which python-telegram-bot raises as RetryAfter.
        """
        if error_code < 400:
            raise ValueError("error_code must be an HTTP error status (400 or more)")
        if count < 1:
            raise ValueError("count must be at least 1")
        if retry_after is not None and retry_after < 0:
            raise ValueError("retry_after cannot be negative")
        flood = error_code == 429
        if description is None:
            if flood:
                description = "Too Many Requests"
                if retry_after is not None:
                    description += f": retry after {retry_after}"
            else:
                try:
                    description = HTTPStatus(error_code).phrase
                except ValueError:
                    description = "Error"
        error = BotApiError(error_code, description, retry_after if flood else None)
        self._faults.setdefault(method.lower(), deque()).append(_Fault(error, count))

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until `predicate()` holds, re-checking after every state change."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                recent = ", ".join(call.method for call in self._calls[-5:]) or "none"
                raise TimeoutError(
                    f"stand-in condition {getattr(predicate, '__qualname__', predicate)!s} "
                    f"still false after {timeout:g}s (last Bot API calls: {recent})"
                )
            await self._changes.wait(remaining)

    def subscribe(self) -> asyncio.Queue[JSON]:
        """A queue receiving a small dict for every new, edited or deleted message, callback
        answer and chat action; a subscriber that falls far behind loses the oldest events."""
        queue: asyncio.Queue[JSON] = asyncio.Queue(maxsize=_SUBSCRIBER_BACKLOG)
        self._subscribers.append(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[JSON]) -> None:
        """Stop delivering events to a queue from `subscribe`."""
        with contextlib.suppress(ValueError):
            self._subscribers.remove(queue)

    def release_long_polls(self) -> None:
        """Make waiting and future getUpdates calls answer at once (so a server can stop)."""
        self._long_polls_released = True
        self._changed()

    def resume_long_polls(self) -> None:
        """Undo `release_long_polls`: getUpdates waits for its timeout again."""
        self._long_polls_released = False

    # --- Bot API entry point ---------------------------------------------------------------------

    async def call_method(
        self,
        method: str,
        params: Mapping[str, Any],
        files: Mapping[str, UploadedFile] | None = None,
    ) -> Any:
        """Run one Bot API method (token already checked); returns its result or raises
        BotApiError. Every call is logged, including failed and unknown ones."""
        files = files or {}
        known = self._methods.get(method.lower())
        name = known[0] if known else method
        decoded = {key: _decode_value(key, value) for key, value in params.items()}
        logged = decoded | {key: upload.summary() for key, upload in files.items()}
        call = ApiCall(name, logged, time.monotonic())
        self._calls.append(call)
        self._changed()
        if self.on_call is not None:
            self.on_call(call)
        self._raise_injected_fault(method.lower())
        if known is None:
            raise BotApiError(404, "Not Found")
        result = known[1](_Params(decoded, files))
        if asyncio.iscoroutine(result):
            result = await result
        return result

    def _raise_injected_fault(self, method_key: str) -> None:
        faults = self._faults.get(method_key)
        if not faults:
            return
        fault = faults[0]
        fault.remaining -= 1
        if fault.remaining == 0:
            faults.popleft()
        raise fault.error

    # --- Bot API methods -------------------------------------------------------------------------

    def _get_me(self, p: _Params) -> JSON:
        return self.bot_user | {
            "can_join_groups": True,
            "can_read_all_group_messages": False,
            "supports_inline_queries": False,
            "can_connect_to_business": False,
            "has_main_web_app": False,
        }

    def _set_webhook(self, p: _Params) -> bool:
        url = p.get_str("url") or ""
        if not url:
            return self._delete_webhook(p)
        if not re.match(r"^https?://[^\s/]+", url):
            raise _bad_request("bad webhook: An HTTPS URL must be provided for webhook")
        secret = p.get_str("secret_token")
        if secret is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,256}", secret):
            raise _bad_request("bad webhook: secret token contains unallowed characters")
        allowed = p.get_list("allowed_updates")
        if allowed is not None:
            self._allowed_updates = [str(kind) for kind in allowed] or None
        if p.get_bool("drop_pending_updates"):
            self._updates.clear()
        self.webhook_url, self._webhook_secret = url, secret
        if self._webhook_task is None or self._webhook_task.done():
            self._webhook_task = asyncio.get_running_loop().create_task(self._push_updates())
        self._changed()
        return True

    def _delete_webhook(self, p: _Params) -> bool:
        if p.get_bool("drop_pending_updates"):
            self._updates.clear()
        self.webhook_url = None
        if self._webhook_task is not None:
            self._webhook_task.cancel()
            self._webhook_task = None
        self._changed()
        return True

    def _get_webhook_info(self, p: _Params) -> JSON:
        return {
            "url": self.webhook_url or "",
            "has_custom_certificate": False,
            "pending_update_count": len(self._updates),
        }

    async def stop_pushing(self) -> None:
        """Stop the webhook delivery task (the webhook stays set)."""
        task, self._webhook_task = self._webhook_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _push_updates(self) -> None:
        """Webhook mode: POST each update to the URL, oldest first, until one is answered 2xx
        (Telegram retries a refused or failed delivery, so the update stays queued)."""
        async with httpx.AsyncClient(timeout=10) as client:
            while self.webhook_url is not None:
                batch = self._deliverable_updates(1)
                if not batch:
                    await self._changes.wait(1.0)
                    continue
                update = batch[0]
                headers = {}
                if self._webhook_secret is not None:
                    headers["X-Telegram-Bot-Api-Secret-Token"] = self._webhook_secret
                try:
                    response = await client.post(self.webhook_url, json=update, headers=headers)
                    status = response.status_code
                except httpx.HTTPError as exc:
                    status = 0
                    log.info("webhook delivery of update %s failed: %s", update["update_id"], exc)
                self.webhook_deliveries.append((update["update_id"], status))
                if 200 <= status < 300:
                    self._confirm_updates(update["update_id"] + 1)
                    if self.on_confirm is not None:
                        self.on_confirm(update["update_id"] + 1)
                    self._changed()
                else:
                    await asyncio.sleep(WEBHOOK_RETRY_DELAY)

    def _set_my_commands(self, p: _Params) -> bool:
        commands = p.get_list("commands")
        if commands is None:
            raise _bad_request('parameter "commands" is required')
        if len(commands) > 100:
            raise _bad_request("too many commands")
        for command in commands:
            if not isinstance(command, dict):
                raise _bad_request("can't parse BotCommand")
            name, description = command.get("command"), command.get("description")
            if not isinstance(name, str) or not _COMMAND_NAME.fullmatch(name):
                raise _bad_request("BOT_COMMAND_INVALID")
            if not isinstance(description, str) or not 1 <= len(description) <= 256:
                raise _bad_request("command description is invalid")
        key = _command_key(p.get_object("scope"), p.get_str("language_code") or "")
        self._commands[key] = [
            {"command": c["command"], "description": c["description"]} for c in commands
        ]
        self._changed()
        return True

    def _get_my_commands(self, p: _Params) -> list[JSON]:
        return self.commands(p.get_object("scope"), p.get_str("language_code") or "")

    def _delete_my_commands(self, p: _Params) -> bool:
        self._commands.pop(
            _command_key(p.get_object("scope"), p.get_str("language_code") or ""), None
        )
        self._changed()
        return True

    async def _get_updates(self, p: _Params) -> list[JSON]:
        offset = p.get_int("offset")
        limit = min(max(p.get_int("limit") or MAX_UPDATES_PER_POLL, 1), MAX_UPDATES_PER_POLL)
        timeout = max(p.get_number("timeout") or 0.0, 0.0)
        allowed = p.get_list("allowed_updates")
        if allowed is not None:
            if not all(isinstance(kind, str) for kind in allowed):
                raise _bad_request("can't parse allowed_updates JSON array")
            # Telegram remembers the last list given; an empty one restores the default.
            self._allowed_updates = list(allowed) or None
        if self.webhook_url is not None:
            raise BotApiError(409, _WEBHOOK_CONFLICT)
        since = 0
        if self.hold_confirmations:
            # Fault injection: the confirmation is "lost" (the poller died before it reached
            # Telegram), so whoever polls next without an offset gets these updates again.
            since = offset if offset is not None and offset > 0 else 0
        else:
            pending = len(self._updates)
            self._confirm_updates(offset)
            if self.on_confirm is not None and offset is not None and len(self._updates) < pending:
                self.on_confirm(offset)
        return await self._long_poll(limit, timeout, since)

    async def _long_poll(self, limit: int, timeout: float, since: int) -> list[JSON]:
        # A newer getUpdates ends an older one still waiting, as Telegram does (409 Conflict).
        self._poll_generation += 1
        generation = self._poll_generation
        self._changed()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if generation != self._poll_generation:
                raise BotApiError(409, _POLL_CONFLICT)
            batch = self._deliverable_updates(limit, since)
            remaining = deadline - loop.time()
            if batch or remaining <= 0 or self._long_polls_released:
                return batch
            await self._changes.wait(remaining)

    def _get_chat(self, p: _Params) -> JSON:
        """A known chat (its title, for a group); 400 "chat not found" for any other."""
        chat = self._target_chat(p)
        # ChatFullInfo: Telegram always sends these three as well.
        return self._chat_json(chat.id) | {
            "accent_color_id": 0,
            "max_reaction_count": 11,
            "accepted_gift_types": {
                "unlimited_gifts": False,
                "limited_gifts": False,
                "unique_gifts": False,
                "premium_subscription": False,
                "gifts_from_channels": False,
            },
        }

    def _send_message(self, p: _Params) -> JSON:
        chat = self._target_chat(p)
        text, entities = _format_text(
            p.get_str("text") or "",
            p.get_str("parse_mode"),
            p.get_list("entities"),
            limit=MAX_TEXT_LENGTH,
            empty="message text is empty",
            too_long="message is too long",
        )
        inline_markup, ui_markup = _reply_markup(p)
        reply_to = self._reply_target(chat, p)
        message = self._new_message(chat, self.bot_user, self._thread_to_send(chat, p), reply_to)
        message["text"] = text
        if entities:
            message["entities"] = entities
        if inline_markup:
            message["reply_markup"] = inline_markup
        return self._record_json(self._store(chat, message, ui_markup), with_extras=False)

    def _send_document(self, p: _Params) -> JSON:
        chat = self._target_chat(p)
        upload = self._uploaded_document(p)
        caption, caption_entities = _format_text(
            p.get_str("caption") or "",
            p.get_str("parse_mode"),
            p.get_list("caption_entities"),
            limit=MAX_CAPTION_LENGTH,
            empty=None,
            too_long="message caption is too long",
        )
        inline_markup, ui_markup = _reply_markup(p)
        reply_to = self._reply_target(chat, p)
        serial = len(self._files) + 1
        file_id = f"BQACAgIAAxkBAAI{serial:06d}{hashlib.sha256(upload.content).hexdigest()[:16]}"
        self._files[file_id] = upload
        message = self._new_message(chat, self.bot_user, self._thread_to_send(chat, p), reply_to)
        message["document"] = {
            "file_id": file_id,
            "file_unique_id": f"AgAD{serial:06d}",
            "file_name": upload.filename,
            "mime_type": upload.mime_type,
            "file_size": len(upload.content),
        }
        if caption:
            message["caption"] = caption
        if caption_entities:
            message["caption_entities"] = caption_entities
        if inline_markup:
            message["reply_markup"] = inline_markup
        return self._record_json(self._store(chat, message, ui_markup), with_extras=False)

    def _edit_message_text(self, p: _Params) -> JSON:
        record = self._editable_record(p)
        if "text" not in record.message:
            raise _bad_request("there is no text in the message to edit")
        text, entities = _format_text(
            p.get_str("text") or "",
            p.get_str("parse_mode"),
            p.get_list("entities"),
            limit=MAX_TEXT_LENGTH,
            empty="message text is empty",
            too_long="message is too long",
        )
        markup = _inline_markup_for_edit(p)
        message = record.message
        unchanged = (
            message["text"] == text
            and message.get("entities", []) == entities
            and message.get("reply_markup") == markup
        )
        if unchanged:
            raise _bad_request(_NOT_MODIFIED)
        message["text"] = text
        _set_or_drop(message, "entities", entities)
        # Like Telegram: an edit that carries no reply_markup removes the keyboard.
        _set_or_drop(message, "reply_markup", markup)
        return self._record_edit(record)

    def _edit_message_reply_markup(self, p: _Params) -> JSON:
        record = self._editable_record(p)
        markup = _inline_markup_for_edit(p)
        if record.message.get("reply_markup") == markup:
            raise _bad_request(_NOT_MODIFIED)
        _set_or_drop(record.message, "reply_markup", markup)
        return self._record_edit(record)

    def _answer_callback_query(self, p: _Params) -> bool:
        query_id = p.get_str("callback_query_id")
        query = self._queries.get(query_id or "")
        if query_id is None or query is None or query.answer is not None:
            raise _bad_request(_QUERY_INVALID)
        query.answer = {
            "callback_query_id": query_id,
            "text": p.get_str("text"),
            "show_alert": p.get_bool("show_alert"),
            "url": p.get_str("url"),
            "cache_time": p.get_int("cache_time") or 0,
        }
        self._publish({"type": "callback_answer", **query.answer})
        self._changed()
        return True

    def _send_chat_action(self, p: _Params) -> bool:
        chat = self._target_chat(p)
        action = p.get_str("action")
        if action not in CHAT_ACTIONS:
            raise _bad_request("wrong parameter action in request")
        self._publish({"type": "chat_action", "chat_id": chat.id, "action": action})
        return True

    def _delete_message(self, p: _Params) -> bool:
        chat = self._target_chat(p)
        message_id = p.get_int("message_id")
        if message_id is None:
            raise _bad_request("message identifier is not specified")
        if self._messages[chat.id].pop(message_id, None) is None:
            raise _bad_request("message to delete not found")
        self._publish({"type": "deleted_message", "chat_id": chat.id, "message_id": message_id})
        self._changed()
        return True

    def _create_forum_topic(self, p: _Params) -> JSON:
        chat = self._forum(p)
        name = p.get_str("name") or ""
        if not 1 <= len(name) <= MAX_TOPIC_NAME_LENGTH:
            raise _bad_request("TOPIC_NAME_INVALID")
        color = p.get_int("icon_color")
        if color is None:
            color = TOPIC_ICON_COLORS[0]
        if color not in TOPIC_ICON_COLORS:
            raise _bad_request("TOPIC_ICON_COLOR_INVALID")
        thread_id = self._create_topic(chat, name, color, self.bot_user)
        return {"message_thread_id": thread_id, "name": name, "icon_color": color}

    def _edit_forum_topic(self, p: _Params) -> bool:
        chat = self._forum(p)
        topic = self._topic(chat, p)
        name = p.get_str("name")
        if name is None or name == topic.name:
            raise _bad_request("TOPIC_NOT_MODIFIED")
        if len(name) > MAX_TOPIC_NAME_LENGTH:
            raise _bad_request("TOPIC_NAME_INVALID")
        topic.name = name
        self._topic_service_message(chat, topic, "forum_topic_edited", {"name": name})
        return True

    def _close_forum_topic(self, p: _Params) -> bool:
        return self._set_topic_closed(p, True)

    def _reopen_forum_topic(self, p: _Params) -> bool:
        return self._set_topic_closed(p, False)

    def _set_topic_closed(self, p: _Params, closed: bool) -> bool:
        chat = self._forum(p)
        topic = self._topic(chat, p)
        if topic.closed == closed:
            raise _bad_request("TOPIC_NOT_MODIFIED")
        topic.closed = closed
        kind = "forum_topic_closed" if closed else "forum_topic_reopened"
        self._topic_service_message(chat, topic, kind, {})
        return True

    # --- Internals -------------------------------------------------------------------------------

    def _forum(self, p: _Params) -> _Chat:
        chat = self._target_chat(p)
        if not chat.is_forum:
            raise _bad_request("the chat is not a forum")
        return chat

    def _topic(self, chat: _Chat, p: _Params) -> _Topic:
        topic = chat.topics.get(p.get_int("message_thread_id") or 0)
        if topic is None:
            raise _bad_request("message thread not found")
        return topic

    def _create_topic(self, chat: _Chat, name: str, color: int, sender: JSON) -> int:
        """Open a topic: a service message whose id becomes the topic's thread id."""
        thread_id = chat.next_message_id
        topic = chat.topics[thread_id] = _Topic(thread_id, name, color)
        created = {"name": name, "icon_color": color}
        self._topic_service_message(chat, topic, "forum_topic_created", created, sender)
        return thread_id

    def _topic_service_message(
        self, chat: _Chat, topic: _Topic, kind: str, body: JSON, sender: JSON | None = None
    ) -> None:
        message = self._new_message(chat, sender or self.bot_user, topic.thread_id, None)
        message[kind] = body
        self._store(chat, message)

    def _thread_to_send(self, chat: _Chat, p: _Params) -> int | None:
        """The message_thread_id a bot message goes to: in a forum, an open topic's (a closed
        one refuses it, as Telegram refuses a member who may not manage topics)."""
        thread_id = p.get_int("message_thread_id")
        if thread_id is None or not chat.is_forum:
            return thread_id
        topic = chat.topics.get(thread_id)
        if topic is None:
            raise _bad_request("message thread not found")
        if topic.closed:
            raise _bad_request("TOPIC_CLOSED")
        return thread_id

    def _changed(self) -> None:
        self._changes.notify()

    def _publish(self, event: JSON) -> None:
        for queue in self._subscribers:
            if queue.full():
                # A stalled observer must not grow memory without bound: drop its oldest event.
                queue.get_nowait()
            queue.put_nowait(event)

    def _ensure_user(self, user_id: int) -> JSON:
        if user_id not in self._users:
            self.add_user(user_id, f"User {user_id}")
        return self._users[user_id]

    def _ensure_chat(self, chat_id: int) -> _Chat:
        if chat_id not in self._chats:
            self.add_chat(chat_id, _default_chat_type(chat_id))
        return self._chats[chat_id]

    def _chat_json(self, chat_id: int) -> JSON:
        chat = self._chats[chat_id]
        if chat.type != "private":
            title = chat.title or f"Chat {chat.id}"
            group: JSON = {"id": chat.id, "type": chat.type, "title": title}
            if chat.is_forum:
                group["is_forum"] = True
            return group
        user = self._users.get(chat.id, {})
        result: JSON = {
            "id": chat.id,
            "type": "private",
            "first_name": user.get("first_name") or chat.title or f"User {chat.id}",
        }
        if user.get("username"):
            result["username"] = user["username"]
        return result

    def _new_message(
        self, chat: _Chat, sender: JSON, thread_id: int | None, reply_to: _Record | None
    ) -> JSON:
        message: JSON = {
            "message_id": chat.next_message_id,
            "from": dict(sender),
            "chat": self._chat_json(chat.id),
            "date": int(time.time()),
        }
        chat.next_message_id += 1
        if thread_id is not None:
            message["message_thread_id"] = thread_id
            message["is_topic_message"] = True
        if reply_to is not None:
            # Telegram nests one level only: the replied-to message has no reply_to_message.
            replied = copy.deepcopy(reply_to.message)
            replied.pop("reply_to_message", None)
            message["reply_to_message"] = replied
        return message

    def _store(self, chat: _Chat, message: JSON, ui_markup: JSON | None = None) -> _Record:
        record = _Record(message, ui_markup=ui_markup)
        self._messages[chat.id][message["message_id"]] = record
        self._publish({"type": "message", "chat_id": chat.id, "message": self._record_json(record)})
        self._changed()
        return record

    def _record_edit(self, record: _Record) -> JSON:
        record.edits += 1
        record.message["edit_date"] = int(time.time())
        chat_id = record.message["chat"]["id"]
        self._publish(
            {"type": "edited_message", "chat_id": chat_id, "message": self._record_json(record)}
        )
        self._changed()
        return self._record_json(record, with_extras=False)

    def _record_json(self, record: _Record, *, with_extras: bool = True) -> JSON:
        message = copy.deepcopy(record.message)
        if with_extras:
            message["edits"] = record.edits
            if record.ui_markup is not None:
                message["ui_markup"] = copy.deepcopy(record.ui_markup)
        return message

    def _queue_update(self, kind: str, payload: JSON) -> None:
        self._updates.append({"update_id": self._next_update_id, kind: payload})
        self._next_update_id += 1
        self._changed()

    def _confirm_updates(self, offset: int | None) -> None:
        if offset is None or offset == 0:
            return
        if offset < 0:
            # A negative offset keeps only the last -offset updates and forgets the rest.
            del self._updates[: max(len(self._updates) + offset, 0)]
        else:
            self._updates = [u for u in self._updates if u["update_id"] >= offset]

    def _deliverable_updates(self, limit: int, since: int = 0) -> list[JSON]:
        allowed = self._allowed_updates

        def wanted(update: JSON) -> bool:
            kind = next(key for key in update if key != "update_id")
            return kind in allowed if allowed is not None else kind not in OPT_IN_UPDATE_TYPES

        # Telegram never produces updates the bot did not ask for, so drop them for good.
        self._updates = [update for update in self._updates if wanted(update)]
        batch = [update for update in self._updates if update["update_id"] >= since]
        return copy.deepcopy(batch[:limit])

    def _target_chat(self, p: _Params) -> _Chat:
        raw = p.values.get("chat_id")
        if raw is None or raw == "":
            raise _bad_request("chat_id is empty")
        chat = self._chats.get(raw) if isinstance(raw, int) and not isinstance(raw, bool) else None
        if chat is None:
            # The bot can only write where a user (or add_chat) introduced it, as on Telegram.
            raise _bad_request("chat not found")
        return chat

    def _reply_target(self, chat: _Chat, p: _Params) -> _Record | None:
        parameters = p.get_object("reply_parameters")
        if parameters is not None:
            message_id = parameters.get("message_id")
            allow_missing = bool(parameters.get("allow_sending_without_reply"))
            if parameters.get("chat_id") not in (None, chat.id):
                raise _bad_request("message to be replied not found")
        else:
            message_id = p.get_int("reply_to_message_id")
            allow_missing = p.get_bool("allow_sending_without_reply")
        if message_id is None:
            return None
        record = self._messages[chat.id].get(message_id) if isinstance(message_id, int) else None
        if record is None and not allow_missing:
            raise _bad_request("message to be replied not found")
        return record

    def _editable_record(self, p: _Params) -> _Record:
        if p.get_str("inline_message_id"):
            raise _bad_request("inline messages are not supported by the stand-in")
        chat = self._target_chat(p)
        message_id = p.get_int("message_id")
        if message_id is None:
            raise _bad_request("message identifier is not specified")
        record = self._messages[chat.id].get(message_id)
        if record is None:
            raise _bad_request("message to edit not found")
        if record.message["from"]["id"] != self.bot_id:
            raise _bad_request("message can't be edited")
        return record

    def _uploaded_document(self, p: _Params) -> UploadedFile:
        upload = p.files.get("document")
        reference = p.values.get("document")
        if upload is None and isinstance(reference, str):
            if reference.startswith("attach://"):
                upload = p.files.get(reference.removeprefix("attach://"))
            elif reference in self._files:
                # Re-sending by file_id, as Telegram allows.
                upload = self._files[reference]
        if upload is None:
            if reference is None:
                raise _bad_request("there is no document in the request")
            raise _bad_request("wrong file identifier/HTTP URL specified")
        if not upload.content:
            raise _bad_request("file must be non-empty")
        if len(upload.content) > MAX_DOCUMENT_BYTES:
            raise BotApiError(413, "Request Entity Too Large")
        return upload


def _default_chat_type(chat_id: int) -> str:
    # Telegram's id ranges: users (and their private chats) are positive, supergroups start
    # at -100_0000000000, basic groups are the other negative ids.
    if chat_id > 0:
        return "private"
    return "supergroup" if chat_id <= _SUPERGROUP_ID_CEILING else "group"


def _command_key(scope: JSON | None, language_code: str) -> tuple[str, str]:
    scope = scope or {"type": "default"}
    return json.dumps(scope, sort_keys=True), language_code


def _set_or_drop(message: JSON, key: str, value: Any) -> None:
    if value:
        message[key] = value
    else:
        message.pop(key, None)


def _callback_data(markup: JSON | None) -> set[str]:
    rows = (markup or {}).get("inline_keyboard", [])
    return {button["callback_data"] for row in rows for button in row if "callback_data" in button}


def _format_text(
    source: str,
    parse_mode: str | None,
    explicit_entities: list[Any] | None,
    *,
    limit: int,
    empty: str | None,
    too_long: str,
) -> tuple[str, list[JSON]]:
    """Apply parse_mode like Telegram: returns (plain text, entities) or raises BotApiError.

    Only HTML is parsed; Markdown modes are accepted and kept verbatim, without entities.
    """
    if empty is not None and not source.strip():
        raise _bad_request(empty)
    mode = (parse_mode or "").lower()
    if mode == "html":
        text, entities = _parse_html(source)
    elif mode == "":
        text, entities = source, list(explicit_entities or [])
    elif mode in ("markdown", "markdownv2"):
        text, entities = source, []
    else:
        raise _bad_request("unsupported parse_mode")
    if empty is not None and not text.strip():
        raise _bad_request(empty)
    if _utf16_len(text) > limit:
        raise _bad_request(too_long)
    return text, entities


def _reply_markup(p: _Params) -> tuple[JSON | None, JSON | None]:
    """Validate reply_markup; returns (inline keyboard for the message, chat-level markup)."""
    markup = p.get_object("reply_markup", "can't parse reply keyboard markup JSON object")
    if markup is None:
        return None, None
    if "inline_keyboard" in markup:
        return _validated_inline_keyboard(markup), None
    if any(key in markup for key in ("keyboard", "remove_keyboard", "force_reply")):
        return None, markup
    raise _bad_request("can't parse reply keyboard markup JSON object")


def _inline_markup_for_edit(p: _Params) -> JSON | None:
    inline_markup, chat_markup = _reply_markup(p)
    if chat_markup is not None:
        raise _bad_request("inline keyboard expected")
    return inline_markup


def _validated_inline_keyboard(markup: JSON) -> JSON | None:
    rows = markup["inline_keyboard"]
    if not isinstance(rows, list) or not all(isinstance(row, list) for row in rows):
        raise _bad_request("can't parse inline keyboard JSON object")
    for button in (button for row in rows for button in row):
        if not isinstance(button, dict) or not isinstance(button.get("text"), str):
            raise _bad_request("can't parse inline keyboard button: Text must be a String")
        if set(button) == {"text"}:
            raise _bad_request(
                "can't parse inline keyboard button: "
                "Text buttons are unallowed in the inline keyboard"
            )
        data = button.get("callback_data")
        if data is not None:
            size = len(data.encode()) if isinstance(data, str) else 0
            if not 1 <= size <= MAX_CALLBACK_DATA_BYTES:
                raise _bad_request("BUTTON_DATA_INVALID")
    # An empty keyboard is no keyboard: Telegram drops it from the message.
    return {"inline_keyboard": rows} if any(rows) else None


# --- HTTP: Bot API and control API --------------------------------------------------------------


def _telegram_error(error: BotApiError) -> JSONResponse:
    return JSONResponse(error.to_json(), status_code=error.error_code)


async def _read_bot_params(request: Request) -> tuple[JSON, dict[str, UploadedFile]]:
    """Query string plus body (form, multipart or JSON), as the Bot API accepts them."""
    params: JSON = dict(request.query_params)
    files: dict[str, UploadedFile] = {}
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        raw = await request.body()
        try:
            body = json.loads(raw) if raw.strip() else {}
        except ValueError as exc:
            raise _bad_request("can't parse JSON encoded request") from exc
        if not isinstance(body, dict):
            raise _bad_request("request body must be a JSON object")
        # Complex values may come as JSON objects or as JSON-encoded strings; both work.
        params.update(body)
        return params, files
    if content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        try:
            async with request.form() as form:
                for key, value in form.multi_items():
                    if isinstance(value, UploadFile):
                        files[key] = UploadedFile(
                            filename=value.filename or key,
                            content=await value.read(),
                            mime_type=value.content_type or "application/octet-stream",
                        )
                    else:
                        params[key] = value
        except HTTPException as exc:
            # Starlette reports a malformed multipart body as an HTTP 400 exception.
            raise _bad_request(f"can't parse request body: {exc.detail}") from exc
        except ValueError as exc:
            raise _bad_request(f"can't parse request body: {exc}") from exc
    return params, files


async def _bot_api(request: Request) -> JSONResponse:
    standin: BotApiStandIn = request.app.state.standin
    token = request.path_params["token"]
    if not hmac.compare_digest(token.encode(), standin.token.encode()):
        return _telegram_error(BotApiError(401, "Unauthorized"))
    try:
        params, files = await _read_bot_params(request)
        result = await standin.call_method(request.path_params["method"], params, files)
    except BotApiError as error:
        return _telegram_error(error)
    return JSONResponse({"ok": True, "result": result})


class _ControlError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def _json_object(request: Request) -> JSON:
    try:
        body = await request.json()
    except ValueError:
        raise _ControlError(400, "body must be a JSON object") from None
    if not isinstance(body, dict):
        raise _ControlError(400, "body must be a JSON object")
    return body


def _field(body: Mapping[str, Any], name: str, kind: type, *, required: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        if required:
            raise _ControlError(400, f"{name} is required")
        return None
    # bool is an int subclass; a JSON true is not a chat id.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _ControlError(400, f"{name} must be {'an integer' if kind is int else 'a string'}")
    return value


def _path_int(request: Request, name: str) -> int:
    # Starlette's int convertor rejects negative numbers, and group chat ids are negative.
    try:
        return int(request.path_params[name])
    except ValueError:
        raise _ControlError(400, f"{name} must be an integer") from None


def _control(
    handler: Callable[[Request, BotApiStandIn], Awaitable[JSON]],
) -> Callable[[Request], Awaitable[JSONResponse]]:
    """Wrap a control endpoint so that bad input is a 4xx `{"error": ...}`, never a 500."""

    async def endpoint(request: Request) -> JSONResponse:
        try:
            return JSONResponse(await handler(request, request.app.state.standin))
        except _ControlError as error:
            return JSONResponse({"error": error.message}, status_code=error.status)
        except ValueError as error:
            return JSONResponse({"error": str(error)}, status_code=400)

    return endpoint


async def _post_message(request: Request, standin: BotApiStandIn) -> JSON:
    body = await _json_object(request)
    chat_id = _field(body, "chat_id", int, required=True)
    user_id = _field(body, "user_id", int, required=True)
    text = _field(body, "text", str, required=True)
    first_name = _field(body, "first_name", str)
    username = _field(body, "username", str)
    chat_type = _field(body, "chat_type", str)
    chat_title = _field(body, "chat_title", str)
    if first_name or username:
        standin.add_user(user_id, first_name or f"User {user_id}", username)
    if chat_type or chat_title:
        standin.add_chat(chat_id, chat_type or ("private" if chat_id > 0 else "group"), chat_title)
    return standin.inject_message(
        chat_id,
        user_id,
        text,
        thread_id=_field(body, "thread_id", int),
        reply_to_message_id=_field(body, "reply_to_message_id", int),
    )


async def _post_callback(request: Request, standin: BotApiStandIn) -> JSON:
    body = await _json_object(request)
    query_id = standin.inject_callback(
        _field(body, "chat_id", int, required=True),
        _field(body, "message_id", int, required=True),
        _field(body, "user_id", int, required=True),
        _field(body, "data", str, required=True),
    )
    return {"callback_query_id": query_id}


async def _get_messages(request: Request, standin: BotApiStandIn) -> JSON:
    chat_id = _path_int(request, "chat_id")
    return {"chat_id": chat_id, "messages": standin.messages(chat_id)}


async def _get_callback(request: Request, standin: BotApiStandIn) -> JSON:
    query_id = request.path_params["query_id"]
    if not standin.has_callback_query(query_id):
        raise _ControlError(404, f"unknown callback query {query_id!r}")
    return {"callback_query_id": query_id, "answer": standin.callback_answer(query_id)}


async def _get_topics(request: Request, standin: BotApiStandIn) -> JSON:
    chat_id = _path_int(request, "chat_id")
    return {"chat_id": chat_id, "topics": standin.topics(chat_id)}


async def _get_calls(request: Request, standin: BotApiStandIn) -> JSON:
    calls = standin.calls(request.query_params.get("method") or None)
    return {"calls": [{"method": c.method, "params": c.params, "at": c.at} for c in calls]}


async def _post_fault(request: Request, standin: BotApiStandIn) -> JSON:
    body = await _json_object(request)
    method = _field(body, "method", str, required=True)
    error_code = _field(body, "error_code", int)
    count = _field(body, "count", int)
    retry_after = _field(body, "retry_after", int) if "retry_after" in body else 1
    standin.fail_next(
        method,
        error_code=429 if error_code is None else error_code,
        retry_after=retry_after,
        description=_field(body, "description", str),
        count=1 if count is None else count,
    )
    return {"method": method, "queued": True}


def build_app(standin: BotApiStandIn) -> Starlette:
    """The ASGI app: Bot API at `/bot{token}/{method}`, control API under `/standin/`."""
    app = Starlette(
        routes=[
            Route("/bot{token}/{method}", _bot_api, methods=["GET", "POST"]),
            Route("/standin/messages", _control(_post_message), methods=["POST"]),
            Route("/standin/callbacks", _control(_post_callback), methods=["POST"]),
            Route("/standin/callbacks/{query_id}", _control(_get_callback), methods=["GET"]),
            Route("/standin/chats/{chat_id}/messages", _control(_get_messages), methods=["GET"]),
            Route("/standin/chats/{chat_id}/topics", _control(_get_topics), methods=["GET"]),
            Route("/standin/calls", _control(_get_calls), methods=["GET"]),
            Route("/standin/faults", _control(_post_fault), methods=["POST"]),
        ]
    )
    app.state.standin = standin
    return app


# --- Serving ------------------------------------------------------------------------------------

_LOCAL_HOSTS = {"127.0.0.1": "127.0.0.1", "localhost": "127.0.0.1"}


class StandInServer(HttpServer):
    """Serves a stand-in on 127.0.0.1 with uvicorn for the duration of an `async with` block."""

    def __init__(self, standin: BotApiStandIn, host: str = "127.0.0.1", port: int = 0) -> None:
        if host not in _LOCAL_HOSTS:
            raise ValueError(f"the stand-in only binds to 127.0.0.1 or localhost, not {host!r}")
        # A waiting long poll would hold uvicorn's graceful shutdown for seconds: release it.
        super().__init__(
            build_app(standin), _LOCAL_HOSTS[host], port, before_stop=standin.release_long_polls
        )
        self.standin = standin

    @property
    def bot_base_url(self) -> str:
        """The `base_url` for python-telegram-bot (it requests `{base_url}{token}/{method}`)."""
        return f"{self.url}/bot"

    async def __aenter__(self) -> StandInServer:
        self.standin.resume_long_polls()
        await super().__aenter__()
        return self

    async def stop(self) -> None:
        """Stop serving (and pushing to a webhook); long polls answer at once again on the
        next start."""
        try:
            await super().stop()
        finally:
            self.standin.resume_long_polls()
            await self.standin.stop_pushing()


async def _serve_until_signalled(standin: BotApiStandIn, host: str, port: int) -> None:
    async with StandInServer(standin, host, port) as server:
        # What TELEGRAM_API_BASE_URL should say (the token and method are appended to it).
        print(server.bot_base_url, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    """Run a stand-in until SIGINT/SIGTERM, printing its URL on one line first."""
    parser = argparse.ArgumentParser(
        prog="python -m bot.standin", description="Local in-memory Telegram Bot API stand-in."
    )
    parser.add_argument("--token", required=True, help="the only bot token accepted")
    parser.add_argument("--host", default="127.0.0.1", choices=sorted(_LOCAL_HOSTS))
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--bot-id", type=int, default=7000000001)
    parser.add_argument("--bot-username", default="loom_ops_bot")
    args = parser.parse_args(argv)
    standin = BotApiStandIn(args.token, bot_id=args.bot_id, bot_username=args.bot_username)
    asyncio.run(_serve_until_signalled(standin, args.host, args.port))


if __name__ == "__main__":
    main()
