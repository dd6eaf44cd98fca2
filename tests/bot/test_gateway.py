"""The Telegram bot end to end (`serve_bot`: the Application, the outbox sender and the
maintenance loop) over HTTP against the Bot API stand-in: the incident flow, one progress
message edited in place, long messages split or attached within Telegram's limits, topics,
faults of the Bot API and of the LLM, and chats no longer served."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from agent.errors import PolicyUnavailable
from agent.policy.base import PolicyContext, PolicyDecision
from agent.policy.mock import MockPolicy
from agent.records import RunStatus
from agent.service.runs import RunService
from agent.settings import Settings
from agent.store import RunStore
from bot.gateway import serve_bot
from bot.settings import TelegramSettings
from bot.standin import BotApiStandIn
from tests.bot_harness import (
    ALICE,
    BOB,
    INCIDENTS,
    JSON,
    PLATFORM,
    PRIVATE,
    TOKEN,
    approval_messages,
    chat_bench,
    confirm_run,
    from_bot,
    keyboard_data,
    long_action_runbook,
    long_notes_runbook,
    outbox_idle,
    run_id_of,
    running_bot,
    standin_server,
    summaries,
    telegram_settings,
    undelivered,
    wait_for,
    wait_for_approval,
)
from tests.support import LATENCY

TWO_GATES_RUNBOOK = """\
id: two-gates
title: Two gates drill
description: Two gated notes, one after the other.
triggers: [two gates drill]
approvers: [telegram:100000001]
steps:
  - id: first
    title: First gated note
    note: one
    approval: required
  - id: second
    title: Second gated note
    note: two
    approval: required
"""

CHECKLIST_RUNBOOK = """\
id: checklist
title: Checklist drill
description: One note step whose text is a long multi-line checklist.
triggers: [checklist drill]
steps:
  - id: checklist
    title: Go through the checklist
    note: |
{lines}
"""


def progress_of(standin: BotApiStandIn, chat_id: int, run_id: str) -> list[JSON]:
    """The run's progress messages: first line `<icon> Run <id> · <status>`."""
    head = re.compile(rf"^\S+ Run {re.escape(run_id)} · ")
    return [m for m in from_bot(standin, chat_id) if head.match(m.get("text", ""))]


def current(standin: BotApiStandIn, chat_id: int, message_id: int) -> JSON:
    """A message as it stands now (after any edits)."""
    [message] = [m for m in standin.messages(chat_id) if m["message_id"] == message_id]
    return message


def approve_data(request: JSON) -> str:
    """The callback data of an approval request's Approve button."""
    return next(d for d in keyboard_data(request) if d.endswith(":y"))


