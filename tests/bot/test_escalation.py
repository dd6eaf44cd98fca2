"""Unanswered approvals on the real bot against the Bot API stand-in: a request with a short
deadline reminds its approvers (a reply to its card mentioning them, and a private message to
whoever started the bot privately), then escalates to the leads (refused before, able to
decide after), each hop journaled and shown on the card; an expiry never approves, and with
`on_expiry: rollback` it rolls the completed steps back first."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from agent.settings import Settings
from agent.views.explain import explain_tree
from agent.views.postmortem import postmortem_of
from agent.views.trace import render_trace, trace_of
from tests.bot_harness import (
    ALICE,
    BOB,
    CAROL,
    INCIDENTS,
    MALLORY,
    approval_messages,
    chat_bench,
    from_bot,
    keyboard_data,
    run_id_of,
    summaries,
    wait_for,
    wait_for_approval,
)
from tests.support import write_runbook

# Alice starts runs; Bob and Mallory are on call; Carol leads (and is on call for nothing).
PEOPLE = f"""\
people:
  - name: alice
    telegram: {ALICE}
  - name: bob
    telegram: {BOB}
    groups: [oncall]
  - name: mallory
    telegram: {MALLORY}
    groups: [oncall]
  - name: carol
    telegram: {CAROL}
    groups: [leads]
"""

ESCALATION_DRILL = """\
id: escalation-drill
title: Escalation drill
description: A gated step nobody on call answers in time.
triggers: [escalation drill]
approvers: [group:oncall]
approval_timeout: 6
escalation:
  remind_after: 30%
  escalate_after: 60%
  escalate_to: [group:leads]
steps:
  - id: gated
    title: A gated note
    note: nothing happens
    approval: required
"""

EXPIRY_ROLLBACK_DRILL = """\
id: expiry-rollback-drill
title: Expiry rollback drill
description: A drained node, then a gated step nobody answers; expiry undrains the node.
triggers: [expiry rollback drill]
approvers: [group:oncall]
approval_timeout: 1.5
on_expiry: rollback
escalation:
  remind_after: 0
steps:
  - id: drain
    title: Drain the node
    note: draining
    rollback:
      note: undrain the node
  - id: gated
    title: A gated note
    note: nothing happens
    approval: required
"""

JSON = dict[str, Any]


def _bench_settings(settings: Settings, workspace: Path) -> Settings:
    (workspace / "people.yaml").write_text(PEOPLE)
    write_runbook(workspace, "escalation-drill", ESCALATION_DRILL)
    write_runbook(workspace, "expiry-rollback-drill", EXPIRY_ROLLBACK_DRILL)
    return settings


def _choice(message: JSON, choice: str) -> str:
    return next(d for d in keyboard_data(message) if d.endswith(f":{choice}"))


def _current(standin: Any, chat_id: int, message_id: int) -> JSON:
    return next(m for m in standin.messages(chat_id) if m["message_id"] == message_id)


def _replies_to(standin: Any, chat_id: int, message_id: int, head: str) -> list[JSON]:
    return [
        m
        for m in from_bot(standin, chat_id)
        if (m.get("reply_to_message") or {}).get("message_id") == message_id
        and m.get("text", "").startswith(head)
    ]


def _started_privately(db: str, user_id: int) -> bool:
    with sqlite3.connect(db) as conn:
        row = conn.execute(
            "SELECT private_chat_at FROM chat_users WHERE identity = ?", (f"telegram:{user_id}",)
        ).fetchone()
    return row is not None and row[0] is not None


def _step_calls(db: str, run_id: str) -> list[tuple[str, str]]:
    """(tool, step) of each step call in run `run_id` and the runs below it, in order."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT tool, step_id FROM tool_calls WHERE run_id LIKE ? AND step_id IS NOT NULL "
            "AND tool != 'await_approval' ORDER BY rowid",
            (f"{run_id}%",),
        ).fetchall()
    return [(row[0], row[1]) for row in rows]


