"""The journal's chain: each event's link covers the link before it and the event itself.

With an audit key (`LOOM_OPS_AUDIT_KEY`, kept outside the store) a link is an HMAC-SHA256,
which a store writer without the key cannot recompute: changing, inserting or removing an
event anywhere but at a run's end breaks the chain for good. Without a key a link is a plain
SHA-256 (as every event before schema 17 is), which anyone who can write the store can
recompute; such events still verify, as *unkeyed*. Each keyed event records the short id of
the key that wrote it (`k:` and 8 hex), so a verifier given another key hears "written with
key k:…, you gave k:…" rather than "tampered".

Deletions show as gaps. Every run gets a global number (`runs.run_no`) from a one-row counter
incremented in the transaction that writes the run's first event, so a rolled-back creation
leaves no hole (a sequence or AUTOINCREMENT would skip one, and a gap would prove nothing);
each keyed link covers the run's number and the event's index in its run, contiguous from 1.
A deleted run is a missing number; a deleted event breaks its run's chain. Numbering runs
rather than events keeps the counter's row lock out of the hot path: it is taken once per run
created, while many workers append events to their own runs without touching a shared row.
What no chain shows by itself is the newest runs or events deleted (with the counter and the
run's recorded head wound back): that is caught against a head published outside the store
(the chat summary, every export) with `loom-ops audit verify --head`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.errors import AuditKeyError
from agent.records import EventRecord, RunRecord

GENESIS = ""
_KEY_ID_LABEL = b"loom-ops key id"
# Shortest published head `--head` compares with: 8 hex digits (32 bits) of a MAC.
MIN_PUBLISHED_HEX = 8
# How much of a head the chat summary and a verdict show: 64 bits, not guessable.
SHOWN_HEX = 16


# One encoder for every call: json.dumps with options builds a new one each time.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_json(data: Any) -> str:
    """JSON with sorted keys and no spaces: the same data always hashes the same."""
    return _CANONICAL.encode(data)


@dataclass(frozen=True)
class AuditKey:
    """The secret the journal's links are MACs under; only its id is ever shown or stored."""

    secret: bytes = field(repr=False)
    id: str

    @classmethod
    def of(cls, secret: str) -> AuditKey:
        """The key a setting names (its UTF-8 bytes), with its public id `k:` + 8 hex."""
        raw = secret.encode()
        digest = hmac.new(raw, _KEY_ID_LABEL, hashlib.sha256).hexdigest()
        return cls(raw, f"k:{digest[:8]}")


def event_hash(prev_hash: str, run_id: str, idx: int, ts: float, type_: str, data_json: str) -> str:
    """The unkeyed link of one event: a plain SHA-256 anyone can recompute."""
    material = "\x1f".join((prev_hash, run_id, str(idx), repr(ts), type_, data_json))
    return hashlib.sha256(material.encode()).hexdigest()


def event_link(
    key: AuditKey | None,
    prev_hash: str,
    run_id: str,
    run_no: int | None,
    idx: int,
    ts: float,
    type_: str,
    data_json: str,
) -> str:
    """One event's link: an HMAC over the run's number too when keyed, else `event_hash`."""
    if key is None:
        return event_hash(prev_hash, run_id, idx, ts, type_, data_json)
    material = "\x1f".join(
        ("mac1", prev_hash, run_id, str(run_no), str(idx), repr(ts), type_, data_json)
    )
    return hmac.new(key.secret, material.encode(), hashlib.sha256).hexdigest()


def first_broken_link(
    events: Iterable[EventRecord], run_no: int | None = None, key: AuditKey | None = None
) -> EventRecord | None:
    """Recompute a run's chain in order; return the first event that does not verify.

    A keyed event verifies only under `key` (with the run's number); an unkeyed event after a
    keyed one is broken (its MAC was stripped and replaced by a plain hash)."""
    prev = GENESIS
    expected_idx = 1
    keyed_before = False
    for event in events:
        data_json = canonical_json(event.data)
        if event.key_id is None:
            digest = event_hash(prev, event.run_id, event.idx, event.ts, event.type, data_json)
            good = not keyed_before
        else:
            keyed_before = True
            good = key is not None and event.key_id == key.id
            digest = event_link(
                key, prev, event.run_id, run_no, event.idx, event.ts, event.type, data_json
            )
        if not good or event.idx != expected_idx or event.prev_hash != prev or event.hash != digest:
            return event
        prev = event.hash
        expected_idx += 1
    return None


@dataclass(frozen=True)
class ChainReport:
    """The verdict on one run's journal: intact, or where it first breaks and how."""

    run_id: str
    run_no: int | None
    events: int
    head: str  # the last event's link, as the journal holds it
    key_id: str | None  # the key of the last event (None: unkeyed)
    unkeyed: int  # events written without a key (not protected against a store writer)
    broken: EventRecord | None
    problem: str | None

    @property
    def intact(self) -> bool:
        """True when every event, the run's recorded head and any published head check out."""
        return self.problem is None