async def root_ids(service: RunService, count: int, timeout: float = 10.0) -> list[str]:
    """The ids of the root runs, once there are at least `count`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        roots = [r.id for r in await service.store.list_runs() if r.parent_id is None]
        if len(roots) >= count:
            return roots
        assert loop.time() < deadline, "no run started"
        await asyncio.sleep(0.02)


def is_terminal(service: RunService, run_id: str) -> bool:
    """Whether the run has ended (read straight from the file)."""
    with contextlib.closing(sqlite3.connect(service.settings.db)) as conn:
        [status] = conn.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()
    return RunStatus(status).is_terminal


async def test_incident_flow_from_run_to_summary(settings: Settings) -> None:
    """/run → progress and an approval keyboard → the approver taps → the message says who
    approved, the run resumes at once, and the audit summary arrives."""
    async with chat_bench(settings) as (standin, service):
        await confirm_run(standin, INCIDENTS, ALICE, "incident: API latency spike")
        request = await wait_for_approval(standin, INCIDENTS)
        run_id = run_id_of(request)
        text = request["text"]
        for expected in (
            "api-latency-spike",
            "scale-out",
            "kubectl scale deployment/checkout-api -n production --replicas=6",
            "Rollback:",
            "Asked by: @alice",
            "Deadline:",
        ):
            assert expected in text
        approve = next(d for d in keyboard_data(request) if d.endswith(":y"))
        assert len(approve.encode()) <= 64

        query = standin.inject_callback(INCIDENTS, request["message_id"], BOB, approve)

        await wait_for(standin, lambda: summaries(standin, INCIDENTS, run_id))
        answer = standin.callback_answer(query)
        assert answer is not None and not answer.get("show_alert")
        [edited] = [
            m for m in from_bot(standin, INCIDENTS) if m["message_id"] == request["message_id"]
        ]
        assert "✅ Approved by @bob at " in edited["text"]
        assert " UTC" in edited["text"] and not keyboard_data(edited)
        [summary] = summaries(standin, INCIDENTS, run_id)
        assert "SUCCEEDED" in summary["text"]
        assert "scale-out" in summary["text"]
        assert "approved by @bob (telegram:100000001)" in summary["text"]
        assert f"/explain {run_id}" in summary["text"]
        assert (await service.get(run_id)).status == RunStatus.SUCCEEDED
        assert len(approval_messages(standin, INCIDENTS)) == 1
        # The commands were registered at start.
        assert {c["command"] for c in standin.commands()} >= {"run", "approve", "trace"}


async def test_progress_is_one_message_edited_in_place(settings: Settings) -> None:
    """A run's progress is one message, edited, never more than once per interval."""
    async with chat_bench(settings, progress_interval=0.5) as (standin, _):
        await confirm_run(standin, INCIDENTS, ALICE, "incident: API latency spike")
        request = await wait_for_approval(standin, INCIDENTS)
        run_id = run_id_of(request)
        approve = next(d for d in keyboard_data(request) if d.endswith(":y"))
        standin.inject_callback(INCIDENTS, request["message_id"], BOB, approve)
        await wait_for(standin, lambda: summaries(standin, INCIDENTS, run_id))
        await asyncio.sleep(0.8)  # the last, throttled edit
        progress = [
            m for m in from_bot(standin, INCIDENTS) if m["text"].startswith(f"✅ Run {run_id}")
        ]
        assert len(progress) == 1, [m["text"][:40] for m in from_bot(standin, INCIDENTS)]
        edits = [
            c
            for c in standin.calls("editMessageText")
            if int(c.params["message_id"]) == progress[0]["message_id"]
        ]
        assert edits, "the progress message was never edited"
        sends = [
            c
            for c in standin.calls("sendMessage")
            if f"Run <code>{run_id}</code></b>" in c.params.get("text", "")
        ]
        times = [sends[0].at] + [c.at for c in edits]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert min(gaps) >= 0.45, gaps


async def test_a_deleted_progress_message_is_replaced_once(
    settings: Settings, workspace: Path
) -> None:
    """An admin deletes the progress message: the bot posts one replacement and edits it from
    then on, instead of posting a new message on every later update."""
    (workspace / "runbooks" / "two-gates.yaml").write_text(TWO_GATES_RUNBOOK)
    async with chat_bench(settings) as (standin, service):
        await confirm_run(standin, INCIDENTS, ALICE, "incident: two gates drill")
        first = await wait_for_approval(standin, INCIDENTS)
        run_id = run_id_of(first)
        await outbox_idle(service)
        [shown] = progress_of(standin, INCIDENTS, run_id)
        # A chat admin tidies the chat up.
        await standin.call_method(
            "deleteMessage", {"chat_id": INCIDENTS, "message_id": shown["message_id"]}
        )
        standin.inject_callback(INCIDENTS, first["message_id"], BOB, approve_data(first))
        await wait_for(
            standin,
            lambda: (
                [m for m in approval_messages(standin, INCIDENTS) if keyboard_data(m)]
                and current(standin, INCIDENTS, first["message_id"]).get("reply_markup") is None
            ),
        )
        [second] = [m for m in approval_messages(standin, INCIDENTS) if keyboard_data(m)]
        await asyncio.sleep(0.5)  # past the progress throttle
        await outbox_idle(service)
        assert len(progress_of(standin, INCIDENTS, run_id)) == 1  # the replacement
        standin.inject_callback(INCIDENTS, second["message_id"], BOB, approve_data(second))
        await wait_for(standin, lambda: summaries(standin, INCIDENTS, run_id))
        await asyncio.sleep(0.5)  # the last, throttled progress edit
        await outbox_idle(service)
        texts = [m["text"].splitlines()[0] for m in progress_of(standin, INCIDENTS, run_id)]
        assert texts == [f"✅ Run {run_id} · succeeded · two-gates"], texts


