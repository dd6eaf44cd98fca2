"""The durable store: transactions over SQLite or PostgreSQL, one module per aggregate.

Its public names, listed once: the store, the commands it takes, and the errors it raises.
"""

from agent.store.base import JournalWatch
from agent.store.commands import (
    DecisionEffect,
    NewApproval,
    NewChild,
    NewEvent,
    NewPolicyTurn,
    NewRun,
    NewToolCall,
    RunbookPin,
    StartedCall,
)
from agent.store.database import Database, SchemaTooNew, StoreError, is_postgres_url
from agent.store.errors import (
    ApprovalNotFound,
    LeaseLost,
    RunBusy,
    RunExists,
    RunNotFound,
    RunNotRunnable,
)
from agent.store.metrics import DURATION_BUCKETS, WAIT_BUCKETS, MetricsSnapshot
from agent.store.runstore import RunStore

__all__ = [
    "DURATION_BUCKETS",
    "WAIT_BUCKETS",
    "ApprovalNotFound",
    "Database",
    "DecisionEffect",
    "JournalWatch",
    "LeaseLost",
    "MetricsSnapshot",
    "NewApproval",
    "NewChild",
    "NewEvent",
    "NewPolicyTurn",
    "NewRun",
    "NewToolCall",
    "RunBusy",
    "RunExists",
    "RunNotFound",
    "RunNotRunnable",
    "RunStore",
    "RunbookPin",
    "SchemaTooNew",
    "StartedCall",
    "StoreError",
    "is_postgres_url",
]