def check_key(run: RunRecord, events: Sequence[EventRecord], key: AuditKey | None) -> None:
    """Refuse (AuditKeyError, one line) to judge a keyed journal without its key or with
    another: that is the verifier's mistake, not tampering."""
    written = sorted({e.key_id for e in events if e.key_id is not None})
    if not written:
        return
    if key is None:
        raise AuditKeyError(
            f"run {run.id} was written with audit key {', '.join(written)}: set "
            "LOOM_OPS_AUDIT_KEY (or LOOM_OPS_AUDIT_KEY_FILE) to verify it"
        )
    if key.id not in written or len(written) > 1:
        others = ", ".join(k for k in written if k != key.id)
        raise AuditKeyError(
            f"run {run.id} was written with key {others}, you gave {key.id} "
            "(or its key ids were altered)"
        )


def verify_chain(
    run: RunRecord,
    events: Sequence[EventRecord],
    key: AuditKey | None,
    published: str | None = None,
    keyed_since: int | None = None,
) -> ChainReport:
    """Check a run's events, that they end where the run says its chain ends, and (given)
    that they end at a head published outside the store.

    The recorded head catches events deleted from the end by someone who left the run's row
    alone; the published head catches it when the row was wound back too. `keyed_since`, the
    number of the first run with a keyed event: with a key, a wholly unkeyed run numbered
    after it had its MACs stripped (or was written by a process without the key)."""
    check_key(run, events, key)
    last = events[-1] if events else None
    head = last.hash if last else GENESIS
    unkeyed = sum(1 for e in events if e.key_id is None)

    def report(problem: str | None, broken: EventRecord | None = None) -> ChainReport:
        key_id = last.key_id if last else None
        return ChainReport(run.id, run.run_no, len(events), head, key_id, unkeyed, broken, problem)

    broken = first_broken_link(events, run.run_no, key)
    if broken is not None:
        return report(
            f"event seq {broken.seq} (#{broken.idx}, {broken.type}) does not match its chain: "
            "it or an event before it was changed, inserted or removed",
            broken,
        )
    stripped = key is not None and keyed_since is not None and 0 < unkeyed == len(events)
    if stripped and run.run_no is not None and run.run_no > keyed_since:
        return report(
            f"no event is keyed though run #{keyed_since} before it was: its MACs were "
            "stripped and replaced by plain hashes (or a process without the key wrote it)"
        )
    if len(events) != run.event_count or head != run.last_hash:
        return report(
            f"the journal holds {len(events)} event(s) but the run recorded "
            f"{run.event_count}: events were removed from its end"
        )
    if published is not None and not head.startswith(published.lower()):
        return report(_published_mismatch(events, published.lower()))
    return report(None)


def _published_mismatch(events: Sequence[EventRecord], published: str) -> str:
    """Why a journal does not end at a published head, as far as the journal can tell."""
    said = f"the published head {published[:SHOWN_HEX]} is not the journal's"
    earlier = next((e for e in events if e.hash.startswith(published)), None)
    if earlier is not None:
        later = len(events) - earlier.idx
        return (
            f"{said}: it is event #{earlier.idx}'s, and {later} event(s) came after it "
            "(published before the run ended, or events were added since)"
        )
    return f"{said} ({len(events)} events): events were removed from its end or rewritten"


def published_head(value: str) -> str:
    """A head as a person copies it from a summary or an export: hex, at least 8 digits."""
    text = value.strip().lower()
    if len(text) < MIN_PUBLISHED_HEX or any(c not in "0123456789abcdef" for c in text):
        raise ValueError(
            f"a published head is at least {MIN_PUBLISHED_HEX} hex digits, not {value!r}"
        )
    return text


@dataclass(frozen=True)
class NumberingReport:
    """What the global run numbering says about deleted runs."""

    missing: list[int]  # numbers no run holds, below the highest one held
    counter: int  # the last number the counter handed out
    highest: int  # the highest number a run holds
    unnumbered: list[str]  # runs without a number (never so written)

    @property
    def intact(self) -> bool:
        """True when no number is missing and every run holds one."""
        return not self.problems()

    def problems(self) -> list[str]:
        """One line per finding, for a person."""
        lines = []
        if self.missing:
            lines.append(f"run number(s) {_ranges(self.missing)} missing: runs were deleted")
        if self.counter > self.highest:
            lines.append(
                f"the run counter is at {self.counter} but the newest run is number "
                f"{self.highest}: the newest runs were deleted"
            )
        if self.unnumbered:
            lines.append(f"run(s) without a number: {', '.join(self.unnumbered)}")
        return lines


def check_numbering(runs: Sequence[RunRecord], counter: int) -> NumberingReport:
    """Gaps in the global run numbering: numbers below the highest that no run holds, and a
    counter past the highest (the newest runs deleted, the counter left alone)."""
    numbers = sorted(r.run_no for r in runs if r.run_no is not None)
    held = set(numbers)
    highest = numbers[-1] if numbers else 0
    missing = [n for n in range(1, highest + 1) if n not in held]
    unnumbered = sorted(r.id for r in runs if r.run_no is None)
    return NumberingReport(missing, counter, highest, unnumbered)


def _ranges(numbers: list[int]) -> str:
    """`3, 5-7`: consecutive numbers as one range."""
    parts: list[str] = []
    start = prev = numbers[0]
    for n in [*numbers[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ", ".join(parts)
