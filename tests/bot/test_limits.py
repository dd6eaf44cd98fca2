"""The chat's limits: a person's /run rate (one short refusal, then silence) and the
active-run cap, both counted from the store."""

from __future__ import annotations

import asyncio
import itertools
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from agent.records import RunRecord, RunStatus
from agent.service.runs import RunService
from agent.settings import Settings
from agent.store import RunStore
from bot.quota import RateDecision, RateVerdict, rate_decision, rate_rule
from bot.settings import TelegramSettings
from bot.store import ChatStore
from tests.bot_harness import (
    ALICE,
    INCIDENTS,
    JSON,
    MALLORY,
    chat_bench,
    from_bot,
    wait_for,
)
from tests.support import SLOW_RUNBOOK, allow, lines, write_runbook

ADMIT, REFUSE, IGNORE = RateVerdict.ADMIT, RateVerdict.REFUSE, RateVerdict.IGNORE


def answers_after(standin_messages: list[JSON], sent: JSON, head: str) -> list[JSON]:
    """The bot's messages after `sent` whose text starts with `head`."""
    return [
        m
        for m in standin_messages
        if m["message_id"] > sent["message_id"] and m.get("text", "").startswith(head)
    ]


def rate_row(db: str, identity: str) -> tuple[int, bool, int] | None:
    """What the store counted of `identity`'s /run messages: (admitted in the window, whether
    a refusal was answered, how many were ignored since)."""
    with sqlite3.connect(db) as conn:
        row = conn.execute(
            "SELECT admitted_at, answered_at, ignored FROM chat_run_rates WHERE identity = ?",
            (identity,),
        ).fetchone()
    return None if row is None else (len(json.loads(row[0])), row[1] is not None, row[2])


async def roots_when(service: RunService, count: int, timeout: float = 15) -> list[RunRecord]:
    """The root runs, once there are `count` of them."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(roots := [r for r in await service.store.list_runs() if r.parent_id is None]) < count:
        assert loop.time() < deadline, f"{len(roots)} root run(s), not {count}"
        await asyncio.sleep(0.05)
    return roots


@dataclass(frozen=True)
class Rate:
    """One bot instance's view of the rate: its store, the limit and the window."""

    chat: ChatStore
    limit: int
    window: float

    async def judge(self, identity: str, message: str) -> RateDecision:
        return await self.chat.judge_run_rate(identity, message, self.limit, self.window)


# -- the decision --------------------------------------------------------------------------------


def test_the_rate_admits_up_to_the_limit_within_the_window() -> None:
    assert rate_decision([], False, 2, 300, now=1000) == RateDecision(ADMIT)
    assert rate_decision([900], False, 2, 300, now=1000) == RateDecision(ADMIT)
    assert rate_decision([800, 900], False, 2, 300, now=1000) == RateDecision(REFUSE, 1100)
    # The oldest left the window: a slot is free again.
    assert rate_decision([650, 900], False, 2, 300, now=1000) == RateDecision(ADMIT)
    assert rate_decision([800, 900, 950], False, 0, 300, now=1000) == RateDecision(ADMIT)


def test_the_rate_is_said_in_the_largest_whole_unit() -> None:
    assert rate_rule(5, 300) == "5 per 5 min"
    assert rate_rule(20, 86400) == "20 per 24 h"
    assert rate_rule(3, 90) == "3 per 90 s"


def test_a_refusal_is_answered_once_then_the_flood_is_ignored() -> None:
    assert rate_decision([800, 900], True, 2, 300, now=1000) == RateDecision(IGNORE, 1100)


