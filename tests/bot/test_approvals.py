"""Approvals through the bot's inline keyboards: who may tap, first decision wins, reasons,
expiry, flood limits (one chat's limit holds up no other chat), taps answered at once while the
database is busy, and many runs at once."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from telegram import Update
from telegram.ext import Application

from agent.records import ApprovalStatus, Decision, RunStatus
from agent.settings import Settings
from bench.roundtrips import RoundTrips, count_store, counting_here
from tests.bot_harness import (
    ALICE,
    BOB,
    CAROL,
    INCIDENTS,
    MALLORY,
    PLATFORM,
    approval_messages,
    chat_bench,
    confirm_run,
    from_bot,
    keyboard_data,
    outbox_idle,
    run_id_of,
    summaries,
    wait_for,
    wait_for_approval,
)
from tests.support import LATENCY

EXPIRY_RUNBOOK = """\
id: quick-expiry
title: Expiry drill
description: A gated step whose request expires after a second.
triggers: [expiry drill]
approvers: [telegram:100000001]
approval_timeout: 1
steps:
  - id: gated
    title: A gated note
    note: nothing happens
    approval: required
"""


def _choice(message: dict, choice: str) -> str:
    return next(d for d in keyboard_data(message) if d.endswith(f":{choice}"))


def _current(standin, chat_id: int, message_id: int) -> dict:
    return next(m for m in standin.messages(chat_id) if m["message_id"] == message_id)


def _decisions(db: str, run_prefix: str) -> list[tuple[str, str]]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT type, data FROM events WHERE run_id LIKE ? AND type = 'approval_decided'",
            (run_prefix + "%",),
        ).fetchall()
    return rows


async def test_a_tap_by_a_non_approver_is_refused_with_an_alert(settings: Settings) -> None:
    """Mallory is in the chat but not an approver: an alert, and nothing changes."""
    async with chat_bench(settings) as (standin, service):
        await confirm_run(standin, INCIDENTS, ALICE, "incident: API latency spike")
        request = await wait_for_approval(standin, INCIDENTS)
        query = standin.inject_callback(
            INCIDENTS, request["message_id"], MALLORY, _choice(request, "y")
        )
        await wait_for(standin, lambda: standin.callback_answer(query))
        answer = standin.callback_answer(query)
        assert answer["show_alert"] and "not an approver" in answer["text"]
        pending = await service.pending_approval(run_id_of(request))
        assert pending is not None and pending.status == ApprovalStatus.PENDING
        assert keyboard_data(_current(standin, INCIDENTS, request["message_id"]))


async def test_a_tap_takes_at_most_three_store_round_trips(
    settings: Settings, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An approver's tap reads the request once and decides in one transaction: its update,
    from python-telegram-bot taking it to its answer, asks the store at most three times (the
    third: Bob's name, stored the first time he is seen; the run it wakes is driven in a
    context of its own, and not counted), on both engines."""
    taps: list[RoundTrips] = []
    process_update = Application.process_update

    async def counted(application: Any, update: object) -> None:
        with counting_here() as counts:
            await process_update(application, update)
        if isinstance(update, Update) and update.callback_query is not None:
            taps.append(counts)

    monkeypatch.setattr(Application, "process_update", counted)
    async with chat_bench(settings.model_copy(update={"db": db_url})) as (standin, service):
        count_store(service.store.db)
        standin.inject_message(INCIDENTS, ALICE, "/run api-latency-spike service=web")
        request = await wait_for_approval(standin, INCIDENTS)
        run_id = run_id_of(request)
        tap = standin.inject_callback(INCIDENTS, request["message_id"], BOB, _choice(request, "y"))
        await wait_for(standin, lambda: summaries(standin, INCIDENTS, run_id), 20)
        await wait_for(standin, lambda: standin.callback_answer(tap))
        assert standin.callback_answer(tap)["text"] == "Approved: the run goes on."
    [counts] = taps
    assert 0 < counts.total_calls <= 3, counts.lines(per=1, unit="tap")


async def test_a_team_with_only_a_people_file_decides_in_chat(settings: Settings) -> None:
    """No TELEGRAM_APPROVER_IDS: the people file's Telegram ids are who decides (Bob is the
    tests' sam, in group approvers, which the shipped runbooks name)."""
    async with chat_bench(settings, approver_ids=[]) as (standin, service):
        standin.inject_message(INCIDENTS, ALICE, "/run disk-almost-full")
        request = await wait_for_approval(standin, INCIDENTS)
        run_id = run_id_of(request)
        standin.inject_callback(INCIDENTS, request["message_id"], BOB, _choice(request, "y"))
        await wait_for(standin, lambda: summaries(standin, INCIDENTS, run_id), 20)
        [first] = (await service.run_tree(run_id)).approvals
        assert (first.status, first.decided_by) == (ApprovalStatus.APPROVED, f"telegram:{BOB}")


