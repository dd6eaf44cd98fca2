"""The deterministic, key-free policy: matches a runbook, then walks its steps in order.

It proposes exactly the tool calls a real LLM policy would, through the same kernel path.
"""

from __future__ import annotations

from collections.abc import Sequence

from agent.errors import RequestError
from agent.policy.base import FinalAnswer, Observation, PolicyContext, PolicyDecision, ToolCall
from agent.runbook.matching import choose_runbook
from agent.runbook.model import Runbook, RunbookCatalog
from agent.runbook.request import parse_request

_STEP_TOOLS = ("execute_step", "check_health", "await_approval")
_FAILED = "FAILED"


def _call(name: str, **args: object) -> PolicyDecision:
    return PolicyDecision(calls=[ToolCall(name=name, args=dict(args))])


def _final(outcome: str, summary: str) -> PolicyDecision:
    return PolicyDecision(final=FinalAnswer(outcome=outcome, summary=summary))  # type: ignore[arg-type]


class MockPolicy:
    """Picks a runbook by matching text, fills params, asks approval where needed, audits."""

    name = "mock"

    def preflight(self, request: str, catalog: RunbookCatalog) -> None:
        """Refuse, before any run exists, a request that matches no runbook or has bad params."""
        parsed = parse_request(request)
        choose_runbook(catalog, parsed, request).resolve_params(parsed.params)

    async def decide(self, context: PolicyContext) -> PolicyDecision:
        """Next turn, from the runbook and the last observation only (constant time per turn)."""
        last = context.history[-1] if context.history else None
        if last is not None and last.status == "refused":
            return _final("failed", f"the kernel refused {last.tool}: {last.outcome['refused']}")
        if context.role == "supervisor":
            return self._supervise(last)
        runbook = context.runbook
        if runbook is None:
            if context.role in ("runbook", "planner"):
                return self._choose(context, last)
            return _final("failed", "there is no plan: no runbook was chosen for this run")
        if context.role == "planner":
            return _final("succeeded", _plan(runbook, context.params))
        if context.role == "verifier":
            return self._verify(runbook, context)
        auditing = context.role == "runbook"  # the executor leaves the audit to the verifier
        if last is not None and last.tool == "record_audit":
            return self._conclude(runbook, context, failed=_FAILED in last.args.get("entry", ""))
        index, retry = self._next_step(runbook, context.history)
        if index is None or index >= len(runbook.steps):
            failed = index is None
            if auditing:
                return self._audit(runbook, context, failed=failed)
            return self._conclude(runbook, context, failed=failed)
        step = runbook.steps[index]
        if step.needs_approval and not retry and not _approved(last, step.id):
            return _call("await_approval", step_id=step.id, reason=step.title)
        tool = "check_health" if step.check is not None and auditing else "execute_step"
        return _call(tool, step_id=step.id)

    @staticmethod
    def _supervise(last: Observation | None) -> PolicyDecision:
        """Plan first; then execute and verify in parallel; then merge what the children said."""
        if last is None:
            return _call("delegate_subagent", role="planner")
        children = last.outcome.get("children", [])
        if last.tool == "delegate_subagent":
            planner = children[0] if children else {}
            if planner.get("status") != "succeeded":
                why = planner.get("error") or planner.get("summary") or planner.get("status")
                return _final("failed", f"planning failed: {why}")
            return _call("delegate_subagents_batch", roles=["executor", "verifier"])
        ok = children and all(c.get("status") == "succeeded" for c in children)
        parts = "; ".join(
            f"{c['role']} {c['status']}: {c.get('summary') or c.get('error') or '-'}"
            for c in children
        )
        return _final("succeeded" if ok else "failed", parts or "no children ran")

    @staticmethod
    def _verify(runbook: Runbook, context: PolicyContext) -> PolicyDecision:
        """Take a health baseline, wait for the executor, check again, audit, and judge."""
        checks = [step for step in runbook.steps if step.check is not None]
        waited = next(
            (i for i, obs in enumerate(context.history) if obs.tool == "await_sibling"), None
        )
        before = context.history if waited is None else context.history[:waited]
        baseline = [obs for obs in before if obs.tool == "check_health"]
        if waited is None:
            if len(baseline) < len(checks):
                return _call("check_health", step_id=checks[len(baseline)].id)
            return _call("await_sibling", role="executor")
        executor = context.history[waited].outcome
        after = [obs for obs in context.history[waited + 1 :] if obs.tool == "check_health"]
        if len(after) < len(checks):
            return _call("check_health", step_id=checks[len(after)].id)
        failed = [str(obs.args.get("step_id")) for obs in after if obs.status != "ok"]
        if not any(obs.tool == "record_audit" for obs in context.history[waited + 1 :]):
            verdict = f"{_FAILED} checks {', '.join(failed)}" if failed else "all checks pass"
            entry = (
                f"{context.run_id}: {runbook.id} verified after the executor "
                f"({executor.get('status')}): {verdict}"
            )
            return _call("record_audit", entry=entry)
        if failed:
            return _final("failed", f"health checks failed: {', '.join(failed)}")
        return _final(
            "succeeded",
            f"{len(checks)} health check(s) pass before and after the executor "
            f"({executor.get('status')})",
        )

    def _choose(self, context: PolicyContext, last: Observation | None) -> PolicyDecision:
        if last is not None and last.tool == "read_runbook" and last.status == "error":
            return _final("failed", f"cannot start the runbook: {last.outcome.get('error')}")
        try:
            parsed = parse_request(context.request)
        except RequestError as exc:
            return _final("failed", str(exc))
        try:
            runbook = choose_runbook(context.catalog, parsed, context.request)
        except RequestError as exc:
            return _final("failed", str(exc))
        return _call("read_runbook", runbook_id=runbook.id, params=parsed.params)

    @staticmethod
    def _next_step(runbook: Runbook, history: Sequence[Observation]) -> tuple[int | None, bool]:
        """(index of the step to do next, whether it is a retry); (None, True) when out of retries.

        Looks only at the tail of the history: the consecutive failures of the current step.
        """
        current = None
        failures = 0
        for obs in reversed(history):
            if obs.tool not in _STEP_TOOLS:
                break
            step_id = obs.args.get("step_id")
            if current is None:
                current = step_id
            elif step_id != current:
                break
            if obs.tool != "await_approval" and obs.status == "error":
                if "denied" in obs.outcome:
                    return None, True  # the allowlist will deny it again: retrying is pointless
                failures += 1
                continue
            break
        if current is None:
            return 0, False
        step = runbook.step(current)
        index = runbook.step_index(step.id)
        if failures == 0:
            return (index, False) if history[-1].tool == "await_approval" else (index + 1, False)
        if failures <= step.retries:
            return index, True
        return None, True

    @staticmethod
    def _audit(runbook: Runbook, context: PolicyContext, failed: bool) -> PolicyDecision:
        last = context.history[-1] if context.history else None
        where = f" at step {last.args.get('step_id')}" if failed and last else ""
        verdict = f"{_FAILED}{where}" if failed else "completed"
        params = " ".join(f"{k}={v}" for k, v in sorted(context.params.items()))
        entry = f"{context.run_id}: runbook {runbook.id} {verdict} ({params})"
        return _call("record_audit", entry=entry)

    @staticmethod
    def _conclude(runbook: Runbook, context: PolicyContext, failed: bool) -> PolicyDecision:
        last_error = next((obs for obs in reversed(context.history) if obs.status == "error"), None)
        if failed and last_error is not None:
            step_id = last_error.args.get("step_id")
            detail = (
                last_error.outcome.get("error")
                or last_error.outcome.get("denied")
                or (f"exit code {last_error.outcome.get('exit_code')}")
            )
            return _final("failed", f"{runbook.title}: step {step_id} failed ({detail})")
        return _final("succeeded", f"{runbook.title}: all {len(runbook.steps)} steps done")


def _plan(runbook: Runbook, params: dict[str, object]) -> str:
    values = " ".join(f"{k}={v}" for k, v in sorted(params.items()))
    gated = [s.id for s in runbook.steps if s.needs_approval]
    return (
        f"plan: runbook {runbook.id} ({len(runbook.steps)} steps"
        + (f", approval before {', '.join(gated)}" if gated else "")
        + f") with {values or 'default params'}"
    )


def _approved(last: Observation | None, step_id: str) -> bool:
    return (
        last is not None
        and last.tool == "await_approval"
        and last.args.get("step_id") == step_id
        and bool(last.outcome.get("approved"))
    )
