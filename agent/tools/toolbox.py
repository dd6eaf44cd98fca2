"""The tools a policy can call, their argument models, and which role may use which.

`await_approval` is declared here but carried out by the kernel itself: it parks the run.
Step templates are rendered here only, and always in a worker thread: a render runs up to its
time bound, and that must never stop the event loop (nor every other run's lease with it).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from agent.errors import CommandDenied, McpError, ParamError, RenderError, SpawnRefused
from agent.events import Audit, Event
from agent.records import Effects, record
from agent.runbook.model import (
    HealthCheck,
    McpAction,
    Runbook,
    RunbookCatalog,
    Step,
    render_command,
    render_text,
    render_url,
)
from agent.settings import Settings
from agent.store import RunbookPin
from agent.tools.allowlist import ShellAllowlist
from agent.tools.mcp import McpConfig, McpHub
from agent.tools.memory import WorkspaceMemory
from agent.tools.shell import run_command, scrubbed_environment

if TYPE_CHECKING:
    import httpx

_T = TypeVar("_T")


class ReadRunbookArgs(BaseModel):
    """List the runbooks (no id), or load one and commit the run to it with its params."""

    model_config = ConfigDict(extra="forbid")

    runbook_id: str | None = None
    params: dict[str, str] = Field(default_factory=dict)


class StepArgs(BaseModel):
    """Names one step of the run's runbook."""

    model_config = ConfigDict(extra="forbid")

    step_id: str = Field(min_length=1, max_length=63)


class AwaitApprovalArgs(BaseModel):
    """Ask a human to approve one step; the run waits for the decision."""

    model_config = ConfigDict(extra="forbid")

    step_id: str = Field(min_length=1, max_length=63)
    reason: str = Field("", max_length=1000)


class DelegateArgs(BaseModel):
    """Start one child run of a role and wait for it."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["planner", "executor", "verifier"]


class DelegateBatchArgs(BaseModel):
    """Start child runs of several roles in parallel and wait for all of them."""

    model_config = ConfigDict(extra="forbid")

    roles: list[Literal["planner", "executor", "verifier"]] = Field(min_length=1, max_length=3)


class AwaitSiblingArgs(BaseModel):
    """Wait until the sibling run of a role (started by the same delegate call) has ended."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["executor"]


class RecordAuditArgs(BaseModel):
    """An audit entry for the journal and the workspace memory."""

    model_config = ConfigDict(extra="forbid")

    entry: str = Field(min_length=1, max_length=2000)


@record
class ToolSpec:
    """A tool's name, its argument model, the roles that may call it, and what it does."""

    name: str
    args_model: type[BaseModel]
    roles: frozenset[str]
    description: str


@dataclass
class ToolResult:
    """What a tool did: a status the policy sees, an outcome, and anything it commits with it."""

    status: str  # ok | error
    outcome: dict[str, Any]
    pin: RunbookPin | None = None
    events: list[Event] = field(default_factory=list)


@record
class EffectGate:
    """When a call may still start its side effect (the fence's spawn deadline: its lease may
    pass to another process after it), and the marker every process of the attempt carries."""

    spawn_before: float
    marker: str | None = None
    reached: Callable[[], None] = lambda: None  # a test hook (failpoint) right before the check
    effects: Effects | None = None  # what the run may do live; None: this process's settings

    def check(self, what: str) -> None:
        """Raise SpawnRefused when the deadline has passed: the effect must not start now."""
        self.reached()
        if time.time() >= self.spawn_before:
            raise SpawnRefused(f"not starting {what}: this driver's lease may have passed on")


RUNBOOK_ROLE = "runbook"