async def test_progress_shows_a_change_committed_while_it_was_being_sent(
    settings: Settings,
) -> None:
    """The run is cancelled while Telegram is answering for the progress message (the stand-in
    stands for a slow round trip): the progress message must end up saying "cancelled"."""
    async with chat_bench(settings) as (standin, service):
        original = standin.call_method
        cancelled: dict[str, str] = {}

        async def slow_telegram(method: str, params: Any, files: Any = None) -> Any:
            result = await original(method, params, files)
            found = re.search(r"Run <code>(tg-[0-9a-f]+)</code></b>", str(params.get("text", "")))
            if found and not cancelled:
                # While Telegram answers for the progress message, the requester cancels.
                cancelled["run"] = found.group(1)
                await service.cancel(found.group(1), by=f"telegram:{ALICE}", wait=False)
            return result

        standin.call_method = slow_telegram  # type: ignore[method-assign]
        await confirm_run(standin, INCIDENTS, ALICE, LATENCY)
        await wait_for(standin, lambda: cancelled)
        run_id = cancelled["run"]
        await wait_for(standin, lambda: summaries(standin, INCIDENTS, run_id))
        await asyncio.sleep(0.8)  # any throttled progress edit
        await outbox_idle(service)
        assert (await service.get(run_id)).status == RunStatus.CANCELLED
        [progress] = progress_of(standin, INCIDENTS, run_id)
        assert progress["text"].startswith(f"🚫 Run {run_id} · cancelled"), progress["text"]


async def test_a_long_summary_is_split_at_lines_or_attached(
    settings: Settings, workspace: Path
) -> None:
    """Over 4096 characters the summary is split at line boundaries (each part valid HTML);
    far longer, it is attached as a file."""
    (workspace / "runbooks" / "long-notes.yaml").write_text(long_notes_runbook(25))
    (workspace / "runbooks" / "longer-notes.yaml").write_text(
        long_notes_runbook(150, "longer-notes", "vast drill")
    )
    roomy = settings.model_copy(update={"max_steps": 1000, "max_tool_calls": 1000})
    async with chat_bench(roomy) as (standin, service):
        await confirm_run(standin, INCIDENTS, ALICE, "incident: long drill")
        await wait_for(standin, lambda: summaries(standin, INCIDENTS))
        [run] = [r for r in await service.store.list_runs() if r.parent_id is None]
        await wait_for(
            standin,
            lambda: any("note-24" in m["text"] for m in from_bot(standin, INCIDENTS)),
        )
        parts = [m for m in from_bot(standin, INCIDENTS) if "note-" in m["text"]]
        assert len(parts) >= 2 and all(len(m["text"]) <= 4096 for m in parts)
        assert parts[0]["text"].startswith(f"Run {run.id}: SUCCEEDED")
        assert "<with> & markup-like" in parts[0]["text"]

        await confirm_run(standin, PLATFORM, ALICE, "incident: vast drill")
        await wait_for(
            standin, lambda: any(m.get("document") for m in from_bot(standin, PLATFORM)), 30
        )
        [document] = [m for m in from_bot(standin, PLATFORM) if m.get("document")]
        text = standin.document_bytes(document["document"]["file_id"]).decode()
        assert "SUCCEEDED" in document["caption"]
        assert "note-149" in text and "<with> & markup-like" in text  # plain text, unescaped

        # Its step list is longer than one message: /explain splits it at lines.
        vast = next(r for r in await service.store.list_runs() if r.id in document["caption"])
        asked = standin.inject_message(PLATFORM, ALICE, f"/explain {vast.id}")

        def explained() -> list[dict]:
            return [m for m in from_bot(standin, PLATFORM) if m["message_id"] > asked["message_id"]]

        await wait_for(standin, lambda: any("note-149" in m["text"] for m in explained()))
        parts = explained()
        assert 2 <= len(parts) <= 3 and all(len(m["text"]) <= 4096 for m in parts)
        assert parts[0]["text"].startswith(f"✅ Run {vast.id} · succeeded · longer-notes")
        assert "✅ 150. note-149: ok (once)" in parts[-1]["text"]
        assert parts[-1]["text"].endswith(f"/trace {vast.id}")


