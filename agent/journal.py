"""The event journal's hash chain: each event's hash covers the previous hash and the event."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

from agent.records import EventRecord

GENESIS = ""


def canonical_json(data: Any) -> str:
    """JSON with sorted keys and no spaces: the same data always hashes the same."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def event_hash(prev_hash: str, run_id: str, idx: int, ts: float, type_: str, data_json: str) -> str:
    """Hash of one event, chained to the one before it."""
    material = "\x1f".join((prev_hash, run_id, str(idx), repr(ts), type_, data_json))
    return hashlib.sha256(material.encode()).hexdigest()


def first_broken_link(events: Iterable[EventRecord]) -> EventRecord | None:
    """Recompute a run's chain in order; return the first event that does not verify."""
    prev = GENESIS
    expected_idx = 1
    for event in events:
        data_json = canonical_json(event.data)
        digest = event_hash(prev, event.run_id, event.idx, event.ts, event.type, data_json)
        if event.idx != expected_idx or event.prev_hash != prev or event.hash != digest:
            return event
        prev = event.hash
        expected_idx += 1
    return None
