"""The journal's chain: each event's link covers the link before it and the event itself.

With an audit key (`LOOM_OPS_AUDIT_KEY`, kept outside the store) a link is an HMAC-SHA256,
which a store writer without the key cannot recompute: changing, inserting or removing an
event anywhere but at a run's end breaks the chain for good. Without a key a link is a plain
SHA-256 (as every event before schema 17 is), which anyone who can write the store can
recompute; such events still verify, as *unkeyed*. Each keyed event records the short id of
the key that wrote it (`k:` and 8 hex), so a verifier holding the key (or, after a rotation,
the previous ones) checks each event under its own key, and names a key it does not hold
rather than calling the run tampered.

Nothing the store says is trusted to decide what must be keyed: a store writer could strip
every MAC and claim the key never came. The anchor comes from outside: the run number from
which the key was in force (`LOOM_OPS_AUDIT_KEYED_SINCE`, or `--keyed-since`), which doctor
prints when it first sees a key on a store with unkeyed runs. From that run on, every run's
journal is keyed from its first event; without an anchor, a verifier holding a key accepts no
unkeyed event at all.

Deletions show as gaps. Every run gets a global number (`runs.run_no`) from a one-row counter
incremented in the transaction that writes the run's first event, so a rolled-back creation
leaves no hole; each keyed link covers the run's number and the event's index in its run,
contiguous from 1, and a run's first event is always `run_created`. A deleted run is a
missing number, an emptied one a run without its first event; a deleted event breaks its
run's chain. What no chain shows by itself is the newest runs or events deleted (with the
counter and the run's recorded head wound back): that is caught against the head of the run's
whole tree (`tree_head`), published outside the store (the chat summary, every export) and
checked with `loom-ops audit verify RUN --head HEX`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable, Sequence
from dataclasses import field
from typing import Any

from agent.records import EventRecord, RunRecord, record

GENESIS = ""
RUN_CREATED = "run_created"  # the first event of every run's journal
_KEY_ID_LABEL = b"loom-ops key id"
_TREE_LABEL = "loom-ops tree 1"
# Shortest published head `--head` compares with: 8 hex digits (32 bits).
MIN_PUBLISHED_HEX = 8
# How much of a head the chat summary and a verdict show: 64 bits, not guessable.
SHOWN_HEX = 16
# Events a published head that does not match is searched back through (older tree heads).
_MAX_SEARCHED_EVENTS = 50_000


# One encoder for every call: json.dumps with options builds a new one each time.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_json(data: Any) -> str:
    """JSON with sorted keys and no spaces: the same data always hashes the same."""
    return _CANONICAL.encode(data)


@record
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


@record
class Keyring:
    """The keys a verifier holds: the one in force (which writes) and the ones it replaced
    (rotation), each found by its id; empty when no key is set."""

    current: AuditKey | None = None
    previous: tuple[AuditKey, ...] = ()

    def get(self, key_id: str) -> AuditKey | None:
        """The key with this id, if held."""
        return next((k for k in self.keys if k.id == key_id), None)

    @property
    def keys(self) -> tuple[AuditKey, ...]:
        """Every key held, the one in force first."""
        return (self.current, *self.previous) if self.current else self.previous

    def describe(self) -> str:
        """The ids held, for a person: `k:ab12cd34 (and previous k:…)`, or `none`."""
        if not self.keys:
            return "none"
        said = self.current.id if self.current else "no current key"
        if self.previous:
            said += f" (and previous {', '.join(k.id for k in self.previous)})"
        return said


NO_KEYS = Keyring()


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
    events: Iterable[EventRecord], run_no: int | None = None, keys: Keyring = NO_KEYS
) -> EventRecord | None:
    """Recompute a run's chain in order; return the first event that does not verify.

    A keyed event verifies only under the key its id names (with the run's number); an
    unkeyed event after a keyed one is broken (its MAC was stripped for a plain hash)."""
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
            key = keys.get(event.key_id)
            good = key is not None
            digest = event_link(
                key, prev, event.run_id, run_no, event.idx, event.ts, event.type, data_json
            )
        if not good or event.idx != expected_idx or event.prev_hash != prev or event.hash != digest:
            return event
        prev = event.hash
        expected_idx += 1
    return None


@record
class ChainReport:
    """The verdict on one run: intact, TAMPERED (`problems`, one line each), or not verified
    (`unverified`: a key the verifier lacks, or unkeyed events and no anchor to judge them)."""

    run_id: str
    run_no: int | None
    events: int
    head: str  # the last event's link, as the journal holds it
    key_id: str | None  # the key of the last event (None: unkeyed)
    unkeyed: int  # events written without a key (not protected against a store writer)
    broken: EventRecord | None = None
    problems: tuple[str, ...] = ()
    unverified: str | None = None

    @property
    def intact(self) -> bool:
        """True when every event and every row read from the journal checks out."""
        return not self.problems and self.unverified is None

    @property
    def problem(self) -> str | None:
        """Every finding in one line (None when intact)."""
        found = [*self.problems, *([self.unverified] if self.unverified else [])]
        return "; ".join(found) if found else None


def verify_chain(
    run: RunRecord,
    events: Sequence[EventRecord],
    keys: Keyring,
    keyed_since: int | None = None,
) -> ChainReport:
    """Check a run's journal: it starts with the run's creation, every link verifies under
    the key its id names, it is keyed where the key was in force, and it ends where the run's
    row says it ends (one snapshot: rows and events agree unless someone wrote behind the
    store's back).

    `keyed_since` is the operator's anchor (never read from the store): the number of the
    first run written under a key. From that run on, a run must be keyed from its first
    event; without it, a verifier holding a key cannot tell an unkeyed event from a stripped
    MAC, and says so."""
    last = events[-1] if events else None
    head = last.hash if last else GENESIS
    unkeyed = sum(1 for e in events if e.key_id is None)
    problems: list[str] = []
    broken: EventRecord | None = None
    unverified: str | None = None

    unknown = sorted({e.key_id for e in events if e.key_id and keys.get(e.key_id) is None})
    if not events:
        problems.append(
            "it has no events, though a run is written with its run_created event: its "
            "journal was deleted and its row kept"
        )
    elif events[0].type != RUN_CREATED or events[0].idx != 1:
        problems.append(
            f"its journal starts with {events[0].type} (#{events[0].idx}), not run_created: "
            "its first events were removed"
        )
    if unknown and not keys.keys:
        unverified = (
            f"written with audit key {', '.join(unknown)}: set LOOM_OPS_AUDIT_KEY (or "
            "LOOM_OPS_AUDIT_KEY_FILE; older keys in LOOM_OPS_AUDIT_PREVIOUS_KEYS) to verify it"
        )
    elif unknown:
        unverified = (
            f"written with key {', '.join(unknown)}, which the verifier does not hold (it "
            f"holds {keys.describe()}): add a rotated-away key to "
            "LOOM_OPS_AUDIT_PREVIOUS_KEYS; otherwise its key ids were altered"
        )
    elif events:
        broken = first_broken_link(events, run.run_no, keys)
        if broken is not None:
            problems.append(
                f"event seq {broken.seq} (#{broken.idx}, {broken.type}) does not match its "
                "chain: it or an event before it was changed, inserted or removed"
            )
    anchored = keyed_since is not None and run.run_no is not None and run.run_no >= keyed_since
    if anchored and events and events[0].key_id is None:
        problems.append(
            f"its first event is unkeyed though the key is in force since run #{keyed_since}: "
            "its MACs were stripped for plain hashes (or a process without the key wrote it)"
        )
    elif keyed_since is None and keys.keys and unkeyed and unverified is None:
        unverified = (
            f"{unkeyed} of its {len(events)} events are unkeyed, and nothing says since which "
            "run the key is in force: they may be MACs a store writer stripped (give "
            "--keyed-since N or set LOOM_OPS_AUDIT_KEYED_SINCE; `loom-ops doctor` prints N)"
        )
    if len(events) < run.event_count:
        problems.append(
            f"the journal holds {len(events)} event(s) but the run recorded "
            f"{run.event_count}: {run.event_count - len(events)} were removed from its end"
        )
    elif len(events) > run.event_count:
        problems.append(
            f"the journal holds {len(events)} event(s) but the run recorded only "
            f"{run.event_count}: events were added behind the store's back, or the run's row "
            "was wound back"
        )
    elif head != run.last_hash:
        problems.append(
            "the run's recorded head is not its last event's link: the row or its last "
            "event was rewritten"
        )
    key_id = last.key_id if last else None
    return ChainReport(
        run.id, run.run_no, len(events), head, key_id, unkeyed, broken, tuple(problems), unverified
    )


# -- the head of a run's tree, published outside the store --------------------------------------


@record
class RunHead:
    """What a tree's head covers of one run: its number, id, journal length and last link."""

    run_no: int | None
    run_id: str
    events: int
    head: str

    @classmethod
    def of(cls, run: RunRecord) -> RunHead:
        """A run's head as its row records it (what a summary rendered from the rows shows)."""
        return cls(run.run_no, run.id, run.event_count, run.last_hash)


def tree_head(runs: Iterable[RunHead]) -> str:
    """The head of a run tree: a SHA-256 over each run's number, id, length and last link, in
    number order. A run's last link is a MAC under the key, so a store writer without it can
    only offer older prefixes of runs, never a tree with a run changed or added."""
    ordered = sorted(runs, key=lambda r: (r.run_no is None, r.run_no or 0, r.run_id))
    material = "\x1e".join(
        "\x1f".join((str(r.run_no), r.run_id, str(r.events), r.head)) for r in ordered
    )
    return hashlib.sha256(f"{_TREE_LABEL}\x1d{material}".encode()).hexdigest()


def published_head(value: str) -> str:
    """A head as a person copies it from a summary or an export: hex, at least 8 digits."""
    text = value.strip().lower()
    if len(text) < MIN_PUBLISHED_HEX or any(c not in "0123456789abcdef" for c in text):
        raise ValueError(
            f"a published head is at least {MIN_PUBLISHED_HEX} hex digits, not {value!r}"
        )
    return text


def journal_tree_head(runs: Sequence[RunRecord], events: Sequence[EventRecord]) -> str:
    """The head of a run tree as its journal (not its rows) says: each run's events counted
    and its last link."""
    last: dict[str, EventRecord] = {}
    count: dict[str, int] = {}
    for event in sorted(events, key=lambda e: e.seq):
        last[event.run_id] = event
        count[event.run_id] = count.get(event.run_id, 0) + 1
    return tree_head(
        RunHead(r.run_no, r.id, count.get(r.id, 0), _link(last.get(r.id))) for r in runs
    )


def published_mismatch(
    runs: Sequence[RunRecord], events: Sequence[EventRecord], published: str
) -> str | None:
    """Why a tree's journal does not end at a published tree head (None when it does), as
    far as the journal tells: the tree's head as of an earlier event, or none of them."""
    whole = journal_tree_head(runs, events)
    if whole.startswith(published):
        return None
    said = f"the published head {published[:SHOWN_HEX]} is not this tree's ({whole[:SHOWN_HEX]})"
    ordered = sorted(events, key=lambda e: e.seq)
    numbers = {r.id: r.run_no for r in runs}
    if len(ordered) <= _MAX_SEARCHED_EVENTS:
        state: dict[str, RunHead] = {}
        for n, event in enumerate(ordered, start=1):
            run_id = event.run_id
            state[run_id] = RunHead(numbers[run_id], run_id, event.idx, event.hash)
            if tree_head(state.values()).startswith(published):
                return (
                    f"{said}: it is the tree's head as of event seq {event.seq}, and "
                    f"{len(ordered) - n} event(s) came after it (published before the tree "
                    "ended, or events were added since)"
                )
    return (
        f"{said}, nor was it at any earlier event ({len(runs)} run(s), {len(ordered)} "
        "events): runs or events were removed from its end, or rewritten"
    )


def _link(event: EventRecord | None) -> str:
    return event.hash if event is not None else GENESIS


@record
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
