"""The bot's own tables: chat delivery of the outbox, chat leases, the inbox of Telegram
updates, how chat users are shown, and where each run's messages go (its forum topic, or the
message its later ones reply to). The outbox rows are queued by the core with the change
they tell of; everything after that (claiming, sending, marking delivered) is the bot's. The
core reads the names back with the runs that mention people (`RunTree.names`)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from agent.records import ChatNotice, record
from agent.store.database import Connection, Database, Leadership
from bot.quota import RateDecision, RateVerdict, rate_decision


@record
class ReceivedUpdate:
    """A Telegram update as it arrived: its id, a digest of its content, and its JSON."""

    update_id: int
    digest: str
    payload: dict[str, Any]


@record
class InboxEntry:
    """An update in the inbox: its row, its Telegram id, and its JSON."""

    id: int
    update_id: int
    payload: dict[str, Any]


@record
class OutboxMessage:
    """A message a run must get to a chat."""

    id: int
    run_id: str | None
    target: dict[str, Any]
    kind: str  # a `ChatNotice`, or another version's kind (which is not delivered)
    payload: dict[str, Any]
    attempts: int
    created_at: float = 0.0
    next_attempt_at: float = 0.0  # after a failed attempt: not before this time
    parts_sent: int = 0  # of a message sent in parts, how many went out already


@record
class RunPlace:
    """Where a run tree's messages go in a chat, as recorded: the forum topic the bot opened
    for it, or (no topic) the run's first message there, which the later ones reply to."""

    root_id: str
    chat_id: int
    thread_id: int | None
    first_message_id: int | None
    closed_at: float | None  # when the bot closed its topic


RUN_PLACE_COLUMNS = "root_id, chat_id, thread_id, first_message_id, closed_at"


def _run_place(row: Any) -> RunPlace:
    return RunPlace(
        root_id=row["root_id"],
        chat_id=row["chat_id"],
        thread_id=row["thread_id"],
        first_message_id=row["first_message_id"],
        closed_at=row["closed_at"],
    )


def _mark_delivered(
    conn: Connection, message_ids: Sequence[int], chat_message_id: int | None, now: float
) -> int:
    """In the caller's transaction: record entries as delivered by one chat message; returns
    how many were not recorded before."""
    cursor = conn.executemany(
        "UPDATE outbox SET delivered_at = ?, message_id = ? WHERE id = ? AND delivered_at IS NULL",
        [(now, chat_message_id, message_id) for message_id in message_ids],
    )
    return cursor.rowcount


