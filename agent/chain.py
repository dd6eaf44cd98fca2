"""The journal's hash chain: each event's hash covers the previous hash and the event."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from agent.records import EventRecord

GENESIS = ""


# One encoder for every call: json.dumps with options builds a new one each time.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_json(data: Any) -> str:
    """JSON with sorted keys and no spaces: the same data always hashes the same."""
    return _CANONICAL.encode(data)


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


@dataclass(frozen=True)
class ChainReport:
    """The verdict on one run's journal: intact, or where it first breaks and how."""

    run_id: str
    events: int
    broken: EventRecord | None
    problem: str | None

    @property
    def intact(self) -> bool:
        """True when every event and the run's recorded chain head check out."""
        return self.problem is None


def verify_chain(
    run_id: str, events: Sequence[EventRecord], head_hash: str, head_count: int
) -> ChainReport:
    """Check a run's events and that they end where the run says its chain ends.

    The head check catches what a chain alone cannot: events deleted from the end.
    """
    broken = first_broken_link(events)
    if broken is not None:
        return ChainReport(
            run_id,
            len(events),
            broken,
            f"event seq {broken.seq} (#{broken.idx}, {broken.type}) does not match its hash "
            "chain: it or an event before it was changed, inserted or removed",
        )
    last = events[-1] if events else None
    if len(events) != head_count or (last.hash if last else "") != head_hash:
        return ChainReport(
            run_id,
            len(events),
            None,
            f"the journal holds {len(events)} event(s) but the run recorded {head_count}: "
            "events were removed from its end",
        )
    return ChainReport(run_id, len(events), None, None)
