"""Where a run's messages go in its chat: the incident's own forum topic, or a thread of replies.

In a forum supergroup each run tree the bot speaks about gets a topic of its own, opened when
its first message goes out, named after the alert or the request, and closed when the run
ends. A run started inside a topic stays there, and the bot leaves that topic open (a person
opened it). In a chat without topics, or a forum where the bot may not open them, every later
message of a run replies to its first one. `placement` decides, as a pure function of what is
known; `Topics` finds that out (whether a chat is a forum, asked once per chat; the recorded
places) and opens and closes the topics.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from telegram import Bot, ReplyParameters
from telegram.error import BadRequest, Forbidden, TelegramError

from agent.records import record
from bot.store import ChatStore, RunPlace

log = logging.getLogger(__name__)

MAX_TOPIC_NAME = 128  # Telegram's limit on a topic's name
# Labels that say which part of the system an alert is about, in the order a name shows them.
KEY_LABELS = ("service", "namespace", "job", "instance", "severity")
# What the Bot API says when a message is sent to a topic that is gone or closed.
LOST_TOPIC_ERRORS = ("topic_closed", "topic_deleted", "topic_id_invalid", "thread not found")


@record
class Placement:
    """Where one message of a run goes: a topic (`thread_id`), a message it replies to, and
    whether the run's topic must be opened first, or this message becomes the run's first."""

    thread_id: int | None = None
    reply_to: int | None = None
    open_topic: bool = False
    first: bool = False

    def reply_parameters(self) -> ReplyParameters | None:
        """What to reply to; a first message that is gone does not stop the reply."""
        if self.reply_to is None:
            return None
        return ReplyParameters(self.reply_to, allow_sending_without_reply=True)


def placement(chat_is_forum: bool, origin_thread: int | None, known: RunPlace | None) -> Placement:
    """Where a run's next message goes: its recorded place (its topic, or a reply to its first
    message); else the topic the run started in; else a new topic in a forum; else the chat,
    as the run's first message."""
    if known is not None:
        if known.thread_id is not None:
            return Placement(thread_id=known.thread_id)
        if known.first_message_id is not None:
            return Placement(reply_to=known.first_message_id)
        return Placement(first=True)
    if origin_thread is not None:
        return Placement(thread_id=origin_thread)
    if chat_is_forum:
        return Placement(open_topic=True)
    return Placement(first=True)


def request_topic_name(request: str, run_id: str) -> str:
    """A topic's name for a run started by a request: the request, on one line."""
    return _fit(request) or f"Run {run_id}"


def alert_topic_name(alertname: str, matchers: Mapping[str, str], labels: Mapping[str, str]) -> str:
    """A topic's name for an alert's incident: the alert's name, then its group's labels and
    the key labels (service, namespace, ...), e.g. `HighLatency · service=checkout-api`."""
    shown = {k: v for k, v in sorted(matchers.items()) if k != "alertname"}
    shown |= {k: labels[k] for k in KEY_LABELS if k in labels and k not in shown}
    parts = " ".join(f"{k}={v}" for k, v in shown.items())
    return _fit(f"{alertname} · {parts}" if parts else alertname)


def is_lost_topic(error: TelegramError) -> bool:
    """Whether a send failed because its topic is gone or closed."""
    reason = str(error).lower()
    return any(text in reason for text in LOST_TOPIC_ERRORS)


def _fit(text: str) -> str:
    """One line of at most MAX_TOPIC_NAME characters."""
    line = re.sub(r"\s+", " ", text).strip()
    return line if len(line) <= MAX_TOPIC_NAME else line[: MAX_TOPIC_NAME - 1].rstrip() + "…"


