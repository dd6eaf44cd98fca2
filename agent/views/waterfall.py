"""The trace's waterfall: where each run of a tree spent its time, as plain geometry.

Invariants: pure functions over the runs and their journals (no template, no browser, no
clock but the `now` passed in); times are epoch seconds until `Waterfall.x` maps them to
pixels, so a band's width is its wait times the scale, the same scale for every lane.

- one lane per run, in the tree's order (parents first), with its depth below the root;
- one bar per attempt of a tool call, from its intent to its outcome; an attempt whose driver
  was lost (no outcome before the next claim of the run) is `in_doubt`, drawn until the run
  was claimed again; a retry is a bar of its own;
- a wait on a person (`await_approval` and in-doubt requests) is a band from the request to
  the decision, never a bar; a call that waits on other runs is a `waiting` bar;
- a policy turn is a tick; a finished run has its end marked.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from agent.events import (
    ApprovalDecided,
    ApprovalExpired,
    ApprovalRequested,
    ApprovalVoted,
    PolicyTurn,
    RunClaimed,
    RunInterrupted,
    ToolIntent,
    ToolOutcome,
)
from agent.records import RunRecord, record
from agent.views.journal import JournalEntry
from agent.views.units import duration

PLOT_WIDTH = 960.0  # px of the time axis; on a narrow screen the lanes scroll inside their box
MIN_BAR = 3.0  # px: a millisecond step stays visible and clickable on a minutes-long axis
AXIS_HEIGHT = 26.0  # px above the first lane: the time axis's labels
LANE_HEIGHT = 46.0  # px of a lane: its label, its bars, its span
BAND_ROW = 14.0  # px more for a lane that waited on a person: who decided, and when
# What a bar's colour says, in the legend's order (the template's CSS gives each its colour).
OUTCOMES = ("ok", "failed", "refused", "skipped", "in_doubt")
WAIT_TOOLS = frozenset({"delegate_subagent", "delegate_subagents_batch", "await_sibling"})
PERSON_TOOLS = frozenset({"await_approval"})  # drawn as the request's band, not as a bar
_STATUS_OUTCOME = {"ok": "ok", "error": "failed", "refused": "refused", "skipped": "skipped"}
# What a decision on an in-doubt request did to the attempt, in the words of the request.
_IN_DOUBT_VERBS = {"approved": "retried", "rejected": "aborted"}
_AXIS_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200)


@record
class Bar:
    """One attempt of one tool call: from its intent to its outcome (epoch seconds)."""

    start: float
    end: float
    label: str  # the step's id, or the tool's name
    tool: str
    outcome: str  # one of OUTCOMES, `waiting` (on other runs) or `running` (no outcome yet)
    attempt: int  # of its step (or tool) in this run: 2 is the first retry
    anchor: str  # the id of the attempt's details on the page
    args: Mapping[str, Any]
    result: Mapping[str, Any] | None  # the outcome as journaled (None: never recorded)
    decision: str = ""  # what a person said about it (an in-doubt attempt), as people read it

    @property
    def seconds(self) -> float:
        """How long the attempt took (or ran until its driver was lost)."""
        return self.end - self.start


@record
class Band:
    """A wait on a person: request #`number`, from its asking to its decision (or to now,
    while pending)."""

    start: float
    end: float
    number: int
    kind: str  # gate | in_doubt
    step_id: str | None
    decision: str  # approved, rejected, skipped, expired, pending
    decided_by: str | None  # as people know them (`@sam`)
    decided_at: float | None
    votes: tuple[str, ...] = ()  # earlier approvals of a request that needs several people

    @property
    def seconds(self) -> float:
        """How long the person kept the run waiting."""
        return self.end - self.start

    @property
    def verb(self) -> str:
        """The decision as the request put it: an in-doubt attempt is retried, skipped or
        aborted; a gate approved or rejected."""
        if self.kind == "in_doubt":
            return _IN_DOUBT_VERBS.get(self.decision, self.decision)
        return self.decision


@record
class Lane:
    """One run of the tree: its span, its attempts, its waits on people, its policy turns."""

    run_id: str
    role: str
    depth: int  # 0 for the root, 1 for its children, ...
    status: str
    start: float
    end: float  # its end, or (still going) the last thing known of it
    finished: bool
    bars: tuple[Bar, ...]
    bands: tuple[Band, ...]
    turns: tuple[float, ...]


@record
class AxisTick:
    """A labelled time on the axis, in seconds after the tree's start."""

    seconds: float
    label: str


