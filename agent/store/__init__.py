"""The durable store: transactions over SQLite or PostgreSQL, one module per aggregate.

Its public names, listed once: the store and the commands it takes (its errors live in
`agent.errors`).
"""

from agent.store.approvals import Decided
from agent.store.base import JournalWatch
from agent.store.commands import (
    CallResult,
    DecisionEffect,
    NewApproval,
    NewChild,
    NewRun,
    NewToolCall,
    Outcome,
    RunbookPin,
    StartedCall,
)
from agent.store.database import Database, is_postgres_url
from agent.store.drive import Drive
from agent.store.metrics import DURATION_BUCKETS, WAIT_BUCKETS, MetricsSnapshot
from agent.store.runstore import RunStore

__all__ = [
    "DURATION_BUCKETS",
    "WAIT_BUCKETS",
    "CallResult",
    "Database",
    "Decided",
    "DecisionEffect",
    "Drive",
    "JournalWatch",
    "MetricsSnapshot",
    "NewApproval",
    "NewChild",
    "NewRun",
    "NewToolCall",
    "Outcome",
    "RunStore",
    "RunbookPin",
    "StartedCall",
    "is_postgres_url",
]
