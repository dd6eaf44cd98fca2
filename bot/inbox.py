"""The inbox: an update is stored before Telegram is told it was received, and handled from
the store, so a crash between the two loses no `/run` and no tap.

Polling fetches a batch (`getUpdates`), writes it to the inbox in one durable commit, and only
then confirms it, by asking for the next batch with a higher offset; webhook mode answers
Telegram's POST with 200 only after the same commit. Each stored update goes to the
Application's handlers at once and is marked handled when they are done. An update the inbox
holds already (same id, same content digest: Telegram's redelivery, a failover) is not handled
again. An instance claims the updates it handles and renews its claims while their handlers
run, however long they take; updates stored and not handled (the process died) are handled by
any instance once their claim lapses or their owner is proven dead. A crash mid-handler means
handling an update twice, which the handlers make harmless (a `/run`'s run id derives from its
message, whatever card it is started from; a decision is recorded once).

Polling confirms by offset, so an offset must never run ahead of what the Bot API holds: after
any failure (a self-hosted Bot API that restarted numbers its updates from 1 again, and an old
offset would confirm its new updates unseen) the next request carries no offset, and the
redelivered updates the inbox holds already are skipped.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence

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
# Storing a refused batch one update at a time stops at this many refusals in a row (the
# store is down, not one update at fault).
MAX_REFUSED_IN_A_ROW = 2
# On a stop, handlers still running get this long before they are cancelled (their updates
# stay pending, their claims released: the next instance to look handles them).
STOP_GRACE = 5.0


def update_digest(update: Update) -> str:
    """A digest of an update's content without its id: a redelivery has the same one, while
    an id reused by a Bot API that restarted its numbering comes with other content (another
    message, another date)."""
    content = update.to_dict()
    content.pop("update_id", None)
    encoded = json.dumps(content, sort_keys=True, ensure_ascii=False, default=str)
    # surrogatepass: a lone surrogate (valid JSON a Bot API may pass on) still has a digest,
    # while every other text keeps the digest it was stored under before.
    return hashlib.sha256(encoded.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class Inbox:
    """Updates stored durably before they are confirmed; each handled from the store under a
    claim renewed until its handlers are done, then marked handled."""

    def __init__(
        self,
        application: Application,  # type: ignore[type-arg]
        chat: ChatStore,
        owner: str,
        claim_ttl: float,
        owner_is_dead: Callable[[str], bool],
    ) -> None:
        self._application = application
        self._chat = chat
        self._owner = owner
        self._claim_ttl = claim_ttl
        self._owner_is_dead = owner_is_dead
        self._tasks: set[asyncio.Task[None]] = set()  # every handling under way
        self._handling: dict[int, asyncio.Task[None]] = {}  # inbox row id -> its handling
        self._keeper: asyncio.Task[None] | None = None  # renews the claims of `_handling`
        self._pruned_at: float | None = None

    async def take(self, updates: Sequence[Update]) -> list[InboxEntry]:
        """Store a batch durably, then start handling the updates that are new; returns
        those. Raises what the store raises: then nothing may be confirmed.

        Taps are handled at once, while the batch is being stored: a busy store must not
        keep a tap from its answer, and a decision is recorded once whatever happens (a tap
        Telegram delivers again is answered again and changes nothing)."""
        received = [ReceivedUpdate(u.update_id, update_digest(u), u.to_dict()) for u in updates]
        storing = asyncio.create_task(self._store(received))
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
        return stored

    async def take_pending(self, *, left_by_me: bool = False) -> list[asyncio.Task[None]]:
        """Claim the updates stored and not handled that no live claim covers (lapsed, or
        its owner proven dead; with `left_by_me` also this instance's own, after a take that
        failed), and start handling them, oldest first. Returns their handling tasks."""

        def claim_over(holder: str) -> bool:
            return (left_by_me and holder == self._owner) or self._owner_is_dead(holder)

        entries = await self._chat.claim_pending_updates(
            self._application.bot.id, self._owner, self._claim_ttl, claim_over
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
                    pending = await self.take_pending(left_by_me=True)
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
                    offset = _next_offset(offset, updates)
                failures = 0
            except InvalidToken:
                raise
            except RetryAfter as exc:  # the Bot API answered: the offset stands
                wait = _seconds(exc.retry_after)
                log.warning("getUpdates: flood control, waiting %.0f s", wait)
                await asyncio.sleep(wait)
            except Exception as exc:  # the network, the Bot API or the store: try again
                # From the lowest update the Bot API holds: it may be a restarted one that
                # numbers from 1 again, where the old offset would confirm new updates unseen.
                offset = None
                wait = RETRY_DELAYS[min(failures, len(RETRY_DELAYS) - 1)]
                failures += 1
                what = "getUpdates" if isinstance(exc, TelegramError) else "storing updates"
                kind = type(exc).__name__
                log.warning("%s failed (%s: %s); again in %.1f s", what, kind, exc, wait)
                await asyncio.sleep(wait)

    async def sweep(self) -> None:
        """Until cancelled, in every instance: handle the updates whose instance stored them
        and stopped before handling them, once its claim lapsed or it is proven dead; and
        prune handled updates now and then (never on an update's way in)."""
        while True:
            try:
                await self.take_pending()
                await self._prune_now_and_then()
            except Exception as exc:  # the store: the next round tries again
                log.warning("could not look for pending updates: %s", exc)
            await asyncio.sleep(self._claim_ttl / 2)

    async def close(self) -> None:
        """Let running handlers finish for a moment, then cancel the rest and give up their
        claims, so the next instance to look handles them at once."""
        tasks = list(self._tasks)
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=STOP_GRACE)
            stopped = [entry_id for entry_id, task in self._handling.items() if task in late]
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
            if stopped:
                try:
                    await self._chat.release_update_claims(stopped, self._owner)
                except Exception as exc:  # they lapse instead
                    log.warning("could not release the claims on updates not handled: %s", exc)
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)

    async def _store(self, received: list[ReceivedUpdate]) -> list[InboxEntry]:
        """Store a batch in one durable commit; when the store refuses it, one update at a
        time, so an update the store cannot take does not hold up the others for good: it is
        dropped (and logged) once an update after it was stored. Raises when the last ones
        could not be stored (the store is down, or a later update will tell); two refusals in
        a row end the pass, so a store that is down is not waited on once per update."""
        bot_id = self._application.bot.id
        try:
            return await self._chat.store_updates(bot_id, received, self._owner, self._claim_ttl)
        except Exception as exc:
            if len(received) == 1:
                raise
            log.warning(
                "could not store a batch of %s updates (%s); one by one", len(received), exc
            )
        stored: list[InboxEntry] = []
        refused: list[tuple[ReceivedUpdate, Exception]] = []
        for update in received:
            try:
                stored += await self._chat.store_updates(
                    bot_id, [update], self._owner, self._claim_ttl
                )
            except Exception as exc:
                refused.append((update, exc))
                if len(refused) == MAX_REFUSED_IN_A_ROW:
                    break
                continue
            # The store took this one: those it refused before it are at fault, not the store.
            for bad, why in refused:
                log.error("dropped update %s: the store cannot take it (%s)", bad.update_id, why)
            refused.clear()
        if refused:
            raise refused[-1][1]
        return stored

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
        """Note that `task` handles the inbox row `entry_id` until it is done, and keep the
        row's claim renewed meanwhile."""
        if task.done():
            return
        self._handling[entry_id] = task
        task.add_done_callback(lambda _: self._handling.pop(entry_id, None))
        if self._keeper is None or self._keeper.done():
            self._keeper = asyncio.create_task(self._keep_claims(), name="inbox-claims")

    async def _keep_claims(self) -> None:
        """Renew the claims of the rows being handled every third of their time to live, until
        none is: a handler slower than that (a reply held by the rate limiter, a long trace)
        must not be joined by another instance's."""
        while self._handling:
            await asyncio.sleep(self._claim_ttl / 3)
            handling = list(self._handling)
            if not handling:
                return
            try:
                renewed = await self._chat.renew_update_claims(
                    handling, self._owner, self._claim_ttl
                )
            except Exception as exc:  # the next round tries again, within the claims' time
                log.warning("could not renew the claims on updates being handled: %s", exc)
                continue
            lost = [i for i in handling if i not in renewed and i in self._handling]
            if lost:  # this process stalled past its claims: another instance took them
                log.warning("inbox rows %s were taken over while being handled here", lost)

    async def _prune_now_and_then(self) -> None:
        now = time.monotonic()
        if self._pruned_at is not None and now - self._pruned_at < PRUNE_INTERVAL:
            return
        self._pruned_at = now
        pruned = await self._chat.prune_inbox(time.time() - INBOX_RETENTION)
        if pruned:
            log.info("pruned %s handled updates from the inbox", pruned)


def _next_offset(sent: int | None, updates: Sequence[Update]) -> int | None:
    """The offset that confirms a stored batch; None (from the lowest again) when the Bot API
    answered with ids below the offset sent: it numbers anew, and whatever it holds below
    the old offset is to be fetched, not confirmed unseen."""
    if sent is not None and updates[0].update_id < sent:
        log.warning(
            "the Bot API answered update %s to offset %s: it numbers updates anew",
            updates[0].update_id,
            sent,
        )
        return None
    return updates[-1].update_id + 1


def _seconds(period: float | dt.timedelta) -> float:
    return period.total_seconds() if isinstance(period, dt.timedelta) else float(period)
