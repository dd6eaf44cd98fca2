"""An incident's own place in the chat: in a forum supergroup each run gets a topic (opened
with its first message, named after the request or the alert, closed when the run ends); a run
started in a topic stays there; without topics a run's later messages reply to its first one."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from telegram import Bot
from telegram.error import BadRequest

from agent.frontends.alerts import AlertmanagerBody, alertmanager_notice
from agent.records import AlertNotice
from agent.service.alerts import AlertService
from agent.settings import Settings
from agent.store.runstore import RunStore
from bot.standin import ApiCall, BotApiError, BotApiStandIn, StandInServer
from bot.store import ChatStore, RunPlace
from bot.topics import (
    MAX_TOPIC_NAME,
    Placement,
    alert_topic_name,
    is_lost_topic,
    placement,
    request_topic_name,
)
from tests.bot_harness import (
    ALICE,
    BOB,
    INCIDENTS,
    PRIVATE,
    TOKEN,
    BotProcess,
    approval_messages,
    bot_env,
    chat_bench,
    confirm_run,
    from_bot,
    keyboard_data,
    outbox_idle,
    run_id_of,
    standin_server,
    summaries,
    wait_for,
    wait_for_approval,
)

JSON = dict[str, Any]
REQUEST = "incident: API latency spike"


def make_forum(standin: BotApiStandIn) -> None:
    """The incident group becomes a forum supergroup."""
    standin.add_chat(INCIDENTS, "supergroup", "Incidents", is_forum=True)


def approve(standin: BotApiStandIn, request: JSON) -> None:
    """Bob taps Approve on an approval request."""
    data = next(d for d in keyboard_data(request) if d.endswith(":y"))
    standin.inject_callback(INCIDENTS, request["message_id"], BOB, data)


def run_messages(standin: BotApiStandIn, run_id: str, card: JSON | None = None) -> list[JSON]:
    """The bot's messages about run tree `run_id` (progress, approval requests, summary,
    alert card), in order; not the /run card `card` (it stays where the /run was typed)."""
    skip = card["message_id"] if card else None
    return [
        m
        for m in from_bot(standin, INCIDENTS)
        if re.search(rf"\b{re.escape(run_id)}\b", m.get("text", "") or m.get("caption", ""))
        and m["message_id"] != skip
    ]


def progress_messages(messages: list[JSON], run_id: str) -> list[JSON]:
    head = re.compile(rf"^\S+ Run {re.escape(run_id)} · ")
    return [m for m in messages if head.match(m.get("text", ""))]


def calls_to(standin: BotApiStandIn, method: str, chat_id: int = INCIDENTS) -> list[ApiCall]:
    return [c for c in standin.calls(method) if c.params.get("chat_id") == chat_id]


def closed(standin: BotApiStandIn) -> bool:
    return bool(standin.topics(INCIDENTS)) and all(
        t["is_closed"] for t in standin.topics(INCIDENTS)
    )


def replies_to(message: JSON) -> int | None:
    return (message.get("reply_to_message") or {}).get("message_id")


def disk_alert() -> AlertNotice:
    """An Alertmanager notification the shipped disk runbook answers with `start: auto`."""
    labels = {
        "alertname": "DiskAlmostFull",
        "instance": "db-1",
        "service": "postgres",
        "mountpoint": "/var",
    }
    body = {
        "version": "4",
        "groupKey": '{}:{alertname="DiskAlmostFull", instance="db-1"}',
        "truncatedAlerts": 0,
        "status": "firing",
        "receiver": "loom-ops",
        "groupLabels": {"alertname": "DiskAlmostFull", "instance": "db-1"},
        "commonLabels": labels,
        "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093",
        "alerts": [
            {
                "status": "firing",
                "labels": labels,
                "annotations": {"summary": "/var is 95% full"},
                "startsAt": "2026-12-05T05:09:00Z",
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "http://prometheus:9090/graph",
                "fingerprint": "fp-disk-db-1",
            }
        ],
    }
    return alertmanager_notice(AlertmanagerBody.model_validate(body))


# -- where a message goes: the decision ----------------------------------------------------------


def _place(thread_id: int | None = None, first: int | None = None) -> RunPlace:
    return RunPlace("inc-1", INCIDENTS, thread_id, first, None)


@pytest.mark.parametrize(
    ("forum", "origin", "known", "expected"),
    [
        (True, None, None, Placement(open_topic=True)),
        (False, None, None, Placement(first=True)),
        (True, 77, None, Placement(thread_id=77)),
        (False, 77, None, Placement(thread_id=77)),
        (True, None, _place(thread_id=9), Placement(thread_id=9)),
        (False, None, _place(first=5), Placement(reply_to=5)),
        (True, None, _place(), Placement(first=True)),  # its topic was lost: the chat itself
        (True, 77, _place(first=5), Placement(reply_to=5)),  # a person's topic was lost
    ],
)
def test_placement_prefers_the_recorded_place_then_the_runs_topic_then_a_new_one(
    forum: bool, origin: int | None, known: RunPlace | None, expected: Placement
) -> None:
    assert placement(forum, origin, known) == expected


def test_topic_names_fit_telegrams_limit_on_one_line() -> None:
    assert request_topic_name(REQUEST, "inc-1") == REQUEST
    assert request_topic_name("  disk\nfull   on db-1 ", "inc-1") == "disk full on db-1"
    assert request_topic_name("   ", "inc-7") == "Run inc-7"
    long = request_topic_name("x" * 500, "inc-1")
    assert len(long) == MAX_TOPIC_NAME and long.endswith("…")
    name = alert_topic_name(
        "HighLatency",
        {"alertname": "HighLatency", "cluster": "eu-1"},
        {"service": "checkout-api", "pod": "checkout-7f", "severity": "page"},
    )
    assert name == "HighLatency · cluster=eu-1 service=checkout-api severity=page"
    assert alert_topic_name("Watchdog", {"alertname": "Watchdog"}, {}) == "Watchdog"


def test_a_lost_topic_is_told_from_other_bad_requests() -> None:
    assert is_lost_topic(BadRequest("Bad Request: TOPIC_CLOSED"))
    assert is_lost_topic(BadRequest("Bad Request: message thread not found"))
    assert not is_lost_topic(BadRequest("Bad Request: message is too long"))


# -- the stand-in's forums -----------------------------------------------------------------------


async def test_the_standin_opens_closes_and_lists_forum_topics_like_telegram() -> None:
    standin = BotApiStandIn(TOKEN)
    standin.add_chat(INCIDENTS, "supergroup", "Incidents", is_forum=True)
    standin.add_chat(-100777, "supergroup", "Plain")
    async with StandInServer(standin) as server, Bot(TOKEN, base_url=server.bot_base_url) as bot:
        assert (await bot.get_chat(INCIDENTS)).is_forum
        assert not (await bot.get_chat(-100777)).is_forum
        topic = await bot.create_forum_topic(INCIDENTS, "disk full on db-1")
        sent = await bot.send_message(INCIDENTS, "hello", message_thread_id=topic.message_thread_id)
        assert sent.message_thread_id == topic.message_thread_id and sent.is_topic_message
        with pytest.raises(BadRequest, match=r"(?i)message thread not found"):
            await bot.send_message(INCIDENTS, "lost", message_thread_id=999)
        with pytest.raises(BadRequest, match=r"(?i)not a forum"):
            await bot.create_forum_topic(-100777, "nope")
        with pytest.raises(BadRequest, match=r"(?i)TOPIC_NAME_INVALID"):
            await bot.create_forum_topic(INCIDENTS, "x" * 129)
        assert await bot.close_forum_topic(INCIDENTS, topic.message_thread_id)
        with pytest.raises(BadRequest, match=r"(?i)TOPIC_CLOSED"):
            await bot.send_message(INCIDENTS, "late", message_thread_id=topic.message_thread_id)
        with pytest.raises(BadRequest, match=r"(?i)TOPIC_NOT_MODIFIED"):
            await bot.close_forum_topic(INCIDENTS, topic.message_thread_id)
    assert standin.topics(INCIDENTS) == [
        {
            "message_thread_id": topic.message_thread_id,
            "name": "disk full on db-1",
            "icon_color": topic.icon_color,
            "is_closed": True,
        }
    ]
    created, _, closing = standin.messages(INCIDENTS)
    assert created["forum_topic_created"]["name"] == "disk full on db-1"
    assert "forum_topic_closed" in closing


# -- a forum supergroup --------------------------------------------------------------------------


async def test_a_run_in_a_forum_gets_a_topic_named_after_its_request_closed_when_it_ends(
    db_url: str, workspace: Path
) -> None:
    settings = Settings(
        _env_file=None, db=db_url, workspace=workspace, mock_llm=True, user="tester"
    )
    async with chat_bench(settings) as (standin, _):
        make_forum(standin)
        card = await confirm_run(standin, INCIDENTS, ALICE, REQUEST)
        request = await wait_for_approval(standin, INCIDENTS)
        run_id = run_id_of(request)
        approve(standin, request)
        await wait_for(standin, lambda: summaries(standin, INCIDENTS, run_id))
        await wait_for(standin, lambda: closed(standin))
    [topic] = standin.topics(INCIDENTS)
    # The request the card started: the person's words, and the runbook they chose.
    assert topic["name"] == f"{REQUEST} runbook=api-latency-spike" and topic["is_closed"]
    thread = topic["message_thread_id"]
    said = run_messages(standin, run_id, card)
    assert progress_messages(said, run_id) and approval_messages(standin, INCIDENTS)
    assert summaries(standin, INCIDENTS, run_id)
    assert [m.get("message_thread_id") for m in said] == [thread] * len(said)
    [card_now] = [m for m in standin.messages(INCIDENTS) if m["message_id"] == card["message_id"]]
    assert "message_thread_id" not in card_now  # the /run's own answer stays where it was typed
    assert len(calls_to(standin, "createForumTopic")) == 1
    assert len(calls_to(standin, "closeForumTopic")) == 1
    assert len(calls_to(standin, "getChat")) == 1


async def test_a_topic_whose_close_keeps_failing_is_retried_without_holding_up_the_chat(
    settings: Settings,
) -> None:
    """The Bot API fails closeForumTopic three times (502): the close is retried like any
    message, and while it backs off the chat's other news (the next run's progress) goes on;
    the topic ends closed."""
    async with chat_bench(settings) as (standin, _):
        make_forum(standin)
        standin.fail_next("closeForumTopic", 502, count=3)
        await confirm_run(standin, INCIDENTS, ALICE, REQUEST)
        request = await wait_for_approval(standin, INCIDENTS)
        first = run_id_of(request)
        approve(standin, request)
        await wait_for(standin, lambda: summaries(standin, INCIDENTS, first))
        await confirm_run(standin, INCIDENTS, ALICE, REQUEST)
        second = run_id_of(await wait_for_approval(standin, INCIDENTS))  # the one with buttons
        await wait_for(standin, lambda: progress_messages(from_bot(standin, INCIDENTS), second))
        first_topic = standin.topics(INCIDENTS)[0]
        assert not first_topic["is_closed"]  # still backing off: it held nothing up
        await wait_for(standin, lambda: standin.topics(INCIDENTS)[0]["is_closed"], 20)
    assert len(calls_to(standin, "closeForumTopic")) == 4


async def test_a_run_started_inside_a_topic_stays_there_and_leaves_it_open(
    settings: Settings,
) -> None:
    async with chat_bench(settings) as (standin, service):
        make_forum(standin)
        war_room = standin.open_topic(INCIDENTS, "latency war room", ALICE)
        card = await confirm_run(standin, INCIDENTS, ALICE, REQUEST, thread_id=war_room)
        request = await wait_for_approval(standin, INCIDENTS)
        run_id = run_id_of(request)
        approve(standin, request)
        await wait_for(standin, lambda: summaries(standin, INCIDENTS, run_id))
        await outbox_idle(service)
    said = run_messages(standin, run_id, card)
    assert progress_messages(said, run_id) and summaries(standin, INCIDENTS, run_id)
    assert [m.get("message_thread_id") for m in said] == [war_room] * len(said)
    assert standin.topics(INCIDENTS) == [
        {"message_thread_id": war_room, "name": "latency war room", "icon_color": 0x6FB9F0}
        | {"is_closed": False}
    ]
    assert calls_to(standin, "createForumTopic") == []
    assert calls_to(standin, "closeForumTopic") == []


async def test_an_alert_started_run_in_a_forum_gets_a_topic_named_after_the_alert(
    settings: Settings,
) -> None:
    chosen = settings.model_copy(update={"alert_chat_id": INCIDENTS})
    async with chat_bench(chosen) as (standin, service):
        make_forum(standin)
        answer = await AlertService(service).receive(disk_alert(), "api:http")
        assert answer.outcome == "opened" and answer.run_id is not None
        run_id = answer.run_id
        request = await wait_for_approval(standin, INCIDENTS)
        assert run_id_of(request) == run_id
        approve(standin, request)
        await wait_for(standin, lambda: summaries(standin, INCIDENTS, run_id))
        await wait_for(standin, lambda: closed(standin))
        await outbox_idle(service)
    [topic] = standin.topics(INCIDENTS)
    assert topic["name"] == "DiskAlmostFull · instance=db-1 service=postgres"
    thread = topic["message_thread_id"]
    cards = [m for m in from_bot(standin, INCIDENTS) if m.get("text", "").startswith("🚨")]
    said = run_messages(standin, run_id)
    assert len(cards) == 1 and progress_messages(said, run_id)
    assert summaries(standin, INCIDENTS, run_id)
    assert [m.get("message_thread_id") for m in [*cards, *said]] == [thread] * (len(said) + 1)
    assert len(calls_to(standin, "createForumTopic")) == 1


async def test_a_topic_a_person_closes_mid_run_sends_the_rest_to_the_chat_itself(
    settings: Settings,
) -> None:
    async with chat_bench(settings) as (standin, service):
        make_forum(standin)
        await confirm_run(standin, INCIDENTS, ALICE, REQUEST)
        request = await wait_for_approval(standin, INCIDENTS)
        run_id = run_id_of(request)
        [topic] = standin.topics(INCIDENTS)
        assert request["message_thread_id"] == topic["message_thread_id"]
        await outbox_idle(service)
        standin.close_topic(INCIDENTS, topic["message_thread_id"], ALICE)
        approve(standin, request)
        await wait_for(standin, lambda: summaries(standin, INCIDENTS, run_id))
        await outbox_idle(service)
        # The chat is asked again whether it is a forum: the next run gets a topic.
        await confirm_run(standin, INCIDENTS, ALICE, "disk full on db-1")
        second = await wait_for_approval(standin, INCIDENTS)
    [summary] = summaries(standin, INCIDENTS, run_id)
    assert "message_thread_id" not in summary and "reply_to_message" not in summary
    first_topic, second_topic = standin.topics(INCIDENTS)
    assert first_topic == topic | {"is_closed": True}  # the run got no second topic
    assert second["message_thread_id"] == second_topic["message_thread_id"] != topic
    assert len(calls_to(standin, "getChat")) == 2
    assert len(calls_to(standin, "closeForumTopic")) == 0


# -- chats without topics ------------------------------------------------------------------------


async def test_in_a_group_without_topics_a_runs_later_messages_reply_to_its_first(
    settings: Settings,
) -> None:
    async with chat_bench(settings) as (standin, service):
        card = await confirm_run(standin, INCIDENTS, ALICE, REQUEST)
        request = await wait_for_approval(standin, INCIDENTS)
        run_id = run_id_of(request)
        approve(standin, request)
        await wait_for(standin, lambda: summaries(standin, INCIDENTS, run_id))
        await outbox_idle(service)
    first, *later = run_messages(standin, run_id, card)
    assert later and summaries(standin, INCIDENTS, run_id)[0] in later
    assert replies_to(first) is None
    assert [replies_to(m) for m in later] == [first["message_id"]] * len(later)
    assert calls_to(standin, "createForumTopic") == []
    assert len(calls_to(standin, "getChat")) == 1


async def test_a_forum_that_refuses_the_bot_a_topic_threads_runs_as_replies(
    settings: Settings,
) -> None:
    async with chat_bench(settings) as (standin, service):
        make_forum(standin)
        standin.fail_next(
            "createForumTopic",
            error_code=400,
            description="Bad Request: not enough rights to create a topic",
        )
        cards = []
        for number in (1, 2):
            cards.append(await confirm_run(standin, INCIDENTS, ALICE, REQUEST))
            await wait_for_approval(standin, INCIDENTS, count=number)
        await outbox_idle(service)
        requests = [m for m in approval_messages(standin, INCIDENTS) if keyboard_data(m)]
        run_ids = [run_id_of(m) for m in requests]
    assert len(set(run_ids)) == 2
    for run_id, card in zip(run_ids, cards, strict=True):
        first, *later = run_messages(standin, run_id, card)
        assert later and [replies_to(m) for m in later] == [first["message_id"]] * len(later)
        assert all("message_thread_id" not in m for m in [first, *later])
    assert standin.topics(INCIDENTS) == []
    assert len(calls_to(standin, "createForumTopic")) == 1  # refused once: not asked again
    assert len(calls_to(standin, "getChat")) == 1


# -- a crash -------------------------------------------------------------------------------------


def kill_the_bot_at(
    standin: BotApiStandIn, bot: BotProcess, matches: Callable[[ApiCall], object]
) -> list[ApiCall]:
    """SIGKILL `bot` at the first Bot API call `matches`, which then fails (it never reaches
    the chat); returns the list that call is put in once it happened."""
    killed: list[ApiCall] = []

    def kill(call: ApiCall) -> None:
        if matches(call) and not killed:
            killed.append(call)
            bot.kill()
            raise BotApiError(502, "Bad Gateway")

    standin.on_call = kill
    return killed


async def test_a_bot_killed_after_opening_and_recording_a_topic_goes_on_in_it_after_restart(
    settings: Settings, tmp_path: Path
) -> None:
    """SIGKILL as the first message goes into the run's new topic (opened and recorded):
    after the restart the run's messages go to that topic; no second topic is opened."""
    async with standin_server() as (standin, server):
        make_forum(standin)
        bot = BotProcess(bot_env(server, settings), settings.workspace, tmp_path / "bot.log")
        killed = kill_the_bot_at(
            standin,
            bot,
            lambda call: call.method == "sendMessage" and call.params.get("message_thread_id"),
        )
        bot.start()
        try:
            card = await confirm_run(standin, INCIDENTS, ALICE, REQUEST, timeout=30)
            await wait_for(standin, lambda: killed, 30)
            standin.on_call = None
            [topic] = standin.topics(INCIDENTS)
            bot = BotProcess(bot_env(server, settings), settings.workspace, tmp_path / "bot.log")
            bot.start()
            request = await wait_for_approval(standin, INCIDENTS)
            run_id = run_id_of(request)
            approve(standin, request)
            await wait_for(standin, lambda: summaries(standin, INCIDENTS, run_id), 30)
            await wait_for(standin, lambda: closed(standin), 10)
        finally:
            code = bot.stop()
        assert code == 0, bot.output()
    assert killed[0].params["message_thread_id"] == topic["message_thread_id"]
    assert [t["message_thread_id"] for t in standin.topics(INCIDENTS)] == [
        topic["message_thread_id"]
    ]
    said = run_messages(standin, run_id, card)
    assert progress_messages(said, run_id) and summaries(standin, INCIDENTS, run_id)
    assert [m.get("message_thread_id") for m in said] == [topic["message_thread_id"]] * len(said)
    assert len(calls_to(standin, "createForumTopic")) == 1


