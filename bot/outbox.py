"""OutboxSender: delivers what runs say to their chats, from the outbox table.

Runs write their messages in the same transaction as the state change they report; this task
sends them, in order per chat (one worker per chat, so a slow chat holds up no other), and
records each delivery with its `message_id`. An entry recorded as delivered is never sent
again; one sent but not yet recorded when the process died is sent again (at least once).
Several bot instances may share the outbox: a chat is delivered by whichever instance holds
its delivery lease in the store, and taken over when that instance dies.
A run's progress entries coalesce into one message edited in place, at most once per
`progress_interval` seconds per run. Where in its chat a run's messages go (the incident's
forum topic, or replies to its first message) is bot/topics.py's to say.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dtm
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from telegram import (
    Bot,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    InputFile,
    LinkPreviewOptions,
    Message,
    ReplyParameters,
)
from telegram.constants import ParseMode
from telegram.error import BadRequest, Forbidden, NetworkError, RetryAfter, TelegramError

from agent.errors import ApprovalNotFound, LoomOpsError, RunNotFound, ServiceError
from agent.failpoints import Failpoints
from agent.records import (
    AlertState,
    ApprovalInRun,
    ApprovalRecord,
    ApprovalStatus,
    ChatNotice,
    RunStatus,
    RunTree,
)
from agent.service.alerts import AlertService
from agent.service.runs import RunService
from agent.views.summary import RunSummary, render_summary, summary_of
from bot.alerts import card_buttons as alert_card_buttons
from bot.alerts import card_text as alert_card_text
from bot.facts import progress_of, tree_status
from bot.messages import (
    MAX_CHUNKS,
    approval_buttons,
    approval_text,
    hop_text,
    html_chunks,
    progress_text,
)
from bot.store import ChatStore, OutboxMessage
from bot.topics import Placement, Topics, alert_topic_name, is_lost_topic, request_topic_name

log = logging.getLogger(__name__)

NO_PREVIEW = LinkPreviewOptions(is_disabled=True)
MAX_BACKOFF = 60.0
NOT_SERVED = "chat is not in TELEGRAM_ALLOWED_CHAT_IDS"
# Errors we cannot tell apart from a lasting fault are retried this many times, then given up.
MAX_UNKNOWN_ATTEMPTS = 8
# Network faults: about an hour of retries at the longest backoff, then the chat moves on.
MAX_NETWORK_ATTEMPTS = 66


class Undeliverable(LoomOpsError):
    """The Bot API refused an entry for good (bad chat, bot blocked, malformed request)."""


# What a person must act on, or is told about a decision, goes out before the rest of a
# chat's news: at Telegram's 20 messages a minute in a group, a flood of other runs' progress
# and summaries must not hold up the card an approver is waiting for.
URGENCY: dict[str, int] = {
    ChatNotice.APPROVAL_REQUEST: 0,
    ChatNotice.APPROVAL_DECIDED: 0,
    ChatNotice.APPROVAL_VOTED: 0,
    ChatNotice.APPROVAL_EXPIRED: 0,
    ChatNotice.APPROVAL_REMINDED: 0,
    ChatNotice.APPROVAL_ESCALATED: 0,
    ChatNotice.ALERT: 0,
    ChatNotice.RUN_FINISHED: 1,
    ChatNotice.TOPIC_CLOSE: 1,  # queued after its tree's summary, so it goes after it
    ChatNotice.PROGRESS: 2,
}


async def _to_the_end(work: Awaitable[None]) -> None:
    """Await `work` to its end even if the caller is cancelled meanwhile; the cancellation
    then goes on."""
    task = asyncio.ensure_future(work)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        raise


def urgent_first(batch: list[OutboxMessage]) -> list[OutboxMessage]:
    """A chat's pending entries in the order to send them: approval cards and decisions
    first, then summaries, then progress edits, each group oldest first (so a request goes
    out before its decision, and a run's news keeps its order within a group)."""
    return sorted(batch, key=lambda m: (URGENCY.get(m.kind, 1), m.id))


class OutboxSender:
    """Delivers the outbox: one task per chat with messages waiting, woken by the store.
    What a message says is read through the service; the delivery through the chat store."""

    def __init__(
        self,
        service: RunService,
        chat: ChatStore,
        bot: Bot,
        progress_interval: float = 2.0,
        failpoints: Failpoints | None = None,
        poll_interval: float = 2.0,
        allowed_chat_ids: Collection[int] | None = None,
        owner: str | None = None,
        lease_ttl: float = 30.0,
    ) -> None:
        self._service = service
        self._chat = chat
        # Several instances share the outbox: each chat is delivered by the lease holder.
        self._owner = owner or service.new_owner_id()
        self._lease_ttl = lease_ttl
        self._allowed = frozenset(allowed_chat_ids) if allowed_chat_ids is not None else None
        self._bot = bot
        self._topics = Topics(bot, chat)
        self._progress_interval = progress_interval
        self._failpoints = failpoints or Failpoints(None)
        # Other processes (a CLI decision on a chat's run) write the outbox too: look again
        # this often even when nothing in this process signalled.
        self._poll_interval = poll_interval
        self._workers: dict[int, asyncio.Task[None]] = {}
        self._again: set[int] = set()  # chats whose busy worker must look once more

    async def run(self) -> None:
        """Deliver until cancelled."""
        ready = self._service.outbox_ready
        try:
            while True:
                ready.clear()
                for chat_id in await self._chat.pending_chat_ids():
                    worker = self._workers.get(chat_id)
                    if worker is None or worker.done():
                        self._start_worker(chat_id)
                    else:  # busy: it looks again before it stops
                        self._again.add(chat_id)
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
                # cancellation that arrives as the event is set, and the bot never stops.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._poll_interval):
                        await ready.wait()
        finally:
            workers = list(self._workers.values())
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    def _start_worker(self, chat_id: int) -> None:
        worker = asyncio.create_task(self._drain(chat_id), name=f"outbox:{chat_id}")
        self._workers[chat_id] = worker
        worker.add_done_callback(lambda task: self._worker_done(chat_id, task))

    def _worker_done(self, chat_id: int, task: asyncio.Task[None]) -> None:
        if self._workers.get(chat_id) is task:
            del self._workers[chat_id]
        if not task.cancelled() and task.exception() is not None:
            log.error("delivering to chat %s failed: %r", chat_id, task.exception())

    def _wake_at(self, at: float) -> None:
        """Look at the outbox again at `at` (a backoff or a progress throttle ends)."""
        delay = max(0.0, at - time.time())
        asyncio.get_running_loop().call_later(delay, self._service.outbox_ready.set)

    async def _drain(self, chat_id: int) -> None:
        """Deliver a chat's entries in order until none is left or the rest must wait; skip
        the chat while another instance holds its delivery lease."""
        # A task of its own: stopped while the claim commits, the drain lets the claim end
        # (it may hold the lease) before it gives the lease back.
        claiming = asyncio.ensure_future(
            self._chat.claim_chat(chat_id, self._owner, self._lease_ttl)
        )
        held = True  # until the claim says otherwise
        try:
            if not await asyncio.shield(claiming):
                held = False
                return  # another instance delivers this chat; its lease expires if it dies
            while True:
                self._again.discard(chat_id)
                if not await self._drain_batch(chat_id) and chat_id not in self._again:
                    return  # no await since the check: nothing can slip in unseen
        finally:
            if held:
                # To its end even when the bot stops meanwhile: else the chat waits for the
                # lease to run out, however soon the next instance starts.
                await _to_the_end(self._give_back(chat_id, claiming))

    async def _give_back(self, chat_id: int, claiming: asyncio.Future[bool]) -> None:
        """Give a chat's delivery lease back once its claim has ended."""
        with contextlib.suppress(Exception):  # else the lease simply expires
            await asyncio.wait([claiming])
            await self._chat.release_chat(chat_id, self._owner)

    async def _drain_batch(self, chat_id: int) -> bool:
        """Deliver what is due of one batch; True if anything was delivered."""
        # Progress entries are one per run tree, so a batch this size sees every run's news.
        batch = await self._chat.undelivered_messages(limit=500, chat_id=chat_id)
        if self._allowed is not None and chat_id not in self._allowed and batch:
            # An approver's own chat with the bot is not served, yet hears their reminders.
            if all(_private_hop(message) for message in batch):
                return await self._drain_private(batch)
            log.warning(
                "not delivering %d message(s) to chat %s: it is no longer served "
                "(TELEGRAM_ALLOWED_CHAT_IDS)",
                len(batch),
                chat_id,
            )
            for message in batch:
                await self._chat.record_delivery_failure(message.id, NOT_SERVED, None)
            return False
        delivered_any = False
        coalesced: set[str] = set()
        for message in urgent_first(batch):
            if not await self._chat.claim_chat(chat_id, self._owner, self._lease_ttl):
                log.warning("chat %s is delivered by another instance now", chat_id)
                return False
            now = time.time()
            if message.next_attempt_at > now:  # backing off: keep the chat's order
                self._wake_at(message.next_attempt_at)
                if message.kind == ChatNotice.TOPIC_CLOSE:
                    continue  # housekeeping, after its tree's last word: it holds up no news
                return False
            if message.kind == ChatNotice.PROGRESS:
                root_id = message.payload["root_id"]
                if root_id in coalesced:
                    continue
                coalesced.add(root_id)
                due = await self._progress_due(root_id)
                if due > now:  # throttled: edit later, do not hold up the chat's other news
                    self._wake_at(due)
                    continue
                ids = [
                    m.id
                    for m in batch
                    if m.kind == ChatNotice.PROGRESS and m.payload["root_id"] == root_id
                ]
                ok = await self._attempt(message, self._progress(message, ids))
            else:
                ok = await self._attempt(message, self._deliver(message))
            if not ok and message.kind != ChatNotice.TOPIC_CLOSE:
                return False
            delivered_any = True
        return delivered_any

    async def _drain_private(self, batch: list[OutboxMessage]) -> bool:
        """Deliver reminders and escalations to a person's private chat with the bot (the
        only entries the store queues there), oldest first."""
        for message in batch:
            if message.next_attempt_at > time.time():
                self._wake_at(message.next_attempt_at)
                return False
            if not await self._attempt(message, self._private_hop(message)):
                return False
        return True

    async def _attempt(self, message: OutboxMessage, send: Awaitable[None]) -> bool:
        """Send one entry; on failure record it and say whether the chat may go on."""
        try:
            await send
            return True
        except RetryAfter as exc:  # the rate limiter's own retries ran out
            await self._failed(message, f"flood limit: {exc}", _seconds(exc.retry_after))
        except (Undeliverable, Forbidden, BadRequest) as exc:  # it will not get better
            # (BadRequest is a NetworkError to python-telegram-bot: caught first.)
            log.error("giving up on outbox entry %s (%s): %s", message.id, message.kind, exc)
            await self._chat.record_delivery_failure(message.id, str(exc), None)
            return True  # nothing behind it should wait for an entry that will never go
        except NetworkError as exc:
            return await self._retry_or_give_up(message, exc, MAX_NETWORK_ATTEMPTS)
        except TelegramError as exc:
            return await self._retry_or_give_up(message, exc, MAX_UNKNOWN_ATTEMPTS)
        except (RunNotFound, ApprovalNotFound) as exc:  # nothing left to say it about
            await self._chat.record_delivery_failure(message.id, str(exc), None)
            return True
        return False

    async def _retry_or_give_up(
        self, message: OutboxMessage, error: Exception, max_attempts: int
    ) -> bool:
        """Back off and retry (holding the chat's later entries), or after `max_attempts`
        give the entry up so the chat moves on; says whether the chat may go on."""
        attempts = message.attempts + 1
        if attempts >= max_attempts:
            log.error(
                "giving up on outbox entry %s after %s attempts: %s", message.id, attempts, error
            )
            await self._chat.record_delivery_failure(message.id, str(error), None)
            return True
        await self._failed(message, str(error), min(MAX_BACKOFF, 2.0**message.attempts))
        return False

    async def _failed(self, message: OutboxMessage, error: str, delay: float) -> None:
        log.warning(
            "outbox entry %s (%s) not delivered, retrying in %.1f s: %s",
            message.id,
            message.kind,
            delay,
            error,
        )
        retry_at = time.time() + delay
        await self._chat.record_delivery_failure(message.id, error, retry_at)
        self._wake_at(retry_at)

    # -- what each kind of entry becomes ---------------------------------------------------

    async def _deliver(self, message: OutboxMessage) -> None:
        match message.kind:
            case ChatNotice.APPROVAL_REQUEST:
                await self._approval_request(message)
            case (
                ChatNotice.APPROVAL_DECIDED
                | ChatNotice.APPROVAL_EXPIRED
                | ChatNotice.APPROVAL_VOTED
            ):
                await self._approval_outcome(message)
            case ChatNotice.APPROVAL_REMINDED | ChatNotice.APPROVAL_ESCALATED:
                if _private_hop(message):
                    await self._private_hop(message)
                else:
                    await self._approval_hop(message)
            case ChatNotice.RUN_FINISHED:
                await self._summary(message)
            case ChatNotice.ALERT:
                await self._alert_card(message)
            case ChatNotice.TOPIC_CLOSE:
                await self._topics.close(message.payload["root_id"], message.target["chat_id"])
                await self._chat.mark_delivered(message.id, None)
            case _:  # another version's kind
                raise Undeliverable(f"unknown outbox entry kind {message.kind!r}")

    async def _approval_request(self, message: OutboxMessage) -> None:
        request = await self._service.approval_request(message.payload["approval_id"])
        text = _approval_text(request, message.payload)
        buttons = _buttons(request.approval)
        self._failpoints.reached("before_send_approval_request")
        sent = await self._send(message, request.root_id, text, reply_markup=buttons)
        self._failpoints.reached("after_send_approval_request")
        await self._chat.mark_delivered(message.id, sent.message_id)

    async def _approval_outcome(self, message: OutboxMessage) -> None:
        """Edit the request's message as it stands now: who decided and when, without the
        buttons; or, while it waits for more approvals, who approved so far, with them."""
        request = await self._service.approval_request(message.payload["approval_id"])
        text = _approval_text(request)
        buttons = _buttons(request.approval)
        message_id = await self._chat.approval_message_id(request.approval.id)
        edited = None
        if message_id is not None:
            edited = await self._edit(message, message_id, text, buttons)
        if edited is None:  # the request never reached the chat, or its message is gone
            sent = await self._send(message, request.root_id, text, reply_markup=buttons)
            edited = sent.message_id
        await self._chat.mark_delivered(message.id, edited)

    async def _approval_hop(self, message: OutboxMessage) -> None:
        """A reminder or an escalation in the run's chat: the card shows the hop (buttons
        kept while it waits), and a reply to it mentions the people who may decide."""
        request = await self._service.approval_request(message.payload["approval_id"])
        approval = request.approval
        card_id = await self._chat.approval_message_id(approval.id)
        if card_id is not None:
            card_id = await self._edit(
                message, card_id, _approval_text(request), _buttons(approval)
            )
        if approval.status != ApprovalStatus.PENDING:  # decided meanwhile: the card says so
            await self._chat.mark_delivered(message.id, card_id)
            return
        text = _hop_text(request, message, private=False)
        target = message.target
        sent = await self._placed(
            message,
            request.root_id,
            lambda where: self._bot.send_message(
                chat_id=target["chat_id"],
                text=text,
                parse_mode=ParseMode.HTML,
                message_thread_id=where.thread_id,
                reply_parameters=(
                    ReplyParameters(card_id, allow_sending_without_reply=True)
                    if card_id is not None
                    else where.reply_parameters()
                ),
                link_preview_options=NO_PREVIEW,
            ),
        )
        await self._chat.mark_delivered(message.id, sent.message_id)

    async def _private_hop(self, message: OutboxMessage) -> None:
        """A reminder or an escalation in one approver's private chat with the bot: a
        message of its own (no buttons: decisions are made where the card is)."""
        request = await self._service.approval_request(message.payload["approval_id"])
        if request.approval.status != ApprovalStatus.PENDING:  # nothing left to remind of
            await self._chat.mark_delivered(message.id, None)
            return
        sent = await self._bot.send_message(
            chat_id=message.target["chat_id"],
            text=_hop_text(request, message, private=True),
            parse_mode=ParseMode.HTML,
            link_preview_options=NO_PREVIEW,
        )
        await self._chat.mark_delivered(message.id, sent.message_id)

    async def _alert_card(self, message: OutboxMessage) -> None:
        """An alert incident's card as it stands now: sent the first time, then edited in
        place (its buttons with it)."""
        alerts = AlertService(self._service)
        try:
            card = await alerts.card(message.payload["incident_id"])
        except ServiceError as exc:  # no such incident: nothing to show
            raise Undeliverable(str(exc)) from None
        text, buttons = alert_card_text(card, time.time()), alert_card_buttons(card)
        message_id = card.incident.card_message_id
        edited = None
        if message_id is not None:
            edited = await self._edit(message, message_id, text, buttons)
        if edited is None:  # the first time, or the card's message is gone
            sent = await self._send(message, card.incident.run_id, text, reply_markup=buttons)
            edited = sent.message_id
            await alerts.record_card(card.incident.id, edited)
        incident = card.incident
        if incident.state == AlertState.IGNORED or (
            incident.state == AlertState.PROPOSED and not incident.is_open
        ):  # the incident ended with no run: its topic has nothing more to say
            await self._chat.mark_delivered_and_close_topic(message, edited, incident.run_id)
        else:
            await self._chat.mark_delivered(message.id, edited)

    async def _progress_due(self, root_id: str) -> float:
        shown = await self._chat.progress_message(root_id)
        return 0.0 if shown is None else shown[1] + self._progress_interval

    async def _progress(self, message: OutboxMessage, ids: list[int]) -> None:
        """Send the run's progress message, or edit it in place: one message per run."""
        await self._chat.claim_messages(ids)  # rendered from here on: later news queues anew
        tree = await self._service.run_tree(message.payload["root_id"])
        root = tree.root
        now = time.time()
        text = progress_text(root, progress_of(tree, now), tree.name, now)
        shown = await self._chat.progress_message(root.id)
        message_id = None
        if shown is not None:
            message_id = await self._edit(message, shown[0], text)
        if message_id is None:
            message_id = (await self._send(message, root.id, text)).message_id
        await self._chat.mark_all_delivered(ids, message_id)

    async def _summary(self, message: OutboxMessage) -> None:
        """The audit summary of a run the chat started: HTML messages, or a file when long."""
        run_id = message.run_id
        assert run_id is not None
        tree = await self._service.run_tree(run_id)
        summary = _in_peoples_terms(summary_of(tree), tree)
        hints = [f"/explain {run_id}", f"/trace {run_id}"]
        html = render_summary(summary, html=True, hints=hints)
        chunks = html_chunks(html)
        self._failpoints.reached("before_send_run_finished")
        if chunks is not None and len(chunks) <= MAX_CHUNKS:
            message_id = None
            for number, chunk in enumerate(chunks, start=1):
                if number <= message.parts_sent:  # went out before a failure or a crash
                    continue
                sent = await self._send(message, run_id, chunk)
                message_id = message_id or sent.message_id
                if number < len(chunks):
                    await self._chat.record_part_sent(message.id, number)
        else:
            text = render_summary(summary, html=False, hints=hints)
            status = RunStatus(summary.run.status)
            caption = f"Run {run_id}: {status.upper()}. The audit summary is attached."
            document = text.encode("utf-8")
            sent = await self._placed(
                message,
                run_id,
                lambda where: self._bot.send_document(
                    chat_id=message.target["chat_id"],
                    document=InputFile(document, filename=f"{run_id}-summary.txt"),
                    caption=caption,
                    message_thread_id=where.thread_id,
                    reply_parameters=where.reply_parameters(),
                ),
            )
            message_id = sent.message_id
        self._failpoints.reached("after_send_run_finished")
        await self._chat.mark_delivered_and_close_topic(message, message_id, run_id)

    # -- the Bot API -----------------------------------------------------------------------

    async def _send(
        self,
        message: OutboxMessage,
        root_id: str,
        text: str,
        reply_markup: InlineKeyboardMarkup | None = None,
    ) -> Message:
        """Send a message of run tree `root_id` where the run's messages go."""
        return await self._placed(
            message,
            root_id,
            lambda where: self._bot.send_message(
                chat_id=message.target["chat_id"],
                text=text,
                parse_mode=ParseMode.HTML,
                reply_markup=reply_markup,
                message_thread_id=where.thread_id,
                reply_parameters=where.reply_parameters(),
                link_preview_options=NO_PREVIEW,
            ),
        )

    async def _placed(
        self,
        message: OutboxMessage,
        root_id: str,
        send: Callable[[Placement], Awaitable[Message]],
    ) -> Message:
        """`send` a message of run tree `root_id` to where the run's messages go: its topic
        (opened now for its first message in a forum), or a reply to its first message; once
        more in the chat itself if the topic turns out gone or closed."""
        target = message.target
        where = await self._topics.where(target, root_id, lambda: self._topic_name(root_id))
        try:
            sent = await send(where)
        except BadRequest as exc:
            if where.thread_id is None or not is_lost_topic(exc):
                raise
            await self._topics.lost(target, root_id, where.thread_id)
            where = await self._topics.where(target, root_id, lambda: self._topic_name(root_id))
            sent = await send(where)
        await self._topics.sent(target, root_id, where, sent.message_id)
        return sent

    async def _topic_name(self, root_id: str) -> str:
        """The name of a run's topic: its alert's, or its request's."""
        incident = await AlertService(self._service).incident_of_run(root_id)
        if incident is not None:
            return alert_topic_name(incident.alertname, incident.matchers, incident.labels)
        run = await self._service.get(root_id)
        return request_topic_name(run.request, run.id)

    async def _edit(
        self,
        message: OutboxMessage,
        message_id: int,
        text: str,
        buttons: InlineKeyboardMarkup | None = None,
    ) -> int | None:
        """Edit a message in place (its buttons become `buttons`: none unless given); None if
        it no longer exists."""
        try:
            await self._bot.edit_message_text(
                chat_id=message.target["chat_id"],
                message_id=message_id,
                text=text,
                parse_mode=ParseMode.HTML,
                link_preview_options=NO_PREVIEW,
                reply_markup=buttons,
            )
        except BadRequest as exc:
            reason = str(exc).lower()
            if "not modified" in reason:  # the edit is already there: as good as done
                return message_id
            if "not found" in reason:
                return None
            raise
        return message_id


def _approval_text(request: ApprovalInRun, facts: dict[str, Any] | None = None) -> str:
    """The request's card; `facts` (its outbox payload) fill in what an older request record
    lacks."""
    run = request.run
    return approval_text(
        request.approval,
        request.root_id,
        run.runbook_id,
        run.requested_by,
        request.name,
        time.time(),
        facts,
        request.votes,
    )


def _hop_text(request: ApprovalInRun, message: OutboxMessage, private: bool) -> str:
    """A reminder's or an escalation's text, mentioning whom its entry names."""
    return hop_text(
        request.approval,
        request.root_id,
        message.kind == ChatNotice.APPROVAL_ESCALATED,
        message.payload.get("mentions") or [],
        time.time(),
        private=private,
    )


def _private_hop(message: OutboxMessage) -> bool:
    """True for an entry the store queued to an approver's private chat: a hop's."""
    return bool(message.target.get("private")) and message.kind in (
        ChatNotice.APPROVAL_REMINDED,
        ChatNotice.APPROVAL_ESCALATED,
    )


def _buttons(approval: ApprovalRecord) -> InlineKeyboardMarkup | None:
    """The request's keys while it is pending (decided before we got to say it: none)."""
    if approval.status != ApprovalStatus.PENDING:
        return None
    return InlineKeyboardMarkup(
        [
            [InlineKeyboardButton(label, callback_data=data) for label, data in row]
            for row in approval_buttons(approval)
        ]
    )


def _in_peoples_terms(summary: RunSummary, tree: RunTree) -> RunSummary:
    """A supervised run that failed because its executor was rejected (or its request
    expired) is reported as that, once: the root's composed error and the rejected run's own
    error only repeat what the approvals section says."""
    shown = tree_status(tree)
    if shown == summary.run.status or shown not in (RunStatus.REJECTED, RunStatus.EXPIRED):
        return summary
    repeats = {summary.run.error, *(m.error for m in tree.children if m.status == shown)}
    summary.run = dataclasses.replace(summary.run, status=shown, summary=None)
    summary.errors = [line for line in summary.errors if line not in repeats]
    return summary


def _seconds(value: int | float | dtm.timedelta) -> float:
    return value.total_seconds() if isinstance(value, dtm.timedelta) else float(value)