@record
class Waterfall:
    """The lanes laid out on one time axis: `x` maps an epoch time to a pixel."""

    lanes: tuple[Lane, ...]
    origin: float  # the tree's first moment
    span: float  # seconds from the origin to the last moment of any lane (> 0)
    axis: tuple[AxisTick, ...]
    width: float = PLOT_WIDTH
    tops: tuple[float, ...] = ()  # px: where each lane starts, top to bottom
    height: float = AXIS_HEIGHT  # px: the axis and every lane

    def x(self, ts: float) -> float:
        """The pixel of epoch time `ts` (0 at the origin, `width` at the end)."""
        return round((ts - self.origin) / self.span * self.width, 1)

    def w(self, start: float, end: float) -> float:
        """The width of an interval, at least MIN_BAR pixels so every attempt shows."""
        return max(MIN_BAR, round((end - start) / self.span * self.width, 1))

    def at(self, seconds: float) -> float:
        """The pixel of a time given in seconds after the origin (an axis tick)."""
        return self.x(self.origin + seconds)


def axis_ticks(span: float, most: int = 8) -> tuple[AxisTick, ...]:
    """Round times from 0 to `span` seconds, at most `most` + 1 of them, labelled in human
    units: the smallest step of 1, 2, 5 s … 12 h (or a power of ten below a second) that fits."""
    if span <= 0:
        return (AxisTick(0.0, "0 s"),)
    step = next((s for s in _AXIS_STEPS if span / s <= most), None)
    if step is None:  # beyond a few days: whole days
        step = 86400 * math.ceil(span / most / 86400)
    elif span < most:  # under a few seconds: 0.1, 0.2, 0.5 …
        exponent = math.floor(math.log10(span / most))
        step = next(m * 10**exponent for m in (1, 2, 5, 10) if span / (m * 10**exponent) <= most)
    count = math.floor(span / step + 1e-9)
    return tuple(AxisTick(n * step, _tick_label(n * step)) for n in range(count + 1))


def _tick_label(seconds: float) -> str:
    if seconds == 0:
        return "0 s"
    if seconds < 1:
        return f"{round(seconds * 1000, 3):g} ms"
    if seconds < 60:
        return f"{round(seconds, 3):g} s"
    if seconds % 3600 == 0:
        return f"{seconds // 3600:g} h"
    if seconds % 60 == 0 and seconds < 3600:
        return f"{seconds // 60:g} min"
    return duration(seconds)


def layout(lanes: Sequence[Lane], width: float = PLOT_WIDTH) -> Waterfall:
    """The lanes on one axis from the first lane's start to the last moment of any lane."""
    if not lanes:
        return Waterfall((), 0.0, 1.0, axis_ticks(1.0), width)
    tops, y = [], AXIS_HEIGHT
    for lane in lanes:
        tops.append(y)
        y += LANE_HEIGHT + (BAND_ROW if lane.bands else 0.0)
    origin = min(lane.start for lane in lanes)
    last = max(
        [lane.end for lane in lanes]
        + [bar.end for lane in lanes for bar in lane.bars]
        + [band.end for lane in lanes for band in lane.bands]
    )
    span = max(last - origin, 1e-3)
    return Waterfall(tuple(lanes), origin, span, axis_ticks(span), width, tuple(tops), y)


def depths(runs: Sequence[RunRecord]) -> dict[str, int]:
    """How far below the first run each run is (a run whose parent is not among them: 0)."""
    found: dict[str, int] = {}
    for run in runs:  # parents come before their children
        found[run.id] = found[run.parent_id] + 1 if run.parent_id in found else 0
    return found


@dataclass
class _Open:
    """An attempt whose outcome has not been read yet."""

    intent: ToolIntent
    start: float
    attempt: int