async def test_a_bot_killed_as_it_closes_a_runs_topic_closes_it_after_restart(
    settings: Settings, tmp_path: Path
) -> None:
    """SIGKILL as the bot asks to close the topic of a run whose summary is out: the restarted
    bot closes it (the summary is not sent again)."""
    async with standin_server() as (standin, server):
        make_forum(standin)
        bot = BotProcess(bot_env(server, settings), settings.workspace, tmp_path / "bot.log")
        killed = kill_the_bot_at(standin, bot, lambda call: call.method == "closeForumTopic")
        bot.start()
        try:
            await confirm_run(standin, INCIDENTS, ALICE, REQUEST, timeout=30)
            request = await wait_for_approval(standin, INCIDENTS)
            run_id = run_id_of(request)
            approve(standin, request)
            await wait_for(standin, lambda: killed, 30)
            standin.on_call = None
            assert not closed(standin)
            bot = BotProcess(bot_env(server, settings), settings.workspace, tmp_path / "bot.log")
            bot.start()
            await wait_for(standin, lambda: closed(standin), 30)
        finally:
            code = bot.stop()
        assert code == 0, bot.output()
    assert len(summaries(standin, INCIDENTS, run_id)) == 1
    assert len(calls_to(standin, "closeForumTopic")) == 2


