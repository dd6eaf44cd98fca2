"""Metrics: counters the store keeps for /metrics, and the few current values it counts live.

How the counters are kept, and why this way:

- **Runs, tool calls, LLM calls, approvals** are facts the journal already holds (`events`,
  append-only, `seq` given in commit order on both engines). A scrape *folds* the events
  appended since the last fold into `metric_counters` and moves the fold's cursor, in one
  transaction; so a scrape reads the events since the previous scrape plus a few dozen counter
  rows, never the whole store. Nothing is added to a run's step: counters written with each
  step would add a statement per step and, worse, make every worker update the same few rows
  (on PostgreSQL, concurrent steps would then conflict and run again).
- **Chat deliveries** are not journaled: triggers on the outbox row count them in the sender's
  own transaction (migration 0014). A run's step only inserts outbox rows, which no trigger
  watches, so the step's write path is unchanged.
- **Current values** (runs not finished by status, pending approvals, the outbox backlog) are
  counted live through indexes that hold only unfinished rows.

Counters never go down: they live in the database, so a restarted `serve` (or another process
scraping the same store) goes on from them. Two folds at once conflict on the cursor row
(SQLite runs one writer at a time; PostgreSQL's repeatable read makes the later one run again
over the newer cursor), so an event is counted exactly once. A fold takes at most
`FOLD_LIMIT` events, so the first scrape of a large store upgraded to this schema catches up
over a few scrapes instead of one long one (`journal_backlog` says how far behind it is).

Label values are bounded: a tool name is one of `known_tools` (what the kernel offers) or
`other`, and every status, role, decision and policy is one of a fixed few or `other`, so a
model inventing names adds no series.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping

from agent.records import CHILD_ROLES, ApprovalStatus, RunStatus, record
from agent.store.base import StoreBase
from agent.store.database import Connection, Dialect

OTHER = "other"  # the label value of anything outside a label's known values

# Histogram bucket bounds (seconds), by the counter name of the histogram.
DURATION_BUCKETS = (0.005, 0.025, 0.1, 0.5, 1, 5, 30, 120, 600)
LLM_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
WAIT_BUCKETS = (10, 60, 300, 900, 1800, 3600, 14400)
HISTOGRAMS: dict[str, tuple[float, ...]] = {
    "tool_call_duration_seconds": DURATION_BUCKETS,
    "mcp_call_duration_seconds": DURATION_BUCKETS,
    "llm_call_duration_seconds": LLM_BUCKETS,
    "approval_wait_seconds": WAIT_BUCKETS,
}

# The bounded values of each label.
ROLES = ("runbook", "supervisor", *CHILD_ROLES)
ACTIVE_STATUSES = tuple(s.value for s in RunStatus if not s.is_terminal)
FINAL_STATUSES = tuple(s.value for s in RunStatus if s.is_terminal)
TOOL_STATUSES = ("ok", "error", "refused", "skipped", "cancelled", "retry")
RAN_STATUSES = frozenset({"ok", "error"})  # outcomes of calls that ran (and so have a duration)
DECISIONS = tuple(s.value for s in ApprovalStatus if s != ApprovalStatus.PENDING)
POLICIES = ("mock", "openai")  # the part of a run's policy name before ":"
LLM_ERROR_REASONS = ("unavailable", "misconfigured")

FOLD_LIMIT = 50_000  # events folded by one scrape at most
CURSOR = "_journal_seq"  # the counter row holding the last folded `events.seq`

# The journal's event types a fold reads (others only move the cursor).
_FOLDED = (
    "run_created",
    "run_finished",
    "run_interrupted",
    "policy_turn",
    "tool_outcome",
    "approval_decided",
    "approval_expired",
)
# How the one line the LLM policy gives when it fails starts (agent/policy/llm.py): the run
# is interrupted by an outage (resumable) and failed by a misconfiguration. Only the journal
# knows of these calls, as the run's error: a call that failed has no turn of its own.
_LLM_OUTAGE = ("LLM request failed", "LLM answered with no choices")
_LLM_MISCONFIGURED = ("LLM misconfigured", "LLM rejected the request")

Labels = tuple[tuple[str, str], ...]  # sorted (name, value) pairs


@record
class MetricsSnapshot:
    """What one scrape shows: the store's counters, and current values counted live."""

    counters: dict[str, dict[Labels, float]]
    runs_by_status: dict[str, int]  # runs not finished, by status (every such status listed)
    approvals_pending: int
    outbox_pending: int  # chat messages not yet delivered nor given up
    outbox_retrying: int  # of those, how many failed at least once
    outbox_oldest_age: float  # seconds the oldest pending message has waited (0: none)
    journal_backlog: int  # events not folded into the counters yet (0 once caught up)

    def value(self, name: str, **labels: str) -> float:
        """One counter's value (0 when never counted)."""
        return self.counters.get(name, {}).get(_labels(labels), 0.0)

    def total(self, name: str, **labels: str) -> float:
        """A counter summed over the label values not given."""
        wanted = set(labels.items())
        return sum(v for k, v in self.counters.get(name, {}).items() if wanted <= set(k))

    @property
    def prompt_tokens(self) -> int:
        """LLM prompt tokens of all runs."""
        return int(self.total("llm_tokens", kind="prompt"))

    @property
    def completion_tokens(self) -> int:
        """LLM completion tokens of all runs."""
        return int(self.total("llm_tokens", kind="completion"))