class ChatStore:
    """The bot's statements, over the database the run store uses."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def leadership(self, name: str) -> Leadership:
        """The right to be the one bot instance sharing the database that does `name` (poll
        Telegram)."""
        return self._db.leadership(name)

    async def schema_version(self) -> int:
        """The database's schema version: an answer means the database is up."""
        return await self._db.schema_version()

    async def remember_chat_user(self, identity: str, display: str) -> None:
        """Record how a chat identity (`telegram:<id>`) is shown to people, e.g. `@alice`."""
        now = time.time()
        await self._db.transaction(
            lambda c: c.execute(
                "INSERT INTO chat_users (identity, display, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT (identity) DO UPDATE SET display = excluded.display, "
                "updated_at = excluded.updated_at WHERE chat_users.display != excluded.display",
                (identity, display, now),
            ),
        )

    async def remember_private_chat(self, identity: str, display: str) -> None:
        """Record that a chat user (`telegram:<id>`) wrote to the bot in a private chat, so
        reminders may reach them there (the Bot API refuses anyone who never started it)."""
        now = time.time()
        await self._db.transaction(
            lambda c: c.execute(
                "INSERT INTO chat_users (identity, display, updated_at, private_chat_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (identity) DO UPDATE SET "
                "display = excluded.display, updated_at = excluded.updated_at, "
                "private_chat_at = COALESCE(chat_users.private_chat_at, excluded.private_chat_at)",
                (identity, display, now, now),
            ),
        )

    async def undelivered_messages(
        self, limit: int = 100, chat_id: int | None = None
    ) -> list[OutboxMessage]:
        """Messages still to deliver (of one chat), oldest first, backoffs included: a chat's
        messages go out in order, so one waiting out a backoff holds back those behind it."""
        sql = (
            "SELECT id, run_id, target, kind, payload, attempts, created_at, next_attempt_at, "
            "parts_sent FROM outbox WHERE delivered_at IS NULL AND failed_at IS NULL"
        )
        params: tuple[Any, ...] = ()
        if chat_id is not None:
            sql += f" AND {self._db.dialect.json_int('target', 'chat_id')} = ?"
            params = (chat_id,)
        sql += " ORDER BY id LIMIT ?"
        rows = await self._db.read(lambda c: c.execute(sql, (*params, limit)).fetchall())
        return [
            OutboxMessage(
                id=row["id"],
                run_id=row["run_id"],
                target=json.loads(row["target"]),
                kind=row["kind"],
                payload=json.loads(row["payload"]),
                attempts=row["attempts"],
                created_at=row["created_at"],
                next_attempt_at=row["next_attempt_at"],
                parts_sent=row["parts_sent"],
            )
            for row in rows
        ]

    async def pending_chat_ids(self) -> list[int]:
        """The chats that have messages still to deliver."""
        rows = await self._db.read(
            lambda c: c.execute(
                f"SELECT DISTINCT {self._db.dialect.json_int('target', 'chat_id')} FROM outbox "
                "WHERE delivered_at IS NULL AND failed_at IS NULL"
            ).fetchall()
        )
        return [row[0] for row in rows]

    async def mark_delivered(self, message_id: int, chat_message_id: int | None) -> bool:
        """Record a delivery once; False if it was already recorded."""
        return await self.mark_all_delivered([message_id], chat_message_id) == 1

    async def mark_delivered_and_close_topic(
        self, message: OutboxMessage, chat_message_id: int | None, root_id: str
    ) -> bool:
        """Record a delivery once (False if it was already recorded), and in the same
        transaction queue the closing of run tree `root_id`'s topic in that chat when the
        bot opened one that is not closed yet: the tree has nothing more to say there."""
        now = time.time()
        chat_id = message.target["chat_id"]

        def mark(conn: Connection) -> bool:
            if _mark_delivered(conn, [message.id], chat_message_id, now) != 1:
                return False
            topic = conn.execute(
                "SELECT 1 FROM run_places WHERE root_id = ? AND chat_id = ? "
                "AND thread_id IS NOT NULL AND closed_at IS NULL",
                (root_id, chat_id),
            ).fetchone()
            if topic is not None:  # no run id: an alert incident's tree may have no run
                conn.execute(
                    "INSERT INTO outbox (run_id, target, kind, payload, created_at) "
                    "VALUES (NULL, ?, ?, ?, ?)",
                    (
                        json.dumps({"chat_id": chat_id}),
                        ChatNotice.TOPIC_CLOSE,
                        json.dumps({"root_id": root_id}),
                        now,
                    ),
                )
            return True

        return await self._db.transaction(mark, durable=True)

    async def drop_stale_progress(self, before: float) -> int:
        """Give up the progress edits queued before `before` and not sent: the chat they edit
        is gone (a restarted sandbox starts an empty page). Requests and summaries stay."""
        return await self._db.transaction(
            lambda c: (
                c.execute(
                    "UPDATE outbox SET delivered_at = ? WHERE delivered_at IS NULL "
                    f"AND kind = '{ChatNotice.PROGRESS}' AND created_at < ?",
                    (time.time(), before),
                ).rowcount
            )
        )

    async def mark_all_delivered(
        self, message_ids: Sequence[int], chat_message_id: int | None
    ) -> int:
        """Record that one chat message delivered these entries (progress rows coalesce into
        one edit); returns how many were not recorded before."""
        now = time.time()

        return await self._db.transaction(
            lambda c: _mark_delivered(c, message_ids, chat_message_id, now), durable=True
        )

    async def claim_messages(self, message_ids: Sequence[int]) -> None:
        """Mark entries as being sent: a change committed from now on queues its own entry
        instead of joining one whose message is already rendered."""
        now = time.time()
        await self._db.transaction(
            lambda c: c.executemany(
                "UPDATE outbox SET claimed_at = ? WHERE id = ?", [(now, i) for i in message_ids]
            ),
        )

    async def record_part_sent(self, message_id: int, parts_sent: int) -> None:
        """Record that the first `parts_sent` parts of an entry went out (never sent again)."""
        await self._db.transaction(
            lambda c: c.execute(
                "UPDATE outbox SET parts_sent = ? WHERE id = ? AND parts_sent < ?",
                (parts_sent, message_id, parts_sent),
            ),
            durable=True,
        )

    async def record_delivery_failure(
        self, message_id: int, error: str, retry_at: float | None
    ) -> None:
        """Count a failed attempt: retry it at `retry_at`, or give up on it when that is None."""
        now = time.time()

        def record(conn: Connection) -> None:
            # Two statements, not `CASE WHEN ? IS NULL`: PostgreSQL cannot type a bare NULL.
            then = "failed_at = ?" if retry_at is None else "next_attempt_at = ?"
            conn.execute(
                f"UPDATE outbox SET attempts = attempts + 1, last_error = ?, {then} "
                "WHERE id = ? AND delivered_at IS NULL",
                (error[:500], now if retry_at is None else retry_at, message_id),
            )

        await self._db.transaction(record)

    async def claim_chat(self, chat_id: int, owner: str, ttl: float) -> bool:
        """Take or extend the lease on delivering a chat's messages; False while another
        live instance holds it. One deliverer per chat keeps the chat's messages in order."""
        now = time.time()

        def claim(conn: Connection) -> bool:
            cursor = conn.execute(
                "INSERT INTO chat_leases (chat_id, owner, expires_at) VALUES (?, ?, ?) "
                "ON CONFLICT (chat_id) DO UPDATE SET owner = excluded.owner, "
                "expires_at = excluded.expires_at "
                "WHERE chat_leases.owner = excluded.owner OR chat_leases.expires_at < ?",
                (chat_id, owner, now + ttl, now),
            )
            return cursor.rowcount == 1

        return await self._db.transaction(claim)

    async def release_chat(self, chat_id: int, owner: str) -> None:
        """Give a chat's delivery lease back (any instance may take the chat at once)."""
        await self._db.transaction(
            lambda c: c.execute(
                "DELETE FROM chat_leases WHERE chat_id = ? AND owner = ?", (chat_id, owner)
            ),
        )

    async def store_updates(
        self, bot_id: int, updates: Sequence[ReceivedUpdate], owner: str, claim_ttl: float
    ) -> list[InboxEntry]:
        """Put a batch of updates in the inbox in one durable commit, claimed by `owner` for
        `claim_ttl` seconds; returns the entries written. An update whose id and digest are
        there already (a redelivery) is not written again, handled or not."""
        now = time.time()

        def store(conn: Connection) -> list[InboxEntry]:
            stored = []
            for update in updates:
                row = conn.execute(
                    "INSERT INTO telegram_inbox (bot_id, update_id, digest, payload, "
                    "received_at, claimed_by, claimed_until) VALUES (?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (bot_id, update_id, digest) DO NOTHING RETURNING id",
                    (
                        bot_id,
                        update.update_id,
                        update.digest,
                        # ASCII: any text a Bot API passes on (a lone surrogate too) is storable.
                        json.dumps(update.payload, ensure_ascii=True, default=str),
                        now,
                        owner,
                        now + claim_ttl,
                    ),
                ).fetchone()
                if row is not None:
                    stored.append(InboxEntry(row["id"], update.update_id, update.payload))
            return stored

        return await self._db.transaction(store, durable=True)

    async def claim_pending_updates(
        self, bot_id: int, owner: str, claim_ttl: float, claim_over: Callable[[str], bool]
    ) -> list[InboxEntry]:
        """Claim for `owner` the inbox's updates not handled yet that no live claim covers
        (none, lapsed, or `claim_over` its holder: proven dead, say), oldest first, and return
        them. A claim is renewed while its update is handled, so a slow handler is never
        joined by a second one."""
        now = time.time()
        sql = (
            "SELECT id, update_id, payload, claimed_by, claimed_until FROM telegram_inbox "
            "WHERE bot_id = ? AND handled_at IS NULL ORDER BY id" + self._db.dialect.skip_locked
        )

        def claim(conn: Connection) -> list[InboxEntry]:
            rows = [
                row
                for row in conn.execute(sql, (bot_id,)).fetchall()
                if row["claimed_by"] is None
                or (row["claimed_until"] or 0) < now
                or claim_over(row["claimed_by"])
            ]
            conn.executemany(
                "UPDATE telegram_inbox SET claimed_by = ?, claimed_until = ? WHERE id = ?",
                [(owner, now + claim_ttl, row["id"]) for row in rows],
            )
            return [
                InboxEntry(row["id"], row["update_id"], json.loads(row["payload"])) for row in rows
            ]

        return await self._db.transaction(claim)

    async def renew_update_claims(
        self, entry_ids: Sequence[int], owner: str, claim_ttl: float
    ) -> list[int]:
        """Extend `owner`'s claims on these inbox rows (their handlers still run) by
        `claim_ttl` from now; returns the rows renewed (not those handled or taken over)."""
        until = time.time() + claim_ttl

        def renew(conn: Connection) -> list[int]:
            renewed = []
            for entry_id in entry_ids:
                cursor = conn.execute(
                    "UPDATE telegram_inbox SET claimed_until = ? "
                    "WHERE id = ? AND claimed_by = ? AND handled_at IS NULL",
                    (until, entry_id, owner),
                )
                if cursor.rowcount == 1:
                    renewed.append(entry_id)
            return renewed

        return await self._db.transaction(renew)

    async def release_update_claims(self, entry_ids: Sequence[int], owner: str) -> list[int]:
        """Give up `owner`'s claims on these inbox rows (their handling was stopped), so any
        instance handles them at once; returns the rows released."""

        def release(conn: Connection) -> list[int]:
            released = []
            for entry_id in entry_ids:
                cursor = conn.execute(
                    "UPDATE telegram_inbox SET claimed_by = NULL, claimed_until = NULL "
                    "WHERE id = ? AND claimed_by = ? AND handled_at IS NULL",
                    (entry_id, owner),
                )
                if cursor.rowcount == 1:
                    released.append(entry_id)
            return released

        return await self._db.transaction(release)

    async def mark_update_handled(self, entry_id: int) -> bool:
        """Record that an update's handlers are done, ending its claim (`claimed_by` stays:
        who handled it); False if that was recorded before."""
        return await self._db.transaction(
            lambda c: (
                c.execute(
                    "UPDATE telegram_inbox SET handled_at = ?, claimed_until = NULL "
                    "WHERE id = ? AND handled_at IS NULL",
                    (time.time(), entry_id),
                ).rowcount
                == 1
            )
        )

    async def prune_inbox(self, before: float) -> int:
        """Forget the updates handled before `before`; returns how many. Updates not handled
        are kept however old: a tap made while the bot was down is still a decision."""
        return await self._db.transaction(
            lambda c: (
                c.execute(
                    "DELETE FROM telegram_inbox WHERE handled_at IS NOT NULL AND handled_at < ?",
                    (before,),
                ).rowcount
            )
        )

    async def approval_message_id(self, approval_id: int) -> int | None:
        """The chat message that carries an approval request's buttons, once delivered."""
        row = await self._db.read(
            lambda c: c.execute(
                # The kind is written out, not bound: only then can the partial index serve.
                f"SELECT message_id FROM outbox WHERE kind = '{ChatNotice.APPROVAL_REQUEST}' "
                f"AND {self._db.dialect.json_int('payload', 'approval_id')} = ? "
                "AND message_id IS NOT NULL",
                (approval_id,),
            ).fetchone()
        )
        return row[0] if row else None

    async def progress_message(self, root_id: str) -> tuple[int, float] | None:
        """The message showing a run tree's progress, and when it was last sent or edited."""
        row = await self._db.read(
            lambda c: c.execute(
                # The kind is written out, not bound: only then can the partial index serve.
                "SELECT message_id, delivered_at FROM outbox "
                f"WHERE kind = '{ChatNotice.PROGRESS}' "
                f"AND {self._db.dialect.json_text('payload', 'root_id')} = ? "
                "AND message_id IS NOT NULL ORDER BY delivered_at DESC, id DESC LIMIT 1",
                (root_id,),
            ).fetchone()
        )
        return (row["message_id"], row["delivered_at"]) if row else None

    async def run_place(self, root_id: str, chat_id: int) -> RunPlace | None:
        """Where a run tree's messages go in a chat, if that is recorded."""
        row = await self._db.read(
            lambda c: c.execute(
                f"SELECT {RUN_PLACE_COLUMNS} FROM run_places WHERE root_id = ? AND chat_id = ?",
                (root_id, chat_id),
            ).fetchone()
        )
        return _run_place(row) if row else None

    async def record_run_place(
        self,
        root_id: str,
        chat_id: int,
        *,
        thread_id: int | None = None,
        first_message_id: int | None = None,
    ) -> RunPlace:
        """Record where a run tree's messages go in a chat (its topic, or the first message of
        a run without one), durably; returns the place as it stands after. A recorded topic is never
        replaced (the first one recorded wins), and a first message is recorded once."""
        now = time.time()

        def record(conn: Connection) -> RunPlace:
            conn.execute(
                "INSERT INTO run_places (root_id, chat_id, thread_id, first_message_id, "
                "created_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT (root_id, chat_id) DO UPDATE SET "
                "first_message_id = excluded.first_message_id WHERE run_places.thread_id IS NULL "
                "AND run_places.first_message_id IS NULL AND excluded.thread_id IS NULL",
                (root_id, chat_id, thread_id, first_message_id, now),
            )
            row = conn.execute(
                f"SELECT {RUN_PLACE_COLUMNS} FROM run_places WHERE root_id = ? AND chat_id = ?",
                (root_id, chat_id),
            ).fetchone()
            return _run_place(row)

        return await self._db.transaction(record, durable=True)

    async def forget_topic(self, root_id: str, chat_id: int, thread_id: int) -> bool:
        """The run's topic is gone (deleted, or closed by a person): its later messages go to
        the chat's main thread, under the next one sent. False if the topic was not the run's."""
        return await self._db.transaction(
            lambda c: (
                c.execute(
                    "UPDATE run_places SET thread_id = NULL, first_message_id = NULL "
                    "WHERE root_id = ? AND chat_id = ? AND thread_id = ?",
                    (root_id, chat_id, thread_id),
                ).rowcount
                == 1
            )
        )

    async def record_topic_closed(self, root_id: str, chat_id: int) -> bool:
        """Record that the bot closed the run's topic; False if that was recorded before."""
        return await self._db.transaction(
            lambda c: (
                c.execute(
                    "UPDATE run_places SET closed_at = ? WHERE root_id = ? AND chat_id = ? "
                    "AND thread_id IS NOT NULL AND closed_at IS NULL",
                    (time.time(), root_id, chat_id),
                ).rowcount
                == 1
            )
        )

    async def judge_run_rate(
        self, identity: str, message: str, limit: int, window: float
    ) -> RateDecision:
        """Decide one /run by `identity` under the rate (`limit` per `window` seconds; 0: no
        rate) and record it, in one transaction on the person's row: two messages at once
        cannot both take the last slot. `message` names the /run message (chat and message
        id): one handled again after a crash is admitted again, not counted twice."""
        if limit == 0:
            return RateDecision(RateVerdict.ADMIT)

        def judge(conn: Connection) -> RateDecision:
            now = time.time()  # inside: the person's row orders the decisions
            row = conn.execute(
                "SELECT admitted_at, answered_at, ignored FROM chat_run_rates WHERE identity = ?",
                (identity,),
            ).fetchone()
            # [message, when] of the latest admitted /run messages.
            admitted = json.loads(row["admitted_at"]) if row is not None else []
            if any(key == message for key, _ in admitted):
                return RateDecision(RateVerdict.ADMIT)
            answered_at = row["answered_at"] if row is not None else None
            ignored = row["ignored"] if row is not None else 0
            decision = rate_decision(
                [at for _, at in admitted], answered_at is not None, limit, window, now
            )
            if decision.verdict == RateVerdict.ADMIT:
                admitted = [*admitted, [message, now]][-limit:]
                answered_at, ignored = None, 0  # a later flood gets its own refusal
            elif decision.verdict == RateVerdict.REFUSE:
                answered_at = now
            else:
                ignored += 1
            conn.execute(
                "INSERT INTO chat_run_rates (identity, admitted_at, answered_at, ignored) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (identity) DO UPDATE SET "
                "admitted_at = excluded.admitted_at, answered_at = excluded.answered_at, "
                "ignored = excluded.ignored",
                (identity, json.dumps(admitted), answered_at, ignored),
            )
            return decision

        return await self._db.transaction(judge)
