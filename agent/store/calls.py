"""Policy turns and tool calls: intents, outcomes and attempts."""

from __future__ import annotations

import time
from typing import Any

from agent.errors import StoreError
from agent.events import Event, EventType, PolicyTurn, ToolIntent, ToolOutcome
from agent.records import Checkpoint, Claim, PolicyTurnRecord, RunStatus, ToolCallRecord
from agent.store.base import StoreBase
from agent.store.commands import CallResult, NewToolCall, Outcome, StartedCall
from agent.store.database import Connection
from agent.store.rows import CALL_COLUMNS, TURN_COLUMNS, call_from_row, dumps, turn_from_row


class CallsStore(StoreBase):
    """What a run asked the policy and which tools it called."""

    # -- policy turns ----------------------------------------------------------------------

    async def get_policy_turn(self, run_id: str, turn: int) -> PolicyTurnRecord | None:
        """The journaled policy answer of one turn, if there is one (its `policy_turn` event:
        the journal is the one place an answer is stored)."""
        row = await self._read(
            lambda c: c.execute(
                f"SELECT {TURN_COLUMNS} FROM events WHERE run_id = ? AND type = ? "
                f"AND {self.dialect.json_int('data', 'turn')} = ?",
                (run_id, EventType.POLICY_TURN, turn),
            ).fetchone()
        )
        return turn_from_row(row) if row else None

    async def list_policy_turns(self, run_id: str) -> list[PolicyTurnRecord]:
        """Every journaled policy answer of a run, in order."""
        rows = await self._read(
            lambda c: c.execute(
                f"SELECT {TURN_COLUMNS} FROM events WHERE run_id = ? AND type = ? ORDER BY idx",
                (run_id, EventType.POLICY_TURN),
            ).fetchall()
        )
        return [turn_from_row(row) for row in rows]

    # -- tool calls ------------------------------------------------------------------------

    async def _begin_call(
        self,
        claim: Claim,
        call: NewToolCall,
        checkpoint: Checkpoint,
        turn: PolicyTurn | None = None,
        rerun: bool = False,
        durable: bool = True,
        attempt_info: dict[str, Any] | None = None,
        earlier: Outcome | None = None,
        fresh: bool = True,
        lease_floor: float = 0.0,
    ) -> StartedCall:
        """Commit the intent of a call (and the policy turn that proposed it) under the claim;
        returns the attempt and the instant its side effect must have started by.

        This is the fence right before a side effect: it proves the claim still holds the
        lease, and the lease's expiry is the spawn deadline (after it, another process may
        take the run over). `attempt_info` (where the attempt may act) is recorded with the
        deadline added. A call a human marked for retry, or an in-doubt call (`rerun`), gets
        a new attempt; any other call that already has an intent or an outcome is refused,
        so nothing runs twice by accident. `durable` (the default) syncs the intent to disk
        before the call runs; a call that is safe to repeat may skip that sync. `lease_floor`
        is the expiry the drive's last renewal proved: the deadline is never earlier.
        """
        now = time.time()
        run_id = claim.run_id

        def begin(conn: Connection) -> StartedCall:
            spawn_before = self._fence(conn, claim, earlier, step=True, lease_floor=lease_floor)
            info = None
            if attempt_info is not None:
                info = dumps({**attempt_info, "spawn_before": spawn_before})
            events: list[Event] = []
            if turn is not None:
                events.append(turn)
            attempt = self._write_intent(conn, run_id, call, now, rerun, info, events, fresh)
            # The checkpoint moves with the intent so that it never lags the journaled turn.
            self._append_events(conn, run_id, events, now, {"checkpoint": checkpoint.to_json()})
            return StartedCall(attempt, spawn_before)

        return await self._transaction(begin, durable=durable, brief=True)

    def _write_intent(
        self,
        conn: Connection,
        run_id: str,
        call: NewToolCall,
        now: float,
        rerun: bool,
        info: str | None,
        events: list[Event],
        fresh: bool = True,
    ) -> int:
        """In the caller's transaction: record an attempt of the call, with its intent event
        added to `events` (what the transaction appends to the run next); returns its number.

        The row keeps the event's chain position: the journal holds the call's arguments.
        A `fresh` call (the caller found none recorded) is attempt 1; the insert carries its
        own check (`Database.expect`), so it waits for no answer (one round trip less on
        PostgreSQL). A call a person marked for retry, or one found in doubt and safe to run
        again (`rerun`), is the next attempt; any other recorded call is never run again."""
        idx = self._next_idx(conn, run_id) + len(events)
        params = _intent_params(run_id, call, now, info, idx)
        if fresh and not rerun:
            begun = f"tool call {call.call_key} was begun already; not run again"
            self.db.expect(conn, _INSERT_INTENT, params, 1, lambda: StoreError(begun))
            events.append(_intent_event(call, 1))
            return 1
        if conn.execute(_INSERT_INTENT, params).rowcount == 1:
            events.append(_intent_event(call, 1))
            return 1
        row = conn.execute(
            "SELECT status, attempt FROM tool_calls WHERE call_key = ?", (call.call_key,)
        ).fetchone()
        if not (row["status"] == "retry" or (rerun and row["status"] == "intent")):
            raise StoreError(f"tool call {call.call_key} is already {row['status']}; not run again")
        attempt = row["attempt"] + 1
        conn.execute(
            "UPDATE tool_calls SET status = 'intent', attempt = ?, intent_at = ?, "
            "attempt_info = ?, intent_idx = ? WHERE call_key = ?",
            (attempt, now, info, idx, call.call_key),
        )
        events.append(_intent_event(call, attempt))
        return attempt

    async def _finish_call(
        self,
        claim: Claim,
        call: NewToolCall,
        attempt: int,
        result: CallResult,
        checkpoint: Checkpoint,
        earlier: Outcome | None = None,
    ) -> None:
        """Commit a call's outcome together with the run's next checkpoint."""
        now = time.time()

        def finish(conn: Connection) -> None:
            self._fence(conn, claim, earlier, step=True)
            self._write_outcome(conn, claim.run_id, call, attempt, result, checkpoint, now)

        await self._transaction(finish, brief=True)

    async def close_cancelled_call(
        self, run_id: str, call_key: str, known: CallResult | None = None
    ) -> bool:
        """Record that a cancelled run's call in flight was stopped, or, with `known`, what it
        came to (it ended before its outcome was committed); only for a cancelled run.

        A run taken over by another process keeps the call in doubt instead: its new owner
        decides what happens to it.
        """
        now = time.time()

        def close(conn: Connection) -> bool:
            row = conn.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None or row["status"] != RunStatus.CANCELLED:
                return False
            status, outcome = "cancelled", {"cancelled": True, "may_have_run": True}
            if known is not None:
                status, outcome = known.status, known.outcome
            row = conn.execute(
                "SELECT attempt FROM tool_calls WHERE call_key = ? AND status = 'intent'",
                (call_key,),
            ).fetchone()
            if row is None:  # no intent committed, or an outcome was recorded after all
                return False
            event = ToolOutcome(call_key, status, outcome, row["attempt"])
            (idx,) = self._append_events(conn, run_id, [event], now)
            conn.execute(
                "UPDATE tool_calls SET status = ?, outcome_idx = ?, outcome_at = ? "
                "WHERE call_key = ?",
                (status, idx, now, call_key),
            )
            return True

        return await self._transaction(close, durable=True)

    async def get_tool_call(self, call_key: str) -> ToolCallRecord | None:
        """One tool call by its idempotency key."""
        row = await self._read(
            lambda c: c.execute(
                f"SELECT {CALL_COLUMNS} FROM tool_calls WHERE call_key = ?", (call_key,)
            ).fetchone()
        )
        return call_from_row(row) if row else None

    async def list_tool_calls(self, run_id: str) -> list[ToolCallRecord]:
        """A run's tool calls in the order they were proposed."""
        rows = await self._read(
            lambda c: c.execute(
                f"SELECT {CALL_COLUMNS} FROM tool_calls WHERE run_id = ? ORDER BY turn, position",
                (run_id,),
            ).fetchall()
        )
        return [call_from_row(row) for row in rows]

    # -- approvals -------------------------------------------------------------------------


# Attempt 1 of a call, unless the call is recorded already (then it changes no row).
_INSERT_INTENT = (
    "INSERT INTO tool_calls (run_id, call_key, turn, position, tool, intent_idx, step_id, "
    "attempt, status, intent_at, repeatable, attempt_info) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, 1, 'intent', ?, ?, ?) "
    "ON CONFLICT (call_key) DO NOTHING"
)


def _intent_params(
    run_id: str, call: NewToolCall, now: float, info: str | None, intent_idx: int
) -> tuple[Any, ...]:
    return (
        run_id,
        call.call_key,
        call.turn,
        call.position,
        call.tool,
        intent_idx,
        call.step_id,
        now,
        int(call.repeatable),
        info,
    )


def _intent_event(call: NewToolCall, attempt: int) -> Event:
    return ToolIntent(call.call_key, call.tool, call.args, call.step_id, attempt)
