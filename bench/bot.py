"""Benchmark of the Telegram bot against the local Bot API stand-in (mock policy).

Prints figures; asserts nothing. Run with `python bench/bot.py [--runs 100] [--concurrent 50]`.

The real python-telegram-bot Application long-polls the stand-in on 127.0.0.1, in the same
process, over a fresh SQLite file. Measured legs, p50/p95 over `--runs` incidents one after
another:

- `/run` injected → the approval keyboard message exists at the stand-in;
- tap injected → the request's message edited (decision shown, buttons gone);
- tap injected → the run resumed (the executor's next journal event after the decision);
then `--concurrent` incidents at once: time until every keyboard, and until every summary
after all taps. Before the timings: the store round trips of one `/run` and of one tap, each
counted from the moment python-telegram-bot takes the update until its handlers are done (what
the update starts in the background, a run's drive or the outbox's sending, is not counted),
against issue 14's target of at most 3 for a tap. `--pg DSN` runs it all on a scratch schema of
that PostgreSQL server instead, and also counts the network round trips of the store calls.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
# Run as a script, bench/ comes first on sys.path, and bench/http.py would shadow the
# standard library's `http` (httpx needs it): put the repo there instead.
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != BENCH]

from telegram import Update  # noqa: E402
from telegram.ext import Application  # noqa: E402

from agent.service.runs import RunService  # noqa: E402
from agent.settings import Settings  # noqa: E402
from bench.roundtrips import (  # noqa: E402
    RoundTrips,
    count_postgres,
    count_store,
    counting_here,
)
from bot.gateway import serve_bot  # noqa: E402
from bot.settings import TelegramSettings  # noqa: E402
from bot.standin import BotApiStandIn, StandInServer  # noqa: E402

TOKEN = "123456789:BENCH-loom-ops-token-0123456789"
CHAT = -100101
REQUESTER = 100000050
APPROVER = 100000001  # in TELEGRAM_APPROVER_IDS: group:approvers, which the runbooks name
# Named outright, so /run starts at once (free text would first get a card to confirm).
INCIDENT = "/run api-latency-spike incident: API latency spike"
TAP_TARGET = 3  # issue 14: a Telegram tap in at most 3 store round trips


def _keyboard(message: dict[str, Any]) -> list[str]:
    markup = message.get("reply_markup") or {}
    return [b["callback_data"] for row in markup.get("inline_keyboard", []) for b in row]


class ChatObserver:
    """Timestamps what the bot does in the chat, from the stand-in's event stream (cheaper and
    more exact than scanning the transcript after every change)."""

    def __init__(self, standin: BotApiStandIn) -> None:
        self.requests: list[dict[str, Any]] = []  # approval requests as first sent
        self.request_at: list[float] = []
        self.edited_at: dict[int, float] = {}  # request message id -> buttons removed
        self.summaries = 0
        self.changed = asyncio.Event()
        self._queue = standin.subscribe()

    async def run(self) -> None:
        """Consume events until cancelled."""
        while True:
            event = await self._queue.get()
            now = time.time()
            message = event.get("message") or {}
            text = message.get("text", "")
            if event["type"] == "message" and "Approval needed" in text and _keyboard(message):
                self.requests.append(message)
                self.request_at.append(now)
            elif event["type"] == "message" and "Requested:" in text:
                self.summaries += 1
            elif (
                event["type"] == "edited_message"
                and not _keyboard(message)
                and ("Approval needed" in text)
            ):
                self.edited_at.setdefault(message["message_id"], now)
            self.changed.set()

    async def until(self, predicate: Callable[[], bool], timeout: float = 60) -> None:
        """Wait until the predicate holds."""
        async with asyncio.timeout(timeout):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()


class UpdateTrips:
    """The store round trips of each update the bot handles, from the moment
    python-telegram-bot takes it until its handlers are done (the drive of a run it starts or
    wakes has a context of its own, and the outbox's sender another: neither is counted)."""

    def __init__(self) -> None:
        self.taps: list[RoundTrips] = []
        self.messages: list[RoundTrips] = []

    def install(self) -> Callable[[], None]:
        """Count every update from now on; returns the function that stops it."""
        original = Application.process_update
        taps, messages = self.taps, self.messages

        async def process_update(application: Any, update: object) -> None:
            with counting_here() as counts:
                await original(application, update)
            tap = isinstance(update, Update) and update.callback_query is not None
            (taps if tap else messages).append(counts)

        Application.process_update = process_update  # type: ignore[method-assign]

        def undo() -> None:
            Application.process_update = original  # type: ignore[method-assign]

        return undo

    def report(self, postgres: bool) -> None:
        """Print the round trips of a /run and of a tap, and the store calls of the last tap."""
        wire = " (+ PostgreSQL round trips inside them)" if postgres else ""
        print(f"store round trips of one update, median and max{wire}:")
        for name, counted, target in (
            ("/run", self.messages, None),
            ("tap ", self.taps, TAP_TARGET),
        ):
            if not counted:
                continue
            calls = sorted(c.total_calls for c in counted)
            line = f"  {name}  {statistics.median(calls):4.1f}  max {calls[-1]:3d}"
            if postgres:
                trips = sorted(c.total_wire for c in counted)
                line += f"   ({statistics.median(trips):4.1f}, max {trips[-1]:3d})"
            if target is not None:
                verdict = "met" if calls[-1] <= target else "NOT met"
                line += f"   target <= {target}: {verdict}"
            print(f"{line}   (n={len(counted)})")
        for name, counted in (("/run", self.messages), ("tap", self.taps)):
            if counted:
                print(f"  the last {name}, by the store method that made each call:")
                for line in counted[-1].lines(per=1, unit=name.strip("/"))[1:]:
                    print(f"  {line}")


def _percentiles(values: list[float]) -> str:
    ordered = sorted(values)
    p50 = statistics.median(ordered)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return f"p50 {p50 * 1000:7.1f} ms   p95 {p95 * 1000:7.1f} ms   (n={len(values)})"


async def _resumed_at(service: RunService, run_id: str) -> float | None:
    """When the executor journaled its first event after the decision, if it has."""
    events = await service.store.list_events(f"{run_id}:sub:executor")
    decided = next((i for i, e in enumerate(events) if e.type == "approval_decided"), None)
    if decided is None or decided + 1 >= len(events):
        return None
    return events[decided + 1].ts


async def sequential(
    standin: BotApiStandIn, chat: ChatObserver, service: RunService, runs: int
) -> None:
    """One incident at a time: the three legs."""
    to_keyboard, to_edit, to_resume = [], [], []
    for n in range(runs):
        started = time.time()
        standin.inject_message(CHAT, REQUESTER, INCIDENT)
        await chat.until(lambda n=n: len(chat.requests) > n)
        to_keyboard.append(chat.request_at[n] - started)
        request = chat.requests[n]
        run_id = request["text"].split("Run: ", 1)[1].split()[0]
        approve = next(d for d in _keyboard(request) if d.endswith(":y"))
        tapped = time.time()
        standin.inject_callback(CHAT, request["message_id"], APPROVER, approve)
        await chat.until(lambda m=request["message_id"]: m in chat.edited_at)
        to_edit.append(chat.edited_at[request["message_id"]] - tapped)
        await chat.until(lambda n=n: chat.summaries > n)
        resumed = await _resumed_at(service, run_id)
        assert resumed is not None, f"run {run_id} did not resume"
        to_resume.append(resumed - tapped)
    print(f"/run -> approval keyboard      {_percentiles(to_keyboard)}")
    print(f"tap  -> message edited         {_percentiles(to_edit)}")
    print(f"tap  -> run resumed            {_percentiles(to_resume)}")


async def concurrent(standin: BotApiStandIn, chat: ChatObserver, count: int) -> None:
    """`count` incidents injected at once, then all approved at once."""
    before_requests, before_summaries = len(chat.requests), chat.summaries
    started = time.time()
    for _ in range(count):
        standin.inject_message(CHAT, REQUESTER, INCIDENT)
    await chat.until(lambda: len(chat.requests) >= before_requests + count, 120)
    keyboards = time.time() - started
    tapped = time.time()
    for request in chat.requests[before_requests:]:
        approve = next(d for d in _keyboard(request) if d.endswith(":y"))
        standin.inject_callback(CHAT, request["message_id"], APPROVER, approve)
    await chat.until(lambda: chat.summaries >= before_summaries + count, 120)
    finished = time.time() - tapped
    print(
        f"{count} at once: all keyboards in {keyboards * 1000:.0f} ms "
        f"({keyboards / count * 1000:.1f} ms each); all summaries {finished * 1000:.0f} ms "
        f"after the taps ({finished / count * 1000:.1f} ms each)"
    )


async def main() -> None:
    """Run the bot against the stand-in and print the figures."""
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--concurrent", type=int, default=50)
    parser.add_argument("--pg", metavar="DSN", help="PostgreSQL server (a scratch schema)")
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="loom-ops-bench-bot-"))
    schema = f"loom_bench_bot_{secrets.token_hex(4)}" if args.pg else None
    try:
        shutil.copytree(REPO / "runbooks", directory / "runbooks")
        db = str(directory / "ops.sqlite")
        if args.pg:
            import psycopg

            with psycopg.connect(args.pg, autocommit=True) as admin:
                admin.execute(f"CREATE SCHEMA {schema}")
            separator = "&" if "?" in args.pg else "?"
            db = f"{args.pg}{separator}options={quote(f'-csearch_path={schema}')}"
        settings = Settings(
            _env_file=None,
            db=db,
            workspace=directory,
            mock_llm=True,
            max_active_runs=10_000,  # `--concurrent` incidents are open at once
            telegram_approvers=[str(APPROVER)],  # group:approvers, which the runbooks name
        )
        standin = BotApiStandIn(TOKEN)
        standin.add_user(REQUESTER, "Alice", "alice")
        standin.add_user(APPROVER, "Bob", "bob")
        standin.add_chat(CHAT, "supergroup", "Incidents")
        async with StandInServer(standin) as server:
            telegram = TelegramSettings(
                _env_file=None,
                allowed_chat_ids=[CHAT],
                approver_ids=[APPROVER],
                api_base_url=server.bot_base_url,
                group_rate=0,  # the stand-in has no flood limit; measure the bot, not the limiter
                overall_rate=0,
                run_rate=0,  # one requester starts every run here: no per-person /run rate
            )
            service = await RunService.open(settings)
            counts = count_store(service.store.db)
            stop_wire = count_postgres(counts) if args.pg else (lambda: None)
            trips = UpdateTrips()
            stop_counting = trips.install()
            stop, ready = asyncio.Event(), asyncio.Event()
            bot = asyncio.create_task(serve_bot(service, TOKEN, telegram, stop, ready))
            await asyncio.wait_for(ready.wait(), 30)
            chat = ChatObserver(standin)
            observer = asyncio.create_task(chat.run())
            try:
                await sequential(standin, chat, service, args.runs)
                trips.report(postgres=bool(args.pg))
                stop_counting()
                await concurrent(standin, chat, args.concurrent)
            finally:
                stop_counting()
                stop_wire()
                observer.cancel()
                stop.set()
                await bot
                await service.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        if args.pg:
            import psycopg

            with psycopg.connect(args.pg, autocommit=True) as admin:
                admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


if __name__ == "__main__":
    asyncio.run(main())
