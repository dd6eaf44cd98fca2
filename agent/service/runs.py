"""RunService: the one door the CLI, the bot and the HTTP API drive and read runs through.

Front ends call its commands (start, resume, decide, cancel) and the queries they need (a run,
its tree, its journal, the processes serving the store), never the store or the kernel. What
only driving a run needs (the kernel, the toolbox, the policy, the runbook model), and the
audit verifier, are imported and built on first use, so a command that only reads starts in a
fraction of the time.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import hashlib
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Coroutine, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from agent.errors import (
    ApprovalAmbiguous,
    ApprovalNotFound,
    DeciderRefused,
    DecisionRefused,
    ErrorKind,
    LoomOpsError,
    PeopleFileError,
    PolicyUnavailable,
    RunBusy,
    RunNotRunnable,
    ServiceError,
    StoreError,
    StoreUnavailable,
    kind_of,
)
from agent.people import TOKEN_NAME_PATTERN, People, load_people, start_refusal
from agent.records import (
    ApiTokenRecord,
    ApprovalInRun,
    ApprovalRecord,
    ApprovalStatus,
    ApprovalVote,
    Claim,
    Decision,
    Effects,
    EventRecord,
    Hop,
    Origin,
    ProcessRecord,
    RunLimits,
    RunRecord,
    RunStatus,
    RunTree,
    VoteOutcome,
    record,
)
from agent.run.approvals import (
    check_decider,
    counted_persons,
    counting_votes,
    decision_effect,
    decision_status,
    escalated,
    reminded,
    vote_outcome,
)
from agent.run.host import HostIdentity, this_host
from agent.run.leases import new_owner_id, owner_is_dead
from agent.runbook.request import MAX_REQUEST_BYTES
from agent.settings import Settings, switched_on
from agent.store import Database, JournalWatch, MetricsSnapshot, NewRun, RunStore
from agent.store.database import is_postgres_url, sqlite_path

if TYPE_CHECKING:
    # Imported on first use (see the module's docstring): named here for the type checker.
    from agent.policy.base import Policy
    from agent.redaction import Redactor
    from agent.run.kernel import RunKernel
    from agent.runbook.model import RunbookCatalog
    from agent.service.audit import StoreReport, TreeReport
    from agent.store.journal import AuditAnchor
    from agent.tools.toolbox import Toolbox

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
# A decision is judged again when someone voted meanwhile; each round means another vote
# landed, so a few rounds are plenty.
MAX_VOTE_ROUNDS = 8
# A person's API token: recognisable in a leaked log or a secret scanner, then 256 bits.
TOKEN_PREFIX = "lo_"


@record
class DecisionResult:
    """What came of a decision: whether it changed anything, the run after it, and the
    request's votes (a request needing several approvals stays pending until they are in)."""

    changed: bool
    message: str
    approval: ApprovalRecord
    run: RunRecord
    votes: tuple[ApprovalVote, ...] = ()  # the approvals that count, one per person

    @property
    def approved_by(self) -> list[str]:
        """Who approved the request so far (identities, oldest first), counting only the
        approvals that count."""
        return [vote.decided_by for vote in self.votes]


