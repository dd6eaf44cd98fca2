"""Metrics: counts and histograms of the whole store for /metrics."""

from __future__ import annotations

from dataclasses import dataclass

from agent.store.base import StoreBase
from agent.store.database import Connection

# Histogram bucket bounds (seconds) of /metrics: tool call durations, approval waits.
DURATION_BUCKETS = (0.005, 0.025, 0.1, 0.5, 1, 5, 30, 120, 600)
WAIT_BUCKETS = (10, 60, 300, 900, 1800, 3600, 14400)


@dataclass(frozen=True)
class MetricsSnapshot:
    """Counts and histograms of the whole store: (label, cumulative bucket counts, count, sum)."""

    runs_by_status: dict[str, int]
    tool_durations: list[tuple[str, list[int], int, float]]
    approval_waits: list[tuple[str, list[int], int, float]]
    prompt_tokens: int
    completion_tokens: int


class MetricsStore(StoreBase):
    """Counts over all runs."""

    async def count_active_roots(self) -> int:
        """Runs started by a front end (roots) with a run of their tree queued or running; a
        tree that only waits for a human holds nothing and is not counted."""
        row = await self._read(
            lambda c: c.execute(
                "WITH RECURSIVE up(id, parent_id) AS ("
                "SELECT id, parent_id FROM runs WHERE status IN ('queued', 'running') UNION "
                "SELECT r.id, r.parent_id FROM runs r JOIN up ON r.id = up.parent_id) "
                "SELECT COUNT(*) FROM up WHERE parent_id IS NULL"
            ).fetchone()
        )
        return int(row[0])

    async def metrics_snapshot(self) -> MetricsSnapshot:
        """Aggregates for /metrics, computed from the store (so every process agrees)."""
        bounds = ", ".join(
            f"SUM(CASE WHEN duration_ms <= {b * 1000:g} THEN 1 ELSE 0 END)"
            for b in DURATION_BUCKETS
        )
        wait_bounds = ", ".join(
            f"SUM(CASE WHEN decided_at - created_at <= {b:g} THEN 1 ELSE 0 END)"
            for b in WAIT_BUCKETS
        )

        def snapshot(c: Connection) -> MetricsSnapshot:
            runs = dict(c.execute("SELECT status, COUNT(*) FROM runs GROUP BY status").fetchall())
            tools = [
                (row[0], list(row[1:-2]), row[-2], row[-1])
                for row in c.execute(
                    f"SELECT tool, {bounds}, COUNT(*), COALESCE(SUM(duration_ms), 0) / 1000.0 "
                    "FROM tool_calls WHERE duration_ms IS NOT NULL GROUP BY tool"
                ).fetchall()
            ]
            waits = [
                (row[0], list(row[1:-2]), row[-2], row[-1])
                for row in c.execute(
                    f"SELECT status, {wait_bounds}, COUNT(*), "
                    "COALESCE(SUM(decided_at - created_at), 0) FROM approvals "
                    "WHERE decided_at IS NOT NULL GROUP BY status"
                ).fetchall()
            ]
            tokens = c.execute(
                "SELECT COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0) "
                "FROM runs"
            ).fetchone()
            return MetricsSnapshot(runs, tools, waits, int(tokens[0]), int(tokens[1]))

        return await self._read(snapshot)

    # -- outbox ----------------------------------------------------------------------------
