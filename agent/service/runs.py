"""RunService: the one facade the CLI, the bot and the HTTP API drive runs through."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from agent.policy.base import Policy, PolicyUnavailable
from agent.policy.mock import MockPolicy
from agent.records import (
    ApprovalRecord,
    ApprovalStatus,
    Claim,
    Origin,
    ProcessRecord,
    RunLimits,
    RunRecord,
    RunStatus,
)
from agent.redaction import Redactor
from agent.run.approvals import (
    Decision,
    DecisionRefused,
    check_decider,
    decision_effect,
    decision_status,
)
from agent.run.host import HostIdentity, this_host
from agent.run.kernel import RunKernel
from agent.run.leases import new_owner_id, owner_is_dead
from agent.runbook.model import Runbook, RunbookCatalog, load_catalog
from agent.runbook.request import MAX_REQUEST_BYTES
from agent.settings import Settings
from agent.store import ApprovalNotFound, NewRun, RunStore, StoreError
from agent.tools.memory import WorkspaceMemory
from agent.tools.shell import kill_attempt
from agent.tools.toolbox import Toolbox, tools_for_role

log = logging.getLogger(__name__)

# A long-running process renews its entry in the store's registry this often; one silent for
# PROCESS_LIVE_WITHIN seconds is gone (killed, frozen, or its host lost).
HEARTBEAT_INTERVAL = 2.0
PROCESS_LIVE_WITHIN = 3 * HEARTBEAT_INTERVAL
T = TypeVar("T")

NO_POLICY = (
    "no LLM configured: set OPENAI_API_KEY (and OPENAI_BASE_URL for a local server) "
    "or pass --mock-llm"
)
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
MAX_NOTE_BYTES = 1000


class ServiceError(Exception):
    """A request the service refuses; `str()` is one line for a human."""


class DeciderRefused(ServiceError):
    """This decider may not decide this request (not an approver, or four eyes)."""


@dataclass(frozen=True)
class DecisionResult:
    """What came of a decision: whether it changed anything, and the run after it."""

    changed: bool
    message: str
    approval: ApprovalRecord
    run: RunRecord


class RunService:
    """Start, resume, decide, cancel, list and explain runs over one store."""

    def __init__(
        self,
        store: RunStore,
        settings: Settings,
        policy: Policy | None = None,
        executes_runs: bool = True,
    ) -> None:
        self.store = store
        # False for a front end beside workers (`--no-worker`): it records starts and
        # decisions, and the workers, woken by the store, drive the runs.
        self.executes_runs = executes_runs
        self.settings = settings
        self._catalog: RunbookCatalog | None = None
        self._catalog_stamp: tuple[tuple[str, int, int], ...] = ()
        self.redactor = Redactor(settings.redact_patterns, settings.secret_values())
        self._injected = policy is not None
        self._policy = policy if policy is not None else _configured_policy(settings, self.redactor)
        self._policies: dict[str, Policy] = {}  # other policies runs were started with, by name
        self.toolbox = Toolbox(
            settings,
            self.catalog,
            WorkspaceMemory(settings.memory_path, settings.memory_max_lines),
        )
        self.kernel = RunKernel(
            store,
            self.toolbox,
            settings,
            self._policy_for,
            self.catalog,
            self.redactor,
            new_owner_id(),
        )
        self._drives: dict[str, asyncio.Task[RunRecord]] = {}
        self.drive_ended = asyncio.Event()  # a slot for another run is free
        self._side_tasks: set[asyncio.Task[None]] = set()

    @classmethod
    async def open(
        cls, settings: Settings, policy: Policy | None = None, executes_runs: bool = True
    ) -> RunService:
        """Open the store named by the settings and build the service over it."""
        store = await RunStore.open(settings.db, settings.db_pool_size)
        try:
            return cls(store, settings, policy, executes_runs)
        except BaseException:
            await store.close()
            raise

    async def close(self) -> None:
        """Stop this process's drives (their runs go back to the queue), then close the store."""
        drives: list[asyncio.Task[Any]] = [*self._drives.values(), *self._side_tasks]
        for task in drives:
            task.cancel()
        await asyncio.gather(*drives, return_exceptions=True)
        await self.toolbox.close()
        await self.store.close()

    def catalog(self) -> RunbookCatalog:
        """The workspace's runbooks; re-read only when a file in runbooks/ changed."""
        directory = self.settings.runbooks_dir
        try:
            stamp = tuple(
                sorted(
                    (p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in directory.iterdir()
                )
            )
        except OSError:
            stamp = ()
        if self._catalog is None or stamp != self._catalog_stamp:
            self._catalog, self._catalog_stamp = load_catalog(directory), stamp
        return self._catalog

    def _policy_for(self, run: RunRecord) -> Policy:
        """What drives `run`: the policy it was started with (the mock, or an LLM by model),
        whatever this process was started with; runs from before that was recorded, and runs
        of a service given its policy (tests, benchmarks), get this process's own."""
        if self._injected or run.policy is None or run.policy == getattr(self._policy, "name", ""):
            if self._policy is None:
                raise PolicyUnavailable(NO_POLICY)
            return self._policy
        policy = self._policies.get(run.policy)
        if policy is None:
            policy = self._policies[run.policy] = _recorded_policy(
                run.policy, self.settings, self.redactor
            )
        return policy

    # -- starting and driving ------------------------------------------------------------------

    async def start(
        self,
        run_id: str,
        message: str,
        role: str = "runbook",
        requested_by: str | None = None,
        origin: Origin | None = None,
        max_steps: int | None = None,
        wait: bool = True,
    ) -> RunRecord:
        """Create a run and drive it (in this task when `wait`, else in the background)."""
        validate_run_id(run_id)
        validate_text("message", message, MAX_REQUEST_BYTES)
        if not message.strip():
            raise ServiceError("message is empty")
        if max_steps is not None and max_steps < 1:
            raise ServiceError("max_steps must be at least 1")
        try:
            tools_for_role(role)
        except ValueError as exc:
            raise ServiceError(str(exc)) from None
        if self._policy is None:
            raise ServiceError(NO_POLICY)
        try:
            self._policy.preflight(message, self.catalog())
        except ValueError as exc:  # RequestError, ParamError: the store stays unchanged
            raise ServiceError(str(exc)) from None
        limits = RunLimits(
            max_steps=max_steps if max_steps is not None else self.settings.max_steps,
            max_tool_calls=self.settings.max_tool_calls,
            deadline_seconds=self.settings.run_deadline,
        )
        await self.store.create_run(
            NewRun(
                id=run_id,
                role=role,
                request=self.redactor.text(message),
                requested_by=requested_by or f"cli:{self.settings.user}",
                origin=origin or Origin(),
                limits=limits,
                policy=self._policy.name,
                effects=self.toolbox.effects(),
            )
        )
        return await self._drive(run_id, wait)

    @property
    def driving(self) -> int:
        """How many runs this process is driving now."""
        return len(self._drives)

    def drive_claimed(self, claim: Claim) -> None:
        """Drive, in the background, a run this process's owner claimed (a worker's claim)."""
        self._start_drive(claim.run_id, claim)

    async def _drive(self, run_id: str, wait: bool = True) -> RunRecord:
        """Drive a run once per process at a time; a second caller joins the first drive.
        A front end beside workers drives nothing: the run stays queued for them."""
        if not self.executes_runs:
            return await self.store.get_run(run_id)
        task = self._start_drive(run_id)
        if not wait:
            return await self.store.get_run(run_id)
        return await asyncio.shield(task)

    def _start_drive(self, run_id: str, claim: Claim | None = None) -> asyncio.Task[RunRecord]:
        task = self._drives.get(run_id)
        if task is not None and not task.done() and claim is None:
            return task  # join the drive in progress
        work = self._drive_tree(run_id, claim)
        if task is not None and not task.done():
            # Claimed while this process's last drive of the run is still winding down (it
            # parked the run, and something woke it since): drive the new claim after it,
            # or the claimed lease would sit undriven until it expires.
            work = _after(task, work)
        task = asyncio.create_task(work, name=f"drive:{run_id}")
        self._drives[run_id] = task
        task.add_done_callback(lambda t, rid=run_id: self._forget(rid, t))
        return task

    async def _drive_tree(self, run_id: str, claim: Claim | None = None) -> RunRecord:
        """Drive a run; drive the children it waits for; when it ends, wake its parent."""
        run = await self.kernel.drive(run_id, claim)
        while run.status == RunStatus.WAITING_CHILDREN:
            runnable = [
                child.id
                for child in await self.store.child_runs(run_id)
                if child.status in (RunStatus.QUEUED, RunStatus.RUNNING)
            ]
            if not runnable:
                break  # the children wait for humans; their end will wake this run
            results = await asyncio.gather(
                *(self._drive(c) for c in runnable), return_exceptions=True
            )
            for child_id, result in zip(runnable, results, strict=True):
                if isinstance(result, BaseException):
                    log.info("child %s of %s not driven here: %s", child_id, run_id, result)
            run = await self.store.get_run(run_id)
            if run.status == RunStatus.WAITING_CHILDREN and all(
                isinstance(result, BaseException) for result in results
            ):
                break  # e.g. the children are driven by another live process: it wakes us
            if run.status == RunStatus.QUEUED:  # the last child's end woke it
                run = await self.kernel.drive(run_id)
        await self._drive_woken(run)
        return run

    async def _drive_woken(self, run: RunRecord) -> None:
        """A run ended: drive what its end woke (a sibling waiting for it, then the parent)."""
        if not run.status.is_terminal or not run.parent_id:
            return
        for sibling in await self.store.child_runs(run.parent_id):
            if sibling.status == RunStatus.QUEUED and sibling.id not in self._drives:
                await self._drive(sibling.id)
        parent = await self.store.get_run(run.parent_id)
        if parent.status == RunStatus.QUEUED and parent.id not in self._drives:
            await self._drive(parent.id)

    def _forget(self, run_id: str, task: asyncio.Task[RunRecord]) -> None:
        if self._drives.get(run_id) is task:
            del self._drives[run_id]
            self.drive_ended.set()
        error = None if task.cancelled() else task.exception()
        if isinstance(error, StoreError):  # e.g. another process drives it: nothing is wrong
            log.info("not driving %s here: %s", run_id, error)
        elif error is not None:
            # Nobody may be awaiting a background drive: say what stopped it.
            log.error("driving %s failed: %s", run_id, error)

    async def resume(self, run_id: str) -> RunRecord:
        """Drive on every runnable run of the tree `run_id` belongs to, children first, each
        with its own stored role; waiting and finished runs are left as they are."""
        await self.expire_overdue()
        await self.store.get_run(run_id)  # RunNotFound for an unknown id
        for tree_id in reversed(await self.store.tree_ids(run_id)):
            run = await self.store.get_run(tree_id)
            if run.status in (RunStatus.QUEUED, RunStatus.RUNNING):
                if tree_id == run_id:
                    await self._drive(tree_id)  # its own errors (RunBusy) are the caller's
                    continue
                try:
                    await self._drive(tree_id)
                except StoreError as exc:  # e.g. driven by another live process
                    log.info("not resuming %s: %s", tree_id, exc)
        return await self.store.get_run(run_id)

    async def live_processes(self) -> list[ProcessRecord]:
        """The other long-running processes serving this store now (a fresh heartbeat)."""
        now = time.time()
        return [
            process
            for process in await self.store.list_processes()
            if now - process.heartbeat_at <= PROCESS_LIVE_WITHIN
            and process.owner != self.kernel.owner
        ]

    async def drive_runnable(self) -> list[str]:
        """Start driving, in the background, every runnable run (due now) this process does
        not drive yet; returns their ids. What a long-running process does when woken."""
        if not self.executes_runs:
            return []
        started = []
        for run_id in await self.store.runnable_run_ids(owner_is_dead, due_only=True):
            if run_id not in self._drives:
                self._start_drive(run_id)
                started.append(run_id)
        return started

    async def recover(self) -> list[RunRecord]:
        """Pick up every run whose owner died (or that was left queued), and drive them all."""
        await self.expire_overdue()
        run_ids = await self.store.runnable_run_ids(owner_is_dead)
        results = await asyncio.gather(
            *(self._drive(run_id) for run_id in run_ids), return_exceptions=True
        )
        recovered = []
        for run_id, result in zip(run_ids, results, strict=True):
            if isinstance(result, StoreError):  # e.g. another process claimed it first
                log.info("not recovering %s: %s", run_id, result)
            elif isinstance(result, BaseException):
                raise result
            else:
                recovered.append(result)
        return recovered

    async def expire_overdue(self, wait: bool = True) -> int:
        """End runs whose approval request passed its deadline; returns how many. What their
        end wakes is driven in this task when `wait`, else in the background."""
        expired = 0
        for approval_id in await self.store.overdue_approval_ids():
            if await self.store.expire_approval(approval_id):
                expired += 1
                approval = await self.store.get_approval(approval_id)
                await self._wake_after_end(await self.store.get_run(approval.run_id), wait)
        return expired

    async def _wake_after_end(self, run: RunRecord, wait: bool) -> None:
        if wait:
            await self._drive_woken(run)
        elif run.status.is_terminal and run.parent_id:
            self._background(self._drive_woken(run), f"wake:{run.id}")

    # -- decisions ---------------------------------------------------------------------------

    async def decide(
        self,
        run_id: str,
        decision: Decision,
        decider: str,
        note: str | None = None,
        approval_token: str | None = None,
        approval_number: int | None = None,
        wait: bool = True,
    ) -> DecisionResult:
        """Decide one approval request of a run; the first decision wins. Approval resumes it
        (in this task when `wait`, else in the background, as a chat handler needs).

        The request is named by its token (buttons, links) or its number in the incident
        (#1, #2); unnamed, it must be the run's only request ever, so a repeated decision can
        never land on a later one.
        """
        if note is not None:
            validate_text("note", note, MAX_NOTE_BYTES)
        await self.expire_overdue(wait)
        run = await self.store.get_run(run_id)
        approval = await self._approval_to_decide(run, approval_token, approval_number)
        if approval.run_id != run.id:  # decided through its root: act on the child itself
            run_id = approval.run_id
            run = await self.store.get_run(run_id)
        if approval.status != ApprovalStatus.PENDING:
            return DecisionResult(False, _already(approval), approval, run)
        self.check_decider(approval, decider)
        try:
            status = decision_status(approval, decision)
        except DecisionRefused as exc:
            raise ServiceError(str(exc)) from None
        runbook = Runbook.from_snapshot(run.runbook) if run.runbook else None
        note = self.redactor.text(note) if note else None
        effect = decision_effect(
            approval,
            run,
            decision,
            decider,
            note,
            rollback_on_reject=bool(runbook and runbook.on_reject == "rollback"),
        )
        changed = await self.store.decide_approval(approval.id, status, decider, note, effect)
        approval = await self.store.get_approval(approval.id)
        if not changed:
            run = await self.store.get_run(run_id)
            return DecisionResult(False, _already(approval), approval, run)

        run = await self.store.get_run(run_id)
        message = f"{status} by {decider}"
        try:
            if run.status == RunStatus.QUEUED:
                run = await self._drive(run_id, wait)
            else:
                await self._wake_after_end(run, wait)  # e.g. a rejected child: its tree goes on
        except StoreError as exc:  # e.g. another process resumed it first: still decided
            message += f"; the run goes on elsewhere ({exc})"
        return DecisionResult(True, message, approval, run)

    def _background(self, work: Coroutine[Any, Any, None], name: str) -> None:
        """Run `work` as a task this service keeps (and stops on close)."""
        task = asyncio.create_task(work, name=name)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_task_done)

    def _side_task_done(self, task: asyncio.Task[None]) -> None:
        self._side_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s failed: %s", task.get_name(), task.exception())

    def check_decider(self, approval: ApprovalRecord, decider: str) -> None:
        """Raise DeciderRefused unless `decider` may decide `approval` (nothing is recorded)."""
        try:
            check_decider(approval, decider, self.settings.approvers)
        except DecisionRefused as exc:
            raise DeciderRefused(str(exc)) from None

    async def _approval_to_decide(
        self, run: RunRecord, approval_token: str | None, approval_number: int | None
    ) -> ApprovalRecord:
        if approval_token is not None or approval_number is not None:
            try:
                if approval_token is not None:
                    approval = await self.store.get_approval_by_token(approval_token)
                else:
                    assert approval_number is not None
                    approval = await self.store.get_approval_by_number(run.id, approval_number)
            except ApprovalNotFound as exc:
                if approval_token is not None:
                    raise ServiceError("no such approval request (stale or forged)") from None
                raise ServiceError(str(exc)) from None
            if approval.run_id not in await self.store.subtree_ids(run.id):
                raise ServiceError("that approval request belongs to another run")
            return approval
        requests = await self.store.list_approvals(run.id)
        if not requests and run.status == RunStatus.WAITING_CHILDREN:
            return await self._approval_in_tree(run)
        pending = [a for a in requests if a.status == ApprovalStatus.PENDING]
        if len(requests) > 1:
            hint = (
                f": the open one is #{pending[0].number} ({_describe(pending[0])})"
                if pending
                else ""
            )
            raise ServiceError(
                f"run {run.id} has had {len(requests)} approval requests; say which one you "
                f"decide by its number{hint}"
            )
        if pending:
            return pending[0]
        if run.status.is_terminal:
            raise ServiceError(f"run {run.id} is already {run.status}; nothing to decide")
        if requests:
            return requests[0]
        raise ServiceError(f"run {run.id} has no approval request (status {run.status})")

    async def _approval_in_tree(self, run: RunRecord) -> ApprovalRecord:
        """The one request below a waiting parent; as for one run, an unnamed decision is only
        taken when the subtree has ever had a single request, so a repeat cannot land on the
        next gate."""
        requests = [
            approval
            for tree_id in (await self.store.subtree_ids(run.id))[1:]
            for approval in await self.store.list_approvals(tree_id)
        ]
        pending = [a for a in requests if a.status == ApprovalStatus.PENDING]
        if len(requests) == 1:  # decided already: the caller says so, nothing changes
            return requests[0]
        if not pending:
            raise ServiceError(f"run {run.id} waits for its children; none waits for a decision")
        listing = ", ".join(f"#{a.number} ({_describe(a)} in {a.run_id})" for a in pending)
        raise ServiceError(
            f"run {run.id} has had {len(requests)} approval requests; say which one you "
            f"decide by its number (open: {listing})"
        )

    async def cancel(self, run_id: str, by: str, wait: bool = True) -> RunRecord:
        """Cancel a run that has not finished (what its end wakes is driven in this task when
        `wait`, else in the background)."""
        try:
            cancelled = await self.store.cancel_run(run_id, by)
        except StoreError as exc:
            raise ServiceError(str(exc)) from None
        # Driven here: stop at once. Driven by another process: its heartbeat finds the lease
        # gone within a third of the lease TTL and stops there.
        for cancelled_id in cancelled:
            self.kernel.stop(cancelled_id)
        # A driver that is frozen never gets there, and its command's guard waits for the
        # timeout: kill the in-flight commands we can reach (same host and PID namespace) now.
        here = this_host()
        for cancelled_id in cancelled:
            for call in await self.store.list_tool_calls(cancelled_id):
                info = call.attempt_info or {}
                marker = info.get("marker")
                if call.status != "intent" or info.get("kind") != "run":
                    continue
                where = HostIdentity(
                    str(info.get("hostname")), info.get("boot_id"), info.get("pid_ns")
                )
                if not isinstance(marker, str) or not here.same_pid_space(where):
                    continue
                try:
                    await asyncio.to_thread(kill_attempt, marker)
                except ValueError:  # a marker this version cannot look for
                    log.warning("run %s: cannot look for attempt %r", cancelled_id, marker)
        run = await self.store.get_run(run_id)
        await self._wake_after_end(run, wait)  # a cancelled child may have been the last one
        return run

    # -- reading -----------------------------------------------------------------------------

    async def get(self, run_id: str) -> RunRecord:
        """One run."""
        return await self.store.get_run(run_id)

    async def list(self, status: RunStatus | None = None, limit: int = 50) -> list[RunRecord]:
        """Recent runs, newest first (overdue approvals are expired first, so none shows stale)."""
        await self.expire_overdue()
        return await self.store.list_runs(status, limit)

    async def pending_approval(self, run_id: str) -> ApprovalRecord | None:
        """The open approval request the run waits for: its own, or one in a child it awaits."""
        pending = await self.store.list_approvals(run_id, ApprovalStatus.PENDING)
        if pending:
            return pending[0]
        run = await self.store.get_run(run_id)
        if run.status != RunStatus.WAITING_CHILDREN:
            return None
        for tree_id in await self.store.subtree_ids(run_id):
            pending = await self.store.list_approvals(tree_id, ApprovalStatus.PENDING)
            if pending:
                return pending[0]
        return None