def _refuse_live_guess(live: list[str], catalog: RunbookCatalog, message: str) -> None:
    """With a live switch on, refuse a message that names no runbook (ServiceError): the
    runbook its words match, with defaults such as namespace=production, is a guess, and a
    guess must not run kubectl unasked."""
    from agent.runbook.matching import live_guess_refusal

    refused = live_guess_refusal(live, catalog, message)
    if refused is None:
        return
    why, guess = refused
    how = (
        f"to run exactly that, make the message {guess.named()!r}"
        if guess.runbook
        else "put a runbook id first"
    )
    raise ServiceError(
        f"{why}; {how}, or confirm the guess (the API's \"yes\": true, the CLI's --yes)"
    )


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
        self._people: People | None = None
        self._people_stamp: tuple[int, int] | None = None
        # API token name -> its person's name, as last read from the store: token identities
        # (`api:<name>`) are people's identities too (see `people`).
        self._token_people: dict[str, str] = {}
        self._injected = policy
        self._policies: dict[str, Policy] = {}  # other policies runs were started with, by name
        self.owner = new_owner_id()  # this process instance, as the leases it takes name it
        self._drives: dict[str, asyncio.Task[RunRecord]] = {}
        self.drive_ended = asyncio.Event()  # a slot for another run is free
        self._side_tasks: set[asyncio.Task[None]] = set()
        self._next_death_look = 0.0  # (time.monotonic) see `claim`

    @functools.cached_property
    def redactor(self) -> Redactor:
        """What hides secrets in what runs journal and show (built on first use: a command
        that only reads never compiles its patterns)."""
        from agent.redaction import Redactor

        return Redactor(self.settings.redact_patterns, self.settings.secret_values())

    @classmethod
    async def open(
        cls, settings: Settings, policy: Policy | None = None, executes_runs: bool = True
    ) -> RunService:
        """Open the store named by the settings and build the service over it."""
        store = await RunStore.open(settings.db, settings.db_pool_size, settings.audit_secret())
        try:
            return cls(store, settings, policy, executes_runs)
        except BaseException:
            await store.close()
            raise

    async def drain(self, grace: float, hurry: asyncio.Event | None = None) -> None:
        """Stop driving runs, gently: no drive starts any more, and each one hands its run
        back at its next step boundary (a call in flight runs to its end, and its outcome is
        kept), waiting at most `grace` seconds for them, or until `hurry` is set. `close`
        then stops what is left at once: a call still in flight is in doubt for whoever
        drives its run next."""
        self.executes_runs = False
        if "kernel" in self.__dict__:  # built, so it may be driving
            self.kernel.draining = True
        going = [task for task in self._drives.values() if not task.done()]
        if not going:
            return
        log.warning(
            "stopping: %d run(s) go back once their step in flight ends, within %g s "
            "(LOOM_OPS_DRAIN_SECONDS; a second signal stops at once)",
            len(going),
            grace,
        )
        if grace > 0:
            ended = asyncio.ensure_future(asyncio.wait(going, timeout=grace))
            waits = {ended, *([asyncio.ensure_future(hurry.wait())] if hurry else [])}
            _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
        if left := sorted(run_id for run_id, task in self._drives.items() if not task.done()):
            log.warning(
                "stopping: %s still in a step: handed back, the step in doubt", ", ".join(left)
            )

    async def close(self) -> None:
        """Stop this process's drives (their runs go back to the queue), then close the store."""
        drives: list[asyncio.Task[Any]] = [*self._drives.values(), *self._side_tasks]
        for task in drives:
            task.cancel()
        await asyncio.gather(*drives, return_exceptions=True)
        if "toolbox" in self.__dict__:  # built, so it may hold MCP servers to stop
            await self.toolbox.close()
        await self.store.close()

    @functools.cached_property
    def _policy(self) -> Policy | None:
        """What drives new runs: the policy given, else the configured one (None: runs refuse
        to start)."""
        if self._injected is not None:
            return self._injected
        return _configured_policy(self.settings, self.redactor)

    @functools.cached_property
    def toolbox(self) -> Toolbox:
        """The tools runs act through: shell, MCP, health checks, workspace memory."""
        from agent.tools.memory import WorkspaceMemory
        from agent.tools.toolbox import Toolbox

        memory = WorkspaceMemory(self.settings.memory_path, self.settings.memory_max_lines)
        return Toolbox(self.settings, self.catalog, memory)

    @functools.cached_property
    def kernel(self) -> RunKernel:
        """The loop that drives this process's runs, under this process's owner id."""
        from agent.run.kernel import RunKernel

        return RunKernel(
            self.store,
            self.toolbox,
            self.settings,
            self._policy_for,
            self.catalog,
            self.redactor,
            self.owner,
        )

    def prepare(self) -> None:
        """Build what driving runs needs (kernel, toolbox, policy) now: a long-running process
        pays for it once at start, not in its first request."""
        _ = self.kernel, self._policy

    def catalog(self) -> RunbookCatalog:
        """The workspace's runbooks; re-read only when a file in runbooks/ changed."""
        from agent.runbook.model import current_catalog

        return current_catalog(self.settings.runbooks_dir)

    def people(self) -> People:
        """Who is who (the people file, the approver settings and the API tokens last read
        from the store); the file is re-read only when it changed. ServiceError (invalid)
        names the file, line and field of a bad one."""
        return self._file_people().with_tokens(self._token_people)

    async def _read_tokens(self) -> None:
        # Before a start or decision that involves a token identity: a token made by another
        # process (`loom-ops tokens create`) must count as its person here too.
        tokens = await self.store.list_tokens()
        self._token_people = {token.name: token.person for token in tokens}

    def _file_people(self) -> People:
        """The people file and the approver settings, re-read when the file changed."""
        try:
            status = self.settings.people_path.stat()
            stamp: tuple[int, int] | None = (status.st_mtime_ns, status.st_size)
        except OSError:
            stamp = None
        if self._people is None or stamp != self._people_stamp:
            try:
                people = load_people(self.settings)
            except PeopleFileError as exc:
                raise ServiceError(str(exc), kind=exc.kind) from None
            self._people, self._people_stamp = people, stamp
        return self._people

    def _policy_for(self, run: RunRecord) -> Policy:
        """What drives `run`: the policy it was started with (the mock, or an LLM by model),
        whatever this process was started with; runs from before that was recorded, and runs
        of a service given its policy (tests, benchmarks), get this process's own."""
        if (
            self._injected is not None
            or run.policy is None
            or run.policy == getattr(self._policy, "name", "")
        ):
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
        capped: bool = False,
        guess_confirmed: bool = False,
    ) -> RunRecord:
        """Create a run and drive it (in this task when `wait`, else in the background).

        `capped` (the API's and the chat's starts) refuses with TooManyRuns while
        LOOM_OPS_MAX_ACTIVE_RUNS incidents are active. A live run starts only from a runbook
        the message names, unless `guess_confirmed` (the CLI's --yes, the API's `yes`): a
        person let it run the runbook the message's words match."""
        validate_run_id(run_id)
        validate_text("message", message, MAX_REQUEST_BYTES)
        if not message.strip():
            raise ServiceError("message is empty")
        if max_steps is not None and max_steps < 1:
            raise ServiceError("max_steps must be at least 1")
        from agent.tools.toolbox import tools_for_role

        try:
            tools_for_role(role)
        except ValueError as exc:
            raise ServiceError(str(exc)) from None
        if self._policy is None:
            raise ServiceError(NO_POLICY)
        catalog = self.catalog()
        try:
            self._policy.preflight(message, catalog)
            if not guess_confirmed:
                _refuse_live_guess(self.settings.live_switches, catalog, message)
        except ValueError as exc:  # RequestError, ParamError: the store stays unchanged
            raise ServiceError(str(exc)) from None
        requested_by = requested_by or f"cli:{self.settings.user}"
        if requested_by.startswith("api:"):
            await self._read_tokens()
        self.check_starter(message, requested_by)
        limits = RunLimits(
            max_steps=max_steps if max_steps is not None else self.settings.max_steps,
            max_tool_calls=self.settings.max_tool_calls,
            deadline_seconds=self.settings.run_deadline,
        )
        created = await self.store.create_run(
            NewRun(
                id=run_id,
                role=role,
                request=self.redactor.text(message),
                requested_by=requested_by,
                origin=origin or Origin(),
                limits=limits,
                policy=self._policy.name,
                effects=self.settings.effects,
            ),
            max_active=self.settings.max_active_runs if capped else None,
        )
        try:
            return await self._drive(run_id, wait, created)
        except (RunBusy, RunNotRunnable):
            # Another process on the store (a worker, `serve`) took the new run first and
            # drives it, or drove it to a wait already: the start happened, the run goes on.
            return await self.store.get_run(run_id)

    @property
    def database(self) -> Database:
        """The database under the store, for a front end's own tables (the bot's)."""
        return self.store.db

    @property
    def outbox_ready(self) -> asyncio.Event:
        """Set when a commit queued a chat message (in this process, or seen from another)."""
        return self.store.outbox_ready

    def new_owner_id(self) -> str:
        """A fresh id naming this process instance, for a lease a front end holds (a chat's
        delivery): unique as a run's lease owner is, and proven dead the same way."""
        return new_owner_id()

    @property
    def driving(self) -> int:
        """How many runs this process is driving now."""
        return len(self._drives)

    def may_act(self, run: RunRecord) -> bool:
        """Whether this process's settings allow all a run does live (`Effects.lacking`):
        it picks up on its own only such runs, and drives others only when asked to."""
        return not self.settings.effects.lacking(run.effects)

    def drive_claimed(self, claim: Claim) -> None:
        """Drive, in the background, a run this process's owner claimed (a worker's claim)."""
        self._start_drive(claim.run_id, claim)

    async def _drive(
        self, run_id: str, wait: bool = True, written: RunRecord | None = None
    ) -> RunRecord:
        """Drive a run once per process at a time; a second caller joins the first drive.
        A front end beside workers drives nothing: the run stays queued for them. Not
        waiting, it returns the run as the caller just `written` it, else as stored now."""
        if self.executes_runs:
            task = self._start_drive(run_id)
            if wait:
                return await asyncio.shield(task)
        return written or await self.store.get_run(run_id)

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
        # A drive is the run's, not its caller's: it starts in a context of its own, so what
        # a request set (e.g. a benchmark's round-trip count) stays with the request.
        task = asyncio.create_task(work, name=f"drive:{run_id}", context=contextvars.Context())
        self._drives[run_id] = task
        task.add_done_callback(lambda t, rid=run_id: self._forget(rid, t))
        return task

    async def _drive_tree(self, run_id: str, claim: Claim | None = None) -> RunRecord:
        """Drive a run; drive the children it waits for; when it ends, wake its parent."""
        run = await self.kernel.drive(run_id, claim)
        while run.status == RunStatus.WAITING_CHILDREN and self.executes_runs:
            now = time.time()
            # A child handed back to be tried again later (an outage), or one this process
            # may not act, waits for the claim loop of a process that may: driving it again
            # now would only stop it again, journaling a claim and a stop each time,
            # hundreds of times a second.
            runnable = [
                child.id
                for child in await self.store.child_runs(run_id)
                if child.status in (RunStatus.QUEUED, RunStatus.RUNNING)
                and child.due(now)
                and self.may_act(child)
            ]
            if not runnable:
                break  # the children wait for humans or a later try; their end wakes this run
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
            if self._wakes(sibling):
                await self._drive(sibling.id)
        parent = await self.store.get_run(run.parent_id)
        if self._wakes(parent):
            await self._drive(parent.id)

    def _wakes(self, run: RunRecord) -> bool:
        """Whether a run another's end woke is driven here: queued, not driven here yet,
        and this process may act it (else it is left for one that may)."""
        return run.status == RunStatus.QUEUED and run.id not in self._drives and self.may_act(run)

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
        await self._expire_and_drive(wait=True)
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
        """The other long-running processes serving this store now: a fresh heartbeat, and
        not provably gone (one of this host killed since its last beat)."""
        now = time.time()
        return [
            process
            for process in await self.store.list_processes()
            if now - process.heartbeat_at <= PROCESS_LIVE_WITHIN
            and process.owner != self.owner
            and not owner_is_dead(process.owner)
        ]

    async def drivers(self, effects: Effects | None) -> list[ProcessRecord]:
        """The other live processes that drive runs and may act a run with `effects` in
        full: those that pick such a run up on their own."""
        live = await self.live_processes()
        return [p for p in live if p.drives_runs and p.may_act(effects)]

    async def _waits_for(self, run: RunRecord) -> str | None:
        """Why a queued run this process leaves to others waits longer than for a driver's
        next look: no live process drives runs, or none has the settings its live steps
        need. None when a live process that drives runs may act it."""
        if await self.drivers(run.effects):
            return None
        needed = run.effects.live if run.effects is not None else ()
        if not needed:
            return "the run waits for a process that drives runs: none is live (`loom-ops worker`)"
        them = "them" if len(needed) > 1 else "it"
        return (
            f"the run waits for a process with {switched_on(needed)}: no live process that "
            f"drives runs has {them}"
        )

    async def runs_nobody_drives(self) -> list[str]:
        """Runnable runs (due now) that no live process driving runs may act, this one
        included: they wait until one starts whose settings allow what they do live."""
        if self.executes_runs:
            return []
        waiting = await self.store.runnable_run_ids(owner_is_dead, due_only=True)
        drivers = {p.effects for p in await self.live_processes() if p.drives_runs}
        for effects in drivers:  # one read per kind of driver: few, and usually one
            if not waiting:
                break
            acted = await self.store.runnable_run_ids(owner_is_dead, True, effects)
            waiting = [run_id for run_id in waiting if run_id not in acted]
        return waiting

    async def drive_runnable(self) -> list[str]:
        """Start driving, in the background, every runnable run (due now) this process does
        not drive yet and may act; returns their ids. What a long-running process does when
        woken."""
        if not self.executes_runs:
            return []
        started = []
        runnable = await self.store.runnable_run_ids(owner_is_dead, True, self.settings.effects)
        for run_id in runnable:
            if run_id not in self._drives:
                self._start_drive(run_id)
                started.append(run_id)
        return started

    async def recover(self) -> list[RunRecord]:
        """Pick up every run whose owner died (or that was left queued) and drive those this
        process may act; the others are returned as they are (`may_act` tells them apart)."""
        await self.expire_overdue()  # what it queues (a rollback, a woken parent) is driven here
        every = await self.store.runnable_run_ids(owner_is_dead)
        run_ids = await self.store.runnable_run_ids(owner_is_dead, effects=self.settings.effects)
        left = [await self.store.get_run(run_id) for run_id in every if run_id not in run_ids]
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
        return recovered + left

    async def sweep_approvals(self, wait: bool = True) -> int:
        """Make what the timers of pending approval requests say is due: expire the overdue
        ones, then remind and escalate; returns how many timers this process acted on. Each
        hop is made once however many processes sweep the store."""
        acted = await self._expire_and_drive(wait)
        for approval_id, hop in await self.store.due_approval_hops():
            if await self.make_hop(approval_id, hop):
                acted += 1
        return acted

    async def make_hop(self, approval_id: int, hop: Hop) -> bool:
        """Remind the people who may decide a pending request, or escalate it (its
        `escalate_to` become deciders, and are told); False when it was made already or the
        request no longer waits."""
        request = await self.store.approval_in_run(approval_id)
        approval = request.approval
        if approval.status != ApprovalStatus.PENDING:
            return False
        try:
            people = self.people()
        except ServiceError as exc:  # the hop is still made (and journaled), naming nobody
            log.warning("approval request %s: cannot tell whom to mention: %s", approval_id, exc)
            mentioned: list[str] = []
        else:
            approvers = self.settings.approvers
            counted = counted_persons(approval, request.votes, people, approvers)
            hop_of = reminded if hop == Hop.REMIND else escalated
            mentioned = hop_of(approval, people, approvers, counted)
        made = await self.store.make_hop(approval_id, hop, mentioned)
        if made.made:
            log.info(
                "approval request %s of %s: %s (%s)",
                approval_id,
                approval.run_id,
                "reminded" if hop == Hop.REMIND else f"escalated to {approval.escalate_to}",
                ", ".join(mentioned) or "nobody to mention",
            )
        return made.made

    async def expire_overdue(self) -> list[RunRecord]:
        """Record the expiry of every pending request past its deadline: its run ends (or,
        `on_expiry: rollback`, is queued to roll its completed steps back first). Store
        transactions only, nothing is driven: what a read command may do; whatever drives
        runs (a worker, `serve`/`telegram`, `loom-ops resume`) drives what it queued. Returns
        the runs as their expiry left them."""
        runs = []
        for approval_id in await self.store.overdue_approval_ids():
            run = await self.store.expire_approval(approval_id)
            if run is not None:
                runs.append(run)
        return runs

    async def _expire_and_drive(self, wait: bool) -> int:
        """Expire overdue requests, then drive what their expiry queued or woke (in this task
        when `wait`, else in the background); returns how many expired."""
        runs = await self.expire_overdue()
        for run in runs:
            await self._wake_after_end(run, wait)
        return len(runs)

    async def _wake_after_end(self, run: RunRecord, wait: bool) -> None:
        if run.status == RunStatus.QUEUED:  # its request expired into a rollback
            if not self.may_act(run):  # left for a process that may act it
                waits = await self._waits_for(run)
                if waits is not None:
                    log.warning("run %s is queued to roll back; %s", run.id, waits)
                return
            try:
                await self._drive(run.id, wait, run)
            except StoreError as exc:  # e.g. another process drives it
                log.info("not rolling %s back here: %s", run.id, exc)
        elif wait:
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
        """Decide one approval request of a run: the first reject, or the approval that makes
        the count its rule asks for (one, unless the step says more), decides it; an earlier
        approval is counted and the run goes on waiting. Approval resumes the run (in this
        task when `wait`, else in the background, as a chat handler needs).

        The request is named by its token (buttons, links) or its number in the incident
        (#1, #2); unnamed, it must be the run's only request ever, so a repeated decision can
        never land on a later one.
        """
        if approval_token is not None:
            # A late decision expires its request in the deciding transaction: no sweep first.
            request = await self.approval_request(token=approval_token)
            if run_id not in request.lineage:
                await self.store.get_run(run_id)  # RunNotFound for an unknown id
                raise ServiceError(
                    "that approval request belongs to another run", kind=ErrorKind.CONFLICT
                )
            return await self.decide_request(request, decision, decider, note, wait)
        if note is not None:
            validate_text("note", note, MAX_NOTE_BYTES)
        await self._expire_and_drive(wait)
        run = await self.store.get_run(run_id)
        approval = await self._approval_to_decide(run, approval_number)
        if approval.run_id != run.id:  # decided through its root: act on the child itself
            run = await self.store.get_run(approval.run_id)
        return await self._decide(approval, run, decision, decider, note, wait)

    async def decide_request(
        self,
        request: ApprovalInRun,
        decision: Decision,
        decider: str,
        note: str | None = None,
        wait: bool = True,
    ) -> DecisionResult:
        """Decide a request looked up with `approval_request` (a chat's button), as `decide`
        does; the deciding transaction checks again that it is pending and not overdue (and,
        when one of its votes no longer counts, reads them all once more)."""
        if note is not None:
            validate_text("note", note, MAX_NOTE_BYTES)
        return await self._decide(
            request.approval, request.run, decision, decider, note, wait, request.votes
        )

    async def _decide(
        self,
        approval: ApprovalRecord,
        run: RunRecord,
        decision: Decision,
        decider: str,
        note: str | None,
        wait: bool,
        votes: Sequence[ApprovalVote] | None = None,
    ) -> DecisionResult:
        """Decide `approval` (its `votes` as read with it, if they were: a button's tap then
        costs no read more; the deciding transaction checks they are still the ones)."""
        if approval.status != ApprovalStatus.PENDING:
            return DecisionResult(False, _already(approval), approval, run)
        if decider.startswith("api:") or approval.requested_by.startswith("api:"):
            await self._read_tokens()
        self.check_decider(approval, decider)
        try:
            status = decision_status(approval, decision)
        except DecisionRefused as exc:
            raise ServiceError(str(exc), kind=exc.kind) from None
        from agent.runbook.model import Runbook  # a decision's, not every command's, import

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
        # Votes count by person under the people file in force: one person's identities on
        # two front ends count once, and a vote counts only while its identity may decide.
        people = self.people()
        person = people.person(decider).name
        if votes is None:
            votes = await self.store.approval_votes(approval.id)
        votes = tuple(votes)

        def result(changed: bool, message: str) -> DecisionResult:
            # The request's approvals as they count now (what the card and the API show).
            counting = counting_votes(approval, votes, people, self.settings.approvers)
            return DecisionResult(changed, message, approval, run, tuple(counting))

        for _ in range(MAX_VOTE_ROUNDS):  # judged again each time someone voted meanwhile
            counted = counted_persons(approval, votes, people, self.settings.approvers)
            outcome = vote_outcome(approval.required, counted, person, decision)
            if outcome == VoteOutcome.ALREADY_COUNTED:
                message = f"already counted: {_tally(approval, len(counted))}; nothing changed"
                return result(False, message)
            decided = await self.store.decide_approval(
                approval.id,
                status,
                decider,
                note,
                effect,
                person=person,
                outcome=outcome,
                counted=[vote.person for vote in votes],
                approvals=len(counted) + 1,
            )
            approval, run, votes = decided.approval, decided.run, decided.votes
            if not decided.stale:
                break
        else:
            raise ServiceError(
                "the request's approvals kept changing while this one was counted; try again",
                kind=ErrorKind.CONFLICT,
            )
        if not decided.changed:
            if approval.status == ApprovalStatus.EXPIRED:  # too late: the deadline ended it
                await self._wake_after_end(run, wait)
            return result(False, _already(approval))
        if outcome == VoteOutcome.COUNTED:  # the request waits for more: the run stays parked
            tally = _tally(approval, len(counted) + 1)
            return result(True, f"recorded: {tally}")
        message = f"{status} by {decider}"
        if approval.required > 1 and outcome == VoteOutcome.COMPLETES:
            message += f": {_tally(approval, len(counted) + 1)}"
        try:
            if run.status == RunStatus.QUEUED and self.executes_runs and self.may_act(run):
                run = await self._drive(run.id, wait, run)
            elif run.status == RunStatus.QUEUED:
                # Left for a live process that may act it; said when there is none.
                waits = await self._waits_for(run)
                message += f"; {waits}" if waits is not None else ""
            else:
                await self._wake_after_end(run, wait)  # e.g. a rejected child: its tree goes on
        except StoreError as exc:  # e.g. another process resumed it first: still decided
            message += f"; the run goes on elsewhere ({exc})"
        return result(True, message)

    def _background(self, work: Coroutine[Any, Any, None], name: str) -> None:
        """Run `work` as a task this service keeps (and stops on close)."""
        task = asyncio.create_task(work, name=name, context=contextvars.Context())
        self._side_tasks.add(task)
        task.add_done_callback(self._side_task_done)

    def _side_task_done(self, task: asyncio.Task[None]) -> None:
        self._side_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s failed: %s", task.get_name(), task.exception())

    def check_decider(self, approval: ApprovalRecord, decider: str) -> None:
        """Raise DeciderRefused unless `decider` may decide `approval` (nothing is recorded)."""
        try:
            check_decider(approval, decider, self.people(), self.settings.approvers)
        except DecisionRefused as exc:
            raise DeciderRefused(str(exc)) from None

    def check_service_decider(self, identity: str) -> None:
        """Raise DeciderRefused when the HTTP API's service token (LOOM_OPS_API_TOKEN), acting
        as `identity` (LOOM_OPS_API_USER), may not decide: with a people file it decides only
        as a person the file names; without one, as before people files, it may."""
        people = self.people()
        if people.source is None or people.person(identity).known:
            return
        raise DeciderRefused(
            f"the service token (LOOM_OPS_API_TOKEN) decides only as a person: map "
            f"{identity} to one in {people.source}, or use a person's token (loom-ops tokens)"
        )

    # -- API tokens ----------------------------------------------------------------------------

    async def create_token(
        self, person: str, name: str | None = None
    ) -> tuple[ApiTokenRecord, str]:
        """A new API token for `person` of the people file: its record and the token itself,
        which is shown once and stored only as a hash. ServiceError for an unknown person or
        a name that is not free; TokenExists for a name another token has."""
        people = self._file_people()
        if person not in people.by_name:
            where = people.source or self.settings.people_path
            raise ServiceError(f"no person named {person!r} in the people file ({where})")
        name = name if name is not None else f"{person}-{secrets.token_hex(3)}"
        if not re.fullmatch(TOKEN_NAME_PATTERN, name):
            raise ServiceError(f"token name {name!r} must match {TOKEN_NAME_PATTERN}")
        identity = f"api:{name}"
        # The token's identity must not already be someone else's (or the service token's):
        # decisions made with it would be recorded as that other identity's person.
        if identity == self.settings.api_user:
            raise ServiceError(f"{identity} is LOOM_OPS_API_USER, the service token's identity")
        owner = people.by_identity.get(identity)
        if owner is not None and owner.name != person:
            raise ServiceError(f"{identity} is {owner.name}'s identity in the people file")
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        record = await self.store.create_token(name, person, token_hash(secret))
        self._token_people[record.name] = record.person
        return record, secret

    async def list_tokens(self) -> list[ApiTokenRecord]:
        """Every API token, revoked ones included (never a token itself: it is not kept)."""
        return await self.store.list_tokens()

    async def revoke_token(self, name: str) -> ApiTokenRecord:
        """Revoke an API token: from now on it is a 401. TokenNotFound for an unknown name."""
        return await self.store.revoke_token(name)

    async def authenticate(self, secret: str) -> ApiTokenRecord | None:
        """The live token `secret` is (not revoked, its person still in the people file), or
        None. Looked up by its hash: the database compares hashes of 256-bit secrets, so how
        long a lookup takes says nothing about any token."""
        if not secret.startswith(TOKEN_PREFIX):
            return None
        record = await self.store.token_by_hash(token_hash(secret))
        if record is None or record.revoked_at is not None:
            return None
        if record.person not in self._file_people().by_name:
            return None  # the person left the file: their tokens end with them
        self._token_people[record.name] = record.person
        return record

    def check_starter(self, message: str, requester: str) -> None:
        """Raise ServiceError (forbidden) when the runbook `message` would run names
        `starters` and none of them is the requester's person or one of their groups."""
        from agent.runbook.matching import choose_runbook
        from agent.runbook.request import parse_request

        try:
            runbook = choose_runbook(self.catalog(), parse_request(message), message)
        except ValueError:  # no runbook matches: the policy (an LLM) reads the request itself
            return
        if not runbook.starters:
            return
        refusal = start_refusal(self.people(), requester, runbook.id, runbook.starters)
        if refusal is not None:
            raise ServiceError(refusal, kind=ErrorKind.FORBIDDEN)

    async def _approval_to_decide(
        self, run: RunRecord, approval_number: int | None
    ) -> ApprovalRecord:
        if approval_number is not None:
            try:
                approval = await self.store.get_approval_by_number(run.id, approval_number)
            except ApprovalNotFound as exc:
                raise ServiceError(str(exc), kind=exc.kind) from None
            if approval.run_id not in await self.store.subtree_ids(run.id):
                raise ServiceError(
                    "that approval request belongs to another run", kind=ErrorKind.CONFLICT
                )
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
            raise ApprovalAmbiguous(
                f"run {run.id} has had {len(requests)} approval requests; say which one you "
                f"decide by its number{hint}",
                [a.number for a in pending],
            )
        if pending:
            return pending[0]
        if run.status.is_terminal:
            raise ServiceError(
                f"run {run.id} is already {run.status}; nothing to decide", kind=ErrorKind.CONFLICT
            )
        if requests:
            return requests[0]
        raise ServiceError(
            f"run {run.id} has no approval request (status {run.status})", kind=ErrorKind.CONFLICT
        )

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
            raise ServiceError(
                f"run {run.id} waits for its children; none waits for a decision",
                kind=ErrorKind.CONFLICT,
            )
        listing = ", ".join(f"#{a.number} ({_describe(a)} in {a.run_id})" for a in pending)
        raise ApprovalAmbiguous(
            f"run {run.id} has had {len(requests)} approval requests; say which one you "
            f"decide by its number (open: {listing})",
            [a.number for a in pending],
        )

    async def cancel(self, run_id: str, by: str, wait: bool = True) -> RunRecord:
        """Cancel a run that has not finished (what its end wakes is driven in this task when
        `wait`, else in the background)."""
        try:
            cancelled = await self.store.cancel_run(run_id, by)
        except StoreError as exc:
            raise ServiceError(str(exc), kind=exc.kind) from None
        # Driven here: stop at once. Driven by another process: its heartbeat finds the lease
        # gone within a third of the lease TTL and stops there. (No kernel yet: this process
        # drives nothing.)
        if "kernel" in self.__dict__:
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
                from agent.tools.shell import kill_attempt

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

    async def root(self, run_id: str) -> RunRecord:
        """The root run of the tree `run_id` belongs to (its incident)."""
        return await self.store.get_run(await self.store.root_id(run_id))

    async def run_tree(self, run_id: str, calls: bool = True, events: bool = False) -> RunTree:
        """The run and every run below it, with their approval requests, tool calls (unless
        `calls` is False), journals (if `events`) and people's names, read in one snapshot:
        what explain, trace, summaries and a chat's progress are made from."""
        return await self.store.read_tree(run_id, calls=calls, events=events)

    async def approval_request(
        self, approval_id: int | None = None, token: str | None = None
    ) -> ApprovalInRun:
        """An approval request by id or by its button's token, with its run, that run's
        ancestry, people's names and the approvals that count, in one read; ServiceError for
        a token that names none."""
        try:
            request = await self.store.approval_in_run(approval_id, token)
        except ApprovalNotFound:
            if token is None:
                raise
            raise ServiceError(
                "no such approval request (stale or forged)", kind=ErrorKind.NOT_FOUND
            ) from None
        if not request.votes:
            return request
        # A decided request's card is drawn right after its decision, so the people file in
        # force is the one it was decided under.
        try:
            people = self.people()
        except ServiceError:  # no decision is taken until the file is fixed: show them all
            return request
        approvers = self.settings.approvers
        counting = counting_votes(request.approval, request.votes, people, approvers)
        return replace(request, votes=tuple(counting))

    async def chat_runs(
        self, chat_id: int, limit: int = 10, active: bool = False
    ) -> list[RunRecord]:
        """The runs a chat started (roots only), newest first; only unfinished ones if
        `active`."""
        return await self.store.list_chat_runs(chat_id, limit, active)

    async def list(
        self, status: RunStatus | None = None, limit: int = 50, offset: int = 0
    ) -> list[RunRecord]:
        """Runs, newest first, optionally of one status: `limit` of them from `offset`. (A
        listing that must show no request past its deadline calls `expire_overdue` first.)"""
        return await self.store.list_runs(status, limit, offset)

    async def children(self, run_id: str) -> list[RunRecord]:
        """The runs a run started, oldest first."""
        return await self.store.child_runs(run_id)

    async def events(self, run_id: str) -> list[EventRecord]:
        """A run's journal, in order."""
        return await self.store.list_events(run_id)

    async def last_event(self, run_id: str) -> EventRecord | None:
        """A run's newest journal event, or None when it has none."""
        return await self.store.last_event(run_id)

    async def tree_events(
        self, run_id: str, after_seq: int = 0, limit: int = 500
    ) -> list[EventRecord]:
        """The journal of a run and every run below it after `after_seq`, in written order."""
        return await self.store.list_tree_events(run_id, after_seq, limit)

    def watch_journal(self, run_ids: Iterable[str]) -> AbstractContextManager[JournalWatch]:
        """Watch runs' journals for a block: no write between a reader's look and its wait is
        missed (`add` a run as it shows up, `wait` for the next write)."""
        return self.store.watch_journal(run_ids)

    async def verify_audit(
        self, run_id: str, published: str | None = None, keyed_since: int | None = None
    ) -> TreeReport:
        """Verify a run and every run below it, over one snapshot: each chain under the keys
        this process holds, the rows views read against the journal, and the tree's head
        against one published outside the store when given. `keyed_since` (else the
        setting) is the run number the key is in force from."""
        from agent.service.audit import audit_tree

        snapshot = await self.store.audit_snapshot(run_id)
        return audit_tree(
            snapshot, run_id, self.settings.audit_keys(), self._keyed_since(keyed_since), published
        )

    async def verify_all_audit(self, keyed_since: int | None = None) -> StoreReport:
        """Verify every run (as `verify_audit` does) and the global run numbering, over one
        snapshot; a run that cannot be judged with the keys held is reported, not fatal."""
        from agent.service.audit import audit_store

        snapshot = await self.store.audit_snapshot()
        keys = self.settings.audit_keys()
        return audit_store(snapshot, keys, self._keyed_since(keyed_since))

    def _keyed_since(self, given: int | None) -> int | None:
        """The anchor a verdict uses: the operator's, never one read from the store."""
        return given if given is not None else self.settings.audit_keyed_since

    @classmethod
    async def audit_anchor(cls, settings: Settings) -> AuditAnchor | None:
        """Where the store stands on audit keys, for doctor to name the run number the key is
        in force from; None when the store does not exist yet (every run it gets is keyed)."""
        if not is_postgres_url(settings.db):
            try:
                if not Path(sqlite_path(settings.db)).exists():
                    return None
            except ValueError as exc:
                raise StoreError(str(exc)) from None
        service = await cls.open(settings)
        try:
            return await service.store.audit_anchor()
        finally:
            await service.close()

    async def metrics(self) -> MetricsSnapshot:
        """Counters and current values of the store (what /metrics shows); a tool name the
        kernel does not offer is counted as `other`."""
        from agent.tools.toolbox import TOOL_SPECS  # what only a scrape needs, on first use

        return await self.store.metrics_snapshot(TOOL_SPECS)

    async def active_runs(self) -> int:
        """Incidents (root runs) with a run of their tree queued or running."""
        return await self.store.count_active_roots()

    async def processes(self) -> list[ProcessRecord]:
        """Every process registered as serving this store, live or gone (by `heartbeat_at`)."""
        return await self.store.list_processes()

    def driver_gone(self, run: RunRecord) -> bool:
        """True when the process that drives a running run is dead or its lease ran out."""
        if not run.lease_owner:
            return False
        return owner_is_dead(run.lease_owner) or (run.lease_expires_at or 0) < time.time()

    def owner_gone(self, owner: str) -> bool:
        """True only when the process instance `owner` names (a front end's lease or claim)
        provably no longer runs (same host and namespace); anything else waits for expiry."""
        return owner_is_dead(owner)

    async def schema_version(self) -> int:
        """The store's schema version: what a health probe asks; StoreUnavailable when the
        store does not answer."""
        return await _answering(self.store.schema_version())

    # -- what a worker does ------------------------------------------------------------------

    @property
    def store_label(self) -> str:
        """The store's name for people: a file path, or a URL without its password."""
        return self.store.label

    @property
    def runs_ready(self) -> asyncio.Event:
        """Set when a commit made a run runnable (in this process, or seen from another)."""
        return self.store.runs_ready

    async def claim(self, limit: int) -> list[Claim]:
        """Claim up to `limit` runs nobody drives, under this process's lease, for
        `drive_claimed`; StoreUnavailable when the database is away (try again later).

        A run whose driver died on this host is taken at once, as `serve` takes it, not when
        its lease runs out: every HEARTBEAT_INTERVAL at most, the leases' owners are looked
        at (one read) for one proven gone."""
        dead: list[str] = []
        if limit > 0 and time.monotonic() >= self._next_death_look:
            self._next_death_look = time.monotonic() + HEARTBEAT_INTERVAL
            owners = await _answering(self.store.lease_owners())
            dead = [owner for owner in owners if owner_is_dead(owner)]
        return await _answering(
            self.store.claim_runnable(
                self.owner, self.settings.lease_ttl, limit, self.settings.effects, dead
            )
        )

    async def release(self, claim: Claim) -> None:
        """Hand a claimed run back (queued) without driving it."""
        await (await self.store.drive(claim)).release()

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


