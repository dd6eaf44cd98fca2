"""The Telegram bot end to end: the real Application over HTTP against the Bot API stand-in."""

from __future__ import annotations

import asyncio
import itertools

from agent.records import RunStatus
from agent.settings import Settings
from tests.bot_harness import (
    ALICE,
    BOB,
    INCIDENTS,
    approval_messages,
    chat_bench,
    from_bot,
    keyboard_data,
    run_id_of,
    summaries,
    wait_for,
    wait_for_approval,
)


async def test_incident_flow_from_run_to_summary(settings: Settings) -> None:
    """/run → progress and an approval keyboard → the approver taps → the message says who
    approved, the run resumes at once, and the audit summary arrives."""
    async with chat_bench(settings) as (standin, service):
        standin.inject_message(INCIDENTS, ALICE, "/run incident: API latency spike")
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
        standin.inject_message(INCIDENTS, ALICE, "/run incident: API latency spike")
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
