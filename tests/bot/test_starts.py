"""`/run` never starts a fuzzy match unasked: free text is answered with the runbook it matches
(or a choice of several) and [▶ Start] [✖ Cancel]; only Start starts it. A runbook named
outright starts at once. In a private chat, /run points to the incident group, so approval
requests always reach a chat where an approver is."""

from __future__ import annotations

import asyncio
import re
import time

from agent.records import Origin, RunRecord, RunStatus
from agent.runbook.model import load_catalog
from agent.settings import Settings
from agent.tools.toolbox import Toolbox
from bot.standin import BotApiStandIn, StandInServer
from bot.starts import card_text, plan_start, start_run_id
from tests.bot_harness import (
    ALICE,
    BOB,
    INCIDENTS,
    JSON,
    MALLORY,
    PLATFORM,
    PRIVATE,
    approval_messages,
    chat_bench,
    from_bot,
    keyboard_data,
    make_standin,
    run_id_of,
    running_bot,
    start_card,
    telegram_settings,
    wait_for,
    wait_for_approval,
)
from tests.support import raw_rows


def _current(standin: BotApiStandIn, chat_id: int, message_id: int) -> JSON:
    return next(m for m in standin.messages(chat_id) if m["message_id"] == message_id)


async def _card(standin: BotApiStandIn, chat_id: int, user_id: int, text: str) -> JSON:
    asked = standin.inject_message(chat_id, user_id, f"/run {text}")
    await wait_for(standin, lambda: start_card(standin, asked))
    card = start_card(standin, asked)
    assert card is not None
    return card


async def _tap(standin: BotApiStandIn, card: JSON, user_id: int, data: str, **kw: bool) -> JSON:
    chat_id = card["chat"]["id"]
    query = standin.inject_callback(chat_id, card["message_id"], user_id, data, **kw)
    await wait_for(standin, lambda: standin.callback_answer(query))
    answer = standin.callback_answer(query)
    assert answer is not None
    return answer


def _starts(card: JSON) -> list[str]:
    return [d for d in keyboard_data(card) if d.startswith("rs:") and d != "rs:x"]


async def test_free_text_is_answered_with_a_card_and_only_start_starts_it(
    settings: Settings,
) -> None:
    """The card names the runbook, the params (given and defaults), the steps and whether
    it acts for real; nothing is stored until ▶ Start, which runs exactly that runbook."""
    async with chat_bench(settings) as (standin, service):
        card = await _card(standin, INCIDENTS, ALICE, "incident: API latency spike service=web")
        text = card["text"]
        assert text.startswith("▶ Start this runbook? Nothing runs until you tap Start.")
        assert "api-latency-spike — API latency spike" in text
        assert "Params: service=web; defaults: " in text and "namespace=production" in text
        assert "7 steps, 1 needs approval · 🧪 DRY-RUN: nothing is executed for real" in text
        assert "Asked by @alice: incident: API latency spike service=web" in text
        assert [label for label, _ in _labels(card)] == ["▶ Start", "✖ Cancel"]
        assert all(len(d.encode()) <= 64 for d in keyboard_data(card))
        await asyncio.sleep(0.3)  # a run started unasked would be stored by now
        assert await service.store.list_runs() == []

        answer = await _tap(standin, card, ALICE, _starts(card)[0])
        assert answer["text"].startswith("Started: run tg-") and not answer["show_alert"]
        request = await wait_for_approval(standin, INCIDENTS)
        run_id = run_id_of(request)
        assert "kubectl scale deployment/web -n production" in request["text"]
        run = await service.get(run_id)
        assert run.request == "incident: API latency spike service=web runbook=api-latency-spike"
        assert run.requested_by == f"telegram:{ALICE}"
        closed = _current(standin, INCIDENTS, card["message_id"])
        assert not keyboard_data(closed)
        assert "▶ Started api-latency-spike by @alice at " in closed["text"]
        assert closed["text"].endswith(f": run {run_id}.")