async def _answering(query: Awaitable[T]) -> T:
    """`query`'s answer; StoreUnavailable (one line) when the machine failed it (the disk,
    the network, the database driver). A refusal (StoreError) and a bug pass as they are."""
    try:
        return await query
    except LoomOpsError:
        raise
    except Exception as exc:
        if kind_of(exc) != ErrorKind.UNAVAILABLE:
            raise  # a bug: keep its traceback
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise StoreUnavailable(f"store unreachable: {detail}") from exc


async def probe_store(settings: Settings) -> tuple[str, int]:
    """(the store's label, its schema version) for a health probe, over one connection;
    StoreError when it cannot be opened or is a SQLite file not created yet (a probe must
    not create the store it probes), StoreUnavailable when it does not answer."""
    if (missing := missing_store(settings)) is not None:
        raise StoreError(f"no database at {missing} yet (a process that records runs creates it)")
    store = await _answering(RunStore.open(settings.db, pool_size=1))
    async with store:
        return store.label, await _answering(store.schema_version())


def missing_store(settings: Settings) -> str | None:
    """The SQLite file the settings name, when it does not exist yet (opening would create
    it); None for PostgreSQL, an existing file, and a path opening must report (its
    directory is missing, or is a file)."""
    if is_postgres_url(settings.db):
        return None
    try:
        path = sqlite_path(settings.db)
    except ValueError:
        return None  # opening it says what is wrong
    file = Path(path)
    return path if path != ":memory:" and not file.exists() and file.parent.is_dir() else None


