"""Policy turns and tool calls: intents, outcomes and attempts."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from agent.records import (
    Checkpoint,
    Claim,
    PolicyTurnRecord,
    RunStatus,
    ToolCallRecord,
)
from agent.store.base import StoreBase
from agent.store.commands import (
    NewEvent,
    NewPolicyTurn,
    NewToolCall,
    RunbookPin,
    StartedCall,
)
from agent.store.database import (
    Connection,
    StoreError,
)
from agent.store.errors import (
    LeaseLost,
)
from agent.store.rows import (
    CALL_COLUMNS,
    TURN_COLUMNS,
    call_from_row,
    dumps,
    turn_from_row,
)


class CallsStore(StoreBase):
    """What a run asked the policy and which tools it called."""

    @staticmethod
    def _insert_intent(
        conn: Connection, run_id: str, call: NewToolCall, now: float, info: str | None = None
    ) -> NewEvent:
        """Insert a call's first intent; returns the event that journals it."""
        conn.execute(
            "INSERT INTO tool_calls (run_id, call_key, turn, position, tool, args, step_id, "
            "attempt, status, intent_at, repeatable, attempt_info) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, 1, 'intent', ?, ?, ?)",
            (
                run_id,
                call.call_key,
                call.turn,
                call.position,
                call.tool,
                dumps(call.args),
                call.step_id,
                now,
                int(call.repeatable),
                info,
            ),
        )
        return _intent_event(call, 1)

    # -- policy turns ----------------------------------------------------------------------

    @staticmethod
    def _insert_policy_turn(
        conn: Connection, run_id: str, turn: NewPolicyTurn, now: float
    ) -> NewEvent:
        conn.execute(
            "INSERT INTO llm_calls (run_id, turn, policy, request_hash, response, prompt_tokens, "
            "completion_tokens, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                run_id,
                turn.turn,
                turn.policy,
                turn.request_hash,
                dumps(turn.response),
                turn.prompt_tokens,
                turn.completion_tokens,
                now,
            ),
        )
        return NewEvent(
            "policy_turn",
            {
                "turn": turn.turn,
                "policy": turn.policy,
                "request_hash": turn.request_hash,
                "response": turn.response,
                "prompt_tokens": turn.prompt_tokens,
                "completion_tokens": turn.completion_tokens,
            },
        )

    async def get_policy_turn(self, run_id: str, turn: int) -> PolicyTurnRecord | None:
        """The journaled policy answer of one turn, if there is one."""
        row = await self._read(
            lambda c: c.execute(
                f"SELECT {TURN_COLUMNS} FROM llm_calls WHERE run_id = ? AND turn = ?",
                (run_id, turn),
            ).fetchone()
        )
        return turn_from_row(row) if row else None

    async def list_policy_turns(self, run_id: str) -> list[PolicyTurnRecord]:
        """Every journaled policy answer of a run, in order."""
        rows = await self._read(
            lambda c: c.execute(
                f"SELECT {TURN_COLUMNS} FROM llm_calls WHERE run_id = ? ORDER BY turn", (run_id,)
            ).fetchall()
        )
        return [turn_from_row(row) for row in rows]

    # -- tool calls ------------------------------------------------------------------------

    async def begin_tool_call(
        self,
        claim: Claim,
        call: NewToolCall,
        checkpoint: Checkpoint,
        turn: NewPolicyTurn | None = None,
        rerun: bool = False,
        durable: bool = True,
        attempt_info: dict[str, Any] | None = None,
    ) -> StartedCall:
        """Commit the intent of a call (and the policy turn that proposed it) under the claim;
        returns the attempt and the instant its side effect must have started by.

        This is the fence right before a side effect: it proves the claim still holds the
        lease, and the lease's expiry is the spawn deadline (after it, another process may
        take the run over). `attempt_info` (where the attempt may act) is recorded with the
        deadline added. A call a human marked for retry, or an in-doubt call (`rerun`), gets
        a new attempt; any other call that already has an intent or an outcome is refused,
        so nothing runs twice by accident. `durable` (the default) syncs the intent to disk
        before the call runs; a call that is safe to repeat may skip that sync.
        """
        now = time.time()
        run_id = claim.run_id

        def begin(conn: Connection) -> StartedCall:
            spawn_before = self._fence(conn, claim)
            info = None
            if attempt_info is not None:
                info = dumps({**attempt_info, "spawn_before": spawn_before})
            events = []
            if turn is not None:
                events.append(self._insert_policy_turn(conn, run_id, turn, now))
            row = conn.execute(
                "SELECT status, attempt FROM tool_calls WHERE call_key = ?", (call.call_key,)
            ).fetchone()
            if row is None:
                attempt = 1
                events.append(self._insert_intent(conn, run_id, call, now, info))
            elif row[0] == "retry" or (rerun and row[0] == "intent"):
                attempt = row[1] + 1
                conn.execute(
                    "UPDATE tool_calls SET status = 'intent', attempt = ?, intent_at = ?, "
                    "attempt_info = ? WHERE call_key = ?",
                    (attempt, now, info, call.call_key),
                )
                events.append(_intent_event(call, attempt))
            else:
                raise StoreError(f"tool call {call.call_key} is already {row[0]}; not run again")
            # The checkpoint moves with the intent so that it never lags the journaled turn.
            self._append_events(
                conn,
                run_id,
                events,
                now,
                {"checkpoint": checkpoint.to_json()},
            )
            return StartedCall(attempt, spawn_before)

        return await self._transaction(begin, durable=durable)

    async def finish_tool_call(
        self,
        claim: Claim,
        call_key: str,
        attempt: int,
        status: str,
        outcome: dict[str, Any],
        duration_ms: float,
        checkpoint: Checkpoint,
        pin: RunbookPin | None = None,
        extra_events: Sequence[NewEvent] = (),
    ) -> None:
        """Commit a call's outcome together with the run's next checkpoint."""
        now = time.time()
        run_id = claim.run_id

        def finish(conn: Connection) -> None:
            self._fence(conn, claim)
            cursor = conn.execute(
                "UPDATE tool_calls SET status = ?, outcome = ?, outcome_at = ?, duration_ms = ? "
                "WHERE call_key = ? AND attempt = ? AND status = 'intent'",
                (status, dumps(outcome), now, duration_ms, call_key, attempt),
            )
            if cursor.rowcount != 1:
                raise LeaseLost(f"tool call {call_key} attempt {attempt} is not in flight here")
            updates: dict[str, Any] = {"checkpoint": checkpoint.to_json()}
            if pin is not None:
                updates.update(
                    runbook_id=pin.runbook_id,
                    runbook=dumps(pin.runbook),
                    params=dumps(pin.params),
                )
            event = NewEvent(
                "tool_outcome",
                {
                    "call_key": call_key,
                    "attempt": attempt,
                    "status": status,
                    "outcome": outcome,
                    "duration_ms": round(duration_ms, 3),
                },
            )
            self._append_events(conn, run_id, [event, *extra_events], now, updates)
            tool, step_id = conn.execute(
                "SELECT tool, step_id FROM tool_calls WHERE call_key = ?", (call_key,)
            ).fetchone()
            progress = {"run_id": run_id, "tool": tool, "step_id": step_id, "status": status}
            self._enqueue_outbox(conn, run_id, "progress", progress, now)

        await self._transaction(finish)

    async def close_cancelled_call(self, run_id: str, call_key: str) -> bool:
        """Record that a cancelled run's call in flight was stopped; only for a cancelled run.

        A run taken over by another process keeps the call in doubt instead: its new owner
        decides what happens to it.
        """
        now = time.time()

        def close(conn: Connection) -> bool:
            row = conn.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None or row[0] != RunStatus.CANCELLED:
                return False
            outcome = {"cancelled": True, "may_have_run": True}
            row = conn.execute(
                "SELECT attempt FROM tool_calls WHERE call_key = ? AND status = 'intent'",
                (call_key,),
            ).fetchone()
            if row is None:  # no intent committed, or an outcome was recorded after all
                return False
            attempt = row[0]
            conn.execute(
                "UPDATE tool_calls SET status = 'cancelled', outcome = ?, outcome_at = ? "
                "WHERE call_key = ?",
                (dumps(outcome), now, call_key),
            )
            event = NewEvent(
                "tool_outcome",
                {
                    "call_key": call_key,
                    "attempt": attempt,
                    "status": "cancelled",
                    "outcome": outcome,
                },
            )
            self._append_events(conn, run_id, [event], now)
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


def _intent_event(call: NewToolCall, attempt: int) -> NewEvent:
    return NewEvent(
        "tool_intent",
        {
            "call_key": call.call_key,
            "tool": call.tool,
            "args": call.args,
            "step_id": call.step_id,
            "attempt": attempt,
        },
    )
