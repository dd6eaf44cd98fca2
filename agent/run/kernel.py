"""The durable run kernel: the loop that asks a policy, checks, journals and executes tool calls.

Every tool call is committed as an intent before it runs, and its outcome is committed together
with the run's next checkpoint. A call found with an intent and no outcome on resume is in doubt:
an idempotent one runs again, any other waits for a human to say retry, skip or abort.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from agent.errors import (
    LeaseLost,
    PeopleFileError,
    PolicyMisconfigured,
    PolicyUnavailable,
    RenderError,
    SpawnRefused,
)
from agent.events import PolicyTurn, WaitingForEarlierAttempt
from agent.failpoints import Failpoints
from agent.people import load_people, start_refusal
from agent.policy.base import (
    FinalAnswer,
    Observation,
    Policy,
    PolicyContext,
    PolicyDecision,
    ToolCall,
)
from agent.records import (
    ApprovalKind,
    Checkpoint,
    Claim,
    RunRecord,
    RunStatus,
    ToolCallRecord,
)
from agent.redaction import Redactor
from agent.run.host import HostIdentity, this_host
from agent.run.leases import LeaseKeeper, owner_is_dead
from agent.run.outcomes import (
    STEP_TOOLS,
    StepState,
    after_call,
    repeat_refusal,
    short_result,
    step_states,
    verdict,
)
from agent.runbook.matching import exact_runbook
from agent.runbook.model import Runbook, RunbookCatalog, Step
from agent.runbook.request import parse_request
from agent.settings import Settings
from agent.store import (
    CallResult,
    Drive,
    NewApproval,
    NewChild,
    NewToolCall,
    RunbookPin,
    RunStore,
)
from agent.store.database import is_postgres_url
from agent.tools.shell import kill_attempt, new_attempt_marker
from agent.tools.toolbox import (
    TOOL_SPECS,
    AwaitApprovalArgs,
    AwaitSiblingArgs,
    DelegateArgs,
    DelegateBatchArgs,
    EffectGate,
    ReadRunbookArgs,
    RecordAuditArgs,
    StepArgs,
    Toolbox,
    ToolResult,
    describe_action,
    tools_for_role,
)

log = logging.getLogger(__name__)

KERNEL_ROLE = "kernel"  # the kernel's own rollback turns
# How long after its spawn deadline plus its timeout an attempt on another host can still act:
# its own alarm kills it at the timeout plus a few seconds even when its driver is frozen.
ACT_GRACE = 5.0
ROLLBACK_POLICY = "kernel:rollback"


class _Wait(Exception):
    """The run is parked (waiting for a human); the loop ends without finishing the run."""


# The three ways a loop stops before the first call of a turn wrote anything carry that
# turn's answer (`turn`, none when the turn is journaled already), so their write journals
# it: the policy is never asked again for an answer it gave (an LLM call is paid for once).


class _HandBack(Exception):
    """This process is stopping: the loop ends between two calls and the run goes back."""

    def __init__(self, turn: PolicyTurn | None = None) -> None:
        super().__init__()
        self.turn = turn


class _CannotAct(Exception):
    """This process may not act as the run does (its effects): the run waits, resumable,
    for a process that may (never a quiet dry run instead)."""

    def __init__(self, reason: str, turn: PolicyTurn | None = None) -> None:
        super().__init__(reason)
        self.turn = turn


class _Finish(Exception):
    """The run must end now with this status and message."""

    def __init__(self, status: RunStatus, error: str, turn: PolicyTurn | None = None) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.turn = turn


def call_key(run_id: str, turn: int, position: int) -> str:
    """The idempotency key of one tool call: stable across crashes and resumes."""
    return f"{run_id}#{turn}.{position}"


class RunKernel:
    """Drives runs to their next wait or their end; one kernel serves many runs at once."""

    def __init__(
        self,
        store: RunStore,
        toolbox: Toolbox,
        settings: Settings,
        policy_for: Callable[[RunRecord], Policy],
        catalog_loader: Callable[[], RunbookCatalog],
        redactor: Redactor,
        owner: str,
    ) -> None:
        self.store = store
        self.toolbox = toolbox
        self.settings = settings
        self.policy_for = policy_for
        self.catalog_loader = catalog_loader
        self.redactor = redactor
        self.owner = owner
        self.failpoints = Failpoints(settings.failpoint)
        # Where a step's action runs, as an approver should read it: any worker sharing a
        # PostgreSQL store may drive the run; a SQLite store is driven on this machine.
        self.runs_on = (
            "any worker (shared PostgreSQL)"
            if is_postgres_url(str(settings.db))
            else f"this host ({socket.gethostname()})"
        )
        self._loops: dict[str, asyncio.Task[None]] = {}
        # Set when this process stops: each loop hands its run back at its next step boundary.
        self.draining = False

    async def drive(self, run_id: str, claim: Claim | None = None) -> RunRecord:
        """Claim the run's lease (unless this process holds `claim` on it already, a worker's
        claim) and drive it until it waits or ends; returns the run after."""
        ttl = self.settings.lease_ttl
        try:
            if claim is not None:
                drive = await self.store.drive(claim)
            else:
                drive = await self.store.claim_run(run_id, self.owner, ttl, owner_is_dead)
        except asyncio.CancelledError:
            # The claim may have committed on the database thread all the same: hand it back.
            run = await self.store.get_run(run_id)
            if run.lease_owner == self.owner:
                await Drive(self.store, Claim.of(run), run).release()
            raise
        self.failpoints.reached("after_claim")
        drive.on_saved = lambda: self.failpoints.reached("after_outcome")
        loop = _RunLoop(self, drive)
        work = asyncio.create_task(loop.run(), name=f"run-loop:{run_id}")
        self._loops[run_id] = work
        keeper = LeaseKeeper(lambda: drive.renew(ttl), ttl, on_lost=work.cancel)
        loop.keeper = keeper
        try:
            async with keeper:
                await work
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                # This process is shutting down: hand the run back, then let the cancellation
                # through. A call in flight stays in doubt for whoever resumes it: the journal
                # says why, since its attempt's processes die with this drive.
                if loop.in_flight is None:
                    await drive.release()
                else:
                    await drive.interrupt(
                        f"this process stopped while call {loop.in_flight} ran: it was cut "
                        "short, and may or may not have done its work",
                        retry_after=0.0,
                    )
                raise
            log.info("stopped driving %s: the run was cancelled or taken over", run_id)
            await self._abandon(run_id, drive, loop.in_flight)
        except _HandBack as handback:
            # Between two calls: the last one's outcome (and an answer not acted on yet) goes
            # with the run, so whoever drives it next goes on from there, asking nobody
            # whether a step ran, nor the policy what it answered already.
            log.info("handing %s back: this process is stopping", run_id)
            if not await drive.release(unacted=loop.unacted(handback.turn)):
                # Cancelled or taken over meanwhile.
                await self._abandon(run_id, drive, None)
        except LeaseLost as exc:
            log.info("stopped driving %s: %s", run_id, exc)
            await self._abandon(run_id, drive, loop.in_flight)
        except PolicyMisconfigured as exc:
            # Before the outage handlers: a wrong key, URL or model never heals by waiting.
            await self._fail(drive, loop._checkpoint(), self.redactor.text(str(exc)))
        except _CannotAct as exc:
            # No pause: only a process that may act the run picks it up on its own (see
            # `Effects.lacking`), and it may at once.
            reason = self.redactor.text(str(exc))
            await self._interrupt(drive, reason, loop.unacted(exc.turn), retry_after=0.0)
        except PolicyUnavailable as exc:
            await self._interrupt(drive, self.redactor.text(str(exc)))
        except Exception as exc:
            # A bug or an outage must not take the whole process down, nor fail the incident
            # run: journal it, free the lease, and leave the run for `resume`.
            log.exception("run %s interrupted", run_id)
            await self._interrupt(drive, self.redactor.text(f"{type(exc).__name__}: {exc}"))
        finally:
            drive.close()
            if self._loops.get(run_id) is work:
                del self._loops[run_id]
        # Ended, the drive holds the run as its last write left it; parked or handed back,
        # it is read (another process may have changed it since).
        return drive.ended or await self.store.get_run(run_id)

    def stop(self, run_id: str) -> None:
        """Stop driving a run in this process now (after it was cancelled)."""
        work = self._loops.get(run_id)
        if work is not None:
            work.cancel()

    async def _abandon(self, run_id: str, drive: Drive, in_flight: str | None) -> None:
        """A cancelled run's calls this drive left open: one that ended keeps its result (its
        outcome was waiting for the next write), one in flight is closed as cancelled."""
        if drive.unsaved is not None:
            known = drive.unsaved
            await self.store.close_cancelled_call(run_id, known.call.call_key, known.result)
        if in_flight is not None:
            await self.store.close_cancelled_call(run_id, in_flight)

    async def _fail(self, drive: Drive, checkpoint: Checkpoint, reason: str) -> None:
        """End the run FAILED now with a one-line reason (journaled; the lease freed)."""
        try:
            await drive.finish(RunStatus.FAILED, checkpoint, summary=None, error=reason)
        except LeaseLost as exc:
            # Another owner holds the run now: it will meet the same setting and fail it.
            log.info("could not fail %s: %s", drive.run_id, exc)
        except Exception:
            # The store failed us: leave the run resumable rather than held by this owner.
            log.exception("could not fail %s", drive.run_id)
            await self._interrupt(drive, reason)

    async def _interrupt(
        self,
        drive: Drive,
        reason: str,
        unacted: tuple[PolicyTurn, Checkpoint] | None = None,
        retry_after: float | None = None,
    ) -> None:
        # Workers try it again after `retry_after`, by default a lease TTL: not in a tight
        # loop against an outage.
        pause = self.settings.lease_ttl if retry_after is None else retry_after
        if not await drive.interrupt(reason, pause, unacted):
            log.info("run %s was taken over meanwhile; not interrupting it", drive.run_id)


class _RunLoop:
    """The state of one drive of one run: its checkpoint, pinned runbook and history."""

    def __init__(self, kernel: RunKernel, drive: Drive) -> None:
        run = drive.run
        self.k = kernel
        self.store = kernel.store  # reads only: every write goes through `drive`
        self.drive = drive
        self.run_record = run
        self.run_id = run.id
        # What the run does live was fixed when it started; runs from before that was recorded
        # act as this process's settings say.
        self.effects = run.effects or kernel.settings.effects
        self.keeper: LeaseKeeper | None = None
        self.in_flight: str | None = None  # the call key, from its intent to its outcome
        self.state = run.checkpoint
        self.runbook = Runbook.from_snapshot(run.runbook) if run.runbook else None
        self.params: dict[str, Any] = dict(run.params)
        self.history: list[Observation] = []
        # A gate approval is good for one attempt of its step, whatever its result: more
        # approvals than attempts means the gate is open.
        self.approvals: Counter[str] = Counter()
        self.steps: dict[str, StepState] = {}  # what each step has done, from the journal
        self.started = time.monotonic()
        self.base_active = run.checkpoint.active_seconds

    # -- the loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        # A run that has taken no turn has journaled nothing to read back (a new run's first
        # drive: three reads fewer).
        at_start = self.state.at_start
        records = [] if at_start else await self.store.list_tool_calls(self.run_id)
        for record in records:
            if record.outcome is not None and record.status not in ("intent", "retry"):
                self.history.append(_observation(record))
        counted = [*await self._earlier_executors_calls(), *records]
        self.steps = step_states(
            (r.tool, r.step_id, r.status, r.attempt, r.outcome)
            for r in counted
            if r.status != "intent"  # an attempt in flight is counted when it is decided
        )
        if not at_start:
            self.approvals = await self.store.approved_gate_counts(self.run_id)
        fresh_turn = at_start  # True once we know no journaled answer exists for this turn
        try:
            while True:
                if self.k.draining:  # between two turns: nothing in flight
                    raise _HandBack
                decision, pending = await self._decision(fresh_turn)
                await self._execute_calls(decision, pending, fresh_turn)
                if decision.final is not None or not decision.calls:
                    await self._finish_from(decision, pending if not decision.calls else None)
                    return
                self.state = self.state.moved(turn=self.state.turn + 1, call=0)
                fresh_turn = True
        except _Wait:
            self.k.failpoints.reached("after_wait")
        except _Finish as finish:
            await self.drive.finish(
                finish.status,
                self._checkpoint(),
                summary=None,
                error=finish.error,
                turn=finish.turn,
            )

    async def _earlier_executors_calls(self) -> list[ToolCallRecord]:
        """The calls of executor runs started before this one by the same parent on the same
        runbook: an incident's steps are counted once, however often an executor is
        delegated, so a second executor never runs a completed step again."""
        run = self.run_record
        if run.role != "executor" or run.parent_id is None or run.runbook_id is None:
            return []
        calls: list[ToolCallRecord] = []
        for sibling in await self.store.child_runs(run.parent_id):
            if sibling.id == run.id:
                break  # child_runs are in the order they were started
            if sibling.role == "executor" and sibling.runbook_id == run.runbook_id:
                calls.extend(await self.store.list_tool_calls(sibling.id))
        return calls

    async def _decision(self, fresh_turn: bool) -> tuple[PolicyDecision, PolicyTurn | None]:
        """The journaled answer for this turn, or a new one (to be committed with its first use)."""
        if not fresh_turn:
            recorded = await self.store.get_policy_turn(self.run_id, self.state.turn)
            if recorded is not None:
                return PolicyDecision.model_validate(recorded.response), None
        rolling_back = self.state.phase == "rollback"
        # A rollback is the kernel's own clean-up after a human said no: the policy's budgets
        # (spent or not) never stand in its way.
        if not rolling_back and self.state.steps_used >= self.run_record.limits.max_steps:
            raise _Finish(
                RunStatus.FAILED,
                f"budget exhausted: max_steps={self.run_record.limits.max_steps}",
            )
        if not rolling_back:
            self._check_deadline()
        if rolling_back:
            decision, policy_name, request_hash = self._rollback_plan(), ROLLBACK_POLICY, ""
        else:
            policy = self.k.policy_for(self.run_record)
            context = PolicyContext(
                run_id=self.run_id,
                role=self.run_record.role,
                request=self.run_record.request,
                catalog_loader=self.k.catalog_loader,
                runbook=self.runbook,
                params=self.params,
                history=self.history,
                memory_loader=self.k.toolbox.memory_lines,
                tools=tools_for_role(self.run_record.role),
            )
            asked = time.perf_counter()
            decision = await policy.decide(context)
            decision.latency_ms = round((time.perf_counter() - asked) * 1000, 3)
            policy_name, request_hash = policy.name, context.request_hash()
        raw = decision.model_dump(mode="json")
        response = self.k.redactor.data(raw)
        if response != raw:  # the journal and the run only ever see the redacted answer
            decision = PolicyDecision.model_validate(response)
        self.state = self.state.moved(steps_used=self.state.steps_used + 1)
        pending = PolicyTurn(
            turn=self.state.turn,
            policy=policy_name,
            request_hash=request_hash,
            response=response,
            prompt_tokens=decision.prompt_tokens,
            completion_tokens=decision.completion_tokens,
        )
        return decision, pending

    async def _execute_calls(
        self, decision: PolicyDecision, pending: PolicyTurn | None, fresh_turn: bool
    ) -> None:
        while self.state.call < len(decision.calls):
            if self.keeper is not None and self.keeper.lost:
                raise LeaseLost(f"lease of run {self.run_id} lost")
            if self.k.draining:  # between two calls: nothing in flight, the last outcome known
                raise _HandBack(pending)
            call = decision.calls[self.state.call]
            key = call_key(self.run_id, self.state.turn, self.state.call)
            existing = None if fresh_turn or pending else await self.store.get_tool_call(key)
            await self._one_call(call, key, pending, existing)
            pending = None  # the turn is journaled with the first call's commit

    async def _finish_from(self, decision: PolicyDecision, pending: PolicyTurn | None) -> None:
        """End the run with the status its facts allow; the model's answer is its narrative."""
        final = decision.final or FinalAnswer(
            outcome="failed", summary="the policy proposed no action and gave no final answer"
        )
        summary, error = final.summary, final.summary
        if self.state.phase == "rollback":
            # Rolled back after a reject, or after an expiry (`on_expiry: rollback`): the
            # run ends as what ended its request, never as a success.
            expired = self._refusal().get("expired") is True
            status = RunStatus.EXPIRED if expired else RunStatus.REJECTED
            summary = error = self._rollback_summary(decision)
        else:
            children = []
            if self.run_record.role == "supervisor":
                children = [(c.role, c.status) for c in await self.store.child_runs(self.run_id)]
            judged = verdict(
                self.run_record.role, final.outcome, self.runbook, self.steps, children
            )
            status = judged.status
            if judged.facts is not None:
                error = judged.facts  # the facts first: they are what the run did
                summary = f"{final.summary}\n{judged.facts}"
        await self.drive.finish(
            status,
            self._checkpoint(),
            summary=summary,
            error=None if status == RunStatus.SUCCEEDED else error,
            turn=pending,
        )

    # -- one call ----------------------------------------------------------------------------

    async def _one_call(
        self,
        call: ToolCall,
        key: str,
        pending: PolicyTurn | None,
        existing: ToolCallRecord | None,
    ) -> None:
        args = call.args  # the whole decision was redacted before it was journaled
        rerun = False
        if existing is not None:
            if existing.status == "intent":
                if not existing.repeatable:
                    await self._open_in_doubt(existing)
                rerun = True
            elif existing.status != "retry":  # already decided by a human (e.g. skipped)
                self.history.append(_observation(existing))
                self.state = self.state.moved(call=self.state.call + 1)
                return
        if self.state.phase != "rollback":
            if self.state.tool_calls_used >= self.run_record.limits.max_tool_calls:
                raise _Finish(
                    RunStatus.FAILED,
                    f"budget exhausted: max_tool_calls={self.run_record.limits.max_tool_calls}",
                    pending,
                )
            self._check_deadline(pending)
        step_id = args.get("step_id") if isinstance(args.get("step_id"), str) else None
        # A person's "retry" of an in-doubt attempt is that person's call, past the runbook's
        # retries; every other call is checked against what the step has done.
        refusal, parsed = self._check(call.name, args, retried=existing is not None and not rerun)
        if refusal is None and isinstance(parsed, StepArgs) and self.runbook is not None:
            step = self.runbook.step(parsed.step_id)
            unable = self.k.toolbox.cannot_act(step, call.name == "rollback_step", self.effects)
            if unable is not None:
                # Before the intent: nothing was started, and the run waits, resumable, for a
                # process allowed to act as the run does (never a quiet dry run instead).
                raise _CannotAct(f"step {step.id!r}: {unable}", pending)
        # A refused call never runs, so repeating it is harmless.
        repeatable = refusal is not None or self.k.toolbox.is_idempotent(
            call.name, args, self.runbook, self.effects
        )
        new_call = NewToolCall(
            key, self.state.turn, self.state.call, call.name, args, step_id, repeatable
        )
        if refusal is None and isinstance(parsed, DelegateArgs | DelegateBatchArgs):
            roles = [parsed.role] if isinstance(parsed, DelegateArgs) else list(parsed.roles)
            await self._open_children(roles, new_call, pending)
        if refusal is None and isinstance(parsed, AwaitSiblingArgs):
            await self._await_sibling(parsed.role, new_call, pending)
            return
        if refusal is None and call.name == "await_approval":
            assert isinstance(parsed, AwaitApprovalArgs)
            if not self._gate_open(parsed.step_id):
                # An in-doubt await_approval already has its intent row; only the request is new.
                # It returns only when the action cannot be shown to an approver: refused.
                refusal = await self._open_gate(parsed, None if existing else new_call, pending)
        self.k.failpoints.reached("before_intent")
        # Only an intent that announces a side effect must survive a power cut before the call
        # runs; losing the intent of a call that is safe to repeat just repeats it.
        durable = not repeatable
        self.in_flight = key  # before the commit: a cancel may land while it is awaited
        marker = new_attempt_marker() if durable and refusal is None else None
        started_call = await self.drive.begin_call(
            new_call,
            self._checkpoint(),
            pending,
            rerun=rerun,
            durable=durable,
            fresh=existing is None,
            attempt_info=self._attempt_info(call.name, args, marker) if marker else None,
        )
        attempt = started_call.attempt
        self.k.failpoints.reached("after_intent")
        started = time.perf_counter()
        if refusal is not None:
            result = ToolResult("refused", {"refused": refusal})
        else:
            gate = EffectGate(started_call.spawn_before, marker, self._before_effect, self.effects)
            result = await self._run_tool(call.name, parsed, gate)
        duration_ms = (time.perf_counter() - started) * 1000
        self.k.failpoints.reached("after_tool")
        outcome = self.k.redactor.data(result.outcome)
        self.state = self.state.moved(
            call=self.state.call + 1, tool_calls_used=self.state.tool_calls_used + 1
        )
        stored = CallResult(result.status, outcome, duration_ms, result.pin, result.events)
        if durable:  # an effect that cannot be repeated: its outcome is known, commit it now
            await self.drive.finish_call(new_call, attempt, stored, self._checkpoint())
        else:  # safe to repeat: the outcome commits with the next step's intent
            self.drive.defer_outcome(new_call, attempt, stored, self._checkpoint())
        self.in_flight = None
        if result.pin is not None:
            self.runbook = Runbook.from_snapshot(result.pin.runbook)
            self.params = dict(result.pin.params)
        self.history.append(Observation(key, call.name, args, result.status, outcome))
        if call.name in STEP_TOOLS and step_id is not None:
            # One attempt with its result, or a refusal (none). A drive that stops before this
            # line counts the attempt from the journal when the run is driven again.
            state = self.steps.get(step_id, StepState())
            self.steps[step_id] = after_call(state, result.status, 1, outcome)

    def _before_effect(self) -> None:
        self.k.failpoints.reached("before_effect")

    def _gate_open(self, step_id: str) -> bool:
        """True while an approval of this step has not yet been used by an attempt."""
        return self.approvals[step_id] > self.steps.get(step_id, StepState()).attempts

    def _budget(self, step: Step, rollback: bool) -> float:
        """How long a step's action may run: its timeout within the run's remaining time (a
        rollback gets its own timeout even when the run's deadline has passed)."""
        return step.timeout if rollback else min(step.timeout, self._remaining())

    def _attempt_info(self, tool: str, args: dict[str, Any], marker: str) -> dict[str, Any]:
        """What finds this attempt again after a crash: where its processes run, the marker
        they carry, and how long it may act after it starts (the store adds the spawn
        deadline)."""
        host = this_host()
        timeout, kind = 0.0, None
        if self.runbook is not None and isinstance(args.get("step_id"), str):
            with contextlib.suppress(KeyError):
                step = self.runbook.step(args["step_id"])
                timeout = self._budget(step, tool == "rollback_step")
                rollback = tool == "rollback_step" and step.rollback is not None
                kind = "run" if (step.rollback.run if rollback else step.run) else "other"
        return {
            "hostname": host.hostname,
            "boot_id": host.boot_id,
            "pid_ns": host.pid_ns,
            "marker": marker,
            "kind": kind,  # "run": a command whose processes carry the marker
            "timeout": round(timeout, 3),
        }

    def _checkpoint(self) -> Checkpoint:
        active = self.base_active + (time.monotonic() - self.started)
        return self.state.moved(active_seconds=round(active, 3))

    def unacted(self, turn: PolicyTurn | None) -> tuple[PolicyTurn, Checkpoint] | None:
        """A turn none of whose calls began, with the checkpoint that points at it: what a
        drive that stops before acting on it writes, so nobody asks for it again."""
        return None if turn is None else (turn, self._checkpoint())

    def _check_deadline(self, pending: PolicyTurn | None = None) -> None:
        if self._remaining() <= 0:
            raise _Finish(
                RunStatus.FAILED,
                f"deadline exceeded: {self.run_record.limits.deadline_seconds:g} s of running time",
                pending,
            )

    def _remaining(self) -> float:
        active = self.base_active + (time.monotonic() - self.started)
        return self.run_record.limits.deadline_seconds - active

    # -- the kernel's checks -------------------------------------------------------------------

    def _check(
        self, tool: str, args: dict[str, Any], retried: bool = False
    ) -> tuple[str | None, Any]:
        """Refuse what the policy may not do; a refusal is an observation, not a crash.
        `retried`: a person said to run this in-doubt call again."""
        spec = TOOL_SPECS.get(tool)
        role = KERNEL_ROLE if self.state.phase == "rollback" else self.run_record.role
        if spec is None:
            return f"unknown tool {tool!r}", None
        if role not in spec.roles:
            return f"tool {tool!r} is not available to the {role} role", None
        try:
            parsed = spec.args_model.model_validate(args)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'args'}: {err['msg']}"
                for err in exc.errors()
            )
            return f"invalid arguments for {tool}: {problems}", None
        if isinstance(parsed, ReadRunbookArgs) and parsed.runbook_id and self.runbook is None:
            refusal = self._start_refusal(parsed.runbook_id) or self._named_refusal(parsed)
            if refusal is not None:
                return refusal, None
        if isinstance(
            parsed,
            ReadRunbookArgs | RecordAuditArgs | DelegateArgs | DelegateBatchArgs | AwaitSiblingArgs,
        ):
            return None, parsed
        assert isinstance(parsed, StepArgs | AwaitApprovalArgs)
        if self.runbook is None:
            return "no runbook chosen yet: call read_runbook with a runbook_id first", None
        try:
            step = self.runbook.step(parsed.step_id)
        except KeyError:
            return f"step {parsed.step_id!r} is not in runbook {self.runbook.id!r}", None
        if tool == "check_health" and step.check is None:
            return f"step {step.id!r} is not a health check", None
        if tool == "rollback_step" and step.rollback is None:
            return f"step {step.id!r} has no rollback", None
        if tool == "await_approval" and not step.needs_approval:
            return f"step {step.id!r} does not need approval", None
        state = self.steps.get(step.id, StepState())
        if tool != "rollback_step" and not retried:
            # Done, or out of attempts: said before any approval is asked for, so a repeat
            # never sends people a second request.
            why = repeat_refusal(step, state)
            if why is not None:
                return why, None
        if tool in STEP_TOOLS and step.needs_approval and not self._gate_open(step.id):
            again = f" for attempt {state.attempts + 1}" if state.attempts else ""
            return (
                f"step {step.id!r} requires approval{again}: call await_approval and wait for "
                "an approver's decision first"
            ), None
        return None, parsed

    def _named_refusal(self, args: ReadRunbookArgs) -> str | None:
        """In a live run whose request names its runbook: why the policy may not commit the
        run to another runbook, or to other values of the params the request sets, or None.
        A person chose those (the service refuses a live start from a guess); a model's
        other choice would act unconfirmed."""
        if not (self.effects.shell or self.effects.mcp):
            return None
        try:
            request = parse_request(self.run_record.request)
        except ValueError:  # (it parsed at the start; redaction may have cut a quote since)
            return None
        named = exact_runbook(self.k.catalog_loader(), request)
        if named is None:  # a person let the policy choose (--yes, "yes": true)
            return None
        if args.runbook_id != named.id:
            return (
                f"the request names runbook {named.id!r}: this live run runs that one, "
                f"not {args.runbook_id!r}"
            )
        differ = [f"{k}={v}" for k, v in request.params.items() if args.params.get(k) != v]
        if differ:
            return f"the request sets {' '.join(differ)}: pass them as they are"
        return None

    def _start_refusal(self, runbook_id: str) -> str | None:
        """Why the run's requester may not start this runbook, or None. The service checks
        the runbook a request names or matches; this holds for one a model chose instead."""
        try:
            starters = self.k.catalog_loader().get(runbook_id).starters
        except KeyError:
            return None  # read_runbook itself says the id is unknown
        if not starters:
            return None
        try:
            people = load_people(self.k.settings)
        except PeopleFileError as exc:
            return str(exc)
        return start_refusal(people, self.run_record.requested_by, runbook_id, starters)

    async def _run_tool(self, tool: str, parsed: Any, gate: EffectGate) -> ToolResult:
        """Carry the call out; nothing live starts once `gate` closed (the lease may be gone)."""
        toolbox = self.k.toolbox
        try:
            if tool == "read_runbook":
                return await toolbox.read_runbook(parsed, self.runbook)
            if tool == "record_audit":
                return await toolbox.record_audit(parsed)
            if tool == "await_approval":
                # Reached only when the gate is already approved (e.g. a retried step).
                return ToolResult("ok", {"approved": True, "step_id": parsed.step_id})
            assert self.runbook is not None
            step = self.runbook.step(parsed.step_id)
            if tool == "check_health":
                assert step.check is not None
                budget = min(step.timeout, self._remaining())
                return await toolbox.check(step.check, self.params, budget, gate)
            rollback = tool == "rollback_step"
            return await toolbox.execute_step(
                step, self.runbook, self.params, self._budget(step, rollback), rollback, gate
            )
        except SpawnRefused as exc:
            # Not the step's failure: this driver may no longer act. The intent stays in doubt
            # for whoever holds the run now, who finds that nothing of this attempt runs.
            raise LeaseLost(str(exc)) from exc
        except Exception as exc:  # a tool's failure is an outcome the policy sees
            log.warning("tool %s failed in run %s", tool, self.run_id, exc_info=True)
            return ToolResult("error", {"error": f"{type(exc).__name__}: {exc}"})

    # -- approvals ---------------------------------------------------------------------------

    def _timers(self, on_expiry: bool = True) -> dict[str, Any]:
        """A new request's deadline and hops: when it reminds, when it escalates and to whom
        (the runbook's `escalation:`, else the settings'), and what its expiry does (an
        in-doubt request's only stops: `on_expiry=False`)."""
        settings = self.k.settings
        now = time.time()
        if self.runbook is None:  # an in-doubt call of a run that never chose a runbook
            return {"deadline_at": now + 3600}
        timeout = self.runbook.approval_timeout or settings.approval_timeout
        escalation = self.runbook.escalation
        remind = escalation.remind(settings.remind_delay)
        escalate = escalation.escalate(settings.escalate_delay)
        escalate_to = escalation.escalate_to or settings.escalate_to
        escalate_at = escalate.after(now, timeout) if escalate and escalate_to else None
        return {
            "deadline_at": now + timeout,
            "remind_at": remind.after(now, timeout) if remind else None,
            "escalate_at": escalate_at,
            "escalate_to": list(escalate_to) if escalate_at is not None else [],
            "on_expiry": self.runbook.on_expiry if on_expiry else "stop",
        }

    async def _open_gate(
        self, args: AwaitApprovalArgs, new_call: NewToolCall, pending: PolicyTurn | None
    ) -> str:
        """Open the approval request and park the run (raises _Wait); returns the refusal
        instead when the step's action cannot be rendered for the approver to read."""
        assert self.runbook is not None
        step = self.runbook.step(args.step_id)
        try:
            action = await describe_action(step, self.params)
            rollback = (
                await describe_action(step, self.params, rollback=True) if step.rollback else None
            )
        except RenderError as exc:
            return f"step {step.id!r} cannot be shown to an approver: {exc}"
        rule = step.approval_rule
        approval = NewApproval(
            call_key=new_call.call_key,
            kind=ApprovalKind.GATE,
            step_id=step.id,
            action=self.k.redactor.text(action),
            reason=args.reason or step.title,
            rollback=self.k.redactor.text(rollback) if rollback else None,
            deciders=list((rule and rule.from_) or self.runbook.approvers),
            # A step's rule may ask for four eyes; it can never waive the runbook's.
            four_eyes=self.runbook.four_eyes or bool(rule and rule.four_eyes),
            requested_by=self.run_record.requested_by,
            mode=self.k.toolbox.mode_of(step, self.effects),
            runs_on=self.k.runs_on,
            evidence=_evidence(self.history),
            required=rule.required if rule else 1,
            **self._timers(),
        )
        await self.drive.open_approval(approval, self._checkpoint(), call=new_call, turn=pending)
        raise _Wait()

    async def _open_in_doubt(self, existing: ToolCallRecord) -> None:
        """Ask a person about a call that may or may not have run, once the attempt provably
        can no longer act; the request says what is known of it."""
        known = await self._settle_earlier_attempt(existing)
        step = None
        if self.runbook is not None and existing.step_id is not None:
            try:
                step = self.runbook.step(existing.step_id)
            except KeyError:
                step = None
        action = f"{existing.tool} {existing.args}"
        if step is not None:
            rollback = existing.tool == "rollback_step"
            try:
                action = await describe_action(step, self.params, rollback=rollback)
            except RenderError as exc:
                # The person must still decide about the attempt: show the call as recorded.
                action = f"{action} (its template cannot be rendered: {exc})"
        what = f"step {existing.step_id!r}" if existing.step_id else f"call {existing.call_key}"
        rule = step.approval_rule if step is not None else None
        approval = NewApproval(
            call_key=existing.call_key,
            kind=ApprovalKind.IN_DOUBT,
            step_id=existing.step_id,
            action=self.k.redactor.text(action),
            reason=(
                f"{what} may or may not have run ({known}): approve to retry, skip to treat it "
                "as done, reject to abort"
            ),
            rollback=None,
            # Retrying a side effect needs the same eyes as running it did: the step's rule's
            # deciders, four eyes and number of people (skip and abort end it at once: see
            # agent.run.approvals.vote_outcome).
            deciders=list(
                (rule and rule.from_) or (self.runbook.approvers if self.runbook else [])
            ),
            four_eyes=bool(self.runbook and self.runbook.four_eyes)
            or bool(rule and rule.four_eyes),
            requested_by=self.run_record.requested_by,
            mode=self.k.toolbox.mode_of(step, self.effects) if step is not None else None,
            runs_on=self.k.runs_on,
            evidence=_evidence(self.history),
            required=rule.required if rule else 1,
            **self._timers(on_expiry=False),
        )
        await self.drive.open_approval(approval, self._checkpoint())
        raise _Wait()

    async def _settle_earlier_attempt(self, existing: ToolCallRecord) -> str:
        """Make sure an in-doubt attempt can no longer act, and say what is known of it: on
        this host (same boot and PID namespace) its processes are found by their marker and
        killed; elsewhere, wait until it is past its spawn deadline plus its timeout."""
        info = existing.attempt_info or {}
        attempt = f"attempt {existing.attempt}"
        marker = info.get("marker")
        if not isinstance(marker, str) or info.get("kind") != "run":
            # No command of ours to look for (an MCP call, say): nothing more can be known.
            return f"the process stopped during {attempt}"
        recorded = HostIdentity(str(info.get("hostname")), info.get("boot_id"), info.get("pid_ns"))
        if this_host().same_pid_space(recorded):
            try:
                swept = await asyncio.to_thread(kill_attempt, marker)
            except ValueError:  # a marker this version cannot look for: prove nothing
                swept = None
            if swept is not None and swept.scanned and swept.all_gone:
                if swept.found:
                    return f"{attempt} was still running; killed at {_clock(swept.killed_at)}"
                return f"no process of {attempt} is left (it ended, or never started)"
        act_until = float(info.get("spawn_before", 0)) + float(info.get("timeout", 0)) + ACT_GRACE
        if time.time() < act_until:
            log.info("run %s: waiting until %s for %s to be over", self.run_id, act_until, attempt)
            await self.drive.note(
                WaitingForEarlierAttempt(existing.call_key, existing.attempt, act_until)
            )
            await asyncio.sleep(act_until - time.time())
        return (
            f"{attempt} ran on {recorded.hostname} where it cannot be checked from here; its "
            f"time ran out at {_clock(act_until)}"
        )

    # -- children ------------------------------------------------------------------------------

    async def _open_children(
        self, roles: list[str], new_call: NewToolCall, pending: PolicyTurn | None
    ) -> None:
        """Start the child runs and park this run until they all end (no task, no lease)."""
        pin = await self._plan_pin() if any(r != "planner" for r in roles) else None
        children = [NewChild(role, pin if role != "planner" else None) for role in roles]
        await self.drive.open_children(new_call, children, self._checkpoint(), turn=pending)
        raise _Wait()

    async def _await_sibling(
        self, role: str, new_call: NewToolCall, pending: PolicyTurn | None
    ) -> None:
        """Wait (durably, holding nothing) for the sibling of `role`, or take its result now."""
        ended = await self.drive.await_sibling(new_call, role, self._checkpoint(), pending)
        if ended is None:
            raise _Wait()
        self.state = self.state.moved(
            call=self.state.call + 1, tool_calls_used=self.state.tool_calls_used + 1
        )
        record = await self.store.get_tool_call(new_call.call_key)
        assert record is not None
        await self.drive.finish_call(
            new_call, record.attempt, CallResult("ok", ended, 0.0), self._checkpoint()
        )
        self.history.append(
            Observation(new_call.call_key, new_call.tool, new_call.args, "ok", ended)
        )

    async def _plan_pin(self) -> RunbookPin | None:
        """The runbook and params the latest successful planner child committed to."""
        for obs in reversed(self.history):
            for child in reversed(obs.outcome.get("children", [])):
                if child.get("role") == "planner" and child.get("status") == "succeeded":
                    planner = await self.store.get_run(child["run_id"])
                    if planner.runbook_id and planner.runbook is not None:
                        return RunbookPin(planner.runbook_id, planner.runbook, planner.params)
        return None

    # -- rollback after a rejection ------------------------------------------------------------

    def _rollback_plan(self) -> PolicyDecision:
        """Roll back completed steps that declare a rollback, newest first.

        A step a human skipped as "it may have run" counts as completed: undoing it is the
        safe side.
        """
        assert self.runbook is not None
        done: list[str] = []
        for obs in self.history:
            if obs.tool == "execute_step" and obs.status in ("ok", "skipped"):
                step_id = obs.args.get("step_id")
                if isinstance(step_id, str) and step_id not in done:
                    done.append(step_id)
        calls = [
            ToolCall(name="rollback_step", args={"step_id": step_id})
            for step_id in reversed(done)
            if self.runbook.step(step_id).rollback is not None
        ]
        # The summary is written once the rollbacks have run (see _rollback_summary).
        return PolicyDecision(
            calls=calls, final=FinalAnswer(outcome="failed", summary="rollback"), thought="rollback"
        )

    def _refusal(self) -> dict[str, Any]:
        """The recorded outcome of the request that started the rollback: a reject, or an
        expiry (`expired: true`)."""
        return next(
            (
                obs.outcome
                for obs in reversed(self.history)
                if obs.tool == "await_approval" and obs.outcome.get("approved") is False
            ),
            {},
        )

    def _rollback_summary(self, decision: PolicyDecision) -> str:
        """Who rejected, and what the rollback actually did, from the recorded outcomes."""
        rejection = self._refusal()
        if rejection.get("expired") is True:
            who = "approval request expired without a decision"
        else:
            who = f"rejected by {rejection.get('decided_by', 'an approver')}"
        if rejection.get("note"):
            who += f": {rejection['note']}"
        planned = [c.args.get("step_id") for c in decision.calls]
        if not planned:
            return f"{who}; nothing to roll back"
        results = {
            obs.args.get("step_id"): obs.status
            for obs in self.history
            if obs.tool == "rollback_step" and obs.args.get("step_id") in planned
        }
        undone = [s for s in planned if results.get(s) == "ok"]
        failed = [s for s in planned if results.get(s) != "ok"]
        text = f"{who}; rolled back {len(undone)} of {len(planned)} step(s)"
        if undone:
            text += f" ({', '.join(map(str, undone))})"
        if failed:
            text += f"; rollback FAILED for {', '.join(map(str, failed))}: check by hand"
        return text