async def test_four_eyes_bars_the_requester_from_approving(settings: Settings) -> None:
    """Carol starts a four-eyes runbook: her own tap is refused; Bob's counts, and oncall's
    CLI approval is the second of the two the rollback needs."""
    async with chat_bench(settings) as (standin, service):
        standin.inject_message(INCIDENTS, CAROL, "/run failed-deploy-rollback service=web")
        request = await wait_for_approval(standin, INCIDENTS)
        run_id = run_id_of(request)
        own = standin.inject_callback(
            INCIDENTS, request["message_id"], CAROL, _choice(request, "y")
        )
        await wait_for(standin, lambda: standin.callback_answer(own))
        answer = standin.callback_answer(own)
        assert answer["show_alert"] and "four eyes" in answer["text"]
        assert (await service.pending_approval(run_id)) is not None

        standin.inject_callback(INCIDENTS, request["message_id"], BOB, _choice(request, "y"))
        await wait_for(
            standin, lambda: "1 of 2" in _current(standin, INCIDENTS, request["message_id"])["text"]
        )
        await service.decide(run_id, Decision.APPROVE, "cli:oncall")
        await wait_for(standin, lambda: summaries(standin, INCIDENTS, run_id), 20)
        assert "approved by cli:oncall" in summaries(standin, INCIDENTS, run_id)[0]["text"]


async def test_a_two_person_card_says_who_approved_and_keeps_its_buttons(
    settings: Settings,
) -> None:
    """failed-deploy-rollback needs two people: after Bob's tap the card says "1 of 2
    approvals: @bob — waiting for one more" and keeps its buttons; Bob's second tap counts
    nothing; Carol's completes it, and the card shows both, without buttons."""
    async with chat_bench(settings) as (standin, service):
        standin.inject_message(INCIDENTS, ALICE, "/run failed-deploy-rollback service=web")
        request = await wait_for_approval(standin, INCIDENTS)
        run_id, message_id = run_id_of(request), request["message_id"]
        assert "Needs 2 approvals by different people" in request["text"]

        first = standin.inject_callback(INCIDENTS, message_id, BOB, _choice(request, "y"))
        await wait_for(
            standin, lambda: "1 of 2" in _current(standin, INCIDENTS, message_id)["text"]
        )
        # The card's edit (the outbox's sender) and the tap's answer (its handler) race.
        await wait_for(standin, lambda: standin.callback_answer(first))
        answer = standin.callback_answer(first)
        assert answer["text"] == "Recorded: 1 of 2 approvals, waiting for one more."
        card = _current(standin, INCIDENTS, message_id)
        assert "1 of 2 approvals: @bob — waiting for one more" in card["text"]
        assert keyboard_data(card) == keyboard_data(request)
        pending = await service.pending_approval(run_id)
        assert pending is not None and pending.status == ApprovalStatus.PENDING

        again = standin.inject_callback(INCIDENTS, message_id, BOB, _choice(request, "y"))
        await wait_for(standin, lambda: standin.callback_answer(again))
        assert standin.callback_answer(again)["text"] == (
            "Already counted: 1 of 2 approvals, waiting for one more; nothing changed."
        )

        standin.inject_callback(INCIDENTS, message_id, CAROL, _choice(request, "y"))
        await wait_for(standin, lambda: summaries(standin, INCIDENTS, run_id), 20)
        await wait_for(standin, lambda: not keyboard_data(_current(standin, INCIDENTS, message_id)))
        final = _current(standin, INCIDENTS, message_id)["text"]
        assert "2 of 2 approvals: @bob, @carol" in final
        assert "Approved by @carol" in final and "waiting" not in final
        assert "SUCCEEDED" in summaries(standin, INCIDENTS, run_id)[0]["text"]
        assert len(_decisions(settings.db, run_id)) == 1


