"""A run's journal as the views read it: each event parsed once, each tool outcome paired
with the intent it answers, and each runbook step's true state from those pairs.

Invariants:
- every stored event yields one entry, in journal order; one this version cannot read is an
  `UnknownEvent` entry, never an error, so a view shows the rest of the journal around it;
- an outcome is paired with the latest intent of its call key journaled before it (a
  decision's outcome has no intent); each paired outcome of a step is one attempt of it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from agent.events import Event, ToolIntent, ToolOutcome, UnknownEvent, parse
from agent.records import EventRecord, RunRecord, record
from agent.run.outcomes import StepState, step_states


@record
class JournalEntry:
    """One stored event with its typed payload; for a tool outcome, the call's intent."""

    record: EventRecord  # as stored: its time, and the raw data a dump shows
    event: Event | UnknownEvent
    intent: ToolIntent | None = None  # set on a tool outcome whose intent came before it


def read_journal(records: Iterable[EventRecord]) -> list[JournalEntry]:
    """The journal's entries in order, each outcome paired with its call's intent."""
    intents: dict[str, ToolIntent] = {}
    entries = []
    for stored in records:
        event = parse(stored)
        intent = None
        match event:
            case ToolIntent(call_key=key):
                intents[key] = event
            case ToolOutcome(call_key=key):
                intent = intents.get(key)
        entries.append(JournalEntry(stored, event, intent))
    return entries


def journal_steps(run: RunRecord, journal: Sequence[JournalEntry]) -> list[tuple[str, StepState]]:
    """Each step of the run's runbook (its id), in order, with its state from the journal's
    paired tool outcomes; a step nothing called is in the initial state."""
    states = step_states(
        (entry.intent.tool, entry.intent.step_id, entry.event.status, 1, entry.event.outcome)
        for entry in journal
        if isinstance(entry.event, ToolOutcome) and entry.intent is not None
    )
    steps = (run.runbook or {}).get("steps", [])
    return [(step["id"], states.get(step["id"], StepState())) for step in steps]