async def test_several_matches_offer_a_choice_and_the_pick_runs(settings: Settings) -> None:
    """Text matching several runbooks lists them, best first, one button each; the second
    pick runs the second runbook, not the best match."""
    async with chat_bench(settings) as (standin, service):
        card = await _card(standin, INCIDENTS, ALICE, "failed deploy, latency up")
        assert card["text"].startswith("❓ Which runbook? Several match")
        labels = [label for label, _ in _labels(card)]
        assert labels[0] == "▶ 1. failed-deploy-rollback"
        assert labels[1] == "▶ 2. api-latency-spike"
        assert labels[-1] == "✖ Cancel" and len(labels) <= 4
        await _tap(standin, card, ALICE, _starts(card)[1])
        request = await wait_for_approval(standin, INCIDENTS)
        assert "Runbook: api-latency-spike" in request["text"]
        run = await service.get(run_id_of(request))
        assert run.request.endswith("runbook=api-latency-spike")


async def test_cancel_starts_nothing_and_closes_the_card(settings: Settings) -> None:
    """✖ Cancel: no run; the card says who cancelled and loses its buttons, and a Start tap
    replayed on it afterwards changes nothing."""
    async with chat_bench(settings) as (standin, service):
        card = await _card(standin, INCIDENTS, ALICE, "incident: API latency spike")
        start = _starts(card)[0]
        answer = await _tap(standin, card, ALICE, "rs:x")
        assert answer["text"] == "Cancelled; nothing was started."
        closed = _current(standin, INCIDENTS, card["message_id"])
        assert "✖ Not started: cancelled by @alice at " in closed["text"]
        assert not keyboard_data(closed)
        replayed = await _tap(standin, card, ALICE, start, require_button=False)
        assert replayed["show_alert"] and "closed" in replayed["text"]
        await asyncio.sleep(0.3)
        assert await service.store.list_runs() == []


async def test_only_the_requester_or_an_approver_may_start_and_a_double_tap_starts_once(
    settings: Settings,
) -> None:
    """Mallory's tap is refused; Bob (an approver) starts Alice's request, recorded as
    Alice's; a second tap at the same moment finds the run the first one started."""
    async with chat_bench(settings) as (standin, service):
        card = await _card(standin, INCIDENTS, ALICE, "incident: API latency spike")
        start = _starts(card)[0]
        refused = await _tap(standin, card, MALLORY, start)
        assert refused["show_alert"] and "Only whoever sent this /run" in refused["text"]
        assert await service.store.list_runs() == []

        first = standin.inject_callback(INCIDENTS, card["message_id"], BOB, start)
        second = standin.inject_callback(INCIDENTS, card["message_id"], ALICE, start)
        await wait_for(
            standin, lambda: standin.callback_answer(first) and standin.callback_answer(second)
        )
        texts = sorted(standin.callback_answer(q)["text"] for q in (first, second))  # type: ignore[index]
        roots = [r for r in await service.store.list_runs() if r.parent_id is None]
        assert len(roots) == 1, texts
        assert texts == sorted(
            [f"Started: run {roots[0].id}.", f"Already started as {roots[0].id}."]
        )
        assert roots[0].requested_by == f"telegram:{ALICE}"
        await wait_for_approval(standin, INCIDENTS)
        assert len(approval_messages(standin, INCIDENTS)) == 1


async def test_a_card_still_starts_after_the_bot_restarts(settings: Settings) -> None:
    """The card's button carries only an opaque key: after a restart the request is read from
    the /run message Telegram sends with the tap, and the run starts."""
    standin = make_standin()
    async with StandInServer(standin) as server:
        async with running_bot(settings, telegram_settings(server)):
            card = await _card(standin, INCIDENTS, ALICE, "disk almost full on /var")
        async with running_bot(settings, telegram_settings(server)) as service:
            answer = await _tap(standin, card, ALICE, _starts(card)[0])
            assert answer["text"].startswith("Started: run ")
            request = await wait_for_approval(standin, INCIDENTS)
            assert "Runbook: disk-almost-full" in request["text"]
            run = await service.get(run_id_of(request))
            assert run.status == RunStatus.WAITING_CHILDREN


