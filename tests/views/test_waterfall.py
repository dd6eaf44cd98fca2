"""The waterfall's geometry, without a browser: lanes, bars, bands and ticks from journals,
and x positions from timestamps."""

from __future__ import annotations

from typing import Any

import pytest

from agent.events import (
    ApprovalDecided,
    ApprovalRequested,
    Event,
    PolicyTurn,
    RunClaimed,
    RunCreated,
    RunFinished,
    ToolIntent,
    ToolOutcome,
)
from agent.records import Checkpoint, EventRecord, Origin, RunLimits, RunRecord, RunStatus
from agent.views.journal import read_journal
from agent.views.units import duration
from agent.views.waterfall import (
    AXIS_HEIGHT,
    BAND_ROW,
    LANE_HEIGHT,
    MIN_BAR,
    Lane,
    axis_ticks,
    depths,
    lane_of,
    layout,
)

T0 = 1_800_000_000.0
NAMES = {"telegram:100000001": "@sam"}


def _run(
    run_id: str = "inc",
    parent: str | None = None,
    status: RunStatus = RunStatus.SUCCEEDED,
    finished: float | None = T0 + 10,
) -> RunRecord:
    return RunRecord(
        id=run_id,
        parent_id=parent,
        role="executor" if parent else "supervisor",
        status=status,
        request="r",
        requested_by="cli:tester",
        origin=Origin(),
        runbook_id=None,
        runbook=None,
        params={},
        checkpoint=Checkpoint(),
        limits=RunLimits(40, 100, 3600.0),
        summary=None,
        error=None,
        lease_owner=None,
        lease_expires_at=None,
        created_at=T0,
        updated_at=T0,
        finished_at=finished,
    )


def _lane(events: list[tuple[float, Event]], run: RunRecord | None = None, now: float = 0) -> Lane:
    """The lane of a run whose journal holds `events` at T0 + their offsets."""
    records = [
        EventRecord(n, "inc", n, T0 + at, event.type, event.data())
        for n, (at, event) in enumerate(events, start=1)
    ]
    return lane_of(
        run or _run(),
        read_journal(records),
        index=1,
        depth=0,
        now=T0 + now,
        name=lambda identity: NAMES.get(identity, identity),
    )


CREATED = RunCreated("executor", "r", "cli:tester", {"kind": "cli"}, {})


def _turn(n: int) -> PolicyTurn:
    return PolicyTurn(n, "mock", "h", {"calls": []})


def _step(key: str, step: str) -> ToolIntent:
    return ToolIntent(key, "execute_step", {"step_id": step}, step_id=step)


def _spans(lane: Lane) -> list[tuple[str, str, int, float, float]]:
    return [
        (bar.label, bar.outcome, bar.attempt, round(bar.start - T0, 3), round(bar.end - T0, 3))
        for bar in lane.bars
    ]


@pytest.mark.parametrize(
    ("seconds", "said"),
    [(0.052, "52 ms"), (4.13, "4.1 s"), (125, "2 min 5 s"), (3780, "1 h 3 min")],
)
def test_durations_read_in_human_units(seconds: float, said: str) -> None:
    assert duration(seconds) == said


def test_the_axis_has_round_times_in_human_units() -> None:
    assert [t.label for t in axis_ticks(2.5)] == ["0 s", "500 ms", "1 s", "1.5 s", "2 s", "2.5 s"]
    ticks = axis_ticks(125)
    assert [t.seconds for t in ticks] == [0, 30, 60, 90, 120]
    assert [t.label for t in ticks] == ["0 s", "30 s", "1 min", "1 min 30 s", "2 min"]
    assert [t.label for t in axis_ticks(0.004)][:4] == ["0 s", "0.5 ms", "1 ms", "1.5 ms"]
    assert [t.label for t in axis_ticks(0.7)][-2:] == ["600 ms", "700 ms"]
    assert [t.label for t in axis_ticks(4 * 3600)][:3] == ["0 s", "30 min", "1 h"]
    assert len(axis_ticks(30 * 3600)) <= 9  # a day-long wait still gets a handful


