"""Processes: which loom-ops processes share this store, by heartbeat."""

from __future__ import annotations

import time

from agent.records import Effects, ProcessRecord
from agent.store.base import StoreBase
from agent.store.database import Connection


class ProcessesStore(StoreBase):
    """Heartbeats of live processes."""

    async def beat_process(
        self, owner: str, kind: str, drives_runs: bool, effects: Effects
    ) -> None:
        """Register a long-running process serving this store, with what it may act live,
        or renew its heartbeat."""
        now = time.time()
        await self._transaction(
            lambda c: c.execute(
                "INSERT INTO processes "
                "(owner, kind, drives_runs, started_at, heartbeat_at, effects) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (owner) DO UPDATE SET "
                "heartbeat_at = excluded.heartbeat_at",
                (owner, kind, int(drives_runs), now, now, effects.to_json()),
            )
        )

    async def forget_process(self, owner: str) -> None:
        """A process stops serving the store (a clean exit)."""
        await self._transaction(
            lambda c: c.execute("DELETE FROM processes WHERE owner = ?", (owner,))
        )

    async def list_processes(self) -> list[ProcessRecord]:
        """Every registered process, live or not (see `heartbeat_at`), newest first; rows of
        processes gone for a day are dropped."""
        now = time.time()

        def listing(c: Connection) -> list[ProcessRecord]:
            c.execute("DELETE FROM processes WHERE heartbeat_at < ?", (now - 86400,))
            rows = c.execute(
                "SELECT owner, kind, drives_runs, started_at, heartbeat_at, effects "
                "FROM processes "
                "ORDER BY started_at DESC"
            ).fetchall()
            return [
                ProcessRecord(
                    owner=row["owner"],
                    kind=row["kind"],
                    drives_runs=bool(row["drives_runs"]),
                    started_at=row["started_at"],
                    heartbeat_at=row["heartbeat_at"],
                    effects=Effects.from_json(row["effects"]) if row["effects"] else None,
                )
                for row in rows
            ]

        return await self._transaction(listing)
