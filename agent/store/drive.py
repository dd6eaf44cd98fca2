"""The handle claiming a run returns: the only way a drive writes.

Invariant: each write of a `Drive` checks its claim (owner and epoch) first, in the same
transaction that writes, so a write after a lost lease raises `LeaseLost` and changes nothing.
The kernel holds a `Drive`, not the claim's parts, so no write of its can skip the check.

The outcome of a call that is safe to repeat is not committed on its own: it rides along
with the drive's next write (the next step's intent, a request, the run's end, the lease's
release), so such a step costs one commit; a crash before that write only makes it run again.
The outcome of a call with an effect that cannot be repeated is committed as soon as it is
known (`finish_call`), so the time it may be in doubt is its own running time.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from agent.errors import CallNotInFlight
from agent.events import Event, PolicyTurn
from agent.records import ApprovalRecord, Checkpoint, Claim, RunRecord, RunStatus
from agent.store.commands import (
    CallResult,
    NewApproval,
    NewChild,
    NewToolCall,
    Outcome,
    StartedCall,
)

if TYPE_CHECKING:
    from agent.store.runstore import RunStore

T = TypeVar("T")


@dataclass
class Drive:
    """A run this process claimed: `run` as it was when claimed, and its fenced writes.

    `lease_until` is a time before which no other process can have taken the run over: the
    lease's expiry as of the last write or renewal that proved the claim."""

    store: RunStore
    claim: Claim
    run: RunRecord
    lease_until: float = 0.0
    ended: RunRecord | None = None  # the run as `finish` left it
    on_saved: Callable[[], object] = lambda: None  # after a write committed a call's outcome
    _unsaved: Outcome | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.lease_until = self.lease_until or float(self.run.lease_expires_at or 0.0)

    @property
    def run_id(self) -> str:
        """The claimed run's id."""
        return self.claim.run_id

    @property
    def unsaved(self) -> Outcome | None:
        """The outcome waiting for the next write, if any."""
        return self._unsaved

    async def _write(
        self,
        write: Callable[[Outcome | None], Awaitable[T]],
        wrote: Callable[[T], bool] = lambda _result: True,
    ) -> T:
        """Run one fenced write with the unsaved outcome at its head; keep the outcome for
        the next write if this one fails or `wrote` says it wrote nothing, drop it if the
        store holds that attempt no longer in flight (recorded already)."""
        unsaved, self._unsaved = self._unsaved, None
        try:
            result = await write(unsaved)
        except CallNotInFlight:
            raise
        except BaseException:
            self._unsaved = unsaved
            raise
        if unsaved is not None:
            if wrote(result):
                self.on_saved()
            else:
                self._unsaved = unsaved
        return result

    async def begin_call(
        self,
        call: NewToolCall,
        checkpoint: Checkpoint,
        turn: PolicyTurn | None = None,
        rerun: bool = False,
        durable: bool = True,
        attempt_info: dict[str, Any] | None = None,
        fresh: bool = True,
    ) -> StartedCall:
        """Commit a call's intent (and the turn that proposed it) before its effect; `fresh`
        says no attempt of it is recorded (else: a retry, or `rerun` of one in doubt)."""
        started = await self._write(
            lambda unsaved: self.store._begin_call(
                self.claim,
                call,
                checkpoint,
                turn,
                rerun,
                durable,
                attempt_info,
                unsaved,
                fresh,
                self.lease_until,
            )
        )
        self.lease_until = started.spawn_before
        return started

    async def finish_call(
        self, call: NewToolCall, attempt: int, result: CallResult, checkpoint: Checkpoint
    ) -> None:
        """Commit the outcome of the call `begin_call` started, with the next checkpoint."""
        await self._write(
            lambda unsaved: self.store._finish_call(
                self.claim, call, attempt, result, checkpoint, unsaved
            )
        )
        self.on_saved()

    def defer_outcome(
        self, call: NewToolCall, attempt: int, result: CallResult, checkpoint: Checkpoint
    ) -> None:
        """Keep the outcome of a call safe to repeat for the drive's next write."""
        assert self._unsaved is None, "a drive writes between two calls"
        self._unsaved = Outcome(call, attempt, result, checkpoint)

    async def finish(
        self,
        status: RunStatus,
        checkpoint: Checkpoint,
        summary: str | None,
        error: str | None,
        turn: PolicyTurn | None = None,
    ) -> None:
        """End the run in a final status (`ended` is then the run as it ended)."""
        self.ended = await self._write(
            lambda unsaved: self.store._finish(
                self.claim, status, checkpoint, summary, error, turn, unsaved
            )
        )

    async def interrupt(
        self,
        reason: str,
        retry_after: float,
        unacted: tuple[PolicyTurn, Checkpoint] | None = None,
    ) -> bool:
        """Journal why the drive stopped (after a policy turn none of whose calls began, with
        the checkpoint that points at it: `unacted`) and hand the run back; False if it was
        lost already."""
        return await self._write(
            lambda unsaved: self.store._interrupt(
                self.claim, reason, retry_after, unsaved, unacted
            ),
            wrote=bool,
        )

    async def open_approval(
        self,
        approval: NewApproval,
        checkpoint: Checkpoint,
        call: NewToolCall | None = None,
        turn: PolicyTurn | None = None,
    ) -> ApprovalRecord:
        """Open an approval request and park the run until it is decided."""
        return await self._write(
            lambda unsaved: self.store._open_approval(
                self.claim, approval, checkpoint, call, turn, unsaved
            )
        )

    async def open_children(
        self,
        call: NewToolCall,
        children: Sequence[NewChild],
        checkpoint: Checkpoint,
        turn: PolicyTurn | None = None,
    ) -> list[str]:
        """Start child runs and park the run until they all end."""
        return await self._write(
            lambda unsaved: self.store._open_children(
                self.claim, call, children, checkpoint, turn, unsaved
            )
        )

    async def await_sibling(
        self,
        call: NewToolCall,
        role: str,
        checkpoint: Checkpoint,
        turn: PolicyTurn | None = None,
    ) -> dict[str, Any] | None:
        """Wait for the sibling of `role`: its end, or None with the run parked."""
        return await self._write(
            lambda unsaved: self.store._await_sibling(
                self.claim, call, role, checkpoint, turn, unsaved
            )
        )

    async def note(self, event: Event) -> None:
        """Journal one event of the drive's own."""
        await self._write(lambda unsaved: self.store._note(self.claim, event, unsaved))

    async def renew(self, ttl: float) -> bool:
        """Extend the lease; False once it is lost."""
        asked = time.time()  # the new expiry is at least this plus `ttl`
        renewed = await self.store._renew(self.claim, ttl)
        if renewed:
            self.lease_until = max(self.lease_until, asked + ttl)
        return renewed

    def close(self) -> None:
        """The drive is over, however it ended: the store keeps nothing for its next write."""
        self.store._forget_head(self.claim)

    async def release(
        self,
        retry_after: float | None = None,
        unacted: tuple[PolicyTurn, Checkpoint] | None = None,
    ) -> bool:
        """Write the unsaved outcome (and a policy turn none of whose calls began, with the
        checkpoint that points at it: `unacted`), then hand the run back (queued) for
        whoever claims it next; once the lease is lost, none is ours to write (False, the
        outcome kept)."""
        return await self._write(
            lambda unsaved: self.store._release(self.claim, retry_after, unsaved, unacted),
            wrote=bool,
        )
