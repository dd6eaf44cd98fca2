"""Reading the journal: an event this version cannot read (another version's type, a damaged
payload) shows as what was stored, and every view still shows the rest around it."""

from __future__ import annotations

import dataclasses

from agent.events import ToolIntent, ToolOutcome, UnknownEvent
from agent.records import EventRecord, RunTree
from agent.service.runs import RunService
from agent.views.explain import explain_tree
from agent.views.journal import read_journal
from agent.views.trace import render_trace, trace_of


def _grown(tree: RunTree, *added: tuple[str, dict[str, object]]) -> RunTree:
    """The tree with events appended to its root's journal, a second apart."""
    last = tree.events_of(tree.root.id)[-1]
    events = [
        EventRecord(last.seq + n, last.run_id, last.idx + n, last.ts + n, kind, dict(data))
        for n, (kind, data) in enumerate(added, start=1)
    ]
    return dataclasses.replace(tree, events=(*tree.events, *events))


async def test_an_unreadable_event_renders_in_explain_and_trace(service: RunService) -> None:
    await service.start("u1", "incident: API latency spike")
    tree = await service.run_tree("u1", events=True)
    grown = _grown(
        tree,
        ("a_later_versions_event", {"what": "news"}),
        ("tool_outcome", {"status": "ok"}),  # no call key: damaged
    )
    start = tree.events_of("u1")[0].ts
    end = tree.events_of("u1")[-1].ts - start
    timeline = explain_tree(grown)
    assert timeline == explain_tree(tree) + (
        f'{f"+{end + 1:.3f}s":>11} a_later_versions_event: {{"what": "news"}}\n'
        f'{f"+{end + 2:.3f}s":>11} tool_outcome: {{"status": "ok"}}\n'
    )
    before, after = trace_of(tree)[0], trace_of(grown)[0]
    assert after.entries[:-2] == before.entries and after.steps == before.steps
    assert [(e.kind, e.title) for e in after.entries[-2:]] == [
        ("run", "a_later_versions_event (unreadable by this version)"),
        ("run", "tool_outcome (unreadable by this version)"),
    ]
    assert "&#34;what&#34;: &#34;news&#34;" in render_trace(trace_of(grown))


def test_an_outcome_is_paired_with_the_latest_intent_of_its_call() -> None:
    def record(seq: int, kind: str, **data: object) -> EventRecord:
        return EventRecord(seq, "r", seq, float(seq), kind, data)

    journal = read_journal(
        [
            record(1, "tool_intent", call_key="k", tool="execute_step", args={}, step_id="s"),
            record(2, "tool_outcome", call_key="k", status="error", attempt=1),
            record(3, "tool_intent", call_key="k", tool="execute_step", args={}, attempt=2),
            record(4, "tool_outcome", call_key="k", status="ok", attempt=2),
            record(5, "tool_outcome", call_key="decision", status="ok"),
            record(6, "tool_outcome", status="ok"),
        ]
    )
    intents = [entry.event for entry in journal if isinstance(entry.event, ToolIntent)]
    assert [entry.intent for entry in journal] == [None, intents[0], None, intents[1], None, None]
    assert isinstance(journal[4].event, ToolOutcome)
    assert journal[5].event == UnknownEvent("tool_outcome", {"status": "ok"})
