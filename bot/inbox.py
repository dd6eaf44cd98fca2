"""The inbox: an update is stored before Telegram is told it was received, and handled from
the store, so a crash between the two loses no `/run` and no tap.

Polling fetches a batch (`getUpdates`), writes it to the inbox in one durable commit, and only
then confirms it, by asking for the next batch with a higher offset; webhook mode answers
Telegram's POST with 200 only after the same commit. Each stored update goes to the
Application's handlers at once and is marked handled when they are done. An update the inbox
holds already (same id, same content digest: Telegram's redelivery, a failover) is not handled
again; updates stored and not handled (the process died) are handled when a poller starts or
takes over, and in webhook mode when their instance's claim lapses. A crash mid-handler means
handling an update twice, which the handlers make harmless (a `/run`'s run id derives from its
message; a decision is recorded once).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
import time
from collections.abc import Sequence

from telegram import Update
from telegram.error import InvalidToken, RetryAfter, TelegramError
from telegram.ext import Application

from bot.store import ChatStore, InboxEntry, ReceivedUpdate

log = logging.getLogger(__name__)

# Update types the handlers use; Telegram drops the others before they reach us.
ALLOWED_UPDATES = [Update.MESSAGE, Update.CALLBACK_QUERY]
# Handled updates are forgotten after this long (Telegram redelivers for a day at most).
INBOX_RETENTION = 2 * 24 * 3600.0
PRUNE_INTERVAL = 3600.0  # seconds between two prunes by one process
# A poller that takes over lets the updates left pending finish first, for at most this long.
PENDING_HEAD_START = 10.0
# Waits after a failed getUpdates or a failed store, doubling up to the last.
RETRY_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
# On a stop, handlers still running get this long before they are cancelled (their updates
# stay pending and are handled again at the next start).
STOP_GRACE = 5.0


def update_digest(update: Update) -> str:
    """A digest of an update's content without its id: a redelivery has the same one, while
    an id reused by a Bot API that restarted its numbering comes with other content (another
    message, another date)."""
    content = update.to_dict()
    content.pop("update_id", None)
    encoded = json.dumps(content, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(encoded.encode("utf-8")).hexdigest()[:32]


class Inbox:
    """Updates stored durably before they are confirmed; each handled from the store, and
    marked handled once its handlers are done."""

    def __init__(
        self,
        application: Application,  # type: ignore[type-arg]
        chat: ChatStore,
        owner: str,
        claim_ttl: float,
    ) -> None:
        self._application = application
        self._chat = chat
        self._owner = owner
        self._claim_ttl = claim_ttl
        self._tasks: set[asyncio.Task[None]] = set()  # every handling under way
        self._handling: dict[int, asyncio.Task[None]] = {}  # inbox row id -> its handling
        self._pruned_at: float | None = None

    async def take(self, updates: Sequence[Update]) -> list[InboxEntry]:
        """Store a batch in one durable commit, then start handling the updates that are new;
        returns those. Raises what the store raises: then nothing may be confirmed.

        Taps are handled at once, while the batch is being stored: a busy store must not
        keep a tap from its answer, and a decision is recorded once whatever happens (a tap
        Telegram delivers again is answered again and changes nothing)."""
        received = [ReceivedUpdate(u.update_id, update_digest(u), u.to_dict()) for u in updates]
        storing = asyncio.create_task(
            self._chat.store_updates(
                self._application.bot.id, received, self._owner, self._claim_ttl
            )
        )
        taps = {u.update_id: self._handle(u, storing) for u in updates if u.callback_query}
        stored = await storing
        new = {entry.update_id: entry for entry in stored}
        for update in updates:
            entry = new.get(update.update_id)
            if update.update_id in taps:
                if entry is not None:
                    self._track(entry.id, taps[update.update_id])
            elif entry is None:
                log.info("update %s was taken already; skipping it", update.update_id)
            else:
                self._handle(update, entry.id)
        await self._prune_now_and_then()
        return stored

    async def take_pending(self, *, lapsed_only: bool) -> list[asyncio.Task[None]]:
        """Claim the updates stored and not handled, and start handling them, oldest first:
        all of them (a poller starting or taking over), or those whose claim lapsed (webhook
        mode: an instance died). Returns their handling tasks."""
        entries = await self._chat.claim_pending_updates(
            self._application.bot.id, self._owner, self._claim_ttl, lapsed_only=lapsed_only
        )
        tasks = []
        for entry in entries:
            update = Update.de_json(entry.payload, self._application.bot)
            if update is None:  # not an update: nothing a handler could do with it
                await self._chat.mark_update_handled(entry.id)
                continue
            if entry.id not in self._handling:  # else: this process is at it already
                log.info("handling update %s, stored and not handled yet", entry.update_id)
            tasks.append(self._handle(update, entry.id))
        return tasks

    async def poll(self, timeout: float) -> None:
        """Long-poll Telegram until cancelled, the updates left pending handled first: each
        batch is stored before the next request confirms it. Pending updates are never
        dropped (taps made while the bot was down are still decisions)."""
        bot = self._application.bot
        offset: int | None = None  # None: Telegram sends every update not confirmed yet
        failures = 0
        recover = True  # the updates a dead or deposed poller stored and did not handle
        webhook_deleted = False
        while True:
            try:
                if recover:
                    pending = await self.take_pending(lapsed_only=False)
                    if pending:
                        await asyncio.wait(pending, timeout=PENDING_HEAD_START)
                    recover = False
                if not webhook_deleted:  # getUpdates is refused while a webhook is set
                    await bot.delete_webhook(drop_pending_updates=False)
                    webhook_deleted = True
                updates = await bot.get_updates(
                    offset=offset, timeout=timeout, allowed_updates=ALLOWED_UPDATES
                )
                if updates:
                    # A store that failed after its commit leaves rows no one handles (their
                    # redelivery is skipped as a duplicate): look for them after any failure.
                    recover = True
                    await self.take(updates)
                    recover = False
                    # Only now: the next request's offset tells Telegram they were received.
                    offset = updates[-1].update_id + 1
                failures = 0
            except InvalidToken:
                raise
            except RetryAfter as exc:
                wait = _seconds(exc.retry_after)
                log.warning("getUpdates: flood control, waiting %.0f s", wait)
                await asyncio.sleep(wait)
            except Exception as exc:  # the network, the Bot API or the store: try again
                wait = RETRY_DELAYS[min(failures, len(RETRY_DELAYS) - 1)]
                failures += 1
                what = "getUpdates" if isinstance(exc, TelegramError) else "storing updates"
                kind = type(exc).__name__
                log.warning("%s failed (%s: %s); again in %.1f s", what, kind, exc, wait)
                await asyncio.sleep(wait)

    async def sweep(self) -> None:
        """Webhook mode, until cancelled: handle the updates whose instance stored them and
        stopped before handling them, once its claim has lapsed."""
        while True:
            await self.take_pending(lapsed_only=True)
            await asyncio.sleep(self._claim_ttl / 2)

    async def close(self) -> None:
        """Let running handlers finish for a moment, then cancel the rest (still pending)."""
        tasks = list(self._tasks)
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=STOP_GRACE)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    def _handle(
        self, update: Update, entry: int | asyncio.Task[list[InboxEntry]]
    ) -> asyncio.Task[None]:
        """Start handling an update, then mark its inbox row handled. `entry` is the row's
        id (an update this process handles already is not started twice), or the task storing
        the update's batch (a tap, handled meanwhile; not stored: not marked)."""
        running = self._handling.get(entry) if isinstance(entry, int) else None
        if running is not None:
            return running
        application = self._application

        async def handle() -> None:
            try:
                # The Application's bound on concurrent updates applies, as for PTB's own.
                await application.update_processor.process_update(
                    update, application.process_update(update)
                )
                if isinstance(entry, int):
                    await self._chat.mark_update_handled(entry)
                    return
                stored = {e.update_id: e.id for e in await entry}
                if update.update_id in stored:
                    await self._chat.mark_update_handled(stored[update.update_id])
            except Exception as exc:  # the update stays pending: handled again at the next start
                log.warning("could not finish handling update %s: %s", update.update_id, exc)

        task = asyncio.create_task(handle(), name=f"update:{update.update_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if isinstance(entry, int):
            self._track(entry, task)
        return task

    def _track(self, entry_id: int, task: asyncio.Task[None]) -> None:
        """Note that `task` handles the inbox row `entry_id` until it is done."""
        if not task.done():
            self._handling[entry_id] = task
            task.add_done_callback(lambda _: self._handling.pop(entry_id, None))

    async def _prune_now_and_then(self) -> None:
        now = time.monotonic()
        if self._pruned_at is not None and now - self._pruned_at < PRUNE_INTERVAL:
            return
        self._pruned_at = now
        try:
            pruned = await self._chat.prune_inbox(time.time() - INBOX_RETENTION)
        except Exception as exc:  # best effort: the next prune tries again
            log.warning("could not prune the inbox: %s", exc)
            return
        if pruned:
            log.info("pruned %s handled updates from the inbox", pruned)


def _seconds(period: float | dt.timedelta) -> float:
    return period.total_seconds() if isinstance(period, dt.timedelta) else float(period)
