"""The Telegram bot end to end: the real Application over HTTP against the Bot API stand-in."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
from pathlib import Path

from agent.records import RunStatus
from agent.settings import Settings
from tests.bot_harness import (
    ALICE,
    BOB,
    INCIDENTS,
    PLATFORM,
    approval_messages,
    chat_bench,
    confirm_run,
    from_bot,
    keyboard_data,
    long_notes_runbook,
    run_id_of,
    summaries,
    wait_for,
    wait_for_approval,
)


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