async def test_a_summary_in_parts_is_not_resent_after_a_later_part_failed(
    settings: Settings, workspace: Path
) -> None:
    """A two-part summary whose second part meets one 502: the first part is not sent twice."""
    (workspace / "runbooks" / "long-notes.yaml").write_text(long_notes_runbook(25))
    roomy = settings.model_copy(update={"max_steps": 1000, "max_tool_calls": 1000})
    async with chat_bench(roomy) as (standin, service):
        original = standin.call_method
        faulted: list[str] = []

        async def flaky_after_first_part(method: str, params: Any, files: Any = None) -> Any:
            result = await original(method, params, files)
            text = str(params.get("text", ""))
            if method.lower() == "sendmessage" and text.startswith("<b>Run ") and not faulted:
                faulted.append(text)
                standin.fail_next("sendMessage", 502)  # the next part meets a bad gateway
            return result

        standin.call_method = flaky_after_first_part  # type: ignore[method-assign]
        await confirm_run(standin, INCIDENTS, ALICE, "incident: long drill")
        await wait_for(standin, lambda: faulted, 20)
        await wait_for(
            standin, lambda: any("note-24" in m["text"] for m in from_bot(standin, INCIDENTS))
        )
        await outbox_idle(service)
        firsts = [m for m in from_bot(standin, INCIDENTS) if m["text"].startswith("Run tg-")]
        assert len(firsts) == 1, [m["text"][:40] for m in firsts]


async def test_a_long_summary_with_a_multiline_step_detail_is_delivered(
    settings: Settings, workspace: Path
) -> None:
    """A note step with a 90-line checklist: its <code> detail spans lines and the summary is
    longer than one message. The summary must arrive (in parts or attached)."""
    checklist = "\n".join(
        f"      {n:02d}. check dashboard panel {n} and note what it shows" for n in range(90)
    )
    (workspace / "runbooks" / "checklist.yaml").write_text(
        CHECKLIST_RUNBOOK.format(lines=checklist)
    )
    async with chat_bench(settings) as (standin, service):
        await confirm_run(standin, INCIDENTS, ALICE, "incident: checklist drill")
        [root] = await root_ids(service, 1)
        await wait_for(standin, lambda: is_terminal(service, root), 10)
        await outbox_idle(service)
        delivered = summaries(standin, INCIDENTS, root) or [
            m for m in from_bot(standin, INCIDENTS) if m.get("document")
        ]
        assert delivered, "the audit summary never reached the chat"


async def test_a_summary_split_in_parts_fits_telegrams_utf16_limit(
    settings: Settings, workspace: Path
) -> None:
    """A long summary whose request has 1000 emoji (2 UTF-16 units each): every part must fit
    Telegram's 4096 UTF-16 units, or the summary goes as a file."""
    (workspace / "runbooks" / "long-notes.yaml").write_text(long_notes_runbook(25))
    roomy = settings.model_copy(update={"max_steps": 1000, "max_tool_calls": 1000})
    async with chat_bench(roomy) as (standin, service):
        await confirm_run(standin, INCIDENTS, ALICE, "incident: long drill " + "🔥" * 1000)
        [root] = await root_ids(service, 1)
        await wait_for(standin, lambda: is_terminal(service, root), 20)
        await outbox_idle(service)
        delivered = summaries(standin, INCIDENTS, root) or [
            m for m in from_bot(standin, INCIDENTS) if m.get("document")
        ]
        assert delivered, "the audit summary never reached the chat"


async def test_an_approval_request_with_a_long_action_still_reaches_the_chat(
    settings: Settings, workspace: Path
) -> None:
    """A gated step whose exact command is 4500 characters: the request must still reach the
    chat with its buttons (the action cut short or attached), not vanish."""
    (workspace / "runbooks" / "long-action.yaml").write_text(long_action_runbook(4500))
    async with chat_bench(settings) as (standin, _):
        await confirm_run(standin, INCIDENTS, ALICE, "incident: long action drill")
        await wait_for(
            standin,
            lambda: [m for m in approval_messages(standin, INCIDENTS) if keyboard_data(m)],
            timeout=6,
        )


async def test_a_run_started_in_a_topic_answers_in_that_topic(settings: Settings) -> None:
    """A forum topic is part of where a run came from: its messages go back to the topic."""
    async with chat_bench(settings) as (standin, _):
        await confirm_run(standin, INCIDENTS, ALICE, "incident: API latency spike", thread_id=77)
        request = await wait_for_approval(standin, INCIDENTS)
        assert request.get("message_thread_id") == 77
        sent = [c for c in standin.calls("sendMessage")]
        assert sent and all(c.params.get("message_thread_id") == 77 for c in sent)