EVIDENCE_STEPS = 3  # the latest step outcomes an approval request shows
EVIDENCE_LINES = 3  # the last lines of each
EVIDENCE_LINE_CHARS = 160


def _evidence(history: list[Observation]) -> list[str]:
    """What the steps already run found, for the person deciding: the last lines of the
    latest few step outcomes (already redacted), one short entry each."""
    entries = []
    for obs in reversed(history):
        if obs.tool not in STEP_TOOLS or obs.status == "refused":
            continue
        outcome = obs.outcome
        stream = outcome.get("stderr") if obs.status == "error" else outcome.get("stdout")
        lines = [line.strip() for line in str(stream or "").splitlines() if line.strip()]
        tail = [line[:EVIDENCE_LINE_CHARS] for line in lines[-EVIDENCE_LINES:]]
        head = f"{obs.args.get('step_id')}: {obs.status}"
        result = short_result(outcome)
        if result and not tail:
            head += f" ({result})"
        entries.append("\n".join([head, *(f"  {line}" for line in tail)]))
        if len(entries) == EVIDENCE_STEPS:
            break
    return list(reversed(entries))


def _clock(ts: float | None) -> str:
    return time.strftime("%H:%M:%S UTC", time.gmtime(ts or time.time()))


def _observation(record: ToolCallRecord) -> Observation:
    return Observation(
        call_key=record.call_key,
        tool=record.tool,
        args=record.args,
        status=record.status,
        outcome=record.outcome or {},
    )