TOOL_SPECS: dict[str, ToolSpec] = {
    spec.name: spec
    for spec in (
        ToolSpec(
            "read_runbook",
            ReadRunbookArgs,
            frozenset({RUNBOOK_ROLE, "planner"}),
            "List runbooks, or load one and commit the run to it with validated params.",
        ),
        ToolSpec(
            "execute_step",
            StepArgs,
            frozenset({RUNBOOK_ROLE, "executor"}),
            "Execute one step of the run's runbook (dry-run unless live shell is allowed).",
        ),
        ToolSpec(
            "await_approval",
            AwaitApprovalArgs,
            frozenset({RUNBOOK_ROLE, "executor"}),
            "Ask a human to approve a step; the run waits until it is decided.",
        ),
        ToolSpec(
            "check_health",
            StepArgs,
            frozenset({RUNBOOK_ROLE, "verifier"}),
            "Run the HTTP health check of a `check` step.",
        ),
        ToolSpec(
            "delegate_subagent",
            DelegateArgs,
            frozenset({"supervisor"}),
            "Start one resumable child run (planner, executor or verifier) and wait for it.",
        ),
        ToolSpec(
            "delegate_subagents_batch",
            DelegateBatchArgs,
            frozenset({"supervisor"}),
            "Start several child runs in parallel and wait until all of them end.",
        ),
        ToolSpec(
            "await_sibling",
            AwaitSiblingArgs,
            frozenset({"verifier"}),
            "Wait until the executor started beside this run has ended; returns its result.",
        ),
        ToolSpec(
            "rollback_step",
            StepArgs,
            frozenset({"kernel"}),
            "Run a completed step's rollback action (the kernel's own, after a rejection).",
        ),
        ToolSpec(
            "record_audit",
            RecordAuditArgs,
            frozenset({RUNBOOK_ROLE, "verifier"}),
            "Append an audit entry to the journal and the workspace memory.",
        ),
    )
}


# Plain text with `{{ name }}` references and nothing else: such a template only copies param
# values (validated and bounded by the request's size), so it cannot loop or build anything.
_PLAIN_TEMPLATE = re.compile(r"(?:[^{]|\{(?![{%#])|\{\{\s*[A-Za-z_][A-Za-z0-9_]*\s*\}\})*")


async def _off_loop(render: Callable[..., _T], *args: Any, templates: Sequence[str] = ()) -> _T:
    """Run a render in a worker thread; its own bound ends the thread, the loop never waits.
    Renders of `templates` that are all plain substitutions run inline: a thread hop would cost
    more than they do."""
    if templates and all(_PLAIN_TEMPLATE.fullmatch(text) for text in templates):
        return render(*args)
    return await asyncio.to_thread(render, *args)


def _describe(step: Step, params: dict[str, Any], rollback: bool) -> str:
    """The text of `describe_action`, rendered on the calling (worker) thread."""
    if rollback:
        if step.rollback is None:
            return "(no rollback)"
        if step.rollback.run is not None:
            return shlex.join(render_command(step.rollback.run, params))
        return f"note: {render_text(step.rollback.note or '', params)}"
    if step.run is not None:
        return shlex.join(render_command(step.run, params))
    if step.check is not None and step.check.url is not None:
        return (
            f"GET {render_text(step.check.url, params)} "
            f"(expect {step.check.expect_status}, within {step.check.max_latency_ms} ms)"
        )
    action = step.mcp or (step.check.mcp if step.check else None)
    if action is not None:
        return f"mcp {action.tool} {json.dumps(_render_arguments(action, params), sort_keys=True)}"
    return f"note: {render_text(step.note or '', params)}"


async def describe_action(step: Step, params: dict[str, Any], rollback: bool = False) -> str:
    """The exact action a step performs, as a human approving it should read it; rendered off
    the event loop. RenderError when a template cannot be rendered (within its bounds)."""
    return await _off_loop(_describe, step, params, rollback)


def _render_arguments(action: McpAction, params: dict[str, Any]) -> dict[str, Any]:
    """An MCP action's arguments with their string templates rendered."""
    return {
        name: render_text(value, params) if isinstance(value, str) else value
        for name, value in action.arguments.items()
    }


def _render_failure(step: Step, field_name: str, exc: RenderError) -> ToolResult:
    """A step whose template cannot be rendered fails with one line naming step and field."""
    return ToolResult("error", {"error": f"step {step.id!r} {field_name}: {exc}"})