def _event_types(db: str, run_id: str) -> list[str]:
    """The event types of run `run_id` and the runs below it, in journal order."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT type FROM events WHERE run_id LIKE ? ORDER BY seq", (f"{run_id}%",)
        ).fetchall()
    return [row[0] for row in rows]


async def test_an_unanswered_request_reminds_then_escalates_to_the_leads(
    settings: Settings, workspace: Path
) -> None:
    """Bob started the bot privately, Mallory never did, and the bot serves only the incident
    group: the reminder replies to the card mentioning both and reaches Bob's private chat,
    not Mallory's; Carol (a lead) is refused before the escalation, is mentioned by it, and
    decides after it; the card shows each hop and keeps its buttons until then."""
    settings = _bench_settings(settings, workspace)
    async with chat_bench(settings, allowed_chat_ids=[INCIDENTS]) as (standin, service):
        standin.add_chat(MALLORY, "private")
        standin.inject_message(BOB, BOB, "/start")  # Bob's private chat with the bot
        await wait_for(standin, lambda: _started_privately(settings.db, BOB))

        standin.inject_message(INCIDENTS, ALICE, "/run escalation-drill")
        card = await wait_for_approval(standin, INCIDENTS)
        run_id = run_id_of(card)
        early = standin.inject_callback(INCIDENTS, card["message_id"], CAROL, _choice(card, "y"))
        await wait_for(standin, lambda: standin.callback_answer(early))
        refused = standin.callback_answer(early)
        assert refused["show_alert"] and "may not decide this request" in refused["text"]

        await wait_for(
            standin, lambda: _replies_to(standin, INCIDENTS, card["message_id"], "🔔 Reminder")
        )
        (reminder,) = _replies_to(standin, INCIDENTS, card["message_id"], "🔔 Reminder")
        assert "@bob" in reminder["text"]
        assert any(
            entity.get("url") == f"tg://user?id={MALLORY}"
            for entity in reminder.get("entities", [])
        )
        # Bob's chat holds the bot's answer to his /start already: wait for the reminder.
        await wait_for(
            standin,
            lambda: any(m["text"].startswith("🔔 Reminder") for m in from_bot(standin, BOB)),
        )
        (private,) = [m for m in from_bot(standin, BOB) if m["text"].startswith("🔔 Reminder")]
        assert run_id in private["text"]
        assert not keyboard_data(private)

        await wait_for(
            standin, lambda: _replies_to(standin, INCIDENTS, card["message_id"], "⏫ Escalated")
        )
        (escalation,) = _replies_to(standin, INCIDENTS, card["message_id"], "⏫ Escalated")
        assert "group:leads" in escalation["text"] and "@carol" in escalation["text"]
        await wait_for(
            standin,
            lambda: (
                "Escalated to group:leads at"
                in _current(standin, INCIDENTS, card["message_id"])["text"]
            ),
        )
        shown = _current(standin, INCIDENTS, card["message_id"])
        assert "Reminded at" in shown["text"] and keyboard_data(shown)
        # Mallory never started the bot: nothing was even attempted in her private chat.
        assert from_bot(standin, MALLORY) == []

        tap = standin.inject_callback(INCIDENTS, card["message_id"], CAROL, _choice(card, "y"))
        await wait_for(standin, lambda: standin.callback_answer(tap))
        assert standin.callback_answer(tap)["text"] == "Approved: the run goes on."
        await wait_for(standin, lambda: summaries(standin, INCIDENTS, run_id), 20)

        types = _event_types(settings.db, run_id)
        assert types.count("approval_reminded") == 1 and types.count("approval_escalated") == 1
        assert (
            types.index("approval_reminded")
            < types.index("approval_escalated")
            < types.index("approval_decided")
        )
        tree = await service.run_tree(run_id, events=True)
        explained = explain_tree(tree)
        assert "approval #1 reminded telegram:100000001, telegram:100000066" in explained
        assert "approval #1 escalated to group:leads (telegram:100000002)" in explained
        traced = render_trace(trace_of(tree))
        assert "approval #1 reminded telegram:100000001, telegram:100000066" in traced
        assert "approval #1 escalated to group:leads" in traced
        draft = postmortem_of(tree)
        assert "reminded telegram:100000001, telegram:100000066 of #1" in draft
        assert "escalated #1 to group:leads" in draft


async def test_an_expiry_with_on_expiry_rollback_rolls_back_and_never_approves(
    settings: Settings, workspace: Path
) -> None:
    """Nobody decides: the card says the request expired with nothing approved and the
    completed steps rolled back; the gated step never ran and the summary says expired."""
    settings = _bench_settings(settings, workspace)
    async with chat_bench(settings) as (standin, _service):
        standin.inject_message(INCIDENTS, ALICE, "/run expiry-rollback-drill")
        card = await wait_for_approval(standin, INCIDENTS)
        run_id = run_id_of(card)

        await wait_for(standin, lambda: summaries(standin, INCIDENTS, run_id), 20)
        shown = _current(standin, INCIDENTS, card["message_id"])
        assert "Expired" in shown["text"]
        assert "the completed steps are rolled back" in shown["text"]
        assert not keyboard_data(shown)
        (summary,) = summaries(standin, INCIDENTS, run_id)
        assert "EXPIRED" in summary["text"].upper()
        assert "expired after" in summary["text"]
        assert "nobody decided; completed steps rolled back" in summary["text"]
        assert "drain — Drain the node: rolled back" in summary["text"]

        calls = _step_calls(settings.db, run_id)
        assert calls == [("execute_step", "drain"), ("rollback_step", "drain")]  # gated: never
        assert approval_messages(standin, INCIDENTS) == [shown]