async def test_a_reject_after_one_approval_ends_the_two_person_request(
    settings: Settings,
) -> None:
    async with chat_bench(settings) as (standin, service):
        standin.inject_message(INCIDENTS, ALICE, "/run failed-deploy-rollback service=web")
        request = await wait_for_approval(standin, INCIDENTS)
        run_id, message_id = run_id_of(request), request["message_id"]
        standin.inject_callback(INCIDENTS, message_id, BOB, _choice(request, "y"))
        await wait_for(
            standin, lambda: "1 of 2" in _current(standin, INCIDENTS, message_id)["text"]
        )

        await service.decide(run_id, Decision.REJECT, "telegram:100000002", "not this one")

        await wait_for(standin, lambda: summaries(standin, INCIDENTS, run_id), 20)
        final = _current(standin, INCIDENTS, message_id)
        assert not keyboard_data(final)
        assert "1 of 2 approvals: @bob\n" in final["text"]
        assert "Rejected by telegram:100000002" in final["text"]
        assert "rejected" in summaries(standin, INCIDENTS, run_id)[0]["text"]


ONE_OF_TWO_GROUPS = """\
id: one-of-two
title: One approval, from either group
triggers: [one of two]
approvers: [group:approvers, group:leads]
steps:
  - id: gated
    title: A gated note
    note: nothing happens
    approval: required
"""


async def test_two_approvers_tapping_at_once_make_one_decision(
    settings: Settings, workspace: Path
) -> None:
    """Bob and Carol approve in the same instant a step one approval decides: exactly one
    decision is recorded, the other tap is told it changed nothing."""
    (workspace / "runbooks" / "one-of-two.yaml").write_text(ONE_OF_TWO_GROUPS)
    async with chat_bench(settings) as (standin, _):
        standin.inject_message(INCIDENTS, ALICE, "/run one-of-two")
        request = await wait_for_approval(standin, INCIDENTS)
        run_id = run_id_of(request)
        first = standin.inject_callback(
            INCIDENTS, request["message_id"], BOB, _choice(request, "y")
        )
        second = standin.inject_callback(
            INCIDENTS, request["message_id"], CAROL, _choice(request, "y")
        )
        await wait_for(
            standin,
            lambda: standin.callback_answer(first) and standin.callback_answer(second),
        )
        await wait_for(standin, lambda: summaries(standin, INCIDENTS, run_id), 20)
        answers = [standin.callback_answer(q) for q in (first, second)]
        refused = [a for a in answers if "nothing changed" in a.get("text", "")]
        assert len(refused) == 1, answers
        assert len(_decisions(settings.db, run_id)) == 1
        assert len(summaries(standin, INCIDENTS, run_id)) == 1


async def test_reject_takes_a_reason_through_a_force_reply(settings: Settings) -> None:
    """❌ asks for a reason; the reply rejects the run and the message says who and why."""
    async with chat_bench(settings) as (standin, service):
        await confirm_run(standin, INCIDENTS, ALICE, "incident: API latency spike")
        request = await wait_for_approval(standin, INCIDENTS)
        run_id = run_id_of(request)
        standin.inject_callback(INCIDENTS, request["message_id"], BOB, _choice(request, "n"))

        def prompt() -> dict | None:
            return next(
                (m for m in from_bot(standin, INCIDENTS) if "why reject" in m["text"]), None
            )

        await wait_for(standin, prompt)
        [asked] = [c for c in standin.calls("sendMessage") if "why reject" in c.params["text"]]
        assert asked.params["reply_markup"]["force_reply"] is True
        assert (await service.pending_approval(run_id)) is not None  # not yet decided
        # Someone else answering the prompt decides nothing.
        standin.inject_message(
            INCIDENTS, CAROL, "hijack", reply_to_message_id=prompt()["message_id"]
        )
        await wait_for(
            standin,
            lambda: any("Only the approver" in m["text"] for m in from_bot(standin, INCIDENTS)),
        )
        standin.inject_message(
            INCIDENTS,
            BOB,
            "error budget is fine, <wait> & see",
            reply_to_message_id=prompt()["message_id"],
        )
        await wait_for(standin, lambda: summaries(standin, INCIDENTS, run_id))
        edited = _current(standin, INCIDENTS, request["message_id"])
        assert "❌ Rejected by @bob" in edited["text"]
        assert "error budget is fine, <wait> & see" in edited["text"]
        assert not keyboard_data(edited)
        summary = summaries(standin, INCIDENTS, run_id)[0]["text"]
        # The executor was rejected; the supervisor then ends the incident run as failed.
        assert "rejected by @bob (telegram:100000001)" in summary
        assert (await service.get(f"{run_id}:sub:executor")).status == RunStatus.REJECTED
        assert (await service.get(run_id)).status.is_terminal