async def test_a_runbook_named_outright_starts_at_once(settings: Settings) -> None:
    """`runbook=<id>` anywhere (or the id as the first word) starts without a card; an
    unknown id is refused in one line."""
    async with chat_bench(settings) as (standin, service):
        asked = standin.inject_message(
            INCIDENTS, ALICE, "/run the disk on db-1 is full runbook=disk-almost-full"
        )
        request = await wait_for_approval(standin, INCIDENTS)
        assert "Runbook: disk-almost-full" in request["text"]
        assert start_card(standin, asked) is None
        wrong = standin.inject_message(INCIDENTS, ALICE, "/run disk trouble runbook=nope")
        await wait_for(
            standin,
            lambda: any(
                m["message_id"] > wrong["message_id"] and "unknown runbook 'nope'" in m["text"]
                for m in from_bot(standin, INCIDENTS)
            ),
        )
        assert len([r for r in await service.store.list_runs() if r.parent_id is None]) == 1


async def test_free_text_with_a_param_no_match_takes_is_refused(settings: Settings) -> None:
    """A param value the runbook refuses is said at once, with no card and no run."""
    async with chat_bench(settings) as (standin, service):
        asked = standin.inject_message(
            INCIDENTS, ALICE, "/run incident: API latency spike namespace=nowhere"
        )

        def answer() -> list[JSON]:
            return [
                m for m in from_bot(standin, INCIDENTS) if m["message_id"] > asked["message_id"]
            ]

        await wait_for(standin, answer)
        [refusal] = answer()
        assert refusal["text"].startswith("Cannot start the run: ")
        assert "namespace" in refusal["text"] and not keyboard_data(refusal)
        assert await service.store.list_runs() == []


def test_the_card_says_live_when_commands_run_for_real(settings: Settings) -> None:
    """With LOOM_OPS_ALLOW_SHELL the card says how many steps act for real."""
    live = settings.model_copy(update={"allow_shell": True})
    catalog = load_catalog(settings.workspace / "runbooks")
    plan = plan_start(catalog, "crash drill")
    [choice] = plan.choices
    assert choice.runbook.id == "crash-drill"
    toolbox = Toolbox(live, lambda: catalog, None)  # type: ignore[arg-type]
    text = card_text(
        plan, "crash drill", "@alice", lambda step: toolbox.mode_of(step, live.effects)
    )
    assert "🔴 <b>LIVE</b>: 2 of 4 steps act for real" in text
    dry = Toolbox(settings, lambda: catalog, None)  # type: ignore[arg-type]
    text = card_text(
        plan, "crash drill", "@alice", lambda step: dry.mode_of(step, settings.effects)
    )
    assert "🧪 <b>DRY-RUN</b>: nothing is executed for real" in text


def test_a_run_message_derives_one_48_bit_run_id() -> None:
    """The run id comes from the /run message (chat, message, date): stable, 48 bits of hash
    (`tg-` and 12 hex digits), moved on only by the attempt number when another run holds it."""
    first = start_run_id(INCIDENTS, 12, 1_700_000_000, 0)
    assert first == start_run_id(INCIDENTS, 12, 1_700_000_000, 0)
    assert re.fullmatch(r"tg-[0-9a-f]{12}", first)
    assert first != start_run_id(INCIDENTS, 12, 1_700_000_000, 1)
    assert first != start_run_id(PLATFORM, 12, 1_700_000_000, 0)
    assert first != start_run_id(INCIDENTS, 12, 1_700_000_001, 0)


# -- /run in a private chat -------------------------------------------------------------------


