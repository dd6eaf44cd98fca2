"""RunStore: every SQL statement of loom-ops, over SQLite or PostgreSQL.

Each public method is one short transaction. A transaction runs as one function on a database
thread (`agent.store.database`), so statements of concurrent runs can never interleave inside
each other's transactions, and a step costs one thread hop per commit. Nothing here awaits the
network or a subprocess. The SQL is written once for both engines (`?` placeholders); the
dialect spells the few expressions that differ. Each aggregate keeps its statements in its own
module; this class puts them together over one database.
"""

from __future__ import annotations

from pathlib import Path

from agent.chain import AuditKey
from agent.errors import StoreError
from agent.store.alerts import AlertsStore
from agent.store.approvals import ApprovalsStore
from agent.store.calls import CallsStore
from agent.store.claims import ClaimsStore
from agent.store.database import is_postgres_url, sqlite_path
from agent.store.journal import JournalStore
from agent.store.metrics import MetricsStore
from agent.store.processes import ProcessesStore
from agent.store.runs import RunsStore
from agent.store.tokens import TokensStore
from agent.store.tree import TreeStore


class RunStore(
    RunsStore,
    TreeStore,
    ClaimsStore,
    CallsStore,
    ApprovalsStore,
    JournalStore,
    ProcessesStore,
    MetricsStore,
    TokensStore,
    AlertsStore,
):
    """The durable store of runs and everything they did."""

    @classmethod
    async def open(
        cls, url: str | Path, pool_size: int = 4, audit_key: AuditKey | None = None
    ) -> RunStore:
        """Open the database a setting names, creating it or bringing its schema up to date:
        `postgresql://…` is PostgreSQL; a path or `sqlite:///path` is a SQLite file. Events
        this store appends are chained under `audit_key` (None: unkeyed)."""
        url = str(url)
        if is_postgres_url(url):
            from agent.store.postgres import PostgresDatabase

            return cls(await PostgresDatabase.open(url, pool_size), audit_key)
        from agent.store.sqlite import SqliteDatabase

        try:
            path = sqlite_path(url)
        except ValueError as exc:
            raise StoreError(str(exc)) from None
        return cls(await SqliteDatabase.open(path), audit_key)