async def test_stale_and_forged_taps_change_nothing(settings: Settings) -> None:
    """A tap on a decided request's old button, and a made-up token: answered, no change."""
    async with chat_bench(settings) as (standin, _):
        await confirm_run(standin, INCIDENTS, ALICE, "incident: API latency spike")
        request = await wait_for_approval(standin, INCIDENTS)
        run_id = run_id_of(request)
        approve = _choice(request, "y")
        standin.inject_callback(INCIDENTS, request["message_id"], BOB, approve)
        await wait_for(standin, lambda: summaries(standin, INCIDENTS, run_id))

        stale = standin.inject_callback(
            INCIDENTS,
            request["message_id"],
            CAROL,
            _choice(request, "n"),
            require_button=False,
        )
        forged = standin.inject_callback(
            INCIDENTS, request["message_id"], BOB, "ap:AAAAAAAAAAAAAAAA:y", require_button=False
        )
        junk = standin.inject_callback(
            INCIDENTS, request["message_id"], BOB, "approve run " + run_id, require_button=False
        )
        await wait_for(
            standin, lambda: all(standin.callback_answer(q) for q in (stale, forged, junk))
        )
        assert "Already approved by @bob" in standin.callback_answer(stale)["text"]
        assert "stale" in standin.callback_answer(forged)["text"]
        assert "not one of ours" in standin.callback_answer(junk)["text"]
        assert len(_decisions(settings.db, run_id)) == 1
        assert len(summaries(standin, INCIDENTS, run_id)) == 1


async def test_an_expired_request_says_so(settings: Settings, workspace: Path) -> None:
    """Nobody decides in time: the request expires at its deadline, its message is edited to
    say so (no buttons), and the summary says how the run ended."""
    (workspace / "runbooks" / "quick-expiry.yaml").write_text(EXPIRY_RUNBOOK)
    async with chat_bench(settings) as (standin, service):
        await confirm_run(standin, INCIDENTS, ALICE, "incident: expiry drill")
        request = await wait_for_approval(standin, INCIDENTS)
        run_id = run_id_of(request)
        await wait_for(
            standin,
            lambda: "Expired" in _current(standin, INCIDENTS, request["message_id"])["text"],
            10,
        )
        assert not keyboard_data(_current(standin, INCIDENTS, request["message_id"]))
        await wait_for(standin, lambda: summaries(standin, INCIDENTS, run_id), 10)
        run = await service.get(run_id)
        assert run.status.is_terminal
        # A tap after expiry changes nothing.
        late = standin.inject_callback(
            INCIDENTS, request["message_id"], BOB, _choice(request, "y"), require_button=False
        )
        await wait_for(standin, lambda: standin.callback_answer(late))
        assert "expired" in standin.callback_answer(late)["text"]


async def test_a_429_on_the_approval_message_is_waited_out(settings: Settings) -> None:
    """Flood control answers 429 with retry_after: the bot waits it out and the keyboard
    arrives exactly once."""
    async with chat_bench(settings) as (standin, _):
        standin.fail_next("sendMessage", 429, retry_after=1, count=2)
        # Named outright: the run starts at once, and its first messages are the outbox's.
        standin.inject_message(INCIDENTS, ALICE, "/run api-latency-spike")
        request = await wait_for_approval(standin, INCIDENTS)
        failed = [c for c in standin.calls("sendMessage")]
        assert len(failed) >= 3  # two refused with 429, then the ones that went through
        assert len(approval_messages(standin, INCIDENTS)) == 1
        standin.inject_callback(INCIDENTS, request["message_id"], BOB, _choice(request, "y"))
        await wait_for(standin, lambda: summaries(standin, INCIDENTS, run_id_of(request)))
        assert len(approval_messages(standin, INCIDENTS)) == 1


async def test_a_429_in_one_chat_does_not_hold_up_taps_in_another(settings: Settings) -> None:
    """Platform gets a 429 (retry after 3 s); a tap in Incidents meanwhile is answered at once."""
    async with chat_bench(settings) as (standin, service):
        await confirm_run(standin, INCIDENTS, ALICE, LATENCY)
        request = await wait_for_approval(standin, INCIDENTS)
        await outbox_idle(service)
        loop = asyncio.get_running_loop()
        # The Platform group hits its flood limit: Telegram says wait 3 s, for that chat.
        standin.fail_next("sendMessage", 429, retry_after=3)
        sends = len(standin.calls("sendMessage"))
        standin.inject_message(PLATFORM, ALICE, "/help")
        await wait_for(standin, lambda: len(standin.calls("sendMessage")) > sends)
        tapped = loop.time()
        query = standin.inject_callback(
            INCIDENTS, request["message_id"], BOB, _choice(request, "y")
        )
        await wait_for(standin, lambda: standin.callback_answer(query), 15)
        waited = loop.time() - tapped
        await wait_for(standin, lambda: summaries(standin, INCIDENTS, run_id_of(request)))
        assert waited < 1.5, f"the tap in another chat was answered after {waited:.1f} s"