async def test_a_failing_bot_api_is_retried_with_backoff(settings: Settings) -> None:
    """A 502 from the Bot API is a network fault: the message is retried after a backoff and
    arrives once; the failed attempt is recorded."""
    async with chat_bench(settings) as (standin, _service):
        standin.fail_next("sendMessage", 502, count=1)
        # Named outright: the run starts at once, and its first message is the outbox's.
        standin.inject_message(INCIDENTS, ALICE, "/run api-latency-spike")
        await wait_for_approval(standin, INCIDENTS)
        assert len(approval_messages(standin, INCIDENTS)) == 1
        with sqlite3.connect(settings.db) as conn:
            [(attempts, error)] = conn.execute(
                "SELECT attempts, last_error FROM outbox WHERE attempts > 0"
            ).fetchall()
        assert attempts == 1 and "bad gateway" in error.lower()


async def test_no_message_goes_to_a_chat_no_longer_served(settings: Settings) -> None:
    """Platform is taken off TELEGRAM_ALLOWED_CHAT_IDS while one of its runs waits; when the run
    ends, the bot must not post or edit anything in Platform any more."""
    async with standin_server() as (standin, server):
        async with running_bot(settings, telegram_settings(server)) as service:
            await confirm_run(standin, PLATFORM, ALICE, LATENCY)
            run_id = run_id_of(await wait_for_approval(standin, PLATFORM))
            await outbox_idle(service)
        # The operator takes the Platform group off the list and restarts the bot.
        narrowed = telegram_settings(server, allowed_chat_ids=[INCIDENTS, PRIVATE])
        async with running_bot(settings, narrowed) as service:
            calls_before = len(standin.calls())
            await service.cancel(run_id, by="cli:oncall")  # the run ends from the CLI
            await wait_for(standin, lambda: undelivered(settings.db) == 0, 10)
            await outbox_idle(service)
            to_platform = [
                c.method
                for c in standin.calls()[calls_before:]
                if str(c.params.get("chat_id")) == str(PLATFORM)
            ]
        assert to_platform == [], to_platform


class LlmBlip(MockPolicy):
    """The mock policy behind an LLM endpoint that is unreachable for its first request."""

    def __init__(self) -> None:
        self.failed = False

    async def decide(self, context: PolicyContext) -> PolicyDecision:
        if not self.failed:
            self.failed = True
            raise PolicyUnavailable("LLM endpoint unreachable (connection reset)")
        return await super().decide(context)


@asynccontextmanager
async def bot_with_policy(
    settings: Settings, telegram: TelegramSettings, policy: MockPolicy
) -> AsyncIterator[RunService]:
    """The real bot in this process, its runs asking `policy`."""
    service = RunService(await RunStore.open(settings.db), settings, policy=policy)
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(serve_bot(service, TOKEN, telegram, stop, ready))
    try:
        await asyncio.wait_for(ready.wait(), 15)
        yield service
    finally:
        with contextlib.suppress(AssertionError):
            await outbox_idle(service)
        stop.set()
        await asyncio.wait_for(task, 15)
        await service.close()


async def test_a_run_interrupted_by_a_passing_fault_is_picked_up_again(
    settings: Settings,
) -> None:
    """The LLM endpoint fails one request: the kernel journals the interruption and leaves the
    run queued for resume. A long-running bot drives it on (within a lease TTL) to its
    approval request."""
    quick = settings.model_copy(update={"lease_ttl": 2.0})
    async with (
        standin_server() as (standin, server),
        bot_with_policy(quick, telegram_settings(server), LlmBlip()) as service,
    ):
        await confirm_run(standin, INCIDENTS, ALICE, LATENCY)
        [run_id] = await root_ids(service, 1)
        try:
            await wait_for(
                standin,
                lambda: [m for m in approval_messages(standin, INCIDENTS) if keyboard_data(m)],
                timeout=8,
            )
        except TimeoutError:
            status = (await service.get(run_id)).status
            pytest.fail(f"run {run_id} left {status} by a passing LLM fault, never driven again")