# -- the store -----------------------------------------------------------------------------------


async def test_a_runs_place_upgrades_in_and_keeps_its_first_topic_and_first_message(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a database an older loom-ops left (schema 20): a recorded topic is never replaced,
    a first message is recorded once, each chat has its own place, and a lost topic leaves
    the run to the chat itself."""
    from agent.store import postgres, sqlite

    for engine in (sqlite, postgres):
        shipped = engine.migrations(engine.MIGRATIONS)
        monkeypatch.setattr(
            engine, "migrations", lambda _pkg, shipped=shipped: [m for m in shipped if m[0] <= 20]
        )
    await (await RunStore.open(db_url)).close()
    monkeypatch.undo()
    store = await RunStore.open(db_url)
    try:
        assert await store.schema_version() >= 21
        chat = ChatStore(store.db)
        assert await chat.run_place("inc-1", INCIDENTS) is None
        first = await chat.record_run_place("inc-1", INCIDENTS, thread_id=11)
        assert (first.thread_id, first.first_message_id, first.closed_at) == (11, None, None)
        again = await chat.record_run_place("inc-1", INCIDENTS, thread_id=12)
        assert again == first  # the first topic recorded wins
        assert (await chat.record_run_place("inc-1", INCIDENTS, first_message_id=5)) == first
        private = await chat.record_run_place("inc-1", PRIVATE, first_message_id=3)
        assert (private.chat_id, private.thread_id, private.first_message_id) == (PRIVATE, None, 3)
        assert await chat.run_place("inc-1", INCIDENTS) == first  # a place per chat
        before = time.time()
        assert await chat.record_topic_closed("inc-1", INCIDENTS)
        assert not await chat.record_topic_closed("inc-1", INCIDENTS)
        place = await chat.run_place("inc-1", INCIDENTS)
        assert place is not None and place.closed_at is not None and place.closed_at >= before

        replies = await chat.record_run_place("inc-2", INCIDENTS, first_message_id=40)
        assert (replies.thread_id, replies.first_message_id) == (None, 40)
        later = await chat.record_run_place("inc-2", INCIDENTS, first_message_id=41)
        assert later.first_message_id == 40  # recorded once

        assert not await chat.forget_topic("inc-1", INCIDENTS, 12)  # not its topic
        assert await chat.forget_topic("inc-1", INCIDENTS, 11)
        lost = await chat.record_run_place("inc-1", INCIDENTS, first_message_id=50)
        assert (lost.thread_id, lost.first_message_id) == (None, 50)
    finally:
        await store.close()