class Topics:
    """Where each run's messages go, chat by chat: whether a chat is a forum (getChat once,
    kept in memory until a send finds a topic gone), each run's recorded place, and the
    topics the bot opens for runs and closes when they end."""

    def __init__(self, bot: Bot, chat: ChatStore) -> None:
        self._bot = bot
        self._chat = chat
        self._forums: dict[int, bool] = {}
        self._refused: set[int] = set()  # forums where the bot may not open topics

    async def where(
        self, target: Mapping[str, Any], root_id: str, name: Callable[[], Awaitable[str]]
    ) -> Placement:
        """Where the next message of run tree `root_id` goes in the chat of `target` (an
        outbox target: chat id, and the thread the run started in); opens the run's topic
        (named `await name()`) when this is its first message in a forum."""
        chat_id: int = target["chat_id"]
        origin_thread: int | None = target.get("thread_id")
        known = await self._chat.run_place(root_id, chat_id)
        forum = known is None and origin_thread is None and await self._may_open_topics(chat_id)
        where = placement(forum, origin_thread, known)
        if where.open_topic:
            return await self._open(chat_id, root_id, await name())
        return where

    async def sent(
        self, target: Mapping[str, Any], root_id: str, where: Placement, message_id: int
    ) -> None:
        """Note that a message went out where `where` said: a run's first message without a
        topic is recorded, for its later messages to reply to."""
        if where.first:
            await self._chat.record_run_place(
                root_id, target["chat_id"], first_message_id=message_id
            )

    async def lost(self, target: Mapping[str, Any], root_id: str, thread_id: int) -> None:
        """A send into the run's topic found it gone or closed: ask the chat again whether it
        is a forum, and send the run's later messages to the chat's main thread, as replies to
        the next one."""
        chat_id: int = target["chat_id"]
        log.warning(
            "topic %s of chat %s is gone or closed: run %s goes on in the chat itself",
            thread_id,
            chat_id,
            root_id,
        )
        self._forums.pop(chat_id, None)
        self._refused.discard(chat_id)
        await self._chat.forget_topic(root_id, chat_id, thread_id)
        await self._chat.record_run_place(root_id, chat_id)  # a topic a person opened, too

    async def close(self, root_id: str, chat_id: int) -> None:
        """Close the topic the bot opened in a chat for a run tree that said its last word
        there (a TOPIC_CLOSE entry). A topic closed already is fine; any other error is the
        outbox's to retry (a network fault, a flood limit) or give up on (a topic deleted,
        a right taken away)."""
        place = await self._chat.run_place(root_id, chat_id)
        if place is None or place.thread_id is None or place.closed_at is not None:
            return  # no topic, a person's topic, or closed already
        try:
            await self._bot.close_forum_topic(place.chat_id, place.thread_id)
        except BadRequest as exc:
            if "not_modified" not in str(exc).lower():  # else someone closed it already
                raise
        await self._chat.record_topic_closed(root_id, chat_id)

    async def _may_open_topics(self, chat_id: int) -> bool:
        """Whether the chat is a forum where the bot has not been refused a topic."""
        if chat_id > 0 or chat_id in self._refused:
            return False  # a private chat has no topics
        if chat_id not in self._forums:
            chat = await self._bot.get_chat(chat_id)
            self._forums[chat_id] = bool(chat.is_forum)
        return self._forums[chat_id]

    async def _open(self, chat_id: int, root_id: str, name: str) -> Placement:
        """Open the run's topic and record it, durably, before anything is sent into it.

        The record is looked up before a topic is opened, and the first one recorded wins, so
        a run never has two topics with messages in them; a crash between opening the topic
        and recording it leaves that topic empty, and the next attempt opens another."""
        try:
            topic = await self._bot.create_forum_topic(chat_id, name)
        except (BadRequest, Forbidden) as exc:
            if chat_id not in self._refused:  # once per chat
                log.warning(
                    "cannot open topics in chat %s (%s): runs' messages there are threaded "
                    "as replies instead",
                    chat_id,
                    exc,
                )
            self._refused.add(chat_id)
            return Placement(first=True)
        place = await self._chat.record_run_place(
            root_id, chat_id, thread_id=topic.message_thread_id
        )
        if place.thread_id != topic.message_thread_id:
            log.warning(
                "run %s has a topic already; topic %s of chat %s stays empty",
                root_id,
                topic.message_thread_id,
                chat_id,
            )
        return placement(False, None, place)