def bounded(value: object, known: Collection[str]) -> str:
    """`value` when it is one of `known`, else `other`."""
    return value if isinstance(value, str) and value in known else OTHER


def _number(value: object) -> float | None:
    """A number read from the journal, or None (absent, or not a number)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _labels(labels: Mapping[str, str]) -> Labels:
    return tuple(sorted(labels.items()))


def _encode(labels: Labels) -> str:
    return json.dumps(dict(labels), sort_keys=True, separators=(",", ":"))


class Fold:
    """Counter increments from a run of journal events, keyed as `metric_counters` keys them."""

    def __init__(self, known_tools: Collection[str]) -> None:
        self.known_tools = frozenset(known_tools)
        self.deltas: dict[tuple[str, Labels], float] = defaultdict(float)

    def add(self, name: str, amount: float = 1.0, **labels: str) -> None:
        """Count `amount` more."""
        self.deltas[(name, _labels(labels))] += amount

    def observe(self, name: str, seconds: float, **labels: str) -> None:
        """One observation of a histogram: its bucket (the first bound it fits) and its sum."""
        bounds = HISTOGRAMS[name]
        le = next((f"{b:g}" for b in bounds if seconds <= b), "+Inf")
        self.add(name, 1.0, **labels, le=le)
        self.add(f"{name}_sum", max(seconds, 0.0), **labels)

    def event(self, row: Mapping[str, object]) -> None:
        """Count one journal event (a row of `_events_sql`)."""
        kind = row["type"]
        if kind == "run_created":
            self.add("runs_started", role=bounded(row["role"], ROLES))
        elif kind == "run_finished":
            status = bounded(row["status"], FINAL_STATUSES)
            self.add("runs_finished", status=status)
            if status == "failed" and str(row["error"] or "").startswith(_LLM_MISCONFIGURED):
                self.add("llm_call_errors", reason="misconfigured")
        elif kind == "run_interrupted":
            self.add("runs_interrupted")
            if str(row["error"] or "").startswith(_LLM_OUTAGE):
                self.add("llm_call_errors", reason="unavailable")
        elif kind == "policy_turn":
            self._policy_turn(row)
        elif kind == "tool_outcome":
            self._tool_outcome(row)
        elif kind == "approval_decided":
            decision = bounded(row["status"], DECISIONS)
            self.add("approvals_decided", decision=decision)
            requested, decided = _number(row["requested_at"]), _number(row["ts"])
            if requested is not None and decided is not None:
                self.observe("approval_wait_seconds", decided - requested, decision=decision)
        elif kind == "approval_expired":
            self.add("approvals_expired")

    def _policy_turn(self, row: Mapping[str, object]) -> None:
        name = str(row["policy"] or "")
        if name.startswith("kernel:"):  # the kernel's own plan (a rollback): no LLM asked
            return
        policy = bounded(name.split(":", 1)[0], POLICIES)
        self.add("llm_calls", policy=policy)
        for kind in ("prompt", "completion"):
            tokens = _number(row[f"{kind}_tokens"])
            # Zero is counted too: the series exists from a policy's first answer (the mock's
            # are all zero), so a rate over it is 0, not absent.
            if tokens is not None and tokens >= 0:
                self.add("llm_tokens", tokens, policy=policy, kind=kind)
        latency = _number(row["latency_ms"])
        if latency is not None:
            self.observe("llm_call_duration_seconds", latency / 1000, policy=policy)

    def _tool_outcome(self, row: Mapping[str, object]) -> None:
        status = bounded(row["status"], TOOL_STATUSES)
        tool = bounded(row["tool"], self.known_tools)
        self.add("tool_calls", tool=tool, status=status)
        duration = _number(row["duration_ms"])
        # A refused, skipped or cancelled call did not run: it has no duration to count.
        ran = duration if status in RAN_STATUSES else None
        if ran is not None:
            self.observe("tool_call_duration_seconds", ran / 1000, tool=tool)
        if row["mcp_tool"] is not None:  # an MCP step or check (its outcome names the tool)
            mode = "live" if row["mode"] == "live" else "dry_run"
            self.add("mcp_calls", status=status, mode=mode)
            if ran is not None and mode == "live":
                self.observe("mcp_call_duration_seconds", ran / 1000, status=status)


def _json_path(dialect: Dialect, column: str, *keys: str, number: bool = False) -> str:
    """A JSON text column's (nested) field, as text or as a number (NULL when the field is
    something else: a cast that fails would fail every scrape after it)."""
    if dialect.name == "sqlite":
        return f"json_extract({column}, '$.{'.'.join(keys)}')"
    path = f"'{{{','.join(keys)}}}'"
    if not number:
        return f"(({column})::jsonb #>> {path})"
    return (
        f"CASE WHEN jsonb_typeof(({column})::jsonb #> {path}) = 'number' "
        f"THEN (({column})::jsonb #>> {path})::double precision END"
    )


def _events_sql(dialect: Dialect) -> str:
    """The fields of the journal events in a seq range that the counters need, and only them
    (a tool's outcome can be large); the tool's name and a request's time come from their
    rows, found by key."""
    # PostgreSQL's JSON types refuse a text that escapes U+0000, which events written before
    # the journal kept it out may hold (a command's binary output): read it as U+0001, and
    # every scrape after such an event goes on.
    data = "e.data" if dialect.name == "sqlite" else "replace(e.data, '\\u0000', '\\u0001')"

    def text(*keys: str) -> str:
        return _json_path(dialect, data, *keys)

    def number(*keys: str) -> str:
        return _json_path(dialect, data, *keys, number=True)

    types = ", ".join(f"'{t}'" for t in _FOLDED)
    return (
        f"SELECT e.type, e.ts, {text('role')} AS role, "
        f"COALESCE({text('status')}, {text('decision')}) AS status, "
        f"SUBSTR({text('error')}, 1, 40) AS error, {text('policy')} AS policy, "
        f"{number('prompt_tokens')} AS prompt_tokens, "
        f"{number('completion_tokens')} AS completion_tokens, "
        f"{number('response', 'latency_ms')} AS latency_ms, "
        f"{number('duration_ms')} AS duration_ms, "
        f"{text('outcome', 'mcp_tool')} AS mcp_tool, {text('outcome', 'mode')} AS mode, "
        "t.tool AS tool, a.created_at AS requested_at "
        "FROM events e "
        f"LEFT JOIN tool_calls t ON e.type = 'tool_outcome' AND t.call_key = {text('call_key')} "
        "LEFT JOIN approvals a ON e.type = 'approval_decided' "
        f"AND a.id = {dialect.json_int(data, 'approval_id')} "
        f"WHERE e.seq > ? AND e.seq <= ? AND e.type IN ({types})"
    )


class MetricsStore(StoreBase):
    """Counts over all runs."""

    async def metrics_snapshot(self, known_tools: Iterable[str] = ()) -> MetricsSnapshot:
        """Fold the journal's new events into the counters, then read the counters and the
        current values: one transaction, whose cost follows what happened since the last
        scrape, not the size of the store. `known_tools` are the tool names kept as labels."""
        tools = tuple(sorted(known_tools))
        events_sql = _events_sql(self.dialect)
        active = ", ".join(f"'{s}'" for s in ACTIVE_STATUSES)

        def scrape(c: Connection) -> MetricsSnapshot:
            now = time.time()
            cursor = int(
                c.execute(
                    "SELECT value FROM metric_counters WHERE name = ? AND labels = '{}'", (CURSOR,)
                ).fetchone()[0]
            )
            latest = int(c.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0])
            upto = min(latest, cursor + FOLD_LIMIT)
            if upto > cursor:
                fold = Fold(tools)
                for row in c.execute(events_sql, (cursor, upto)).fetchall():
                    fold.event(row)
                c.executemany(
                    "INSERT INTO metric_counters (name, labels, value) VALUES (?, ?, ?) "
                    "ON CONFLICT (name, labels) DO UPDATE "
                    "SET value = metric_counters.value + excluded.value",
                    [(name, _encode(labels), v) for (name, labels), v in fold.deltas.items()],
                )
                # A conflicting fold (another process's, at the same time) fails here, on
                # PostgreSQL, and runs again from the cursor it moved.
                c.execute(
                    "UPDATE metric_counters SET value = ? WHERE name = ? AND labels = '{}'",
                    (upto, CURSOR),
                )
            counters: dict[str, dict[Labels, float]] = defaultdict(dict)
            for name, labels, value in c.execute(
                "SELECT name, labels, value FROM metric_counters"
            ).fetchall():
                if name != CURSOR:
                    counters[name][tuple(sorted(json.loads(labels).items()))] = float(value)
            # The indexes on runs(status, …), approvals(status, …) and the outbox's
            # undelivered rows hold these rows apart: finished ones are never read.
            runs = dict.fromkeys(ACTIVE_STATUSES, 0)
            runs.update(
                c.execute(
                    f"SELECT status, COUNT(*) FROM runs WHERE status IN ({active}) GROUP BY status"
                ).fetchall()
            )
            pending = c.execute(
                "SELECT COUNT(*) FROM approvals WHERE status = 'pending'"
            ).fetchone()[0]
            outbox = c.execute(
                "SELECT COUNT(*), COALESCE(SUM(CASE WHEN attempts > 0 THEN 1 ELSE 0 END), 0), "
                "MIN(created_at) FROM outbox WHERE delivered_at IS NULL AND failed_at IS NULL"
            ).fetchone()
            return MetricsSnapshot(
                counters=dict(counters),
                runs_by_status={k: int(v) for k, v in runs.items()},
                approvals_pending=int(pending),
                outbox_pending=int(outbox[0]),
                outbox_retrying=int(outbox[1]),
                outbox_oldest_age=max(0.0, now - outbox[2]) if outbox[2] is not None else 0.0,
                journal_backlog=latest - upto,
            )

        return await self._transaction(scrape)
