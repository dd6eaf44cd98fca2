"""What a policy (LLM or mock) sees and what it answers; the kernel journals every answer."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from agent.chain import canonical_json
from agent.records import record
from agent.runbook.model import Runbook, RunbookCatalog


class ToolCall(BaseModel):
    """One action a policy proposes: a tool name and its arguments."""

    model_config = ConfigDict(extra="forbid")

    name: str
    args: dict[str, Any] = Field(default_factory=dict)


class FinalAnswer(BaseModel):
    """The policy's claim that the run is over, with its summary."""

    model_config = ConfigDict(extra="forbid")

    outcome: Literal["succeeded", "failed"]
    summary: str


class PolicyDecision(BaseModel):
    """A policy's answer for one turn: calls to make, and/or a final answer."""

    model_config = ConfigDict(extra="forbid")

    calls: list[ToolCall] = Field(default_factory=list)
    final: FinalAnswer | None = None
    thought: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_excerpt: str = ""  # the end of what the policy was shown, for the trace
    latency_ms: float = 0.0  # how long the policy took to answer (set by the kernel)


@record
class Observation:
    """A finished tool call as the policy sees it."""

    call_key: str
    tool: str
    args: dict[str, Any]
    status: str  # ok | error | refused | skipped
    outcome: dict[str, Any]


@dataclass
class PolicyContext:
    """Everything a policy may look at to decide its next turn."""

    run_id: str
    role: str
    request: str
    catalog_loader: Callable[[], RunbookCatalog]
    runbook: Runbook | None
    params: dict[str, Any]
    history: Sequence[Observation]
    memory_loader: Callable[[], Sequence[str]] = tuple
    tools: Sequence[str] = ()

    @property
    def memory(self) -> Sequence[str]:
        """Lines of the workspace memory (audit lines of earlier runs), read when asked for."""
        return self.memory_loader()

    @property
    def catalog(self) -> RunbookCatalog:
        """The workspace's runbooks, loaded only if the policy looks (a pinned run need not)."""
        return self.catalog_loader()

    def request_hash(self) -> str:
        """A digest of what the policy was asked, journaled beside its answer."""
        last = self.history[-1].call_key if self.history else None
        material = canonical_json(
            {
                "role": self.role,
                "request": self.request,
                "runbook": self.runbook.id if self.runbook else None,
                "history": len(self.history),
                "last": last,
            }
        )
        return hashlib.sha256(material.encode()).hexdigest()


class Policy(Protocol):
    """Proposes the next actions of a run; never executes anything itself."""

    name: str

    def preflight(self, request: str, catalog: RunbookCatalog) -> None:
        """Raise ValueError (one line) for a request this policy can already tell is hopeless."""
        ...

    async def decide(self, context: PolicyContext) -> PolicyDecision:
        """Return the next turn's decision."""
        ...