async def _after(previous: asyncio.Task[RunRecord], work: Coroutine[Any, Any, T]) -> T:
    """Run `work` once `previous` is over, however it ended."""
    await asyncio.gather(previous, return_exceptions=True)
    return await work


def _configured_policy(settings: Settings, redactor: Redactor) -> Policy | None:
    """The mock when asked for, else the LLM when a key is set, else none (runs refuse to start)."""
    if settings.mock_llm:
        return MockPolicy()
    if settings.openai_api_key is None or not settings.openai_api_key.get_secret_value():
        return None
    # Imported here: the openai package costs about half a second of start-up that the mock,
    # and every CLI command that starts no run, should not pay.
    from agent.policy.llm import OpenAIPolicy

    return OpenAIPolicy(settings, redactor)


def _recorded_policy(name: str, settings: Settings, redactor: Redactor) -> Policy:
    """The policy a run was started with, by its recorded name: the mock needs nothing; an
    LLM needs this process's key and URL, and keeps the run's model."""
    if name == MockPolicy.name:
        return MockPolicy()
    kind, _, model = name.partition(":")
    if kind != "openai" or not model:
        raise PolicyUnavailable(f"this run is driven by {name!r}, which this version lacks")
    if settings.openai_api_key is None or not settings.openai_api_key.get_secret_value():
        raise PolicyUnavailable(
            f"this run is driven by the LLM {model!r}: set OPENAI_API_KEY (and OPENAI_BASE_URL) "
            "where it resumes"
        )
    from agent.policy.llm import OpenAIPolicy

    return OpenAIPolicy(settings.model_copy(update={"openai_model": model}), redactor)


def _describe(approval: ApprovalRecord) -> str:
    return f"{approval.kind} for step {approval.step_id}"


def _already(approval: ApprovalRecord) -> str:
    who = f"by {approval.decided_by}" if approval.decided_by else "at its deadline"
    return f"already {approval.status} {who}; nothing changed"


def validate_text(name: str, value: str, max_bytes: int) -> None:
    """Raise ServiceError for text that is not valid UTF-8, has a NUL, or is too long."""
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise ServiceError(f"{name} is not valid UTF-8") from None
    if "\x00" in value:
        raise ServiceError(f"{name} contains a NUL character")
    if size > max_bytes:
        raise ServiceError(f"{name} is longer than {max_bytes} bytes")


def validate_run_id(run_id: str) -> None:
    """Raise ServiceError unless `run_id` is a sane id (letters, digits, `._:-`, <= 128)."""
    if not RUN_ID_PATTERN.fullmatch(run_id):  # fullmatch: `$` would let "id\n" through
        raise ServiceError(
            f"invalid run id {run_id[:40]!r}: use letters, digits and ._:- (at most 128)"
        )