async def test_a_tap_is_answered_at_once_while_the_database_is_busy(settings: Settings) -> None:
    """Another process holds the SQLite write lock for 3 s: the tap is still answered at once."""
    async with chat_bench(settings) as (standin, service):
        await confirm_run(standin, INCIDENTS, ALICE, LATENCY)
        request = await wait_for_approval(standin, INCIDENTS)
        await outbox_idle(service)
        loop = asyncio.get_running_loop()
        # Another process (a CLI decision, a backup) holds the write lock for three seconds.
        other = sqlite3.connect(settings.db, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        release = loop.call_later(3.0, other.rollback)
        try:
            tapped = loop.time()
            query = standin.inject_callback(
                INCIDENTS, request["message_id"], BOB, _choice(request, "y")
            )
            await wait_for(standin, lambda: standin.callback_answer(query), 15)
            waited = loop.time() - tapped
        finally:
            release.cancel()
            other.rollback()
            other.close()
        assert waited < 1.5, f"the tap was answered after {waited:.1f} s"


async def test_twenty_runs_at_once_in_two_chats(settings: Settings) -> None:
    """20 runs started together across two chats: each chat gets its own runs' keyboards
    and summaries, the bot keeps answering meanwhile, and every run succeeds."""
    chats = [INCIDENTS, PLATFORM]
    async with chat_bench(settings) as (standin, service):
        for n in range(20):
            # Named outright, so all 20 start at once (no card to confirm).
            standin.inject_message(chats[n % 2], ALICE, f"/run api-latency-spike incident {n}")
        expected = {chat: len([n for n in range(20) if chats[n % 2] == chat]) for chat in chats}
        for chat, count in expected.items():
            await wait_for_approval(standin, chat, count)
        # The bot answers while 20 runs wait.
        standin.inject_message(INCIDENTS, ALICE, "/help")
        await wait_for(
            standin, lambda: any("loom-ops" in m["text"] for m in from_bot(standin, INCIDENTS))
        )
        for chat in chats:
            for request in approval_messages(standin, chat):
                standin.inject_callback(chat, request["message_id"], BOB, _choice(request, "y"))
        for chat, count in expected.items():
            await wait_for(standin, lambda c=chat, n=count: len(summaries(standin, c)) == n, 30)
        run_ids = {chat: {run_id_of(m) for m in approval_messages(standin, chat)} for chat in chats}
        assert sum(len(ids) for ids in run_ids.values()) == 20
        for chat in chats:
            assert {run_id_of_summary(m) for m in summaries(standin, chat)} == run_ids[chat]
        runs = [r for r in await service.store.list_runs(limit=200) if r.parent_id is None]
        assert len(runs) == 20 and all(r.status == RunStatus.SUCCEEDED for r in runs)
        await asyncio.sleep(0)


def run_id_of_summary(message: dict) -> str:
    """The run id a summary's first line names."""
    return message["text"].split(":", 1)[0].removeprefix("Run ")


def _refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The bot's log lines about refused decisions, in order."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "bot.handlers"
        and r.levelname == "WARNING"
        and r.getMessage().startswith("refused a decision")
    ]


async def test_each_refused_tap_is_logged_once_with_its_reason(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Mallory (no approver) and Carol (the requester of a four-eyes run) tap Approve: each
    refusal is one WARNING line naming the chat, the tapper, the run and request, and why."""
    caplog.set_level("WARNING", logger="bot.handlers")
    async with chat_bench(settings) as (standin, service):
        standin.inject_message(INCIDENTS, CAROL, "/run failed-deploy-rollback service=web")
        request = await wait_for_approval(standin, INCIDENTS)
        run_id = run_id_of(request)
        pending = await service.pending_approval(run_id)
        assert pending is not None
        for user in (MALLORY, CAROL):
            tap = standin.inject_callback(
                INCIDENTS, request["message_id"], user, _choice(request, "y")
            )
            await wait_for(standin, lambda q=tap: standin.callback_answer(q))
    subject = f"in chat {INCIDENTS} by telegram:{{}} on run {run_id} request #{pending.number}: "
    assert _refusals(caplog) == [
        "refused a decision "
        + subject.format(MALLORY)
        + "in neither TELEGRAM_APPROVER_IDS nor the people file",
        "refused a decision "
        + subject.format(CAROL)
        + "lead (telegram:100000002) requested this run and the runbook asks for four eyes",
    ]