def tools_for_role(role: str) -> list[str]:
    """Names of the tools a role may call; an unknown role is an error, never "all tools"."""
    names = [spec.name for spec in TOOL_SPECS.values() if role in spec.roles]
    if not names or role == "kernel":
        raise ValueError(f"unknown role {role!r}")
    return names


class Toolbox:
    """Carries out tool calls for the kernel, with the workspace's settings and allowlist."""

    def __init__(
        self,
        settings: Settings,
        catalog_loader: Callable[[], RunbookCatalog],
        memory: WorkspaceMemory,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self._settings = settings
        self._catalog_loader = catalog_loader
        self._memory = memory
        self._http = http
        self._allowlist: ShellAllowlist | None = None
        self._hub: McpHub | None = None

    def mode_of(self, step: Step, effects: Effects) -> str:
        """Whether the step's action acts on the world in a run with these `effects` ("live")
        or is only shown ("dry-run"), as an approver must know before deciding."""
        live = (
            (step.run is not None and effects.shell)
            or (step.mcp is not None and effects.mcp)
            or (step.check is not None and effects.checks)
        )
        return "live" if live else "dry-run"

    def cannot_act(self, step: Step, rollback: bool, effects: Effects) -> str | None:
        """Why this process may not carry out a step that the run does live (its settings
        forbid that kind of effect), or None. The run then waits for a process that may."""
        here = self._settings.effects
        rollback_run = step.rollback.run if step.rollback is not None else None
        run = rollback_run if rollback else step.run
        if run is not None and effects.shell and not here.shell:
            return "this run runs commands live; this process has LOOM_OPS_ALLOW_SHELL off"
        if not rollback and step.mcp is not None and effects.mcp and not here.mcp:
            return "this run calls MCP tools live; this process has LOOM_OPS_ALLOW_MCP off"
        checks = step.check is not None and not rollback
        if checks and effects.checks and not here.checks:
            return "this run checks health live; this process has LOOM_OPS_LIVE_CHECKS off"
        return None

    def is_idempotent(
        self, tool: str, args: dict[str, Any], runbook: Runbook | None, effects: Effects
    ) -> bool:
        """Whether a call may simply run again when it is in doubt after a crash."""
        if tool in (
            "read_runbook",
            "check_health",
            "record_audit",
            "await_approval",
            "await_sibling",
        ):
            return True  # reads, and a deduplicated audit line
        if tool != "execute_step" or runbook is None:
            return False
        try:
            step = runbook.step(str(args.get("step_id")))
        except KeyError:
            return True  # it was refused, so it cannot have had an effect
        if step.idempotent or step.action_kind in ("check", "note"):
            return True
        if step.action_kind == "mcp":
            return not effects.mcp
        return not effects.shell

    async def read_runbook(self, args: ReadRunbookArgs, pinned: Runbook | None) -> ToolResult:
        """List runbooks, or load one and pin it with resolved params."""
        catalog = self._catalog_loader()
        if args.runbook_id is None:
            listing = [
                {"id": rb.id, "title": rb.title, "triggers": list(rb.triggers)}
                for rb in catalog.runbooks.values()
            ]
            return ToolResult(
                "ok", {"runbooks": listing, "invalid": [str(e) for e in catalog.errors]}
            )
        if pinned is not None:
            # Re-pinning (even the same runbook with other params) would change what an
            # approver already approved.
            return ToolResult(
                "error",
                {"error": f"this run is committed to runbook {pinned.id!r} and its params already"},
            )
        try:
            runbook = catalog.get(args.runbook_id)
        except KeyError:
            known = ", ".join(sorted(catalog.runbooks)) or "none"
            return ToolResult(
                "error", {"error": f"unknown runbook {args.runbook_id!r} (known: {known})"}
            )
        try:
            params = runbook.resolve_params(args.params)
        except ParamError as exc:
            return ToolResult("error", {"error": str(exc)})
        document = runbook.model_dump(mode="json")
        return ToolResult(
            "ok",
            {"runbook": document, "params": params},
            pin=RunbookPin(runbook.id, document, params),
        )

    async def execute_step(
        self,
        step: Step,
        runbook: Runbook,
        params: dict[str, Any],
        timeout: float,
        rollback: bool = False,
        gate: EffectGate | None = None,
    ) -> ToolResult:
        """Execute a step's action (or its rollback action); nothing live starts once the
        `gate` closed (SpawnRefused)."""
        if rollback:
            assert step.rollback is not None
            run_template, note, check = step.rollback.run, step.rollback.note, None
        else:
            run_template, note, check = step.run, step.note, step.check
        if check is not None:
            return await self.check(check, params, min(step.timeout, timeout), gate)
        if not rollback and step.mcp is not None:
            return await self._mcp(step.mcp, params, min(step.timeout, timeout), True, gate)
        prefix = "rollback " if rollback else ""
        if note is not None:
            try:
                text = await _off_loop(render_text, note, params, templates=[note])
                return ToolResult("ok", {"note": text})
            except RenderError as exc:
                return _render_failure(step, f"{prefix}note", exc)
        assert run_template is not None
        try:
            argv = await _off_loop(render_command, run_template, params, templates=[run_template])
        except RenderError as exc:
            return _render_failure(step, f"{prefix}run", exc)
        if not self._effects(gate).shell:
            return ToolResult("ok", {"mode": "dry-run", "dry_run": True, "argv": argv})
        try:
            admitted = self._load_allowlist().admit(argv)
        except CommandDenied as exc:
            return ToolResult("error", {"mode": "live", "argv": argv, "denied": str(exc)})
        if gate is not None:
            gate.check(f"command {admitted[0]}")  # no await between this and the spawn
        result = await run_command(
            admitted,
            timeout=max(0.01, min(step.timeout, timeout)),
            env=scrubbed_environment(os.environ, runbook.env),
            output_cap=self._settings.output_cap,
            cwd=self._settings.workspace,
            marker=gate.marker if gate else None,
            spawn_before=gate.spawn_before if gate else None,
        )
        outcome = {
            "mode": "live",
            "argv": result.argv,
            "exit_code": result.exit_code,
            "stdout": result.stdout,
            "stderr": result.stderr,
            "stdout_bytes": result.stdout_bytes,
            "stderr_bytes": result.stderr_bytes,
            "truncated": result.truncated,
            "timed_out": result.timed_out,
            "duration_ms": round(result.duration_ms, 3),
        }
        return ToolResult("ok" if result.exit_code == 0 else "error", outcome)

    async def _mcp(
        self,
        action: McpAction,
        params: dict[str, Any],
        timeout: float,
        live: bool,
        gate: EffectGate | None = None,
    ) -> ToolResult:
        """Call a mapped MCP tool (dry-run unless allowed); a server failure is an outcome."""
        try:
            texts = [v for v in action.arguments.values() if isinstance(v, str)]
            arguments = await _off_loop(_render_arguments, action, params, templates=texts)
        except RenderError as exc:
            return ToolResult("error", {"mcp_tool": action.tool, "error": f"arguments: {exc}"})
        base: dict[str, Any] = {"mcp_tool": action.tool, "arguments": arguments}
        effects = self._effects(gate)
        allowed = effects.mcp if live else effects.checks
        if not allowed:
            # Shown, not called: which server and tool it would be, when the config says.
            return ToolResult("ok", {**base, **self._mcp_target(action.tool), "dry_run": True})
        if gate is not None:
            gate.check(f"MCP tool {action.tool}")
        try:
            hub = self._mcp_hub()
            mapping = hub.config.resolve(action.tool)
            if mapping is not None:
                base.update(server=mapping.server, server_tool=mapping.tool)
            result = await hub.call(
                action.tool, arguments, max(0.01, timeout), self._settings.output_cap
            )
        except McpError as exc:
            return ToolResult("error", {**base, "mode": "live", "error": str(exc)})
        outcome = {**base, "mode": "live", "is_error": result.is_error, "text": result.text}
        outcome["text_bytes"] = result.text_bytes
        if result.truncated:
            outcome["truncated"] = True  # the text's marker, or `data_bytes`, says what was cut
        if result.data is not None:
            outcome["data"] = result.data
        if result.data_bytes is not None:
            outcome["data_bytes"] = result.data_bytes
        if result.is_error:
            outcome["error"] = result.text or "the MCP tool reported an error"
        return ToolResult("error" if result.is_error else "ok", outcome)

    def _effects(self, gate: EffectGate | None) -> Effects:
        return (
            gate.effects
            if gate is not None and gate.effects is not None
            else self._settings.effects
        )

    def _mcp_target(self, tool: str) -> dict[str, Any]:
        """`mode`, and the server and tool a dry-run MCP call names (None when the config
        cannot be read or does not resolve it: dry-run shows, it does not fail). A config
        that cannot be read is said, as `config_error`: the step succeeds (a dry run uses no
        server, as `runbooks validate` warns rather than fails then), but not in silence."""
        problem: dict[str, Any] = {}
        try:
            config = (
                self._hub.config if self._hub else McpConfig.load(self._settings.mcp_config_path)
            )
        except McpError as exc:
            config, problem = McpConfig(), {"config_error": str(exc)}
        mapping = config.resolve(tool)
        return {
            "mode": "dry-run",
            "server": mapping.server if mapping else None,
            "server_tool": mapping.tool if mapping else None,
            **problem,
        }

    def _mcp_hub(self) -> McpHub:
        if self._hub is None:
            self._hub = McpHub(McpConfig.load(self._settings.mcp_config_path))
        return self._hub

    async def close(self) -> None:
        """Stop the MCP servers this process started."""
        if self._hub is not None:
            await self._hub.close()

    async def check(
        self,
        check: HealthCheck,
        params: dict[str, Any],
        timeout: float,
        gate: EffectGate | None = None,
    ) -> ToolResult:
        """An HTTP GET against a health URL or an MCP tool, or a synthetic pass in dry-run."""
        if check.mcp is not None:
            return await self._mcp(check.mcp, params, timeout, False, gate)
        assert check.url is not None
        try:
            url = await _off_loop(render_url, check.url, params, templates=[check.url])
        except RenderError as exc:
            return ToolResult("error", {"url": check.url, "error": str(exc)})
        if not self._effects(gate).checks:
            return ToolResult(
                "ok",
                {
                    "url": url,
                    "synthetic": True,
                    "dry_run": True,
                    "status_code": check.expect_status,
                    "latency_ms": 0.0,
                    "ok": True,
                },
            )
        if gate is not None:
            gate.check(f"the health check of {url}")
        import httpx  # only a live check needs it (about 70 ms of every command's start-up)

        client = self._http or httpx.AsyncClient()
        started = time.perf_counter()
        try:
            response = await client.get(url, timeout=max(0.01, timeout), follow_redirects=False)
        except httpx.HTTPError as exc:
            latency = (time.perf_counter() - started) * 1000
            return ToolResult(
                "error",
                {"url": url, "error": f"{type(exc).__name__}: {exc}", "latency_ms": latency},
            )
        finally:
            if self._http is None:
                await client.aclose()
        latency = (time.perf_counter() - started) * 1000
        problems = []
        if response.status_code != check.expect_status:
            problems.append(f"status {response.status_code}, expected {check.expect_status}")
        if latency > check.max_latency_ms:
            problems.append(f"latency {latency:.0f} ms over {check.max_latency_ms} ms")
        outcome = {
            "url": url,
            "status_code": response.status_code,
            "latency_ms": round(latency, 3),
            "ok": not problems,
        }
        if problems:
            outcome["error"] = "; ".join(problems)
        return ToolResult("ok" if not problems else "error", outcome)

    async def record_audit(self, args: RecordAuditArgs) -> ToolResult:
        """Journal an audit entry and remember it in the workspace memory."""
        kept = self._memory.add(args.entry)
        return ToolResult(
            "ok",
            {"recorded": True, "memory_lines": kept},
            events=[Audit(args.entry)],
        )

    def memory_lines(self) -> list[str]:
        """What later runs get as context from the workspace memory."""
        return self._memory.read()

    def _load_allowlist(self) -> ShellAllowlist:
        if self._allowlist is None:
            self._allowlist = ShellAllowlist.load(self._settings.allowlist_path)
        return self._allowlist