async def test_the_run_rate_is_counted_in_the_store_for_every_instance(db_url: str) -> None:
    """Two bot instances on one store share each person's count, racing messages cannot both
    take the last slot, and a message handled again after a crash is not counted twice."""
    messages = (f"{INCIDENTS}:{n}" for n in itertools.count(1))

    async def verdicts(rate: Rate, identity: str, times: int) -> list[RateVerdict]:
        return [(await rate.judge(identity, next(messages))).verdict for _ in range(times)]

    first, second = await RunStore.open(db_url), await RunStore.open(db_url)
    try:
        a, b = Rate(ChatStore(first.db), 2, 300), Rate(ChatStore(second.db), 2, 300)
        assert await verdicts(a, "telegram:66", 1) + await verdicts(b, "telegram:66", 1) == [
            ADMIT,
            ADMIT,
        ]
        assert await verdicts(a, "telegram:66", 1) + await verdicts(b, "telegram:66", 1) == [
            REFUSE,
            IGNORE,
        ]
        assert await verdicts(b, "telegram:67", 1) == [ADMIT]  # per person

        # A /run admitted, then handled again after a crash: admitted again, counted once.
        assert (await a.judge("telegram:70", "crashed:1")).verdict == ADMIT
        assert (await b.judge("telegram:70", "crashed:1")).verdict == ADMIT
        assert await verdicts(a, "telegram:70", 2) == [ADMIT, REFUSE]

        # Once a slot is free, the next flood gets its own refusal.
        c = Rate(ChatStore(first.db), 2, 0.2)
        assert await verdicts(c, "telegram:69", 4) == [ADMIT, ADMIT, REFUSE, IGNORE]
        await asyncio.sleep(0.25)
        assert await verdicts(c, "telegram:69", 4) == [ADMIT, ADMIT, REFUSE, IGNORE]

        raced = await asyncio.gather(
            *(rate.judge("telegram:68", next(messages)) for rate in (a, b) * 3)
        )
        assert sorted(d.verdict.value for d in raced) == sorted(
            ["admit", "admit", "refuse", "ignore", "ignore", "ignore"]
        )
    finally:
        await first.close()
        await second.close()


# -- in the chat ---------------------------------------------------------------------------------


async def test_a_flood_of_run_messages_gets_the_rate_then_one_refusal_then_silence(
    settings: Settings,
) -> None:
    """With the default rate (5 per 5 min): 8 /run messages start 5 runs, get one refusal,
    and 2 are ignored."""
    defaults = TelegramSettings(_env_file=None)  # type: ignore[call-arg]
    rate = {"run_rate": defaults.run_rate, "run_rate_window": defaults.run_rate_window}
    assert rate == {"run_rate": 5, "run_rate_window": 300}
    async with chat_bench(settings, **rate) as (standin, service):
        sent = [
            standin.inject_message(INCIDENTS, MALLORY, "/run disk-almost-full") for _ in range(8)
        ]
        mallory = f"telegram:{MALLORY}"
        await wait_for(standin, lambda: rate_row(settings.db, mallory) == (5, True, 2))
        refusal_head = "Too many /run messages"
        await wait_for(
            standin, lambda: answers_after(from_bot(standin, INCIDENTS), sent[0], refusal_head)
        )
        [refusal] = answers_after(from_bot(standin, INCIDENTS), sent[0], refusal_head)
        assert "5 per 5 min per person" in refusal["text"]
        assert len(refusal["text"]) < 200
        roots = await roots_when(service, 5)
        assert {r.requested_by for r in roots} == {mallory}

        # Another person is not held back by Mallory's flood.
        asked = standin.inject_message(INCIDENTS, ALICE, "/run disk-almost-full")
        alice = f"telegram:{ALICE}"
        await wait_for(standin, lambda: rate_row(settings.db, alice) == (1, False, 0))
        assert not answers_after(from_bot(standin, INCIDENTS), asked, refusal_head)


async def test_a_run_in_chat_is_refused_while_the_active_run_cap_is_reached(
    settings: Settings, workspace: Path
) -> None:
    write_runbook(workspace, "slow-drill", SLOW_RUNBOOK)
    allow(workspace, "append.py", "slow", "60")
    capped = settings.model_copy(update={"max_active_runs": 1, "allow_shell": True})
    async with chat_bench(capped) as (standin, service):
        await service.start("slow", "slow-drill", role="runbook", wait=False)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while lines(workspace) != ["slow"]:
            assert loop.time() < deadline, "the slow step did not start"
            await asyncio.sleep(0.05)
        asked = standin.inject_message(INCIDENTS, ALICE, "/run disk-almost-full")
        head = "Cannot start the run"
        await wait_for(standin, lambda: answers_after(from_bot(standin, INCIDENTS), asked, head))
        [answer] = answers_after(from_bot(standin, INCIDENTS), asked, head)
        assert "LOOM_OPS_MAX_ACTIVE_RUNS" in answer["text"]
        assert [r.id for r in await service.store.list_runs()] == ["slow"]

        cancelled = await service.cancel("slow", by="cli:tester")
        assert cancelled.status == RunStatus.CANCELLED
        again = standin.inject_message(INCIDENTS, ALICE, "/run disk-almost-full")
        assert len(await roots_when(service, 2)) == 2  # the freed slot took it
        assert not answers_after(from_bot(standin, INCIDENTS), again, head)
