"""`/metrics`: one store snapshot as Prometheus text.

Counters (`_total`, `# TYPE … counter`) are what the store counted since it was created, and
never go down (agent/store/metrics.py keeps them); gauges are current values only. A tool label
is one of the kernel's tool names or `other`, and every other label has a fixed few values, so
what a model writes never makes a new series.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from agent.records import record
from agent.store import MetricsSnapshot
from agent.store.metrics import (
    DECISIONS,
    FINAL_STATUSES,
    HISTOGRAMS,
    LLM_ERROR_REASONS,
    ROLES,
    Labels,
)

CONTENT_TYPE = CONTENT_TYPE_LATEST
PREFIX = "loom_ops_"


@record
class Family:
    """One family: the store's counter name, its labels, its help, and the label values shown
    at 0 before anything is counted (so a rate has a start)."""

    name: str
    labels: tuple[str, ...]
    help: str
    zeros: tuple[str, ...] = ()  # values of the one label, listed even when never counted


COUNTERS = (
    Family("runs_started", ("role",), "Runs created, by role", ROLES),
    Family("runs_finished", ("status",), "Runs that ended, by final status", FINAL_STATUSES),
    Family("runs_interrupted", (), "Drives stopped without an end (resumable)"),
    Family(
        "tool_calls",
        ("tool", "status"),
        "Tool calls with an outcome, refused ones included (tool: a known tool or other)",
    ),
    Family("mcp_calls", ("status", "mode"), "MCP tool calls of runbook steps and checks"),
    Family("llm_calls", ("policy",), "Policy answers (LLM or mock calls) that were journaled"),
    Family("llm_tokens", ("policy", "kind"), "LLM tokens used, prompt and completion"),
    Family(
        "llm_call_errors",
        ("reason",),
        "LLM calls that failed: an outage (run interrupted) or a setting (run failed)",
        LLM_ERROR_REASONS,
    ),
    Family("approvals_decided", ("decision",), "Approval requests decided", DECISIONS),
    Family("approvals_expired", (), "Approval requests nobody decided before the deadline"),
    Family(
        "alerts_received",
        ("outcome",),
        "Alert notifications, by what came of them (agent/store/alerts.py)",
        ("opened", "updated", "resolved", "unchanged", "unmatched"),
    ),
    Family("outbox_delivered", (), "Chat messages delivered"),
    Family(
        "outbox_delivery_failures",
        ("outcome",),
        "Failed chat deliveries: retried later, or given up",
        ("gave_up", "retry"),
    ),
)

# Histograms: their labels and help (their buckets are the store's, HISTOGRAMS).
HISTOGRAM_FAMILIES = {
    "tool_call_duration_seconds": (
        ("tool",),
        "Durations of tool calls that ran (refused calls are not)",
    ),
    "mcp_call_duration_seconds": (("status",), "Durations of live MCP tool calls"),
    "llm_call_duration_seconds": (
        ("policy",),
        "How long the policy (LLM) took to answer a turn",
    ),
    "approval_wait_seconds": (("decision",), "Time from an approval request to its decision"),
}


def render_metrics(snapshot: MetricsSnapshot) -> bytes:
    """The Prometheus text exposition of `snapshot`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot))
    return generate_latest(registry)


class SnapshotCollector(Collector):
    """Prometheus families from one store snapshot."""

    def __init__(self, snapshot: MetricsSnapshot) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        """Yield every family: counters, histograms, then gauges."""
        snap = self._snapshot
        for family in COUNTERS:
            yield _counter(family, snap)
        queued = CounterMetricFamily(
            f"{PREFIX}outbox_queued", "Chat messages queued (delivered, given up or pending)"
        )
        queued.add_metric(
            [],
            snap.total("outbox_delivered")
            + snap.value("outbox_delivery_failures", outcome="gave_up")
            + snap.outbox_pending,
        )
        yield queued
        for name, (labels, help_text) in HISTOGRAM_FAMILIES.items():
            yield _histogram(name, labels, help_text, snap)
        yield from _gauges(snap)


def _counter(family: Family, snap: MetricsSnapshot) -> Metric:
    metric = CounterMetricFamily(f"{PREFIX}{family.name}", family.help, labels=family.labels)
    values = dict(snap.counters.get(family.name, {}))
    for zero in family.zeros:
        values.setdefault(((family.labels[0], zero),), 0.0)
    if not family.labels:
        values.setdefault((), 0.0)
    for labels, value in sorted(values.items()):
        metric.add_metric([dict(labels).get(name, "") for name in family.labels], value)
    return metric


def _histogram(
    name: str, label_names: tuple[str, ...], help_text: str, snap: MetricsSnapshot
) -> Metric:
    """A histogram from its bucket counters (one per bound, not cumulative) and its sum."""
    metric = HistogramMetricFamily(f"{PREFIX}{name}", help_text, labels=label_names)
    buckets: dict[Labels, dict[str, float]] = defaultdict(dict)
    for labels, value in snap.counters.get(name, {}).items():
        rest = tuple(pair for pair in labels if pair[0] != "le")
        buckets[rest][dict(labels).get("le", "+Inf")] = value
    sums = snap.counters.get(f"{name}_sum", {})
    bounds = [f"{b:g}" for b in HISTOGRAMS[name]]
    for labels, counts in sorted(buckets.items()):
        cumulative, running = [], 0.0
        for bound in [*bounds, "+Inf"]:
            running += counts.get(bound, 0.0)
            cumulative.append((bound, running))
        values = dict(labels)
        metric.add_metric(
            [values.get(n, "") for n in label_names], cumulative, sums.get(labels, 0.0)
        )
    return metric


def _gauges(snap: MetricsSnapshot) -> Iterator[Metric]:
    runs = GaugeMetricFamily(
        f"{PREFIX}runs",
        "Runs not finished, by status (finished: runs_finished_total)",
        None,
        ["status"],
    )
    for status, count in snap.runs_by_status.items():
        runs.add_metric([status], count)
    yield runs
    for name, help_text, value in (
        ("approvals_pending", "Approval requests waiting for a decision", snap.approvals_pending),
        ("outbox_pending", "Chat messages not delivered yet", snap.outbox_pending),
        (
            "outbox_pending_retrying",
            "Pending chat messages whose delivery failed at least once",
            snap.outbox_retrying,
        ),
        (
            "outbox_oldest_pending_age_seconds",
            "How long the oldest pending chat message has waited",
            snap.outbox_oldest_age,
        ),
        (
            "metrics_journal_backlog_events",
            "Journal events not counted yet (a large store catching up after an upgrade)",
            snap.journal_backlog,
        ),
    ):
        yield GaugeMetricFamily(f"{PREFIX}{name}", help_text, value=value)