async def _after(previous: asyncio.Task[RunRecord], work: Coroutine[Any, Any, T]) -> T:
    """Run `work` once `previous` is over, however it ended."""
    await asyncio.gather(previous, return_exceptions=True)
    return await work


def _configured_policy(settings: Settings, redactor: Redactor) -> Policy | None:
    """The mock when asked for, else the LLM when a key is set, else none (runs refuse to start)."""
    if settings.mock_llm:
        from agent.policy.mock import MockPolicy  # with the runbook model: not every command's

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
    from agent.policy.mock import MockPolicy

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


def _tally(approval: ApprovalRecord, approvals: int) -> str:
    """`1 of 2 approvals, waiting for one more` (or `2 of 2 approvals, done`)."""
    more = approval.required - approvals
    if more <= 0:
        return f"{approvals} of {approval.required} approvals, done"
    waiting = "one more" if more == 1 else f"{more} more"
    return f"{approvals} of {approval.required} approvals, waiting for {waiting}"


def _already(approval: ApprovalRecord) -> str:
    who = f"by {approval.decided_by}" if approval.decided_by else "at its deadline"
    return f"already {approval.status} {who}; nothing changed"


def token_hash(secret: str) -> str:
    """What the store keeps of an API token: its SHA-256, hex."""
    return hashlib.sha256(secret.encode()).hexdigest()


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