def test_a_retry_is_a_bar_of_its_own_and_turns_are_ticks() -> None:
    lane = _lane(
        [
            (0.0, CREATED),
            (0.1, _turn(0)),
            (0.1, _step("k#0.0", "connect")),
            (0.3, ToolOutcome("k#0.0", "error", {"exit_code": 3}, 1, 200.0)),
            (0.4, _turn(1)),
            (0.4, _step("k#1.0", "connect")),
            (0.5, ToolOutcome("k#1.0", "ok", {"exit_code": 0}, 1, 100.0)),
            (0.6, RunFinished("succeeded", "done")),
        ],
        _run(finished=T0 + 0.6),
    )
    assert _spans(lane) == [
        ("connect", "failed", 1, 0.1, 0.3),
        ("connect", "ok", 2, 0.4, 0.5),
    ]
    assert [bar.anchor for bar in lane.bars] == ["step-1-1", "step-1-2"]
    assert [round(t - T0, 3) for t in lane.turns] == [0.1, 0.4]
    assert lane.finished and round(lane.end - T0, 3) == 0.6


def test_an_attempt_whose_driver_died_is_in_doubt_until_the_run_is_claimed_again() -> None:
    lane = _lane(
        [
            (0.0, CREATED),
            (1.0, _step("k#2.0", "restart")),  # the driver dies running it
            (5.0, RunClaimed("other", 2, taken_over_from="dead")),
            (5.1, ApprovalRequested(1, "in_doubt", "restart it", "may have run", T0 + 99, 1)),
            (9.1, ApprovalDecided(1, "approved", "telegram:100000001", 1, "k#2.0", "down")),
            (9.2, ToolIntent("k#2.0", "execute_step", {}, step_id="restart", attempt=2)),
            (9.4, ToolOutcome("k#2.0", "ok", {"exit_code": 0}, 2, 200.0)),
        ],
        _run(finished=T0 + 10),
    )
    assert _spans(lane) == [
        ("restart", "in_doubt", 1, 1.0, 5.0),
        ("restart", "ok", 2, 9.2, 9.4),
    ]
    assert lane.bars[0].decision == "retried by @sam — down"
    assert lane.bars[0].result is None
    (band,) = lane.bands
    assert (round(band.start - T0, 3), round(band.end - T0, 3)) == (5.1, 9.1)
    assert (band.kind, band.verb, band.decided_by) == ("in_doubt", "retried", "@sam")


def test_an_in_doubt_attempt_a_person_skipped_is_drawn_skipped() -> None:
    lane = _lane(
        [
            (0.0, CREATED),
            (1.0, _step("k#2.0", "restart")),
            (2.0, RunClaimed("other", 2, taken_over_from="dead")),
            (2.1, ApprovalRequested(1, "in_doubt", "restart it", "may have run", T0 + 99, 1)),
            (3.0, ApprovalDecided(1, "skipped", "cli:oncall", 1, "k#2.0")),
            (3.0, ToolOutcome("k#2.0", "skipped", {"skipped": True, "decided_by": "cli:oncall"})),
        ]
    )
    assert _spans(lane) == [("restart", "skipped", 1, 1.0, 2.0)]
    assert lane.bars[0].decision == "skipped by cli:oncall"


def test_a_wait_on_a_person_is_a_band_not_a_bar() -> None:
    gate = ToolIntent("k#3.0", "await_approval", {"step_id": "scale"}, step_id="scale")
    lane = _lane(
        [
            (0.0, CREATED),
            (1.0, gate),
            (1.0, ApprovalRequested(2, "gate", "scale", "why", T0 + 99, 2, "scale")),
            (61.0, ApprovalDecided(2, "approved", "telegram:100000001", 2, "k#3.0")),
            (61.0, ToolOutcome("k#3.0", "ok", {"approved": True})),
            (61.1, _step("k#4.0", "scale")),
            (61.3, ToolOutcome("k#4.0", "ok", {}, 1, 200.0)),
        ]
    )
    assert _spans(lane) == [("scale", "ok", 1, 61.1, 61.3)]
    (band,) = lane.bands
    assert (band.number, band.step_id, band.decision, band.decided_by) == (
        2,
        "scale",
        "approved",
        "@sam",
    )
    assert band.seconds == pytest.approx(60.0)
    assert band.decided_at == pytest.approx(T0 + 61)


