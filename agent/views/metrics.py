"""`/metrics`: one store snapshot as Prometheus text (runs by status, tool call durations,
approval waits, LLM tokens)."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.records import RunStatus
from agent.store import DURATION_BUCKETS, WAIT_BUCKETS, MetricsSnapshot

CONTENT_TYPE = CONTENT_TYPE_LATEST


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
        """Yield every family."""
        snap = self._snapshot
        runs = GaugeMetricFamily("loom_ops_runs", "Runs by status", labels=["status"])
        for status in RunStatus:
            runs.add_metric([str(status)], snap.runs_by_status.get(str(status), 0))
        yield runs
        tools = HistogramMetricFamily(
            "loom_ops_tool_call_duration_seconds",
            "Tool call durations (execute_step is a runbook step)",
            labels=["tool"],
        )
        for tool, cumulative, count, total in snap.tool_durations:
            tools.add_metric([tool], _buckets(DURATION_BUCKETS, cumulative, count), total)
        yield tools
        waits = HistogramMetricFamily(
            "loom_ops_approval_wait_seconds",
            "Time from an approval request to its decision",
            labels=["status"],
        )
        for status, cumulative, count, total in snap.approval_waits:
            waits.add_metric([status], _buckets(WAIT_BUCKETS, cumulative, count), total)
        yield waits
        tokens = GaugeMetricFamily(
            "loom_ops_llm_tokens", "LLM tokens used by all runs", labels=["kind"]
        )
        tokens.add_metric(["prompt"], snap.prompt_tokens)
        tokens.add_metric(["completion"], snap.completion_tokens)
        yield tokens


def _buckets(bounds: Iterable[float], cumulative: list[int], count: int) -> list[tuple[str, float]]:
    pairs = [(f"{bound:g}", float(n or 0)) for bound, n in zip(bounds, cumulative, strict=True)]
    return [*pairs, ("+Inf", float(count))]