async def test_a_private_run_points_to_the_incident_groups(settings: Settings) -> None:
    """The bot serves groups: /run in a private chat (even an approver's) starts nothing and
    names the groups by title, where approvers will see the requests."""
    async with chat_bench(settings) as (standin, service):
        asked = standin.inject_message(PRIVATE, BOB, "/run incident: API latency spike")

        def answer() -> list[JSON]:
            return [m for m in from_bot(standin, PRIVATE) if m["message_id"] > asked["message_id"]]

        await wait_for(standin, answer)
        [pointer] = answer()
        assert pointer["text"] == (
            "Runs start in the incident group, where approvers see their requests: "
            "send this /run in Platform, Incidents."
        )
        assert not keyboard_data(pointer)
        await asyncio.sleep(0.3)
        assert await service.store.list_runs() == []


async def test_without_groups_only_an_approver_starts_runs_in_private(
    settings: Settings,
) -> None:
    """A bot serving private chats only: Alice (no approver) is refused, so no request waits
    where no approver sees it; Bob's own /run reaches him with its approval request."""
    async with chat_bench(settings, allowed_chat_ids=[PRIVATE, ALICE]) as (standin, _):
        asked = standin.inject_message(ALICE, ALICE, "/run api-latency-spike")
        await wait_for(
            standin,
            lambda: [m for m in from_bot(standin, ALICE) if m["message_id"] > asked["message_id"]],
        )
        [refusal] = from_bot(standin, ALICE)
        assert refusal["text"].startswith("Only an approver may start runs in a private chat")
        standin.inject_message(PRIVATE, BOB, "/run api-latency-spike")
        request = await wait_for_approval(standin, PRIVATE)
        assert "Approvers: group:approvers" in request["text"]


def _labels(message: JSON) -> list[tuple[str, str]]:
    markup = message.get("reply_markup") or {}
    return [
        (b["text"], b["callback_data"]) for row in markup.get("inline_keyboard", []) for b in row
    ]


# -- one /run, one run ------------------------------------------------------------------------


def _cards(standin: BotApiStandIn, asked: JSON) -> list[JSON]:
    """Every card (with its buttons) answering the /run message `asked`."""
    return [
        m
        for m in from_bot(standin, asked["chat"]["id"])
        if (m.get("reply_to_message") or {}).get("message_id") == asked["message_id"] and _starts(m)
    ]


def _handled(db: str) -> int:
    return raw_rows(db, "SELECT COUNT(*) FROM telegram_inbox WHERE handled_at IS NOT NULL")[0][0]


def _crash_before_marked_handled(db: str) -> None:
    """As if the bot died after the handler ran and before the update was marked handled
    (its claim has lapsed since, as a dead instance's does)."""
    raw_rows(db, "UPDATE telegram_inbox SET handled_at = NULL, claimed_until = 0")


async def test_every_card_of_one_run_message_starts_the_same_one_run(
    settings: Settings,
) -> None:
    """A free-text /run handled again (a crash between its card and the update's handled
    mark) is answered with a second card; a Start on each card still starts one run."""
    standin = make_standin()
    async with StandInServer(standin) as server:
        async with running_bot(settings, telegram_settings(server)):
            asked = standin.inject_message(INCIDENTS, ALICE, "/run incident: API latency spike")
            await wait_for(standin, lambda: _cards(standin, asked) and _handled(settings.db))
        _crash_before_marked_handled(settings.db)
        async with running_bot(settings, telegram_settings(server)) as service:
            await wait_for(standin, lambda: len(_cards(standin, asked)) == 2)
            first, second = _cards(standin, asked)
            started = await _tap(standin, first, ALICE, _starts(first)[0])
            again = await _tap(standin, second, BOB, _starts(second)[0])
            roots = [r for r in await service.store.list_runs() if r.parent_id is None]
    assert len(roots) == 1
    assert started["text"] == f"Started: run {roots[0].id}."
    assert again["text"] == f"Already started as {roots[0].id}."
    assert roots[0].origin.message_id == asked["message_id"]