def test_what_is_still_going_ends_now() -> None:
    run = _run(status=RunStatus.WAITING_APPROVAL, finished=None)
    lane = _lane(
        [
            (0.0, CREATED),
            (1.0, _step("k#0.0", "slow")),
            (2.0, ApprovalRequested(1, "gate", "x", "why", T0 + 99, 1, "other")),
        ],
        run,
        now=30.0,
    )
    assert _spans(lane) == [("slow", "running", 1, 1.0, 30.0)]
    (band,) = lane.bands
    assert band.decision == "pending" and band.decided_by is None
    assert round(band.end - T0, 3) == 30.0
    assert not lane.finished and round(lane.end - T0, 3) == 30.0


def test_a_wait_on_other_runs_survives_a_new_claim() -> None:
    lane = _lane(
        [
            (0.0, CREATED),
            (0.1, ToolIntent("k#1.0", "delegate_subagents_batch", {"roles": ["executor"]})),
            (0.2, RunClaimed("same", 2)),
            (8.0, ToolOutcome("k#1.0", "ok", {"children": []}, 1, 7900.0)),
        ]
    )
    assert _spans(lane) == [("delegate_subagents_batch", "waiting", 1, 0.1, 8.0)]


def test_an_unreadable_event_is_passed_over() -> None:
    records = [
        EventRecord(1, "inc", 1, T0, CREATED.type, CREATED.data()),
        EventRecord(2, "inc", 2, T0 + 1, "tool_outcome", {"status": "ok"}),  # no call key
        EventRecord(3, "inc", 3, T0 + 2, "a_later_versions_event", {"what": "news"}),
    ]
    lane = lane_of(_run(), read_journal(records), index=1, depth=0, now=T0 + 5)
    assert lane.bars == () and lane.bands == ()


def _span_lane(run_id: str, start: float, end: float, bands: bool = False) -> Lane:
    events: list[tuple[float, Any]] = [(start, CREATED)]
    if bands:
        events += [
            (start, ApprovalRequested(1, "gate", "x", "why", T0 + 99, 1)),
            (end, ApprovalDecided(1, "approved", "cli:oncall", 1)),
        ]
    lane = _lane(events, _run(finished=T0 + end))
    return Lane(run_id, lane.role, 0, lane.status, T0 + start, T0 + end, True, (), lane.bands, ())


def test_x_positions_share_one_scale_from_the_first_start_to_the_last_end() -> None:
    lanes = [_span_lane("a", 0.0, 10.0), _span_lane("b", 2.0, 6.0, bands=True)]
    picture = layout(lanes, width=1000)
    assert picture.origin == T0 and picture.span == pytest.approx(10.0)
    assert (picture.x(T0), picture.x(T0 + 10), picture.x(T0 + 2.5)) == (0, 1000, 250)
    band = picture.lanes[1].bands[0]
    assert picture.w(band.start, band.end) == 400  # 4 s of 10, on 1000 px
    assert picture.w(T0, T0 + 0.001) == MIN_BAR  # a millisecond still shows
    assert picture.tops == (AXIS_HEIGHT, AXIS_HEIGHT + LANE_HEIGHT)
    assert picture.height == AXIS_HEIGHT + 2 * LANE_HEIGHT + BAND_ROW  # room for who decided


def test_depths_follow_the_parents() -> None:
    runs = [
        _run("inc"),
        _run("inc:sub:executor", parent="inc"),
        _run("inc:sub:executor:sub:x", parent="inc:sub:executor"),
        _run("other", parent="elsewhere"),
    ]
    assert depths(runs) == {
        "inc": 0,
        "inc:sub:executor": 1,
        "inc:sub:executor:sub:x": 2,
        "other": 0,
    }