def lane_of(
    run: RunRecord,
    journal: Sequence[JournalEntry],
    *,
    index: int,
    depth: int,
    now: float,
    name: Callable[[str], str] = str,
) -> Lane:
    """The lane of `run` from its journal: its attempts, its waits on people and its turns.
    `index` names its anchors (`step-<index>-<n>`); `now` ends what is still going; `name`
    says how people know an identity."""
    bars: list[Bar] = []
    where: dict[str, int] = {}  # call key -> its latest bar (an in-doubt one may be decided)
    opened: dict[str, _Open] = {}
    tries: dict[str, int] = {}  # step id (or tool) -> attempts drawn
    bands: dict[int, Band] = {}
    votes: dict[int, list[str]] = {}
    turns: list[float] = []
    start = journal[0].record.ts if journal else run.created_at
    last = start

    def close(key: str, end: float, outcome: str, result: Mapping[str, Any] | None) -> None:
        began = opened.pop(key)
        intent = began.intent
        label = intent.step_id or intent.tool
        where[key] = len(bars)
        bars.append(
            Bar(
                began.start,
                max(end, began.start),
                label,
                intent.tool,
                outcome,
                began.attempt,
                f"step-{index}-{len(bars) + 1}",
                intent.args,
                result,
            )
        )

    for entry in journal:
        ts = entry.record.ts
        last = max(last, ts)
        match entry.event:
            case PolicyTurn():
                turns.append(ts)
            case ToolIntent(call_key=key, tool=tool) as intent if tool not in PERSON_TOOLS:
                if key in opened:  # a second intent with no outcome between: the first is lost
                    close(key, ts, "in_doubt", None)
                label = intent.step_id or tool
                tries[label] = tries.get(label, 0) + 1
                opened[key] = _Open(intent, ts, tries[label])
            case ToolOutcome(call_key=key, status=status, outcome=result) if key in opened:
                kind = "waiting" if opened[key].intent.tool in WAIT_TOOLS else None
                close(key, ts, kind or _STATUS_OUTCOME.get(status, "failed"), result)
            case ToolOutcome(call_key=key, status="skipped") if key in where:
                # A person said to treat an attempt drawn as in doubt as done.
                bars[where[key]] = replace(bars[where[key]], outcome="skipped")
            case RunClaimed() | RunInterrupted():
                # The driver changed or stopped: an attempt it left open never reported.
                for key in [k for k, o in opened.items() if o.intent.tool not in WAIT_TOOLS]:
                    close(key, ts, "in_doubt", None)
            case ApprovalRequested() as asked:
                bands[asked.approval_id] = Band(
                    ts, ts, asked.number or asked.approval_id, asked.kind, asked.step_id,
                    "pending", None, None,
                )  # fmt: skip
            case ApprovalVoted() as voted if voted.approval_id in bands:
                votes.setdefault(voted.approval_id, []).append(name(voted.decided_by))
            case ApprovalDecided() as decided if decided.approval_id in bands:
                bands[decided.approval_id] = replace(
                    bands[decided.approval_id],
                    end=ts,
                    decision=decided.decision,
                    decided_by=name(decided.decided_by),
                    decided_at=ts,
                )
                if decided.call_key in where:  # an in-doubt request: say so on the attempt
                    note = f" — {decided.note}" if decided.note else ""
                    verb = bands[decided.approval_id].verb
                    text = f"{verb} by {name(decided.decided_by)}{note}"
                    bars[where[decided.call_key]] = replace(
                        bars[where[decided.call_key]], decision=text
                    )
            case ApprovalExpired(approval_id=approval_id) if approval_id in bands:
                bands[approval_id] = replace(bands[approval_id], end=ts, decision="expired")
    finished = run.finished_at is not None
    # A finished run ends when it finished (or at a later event another version journaled);
    # anything still going lasts until now.
    end = max(run.finished_at or now, last)
    for key in list(opened):  # never reported: lost with a finished run, else still running
        close(key, end, "in_doubt" if finished else "running", None)
    for approval_id, band in bands.items():
        if band.decision == "pending":
            bands[approval_id] = replace(band, end=max(end, band.start))
        if approval_id in votes:
            bands[approval_id] = replace(bands[approval_id], votes=tuple(votes[approval_id]))
    return Lane(
        run.id,
        run.role,
        depth,
        str(run.status),
        min(start, run.created_at),
        end,
        finished,
        tuple(bars),
        tuple(bands.values()),
        tuple(turns),
    )