async def test_a_run_message_handled_again_after_its_run_started_sends_no_second_card(
    settings: Settings,
) -> None:
    """The card's Start started the run; the /run's update is then handled again: the run
    is the answer, and no second card offers to start it once more."""
    standin = make_standin()
    async with StandInServer(standin) as server:
        async with running_bot(settings, telegram_settings(server)):
            card = await _card(standin, INCIDENTS, ALICE, "incident: API latency spike")
            answer = await _tap(standin, card, ALICE, _starts(card)[0])
            assert answer["text"].startswith("Started: run ")
            await wait_for(standin, lambda: _handled(settings.db) == 2)  # the /run, the tap
        _crash_before_marked_handled(settings.db)
        async with running_bot(settings, telegram_settings(server)):
            await wait_for(standin, lambda: _handled(settings.db) == 2)
            sent = standin.inject_message(INCIDENTS, ALICE, "/help")  # handled after them
            await wait_for(
                standin,
                lambda: any(
                    m["message_id"] > sent["message_id"] for m in from_bot(standin, INCIDENTS)
                ),
            )
    replies = [
        m
        for m in from_bot(standin, INCIDENTS)
        if (m.get("reply_to_message") or {}).get("message_id")
        == card["reply_to_message"]["message_id"]
    ]
    assert [m["message_id"] for m in replies] == [card["message_id"]]
    assert raw_rows(settings.db, "SELECT COUNT(*) FROM runs WHERE parent_id IS NULL") == [(1,)]


async def test_a_run_message_whose_run_id_another_run_holds_starts_its_own_run(
    settings: Settings,
) -> None:
    """Another /run's run holds the id the next /run message derives (a hash collision, the
    same request text): the new message is not taken for that run; it starts its own under
    the next attempt's id, and its origin names its message."""
    async with chat_bench(settings) as (standin, service):
        standin.inject_message(INCIDENTS, ALICE, "/help")
        await wait_for(standin, lambda: from_bot(standin, INCIDENTS))
        next_id = max(m["message_id"] for m in standin.messages(INCIDENTS)) + 1
        now = int(time.time())
        # The test does not control the clock: a planted run for each date the message may carry.
        planted = {start_run_id(INCIDENTS, next_id, date, 0) for date in range(now, now + 4)}
        for run_id in planted:  # stored before runs named their message: none in the origin
            await service.start(
                run_id,
                "disk-almost-full",
                role="supervisor",
                requested_by=f"telegram:{BOB}",
                origin=Origin(kind="telegram", chat_id=INCIDENTS),
                wait=False,
            )
        asked = standin.inject_message(INCIDENTS, ALICE, "/run disk-almost-full")
        assert asked["message_id"] == next_id

        async def new_runs() -> list[RunRecord]:
            runs = await service.store.list_runs()
            return [r for r in runs if r.parent_id is None and r.id not in planted]

        deadline = time.monotonic() + 15
        while not await new_runs():
            assert time.monotonic() < deadline, "the /run was taken for another run"
            await asyncio.sleep(0.05)
        [own] = await new_runs()
        assert own.id == start_run_id(INCIDENTS, next_id, asked["date"], 1)
        assert own.origin.message_id == next_id


def test_a_run_origin_keeps_its_message_and_origins_stored_without_one_still_read() -> None:
    """The /run message's id is part of a run's origin; an origin stored before it was (no
    `message_id` in its JSON) reads with none."""
    origin = Origin(kind="telegram", chat_id=INCIDENTS, thread_id=7, message_id=42)
    assert Origin.from_json(origin.to_json()) == origin
    old = Origin.from_json('{"kind":"telegram","chat_id":-1001,"thread_id":null}')
    assert old == Origin(kind="telegram", chat_id=-1001)
