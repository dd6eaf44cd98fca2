"""The bot's commands end to end: the real Application over HTTP against the Bot API stand-in,
a real SQLite file, the shipped runbooks. Every wait is on a condition, never a fixed sleep."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from telegram import Bot

from agent.records import Origin, RunStatus
from agent.service.runs import RunService
from agent.settings import Settings
from bot.outbox import OutboxSender
from bot.standin import BotApiStandIn
from bot.store import ChatStore
from tests.bot_harness import (
    ALICE,
    BOB,
    CAROL,
    FOREIGN,
    INCIDENTS,
    JSON,
    MALLORY,
    PLATFORM,
    TOKEN,
    approval_messages,
    chat_bench,
    confirm_run,
    from_bot,
    keyboard_data,
    long_action_runbook,
    outbox_idle,
    run_id_of,
    running_bot,
    standin_server,
    start_card,
    summaries,
    telegram_settings,
    wait_for,
    wait_for_approval,
)
from tests.support import LATENCY, raw_rows

SHIPPED = ("api-latency-spike", "disk-almost-full", "failed-deploy-rollback")
HELP_HEAD = "loom-ops runs runbooks from this chat."


def text_of(message: JSON) -> str:
    """What a chat member reads: a message's text, or a document's caption."""
    return message.get("text") or message.get("caption") or ""


@dataclass
class Bench:
    """The stand-in and the running bot's service, with the user's side of a conversation."""

    standin: BotApiStandIn
    service: RunService

    def bot_after(self, chat_id: int, message_id: int) -> list[JSON]:
        """The bot's messages in a chat sent after `message_id`, in order."""
        return [m for m in from_bot(self.standin, chat_id) if m["message_id"] > message_id]

    async def ask(
        self,
        chat_id: int,
        user_id: int,
        text: str,
        where: Callable[[str], bool] = lambda _: True,
    ) -> JSON:
        """Send `text` as `user_id`; the first bot message after it whose text satisfies
        `where` (runs' own messages arrive in the same chat, so say what the answer is)."""
        sent = self.standin.inject_message(chat_id, user_id, text)

        def answers() -> list[JSON]:
            return [m for m in self.bot_after(chat_id, sent["message_id"]) if where(text_of(m))]

        await wait_for(self.standin, answers, timeout=10)
        return answers()[0]

    async def start_run(self, chat_id: int, text: str, user_id: int = ALICE) -> tuple[str, JSON]:
        """`/run <text>` (confirmed with ▶ Start when the bot answers with a card) and its
        approval request (with buttons): (root run id, request)."""
        before = {m["message_id"] for m in approval_messages(self.standin, chat_id)}

        def new_requests() -> list[JSON]:
            return [
                m
                for m in approval_messages(self.standin, chat_id)
                if m["message_id"] not in before and keyboard_data(m)
            ]

        asked = self.standin.inject_message(chat_id, user_id, f"/run {text}")
        await wait_for(
            self.standin, lambda: new_requests() or start_card(self.standin, asked), timeout=10
        )
        card = start_card(self.standin, asked)
        if card is not None:
            start = next(d for d in keyboard_data(card) if d.startswith("rs:") and d != "rs:x")
            self.standin.inject_callback(chat_id, card["message_id"], user_id, start)
        await wait_for(self.standin, new_requests, timeout=10)
        [request] = new_requests()
        return run_id_of(request), request

    def current(self, chat_id: int, message_id: int) -> JSON:
        """A message as it stands now (after any edits)."""
        [message] = [m for m in self.standin.messages(chat_id) if m["message_id"] == message_id]
        return message

    async def summary(self, chat_id: int, run_id: str) -> JSON:
        """Wait for the run's audit summary in the chat."""
        await wait_for(self.standin, lambda: summaries(self.standin, chat_id, run_id))
        [summary] = summaries(self.standin, chat_id, run_id)
        return summary


@pytest.fixture
async def bench(settings: Settings) -> AsyncIterator[Bench]:
    """The stand-in on 127.0.0.1 and the real bot polling it, over a fresh database."""
    async with (
        standin_server() as (standin, server),
        running_bot(settings, telegram_settings(server)) as service,
    ):
        yield Bench(standin, service)


def starts_with(head: str) -> Callable[[str], bool]:
    return lambda text: text.startswith(head)


async def ask(standin: BotApiStandIn, chat_id: int, user_id: int, text: str) -> JSON:
    """Send a command; the bot's first message after it that is not a run's own message
    (its progress or an approval request)."""
    sent = standin.inject_message(chat_id, user_id, text)

    def answers() -> list[JSON]:
        return [
            m
            for m in from_bot(standin, chat_id)
            if m["message_id"] > sent["message_id"]
            and not re.match(r"^\S+ Run \S+ · ", m.get("text", ""))
            and "Approval needed" not in m.get("text", "")
        ]

    await wait_for(standin, answers, timeout=10)
    return answers()[0]


async def waiting_root(service: RunService, timeout: float = 10.0) -> str:
    """The id of the one root run, once something in its tree waits for a decision."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        roots = [r for r in await service.store.list_runs() if r.parent_id is None]
        if roots and await service.pending_approval(roots[0].id) is not None:
            return roots[0].id
        assert loop.time() < deadline, "no run waits for a decision"
        await asyncio.sleep(0.02)


# -- help, start, unknown and other bots' commands ---------------------------------------------


async def test_help_and_start_list_every_command(bench: Bench) -> None:
    """/help and /start answer with the whole command list and an example."""
    for command in ("/help", "/start"):
        answer = await bench.ask(INCIDENTS, ALICE, command, starts_with(HELP_HEAD))
        text = text_of(answer)
        for name in ("run", "runs", "status", "explain", "trace", "cancel", "approve", "reject"):
            assert f"/{name} — " in text, (name, text)
        assert "/runbooks — " in text and "/help — " in text
        assert "/run incident: API latency spike service=checkout" in text
        # The example is markup the stand-in parsed: a code entity, not literal tags.
        assert "<code>" not in text
        assert any(e["type"] == "code" for e in answer.get("entities", []))


async def test_unknown_command_gets_the_short_help(bench: Bench) -> None:
    answer = await bench.ask(INCIDENTS, ALICE, "/frobnicate now", starts_with("Unknown command"))
    assert HELP_HEAD in text_of(answer)
    assert "/run — " in text_of(answer)


async def test_help_addressed_to_us_in_a_group_is_answered(bench: Bench) -> None:
    answer = await bench.ask(INCIDENTS, ALICE, "/help@loom_ops_bot", starts_with(HELP_HEAD))
    assert "/status — " in text_of(answer)


async def test_another_bots_command_gets_no_answer(bench: Bench) -> None:
    """`/help@some_other_bot` is none of our business: the answers after it are exactly those
    to the two commands that follow it (updates are handled in order of arrival)."""
    other = bench.standin.inject_message(INCIDENTS, ALICE, "/help@some_other_bot")
    bench.standin.inject_message(INCIDENTS, ALICE, "/frobnicate@some_other_bot")
    help_answer = await bench.ask(INCIDENTS, ALICE, "/help", starts_with(HELP_HEAD))
    listing = await bench.ask(INCIDENTS, ALICE, "/runbooks", starts_with("Runbooks"))
    after = bench.bot_after(INCIDENTS, other["message_id"])
    assert [m["message_id"] for m in after] == [help_answer["message_id"], listing["message_id"]]


# -- chats the bot does not serve ------------------------------------------------------------


async def test_foreign_chat_gets_one_refusal_and_no_run(bench: Bench) -> None:
    standin = bench.standin
    run = standin.inject_message(FOREIGN, ALICE, "/run incident: API latency spike")
    await wait_for(standin, lambda: bench.bot_after(FOREIGN, run["message_id"]))
    # Plain chat is ignored; the command after it tells us the text has been handled.
    standin.inject_message(FOREIGN, ALICE, "is anyone looking at checkout?")
    last = await bench.ask(FOREIGN, ALICE, "/help", starts_with("This chat is not served"))

    replies = bench.bot_after(FOREIGN, run["message_id"])
    assert [text_of(m) for m in replies] == [
        "This chat is not served by this loom-ops bot.",
        "This chat is not served by this loom-ops bot.",
    ]
    assert replies[-1]["message_id"] == last["message_id"]
    assert await bench.service.store.list_runs() == []
    assert from_bot(standin, INCIDENTS) == []


async def test_foreign_chat_button_tap_gets_an_alert(bench: Bench) -> None:
    standin = bench.standin
    message = standin.inject_message(FOREIGN, MALLORY, "a message with a forged button")
    query = standin.inject_callback(
        FOREIGN, message["message_id"], MALLORY, "ap:0123456789abcdef:y", require_button=False
    )
    await wait_for(standin, lambda: standin.callback_answer(query))
    answer = standin.callback_answer(query)
    assert answer is not None and answer["show_alert"] is True
    assert "not served" in (answer["text"] or "")
    assert from_bot(standin, FOREIGN) == []
    assert await bench.service.store.list_runs() == []


# -- /run ------------------------------------------------------------------------------------


async def test_run_without_text_answers_with_usage(bench: Bench) -> None:
    answer = await bench.ask(INCIDENTS, ALICE, "/run", starts_with("Usage:"))
    assert "/run incident: API latency spike service=checkout" in text_of(answer)
    assert await bench.service.store.list_runs() == []


async def test_run_matching_no_runbook_is_refused_and_stores_nothing(bench: Bench) -> None:
    command = bench.standin.inject_message(
        INCIDENTS, ALICE, "/run incident: the coffee machine is sad"
    )
    await wait_for(bench.standin, lambda: bench.bot_after(INCIDENTS, command["message_id"]))
    # One answer only: a second command's answer is the next message.
    listing = await bench.ask(INCIDENTS, ALICE, "/runs", starts_with("No runs"))
    [refusal, following] = bench.bot_after(INCIDENTS, command["message_id"])
    assert following["message_id"] == listing["message_id"]
    assert text_of(refusal).startswith(
        "No runbook matches 'incident: the coffee machine is sad'. Name one: "
        "/run <runbook id> [key=value …] (known: api-latency-spike, "
    )
    assert len(text_of(refusal)) < 500
    assert await bench.service.store.list_runs() == []


async def test_run_by_runbook_id_with_params(bench: Bench) -> None:
    """`/run <runbook id> key=value`: the param reaches the approval's exact command."""
    run_id, request = await bench.start_run(INCIDENTS, "api-latency-spike service=checkout")
    text = text_of(request)
    assert "Runbook: api-latency-spike, step scale-out" in text
    assert "kubectl scale deployment/checkout -n production --replicas=6" in text
    assert "deployment/checkout-api" not in text  # the default was overridden
    run = await bench.service.get(run_id)
    assert run.origin.chat_id == INCIDENTS
    assert run.requested_by == f"telegram:{ALICE}"


async def test_run_with_a_bad_param_value_is_refused(bench: Bench) -> None:
    answer = await bench.ask(
        INCIDENTS,
        ALICE,
        "/run api-latency-spike namespace=nowhere",
        starts_with("Cannot start the run: "),
    )
    assert "param 'namespace'" in text_of(answer) and "nowhere" in text_of(answer)
    assert len(text_of(answer)) < 500
    assert await bench.service.store.list_runs() == []


# -- /runs -----------------------------------------------------------------------------------


async def test_runs_lists_only_this_chats_runs(bench: Bench) -> None:
    ours, _ = await bench.start_run(INCIDENTS, "incident: API latency spike")
    theirs, _ = await bench.start_run(PLATFORM, "failed deploy of checkout-api")

    mine = text_of(await bench.ask(INCIDENTS, ALICE, "/runs", starts_with("Active")))
    assert ours in mine and theirs not in mine
    assert "waiting for approval" in mine and "waiting_" not in mine

    other = text_of(await bench.ask(PLATFORM, ALICE, "/runs", starts_with("Active")))
    assert theirs in other and ours not in other
    # Roots only: the planner/executor/verifier children are not listed.
    assert other.count("tg-") == 1 and mine.count("tg-") == 1


async def test_runs_lists_active_before_recent(bench: Bench) -> None:
    done, request = await bench.start_run(INCIDENTS, "incident: API latency spike")
    approve = next(d for d in keyboard_data(request) if d.endswith(":y"))
    bench.standin.inject_callback(INCIDENTS, request["message_id"], BOB, approve)
    await bench.summary(INCIDENTS, done)
    active, _ = await bench.start_run(INCIDENTS, "disk almost full on /var")

    text = text_of(await bench.ask(INCIDENTS, ALICE, "/runs", starts_with("Active")))
    assert text.index("Active") < text.index(active) < text.index("Recent") < text.index(done)


# -- /status ---------------------------------------------------------------------------------


async def test_status_of_a_waiting_run_names_the_pending_approval(bench: Bench) -> None:
    run_id, _ = await bench.start_run(INCIDENTS, "incident: API latency spike")
    answer = await bench.ask(INCIDENTS, ALICE, f"/status {run_id}", lambda t: "Waiting for" in t)
    text = text_of(answer)
    head = text.splitlines()[0]
    assert run_id in head and "waiting for approval · api-latency-spike · by @alice" in head
    assert re.search(r"Waiting for approval #1 of step scale-out: ", text), text
    assert "kubectl scale deployment/checkout-api -n production --replicas=6" in text
    assert f"/approve {run_id} #1" in text and re.search(r"Deadline in \d+ min \(", text)
    assert "Steps: 3 of 7 done; last logs ok" in text
    # The team stands behind the root: by role, in people's words, without child run ids.
    [team] = [line for line in text.splitlines() if line.startswith("Team: ")]
    assert team.index("planner ✅ succeeded") < team.index("executor 🛑 waiting for approval")
    assert "verifier" in team
    assert ":sub:" not in text and "waiting_" not in text


async def test_status_of_an_unknown_or_foreign_run_is_refused_alike(bench: Bench) -> None:
    theirs, _ = await bench.start_run(PLATFORM, "incident: API latency spike")

    unknown = await bench.ask(INCIDENTS, ALICE, "/status nosuchrun", starts_with("No run"))
    assert text_of(unknown) == "No run nosuchrun in this chat."
    foreign = await bench.ask(INCIDENTS, ALICE, f"/status {theirs}", starts_with("No run"))
    assert text_of(foreign) == f"No run {theirs} in this chat."  # nothing about it leaks
    usage = await bench.ask(INCIDENTS, ALICE, "/status", starts_with("Usage"))
    assert text_of(usage) == "Usage: /status <run id>"


async def test_status_lists_child_runs_without_literal_tags(settings: Settings) -> None:
    """/status names the team behind the root run (by role, no child ids); the run id and
    runbook are markup, not text."""
    async with chat_bench(settings) as (standin, _):
        await confirm_run(standin, INCIDENTS, ALICE, LATENCY)
        run_id = run_id_of(await wait_for_approval(standin, INCIDENTS))
        answer = await ask(standin, INCIDENTS, ALICE, f"/status {run_id}")
        [team] = [line for line in answer["text"].splitlines() if line.startswith("Team: ")]
        assert all(role in team for role in ("planner", "executor", "verifier")), team
        assert ":sub:" not in answer["text"]
        assert "<code>" not in answer["text"], answer["text"]


async def test_status_of_a_run_waiting_on_a_long_action_answers(
    settings: Settings, workspace: Path
) -> None:
    """/status of a run whose pending action is 4500 characters long still answers."""
    (workspace / "runbooks" / "long-action.yaml").write_text(long_action_runbook(4500))
    async with chat_bench(settings) as (standin, service):
        await confirm_run(standin, INCIDENTS, ALICE, "incident: long action drill")
        root_id = await waiting_root(service)
        answer = await ask(standin, INCIDENTS, ALICE, f"/status {root_id}")
        assert "Something went wrong" not in answer["text"], answer["text"]
        assert "Waiting for approval" in answer["text"]


# -- /explain and /trace ---------------------------------------------------------------------


async def test_explain_answers_with_a_short_step_list(bench: Bench) -> None:
    """/explain in people's words: each step's state, the open request, who asked (by
    @name), and where the journal is (/trace); no JSON, no kernel words, no child ids."""
    run_id, _ = await bench.start_run(INCIDENTS, "incident: API latency spike")
    answer = await bench.ask(
        INCIDENTS, ALICE, f"/explain {run_id}", starts_with(f"🛑 Run {run_id} ·")
    )
    text = text_of(answer)
    lines = text.splitlines()
    assert lines[0] == f"🛑 Run {run_id} · waiting for approval · api-latency-spike"
    assert lines[1].startswith("Asked by @alice at ")
    for expected in (
        "✅ 1. pods: ok (once)",
        "✅ 3. logs: ok (once)",
        "▫️ 4. scale-out: not run",
        "▫️ 7. handoff: not run",
    ):
        assert expected in lines, (expected, lines)
    [request] = [line for line in lines if line.startswith("#1 scale-out: waiting, deadline in")]
    assert request.endswith(" UTC)")
    assert lines[-1] == f"Every call and answer, in order: /trace {run_id}"
    for kernel_word in ("{", "telegram:", ":sub:", "waiting_", "execute_step", "role "):
        assert kernel_word not in text, kernel_word
    assert len(text) < 1500


async def test_trace_sends_an_offline_html_document(bench: Bench) -> None:
    run_id, _ = await bench.start_run(INCIDENTS, "incident: API latency spike")
    answer = await bench.ask(
        INCIDENTS, ALICE, f"/trace {run_id}", lambda text: text.startswith("Trace of run")
    )
    document = answer["document"]
    assert document["file_name"] == f"{run_id}.html"
    assert run_id in text_of(answer)
    html = bench.standin.document_bytes(document["file_id"]).decode("utf-8")
    assert html.lstrip().startswith("<!DOCTYPE html") or "<html" in html
    assert run_id in html
    assert "scale-out" in html
    # Self-contained: nothing is fetched from anywhere when it is opened.
    lowered = html.lower()
    assert "<script src" not in lowered
    assert not re.search(r"<link[^>]*href", lowered)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", lowered)
    assert "@import" not in lowered and "url(http" not in lowered


async def test_postmortem_sends_a_markdown_draft_from_the_journal(bench: Bench) -> None:
    run_id, _ = await bench.start_run(INCIDENTS, "incident: API latency spike")
    answer = await bench.ask(
        INCIDENTS,
        ALICE,
        f"/postmortem {run_id}",
        lambda text: text.startswith("Post-mortem draft of run"),
    )
    document = answer["document"]
    assert document["file_name"] == f"postmortem-{run_id}.md"
    draft = bench.standin.document_bytes(document["file_id"]).decode("utf-8")
    assert draft.startswith("# Post-mortem draft: ")
    assert "by @alice (telegram)" in draft  # people as the chat knows them
    assert "asked group:approvers to decide #1: step scale-out:" in draft
    assert "## Cause" in draft and "## Follow-ups" in draft


# -- /cancel ---------------------------------------------------------------------------------


async def test_cancel_by_someone_else_is_refused(bench: Bench) -> None:
    run_id, request = await bench.start_run(INCIDENTS, "incident: API latency spike")
    answer = await bench.ask(INCIDENTS, MALLORY, f"/cancel {run_id}", starts_with("Only"))
    assert text_of(answer) == "Only an approver or whoever started the run may cancel it."
    assert (await bench.service.get(run_id)).status == RunStatus.WAITING_CHILDREN
    assert await bench.service.pending_approval(run_id) is not None
    assert keyboard_data(bench.current(INCIDENTS, request["message_id"]))


async def test_cancel_by_the_requester_cancels_the_run(bench: Bench) -> None:
    run_id, _ = await bench.start_run(INCIDENTS, "incident: API latency spike")
    answer = await bench.ask(INCIDENTS, ALICE, f"/cancel {run_id}", starts_with("🚫 Cancelled"))
    assert text_of(answer) == f"🚫 Cancelled run {run_id}."
    summary = await bench.summary(INCIDENTS, run_id)
    assert f"Run {run_id}: CANCELLED" in text_of(summary)
    assert (await bench.service.get(run_id)).status == RunStatus.CANCELLED
    assert await bench.service.pending_approval(run_id) is None


async def test_cancel_edits_the_approval_message(bench: Bench) -> None:
    """After /cancel the approval request says so and has no buttons left to tap."""
    run_id, request = await bench.start_run(INCIDENTS, "incident: API latency spike")
    await bench.ask(INCIDENTS, ALICE, f"/cancel {run_id}", starts_with("🚫 Cancelled"))
    await bench.summary(INCIDENTS, run_id)
    # Every outbox entry of the run is delivered by now: the sender is idle.
    await outbox_idle(bench.service)
    edited = bench.current(INCIDENTS, request["message_id"])
    assert "Cancelled with the run by @alice" in text_of(edited), text_of(edited)
    assert not keyboard_data(edited)


# -- /approve and /reject --------------------------------------------------------------------


async def test_approve_by_text_needs_an_approver(bench: Bench) -> None:
    run_id, request = await bench.start_run(INCIDENTS, "incident: API latency spike")
    answer = await bench.ask(
        INCIDENTS, MALLORY, f"/approve {run_id}", starts_with("You are not an approver")
    )
    assert "TELEGRAM_APPROVER_IDS" in text_of(answer)
    assert (await bench.service.get(run_id)).status == RunStatus.WAITING_CHILDREN
    pending = await bench.service.pending_approval(run_id)
    assert pending is not None and pending.decided_by is None
    assert keyboard_data(bench.current(INCIDENTS, request["message_id"]))


async def test_approve_by_text_resumes_the_run(bench: Bench) -> None:
    run_id, request = await bench.start_run(INCIDENTS, "incident: API latency spike")
    answer = await bench.ask(INCIDENTS, BOB, f"/approve {run_id}", starts_with("Approved"))
    number = re.fullmatch(r"Approved request #(\d+) of run (\S+)\.", text_of(answer))
    assert number is not None, text_of(answer)
    assert number.group(2).startswith(run_id)

    summary = await bench.summary(INCIDENTS, run_id)
    assert f"Run {run_id}: SUCCEEDED" in text_of(summary)
    assert "approved by @bob (telegram:100000001)" in text_of(summary)
    await wait_for(
        bench.standin,
        lambda: "Approved by @bob" in text_of(bench.current(INCIDENTS, request["message_id"])),
    )
    assert not keyboard_data(bench.current(INCIDENTS, request["message_id"]))
    assert (await bench.service.get(run_id)).status == RunStatus.SUCCEEDED

    # Naming the request again changes nothing, and says who decided it.
    again = await bench.ask(
        INCIDENTS, BOB, f"/approve {run_id} #{number.group(1)}", starts_with("Already")
    )
    assert text_of(again) == "Already approved by @bob; nothing changed."
    # Without the number, the finished run has nothing left to decide.
    bare = await bench.ask(INCIDENTS, BOB, f"/approve {run_id}", lambda t: "nothing" in t)
    assert text_of(bare) == f"Refused: run {run_id} is already succeeded; nothing to decide"
    assert (await bench.service.get(run_id)).status == RunStatus.SUCCEEDED
    assert len(summaries(bench.standin, INCIDENTS, run_id)) == 1


async def test_second_approve_while_the_run_goes_on_says_already_approved(
    bench: Bench, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two approvers type /approve at once: the second learns it was approved already. The
    executor's resumed drive is held so the run is still going at the second /approve."""
    run_id, request = await bench.start_run(INCIDENTS, "incident: API latency spike")
    release = asyncio.Event()
    kernel = bench.service.kernel
    drive = kernel.drive

    async def held(target: str, claimed: bool = False) -> Any:
        if target.endswith(":sub:executor"):
            await release.wait()
        return await drive(target, claimed)

    monkeypatch.setattr(kernel, "drive", held)
    try:
        await bench.ask(INCIDENTS, BOB, f"/approve {run_id}", starts_with("Approved request"))
        assert (await bench.service.get(run_id)).status == RunStatus.WAITING_CHILDREN
        again = await bench.ask(
            INCIDENTS, BOB, f"/approve {run_id}", lambda t: t.startswith(("Already", "Refused"))
        )
        assert text_of(again) == "Already approved by @bob; nothing changed."
    finally:
        release.set()
        await bench.summary(INCIDENTS, run_id)
    assert (await bench.service.get(run_id)).status == RunStatus.SUCCEEDED
    assert "Approved by @bob" in text_of(bench.current(INCIDENTS, request["message_id"]))


async def test_a_person_of_the_people_file_decides_outside_telegram_approver_ids(
    bench: Bench, settings: Settings
) -> None:
    """MALLORY is in no TELEGRAM_APPROVER_IDS; once the people file puts her in
    group:approvers (which api-latency-spike names), her /approve decides."""
    run_id, _ = await bench.start_run(INCIDENTS, "incident: API latency spike")
    refused = await bench.ask(INCIDENTS, MALLORY, f"/approve {run_id}", starts_with("You are"))
    assert text_of(refused).startswith("You are not an approver here")
    people = settings.workspace / "people.yaml"
    joined = "  - name: mel\n    telegram: 100000066\n    groups: [approvers]\n"
    people.write_text(people.read_text() + joined)

    answer = await bench.ask(INCIDENTS, MALLORY, f"/approve {run_id}", starts_with("Approved"))

    assert text_of(answer).startswith("Approved")
    tree = await bench.service.run_tree(run_id)
    assert [a.decided_by for a in tree.approvals] == ["telegram:100000066"]


async def test_approve_by_a_non_runbook_approver_is_refused(bench: Bench) -> None:
    """CAROL is a Telegram approver, but api-latency-spike names group:approvers, and the
    people file puts her (lead) only in group leads."""
    run_id, request = await bench.start_run(INCIDENTS, "incident: API latency spike")
    answer = await bench.ask(INCIDENTS, CAROL, f"/approve {run_id}", starts_with("Refused"))
    assert "(telegram:100000002) may not decide this request" in text_of(answer)
    assert (await bench.service.get(run_id)).status == RunStatus.WAITING_CHILDREN
    assert keyboard_data(bench.current(INCIDENTS, request["message_id"]))


async def test_each_refused_approve_is_logged_once_with_its_reason(
    bench: Bench, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Each refused /approve is one WARNING line naming the chat, the sender, the run (and
    request) and why: not in the runbook's approvers; then, with the people file broken, an
    approver of TELEGRAM_APPROVER_IDS (the file's error) and someone who is not."""
    caplog.set_level("WARNING", logger="bot.handlers")
    run_id, _ = await bench.start_run(INCIDENTS, "incident: API latency spike")
    await bench.ask(INCIDENTS, CAROL, f"/approve {run_id}", starts_with("Refused"))
    people = settings.workspace / "people.yaml"
    people.write_text("people:\n  - name: sam\n    grups: [approvers]\n")
    await bench.ask(INCIDENTS, BOB, f"/approve {run_id} #1", starts_with("Refused"))
    await bench.ask(INCIDENTS, MALLORY, f"/approve {run_id}", starts_with("You are not"))

    lines = [
        r.getMessage()
        for r in caplog.records
        if r.levelname == "WARNING" and r.getMessage().startswith("refused a decision")
    ]
    assert len(lines) == 3, lines
    carol, bob, mallory = lines
    assert carol == (
        f"refused a decision in chat {INCIDENTS} by telegram:{CAROL} on run {run_id}: "
        "lead (telegram:100000002) may not decide this request (runbook approvers: "
        "group:approvers)"
    )
    assert bob.startswith(
        f"refused a decision in chat {INCIDENTS} by telegram:{BOB} on run {run_id} request #1: "
        f"{people}:3: "
    ), bob
    assert mallory.startswith(
        f"refused a decision in chat {INCIDENTS} by telegram:{MALLORY} on run {run_id}: not in "
        f"TELEGRAM_APPROVER_IDS, and the people file cannot be read: {people}:3: "
    ), mallory
    assert (await bench.service.get(run_id)).status == RunStatus.WAITING_CHILDREN


async def test_reject_by_text_with_a_reason(bench: Bench) -> None:
    """CAROL rejects a failed-deploy rollback (a runbook naming her) with a reason."""
    other, _ = await bench.start_run(INCIDENTS, "incident: API latency spike")
    run_id, request = await bench.start_run(INCIDENTS, "failed-deploy-rollback service=checkout")
    answer = await bench.ask(
        INCIDENTS, CAROL, f"/reject {run_id} too risky today", starts_with("Rejected")
    )
    assert re.fullmatch(r"Rejected request #\d+ of run \S+\.", text_of(answer)), text_of(answer)

    summary = text_of(await bench.summary(INCIDENTS, run_id))
    # The supervisor ends the incident run as failed once its executor is rejected; the chat
    # says what happened: rejected, by whom and why, once.
    assert summary.startswith(f"Run {run_id}: REJECTED")
    assert "gate for rollback: rejected by @carol (telegram:100000002)" in summary
    assert summary.count("too risky today") == 1, summary
    status = await bench.ask(INCIDENTS, ALICE, f"/status {run_id}", starts_with("❌"))
    assert text_of(status).splitlines()[0].startswith(f"❌ {run_id} rejected")
    assert "Outcome: rejected by @carol: too risky today" in text_of(status)
    await wait_for(
        bench.standin,
        lambda: "Rejected by @carol" in text_of(bench.current(INCIDENTS, request["message_id"])),
    )
    edited = bench.current(INCIDENTS, request["message_id"])
    assert "too risky today" in text_of(edited)
    assert not keyboard_data(edited)
    assert (await bench.service.get(f"{run_id}:sub:executor")).status == RunStatus.REJECTED
    assert (await bench.service.get(run_id)).status == RunStatus.FAILED
    # The other run was not touched.
    assert (await bench.service.get(other)).status == RunStatus.WAITING_CHILDREN


async def test_a_reject_reason_starting_with_a_number_is_a_reason(settings: Settings) -> None:
    """`/reject <id> 5 pods are crashlooping` rejects the run's request with that reason (the
    5 is not a request number)."""
    async with chat_bench(settings) as (standin, _):
        await confirm_run(standin, INCIDENTS, ALICE, LATENCY)
        run_id = run_id_of(await wait_for_approval(standin, INCIDENTS))
        answer = await ask(
            standin, INCIDENTS, BOB, f"/reject {run_id} 5 pods are crashlooping, not now"
        )
        assert answer["text"].startswith("Rejected request #"), answer["text"]


# -- /runbooks -------------------------------------------------------------------------------


async def test_runbooks_lists_the_shipped_runbooks(bench: Bench) -> None:
    answer = await bench.ask(INCIDENTS, ALICE, "/runbooks", starts_with("Runbooks"))
    text = text_of(answer)
    for runbook_id in SHIPPED:
        assert f"{runbook_id} — " in text
    assert "(7 steps, 1 gated)" in text  # api-latency-spike: one gate, on scale-out


# -- HTML in what people type ----------------------------------------------------------------


async def test_html_in_the_request_is_shown_literally(bench: Bench) -> None:
    typed = "API latency <b>spike</b> & </pre> <script>x</script> on checkout &amp;"
    run_id, request = await bench.start_run(INCIDENTS, f"incident: {typed}")
    progress = [m for m in from_bot(bench.standin, INCIDENTS) if f"Run {run_id} ·" in text_of(m)]
    assert progress and f"incident: {typed}" in text_of(progress[0])

    approve = next(d for d in keyboard_data(request) if d.endswith(":y"))
    bench.standin.inject_callback(INCIDENTS, request["message_id"], BOB, approve)
    summary = await bench.summary(INCIDENTS, run_id)
    assert "<b>spike</b> &" in text_of(summary)
    assert f"Request:   incident: {typed}" in text_of(summary)
    assert (await bench.service.get(run_id)).status == RunStatus.SUCCEEDED

    await outbox_idle(bench.service)  # every entry of the run has been tried
    with contextlib.closing(sqlite3.connect(bench.service.settings.db)) as conn:
        [(failed,)] = conn.execute("SELECT COUNT(*) FROM outbox WHERE failed_at IS NOT NULL")
    assert failed == 0  # a 400 for unparsable HTML would have left a failed entry


# -- a failing handler -----------------------------------------------------------------------


async def test_a_handler_exception_does_not_kill_the_bot(
    bench: Bench, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the database went for coffee")

    monkeypatch.setattr(bench.service, "chat_runs", broken)
    answer = await bench.ask(INCIDENTS, ALICE, "/runs", starts_with("⚠️"))
    assert text_of(answer) == "⚠️ Something went wrong; it is logged."
    assert "the database went for coffee" in caplog.text
    monkeypatch.undo()

    await bench.ask(INCIDENTS, ALICE, "/help", starts_with(HELP_HEAD))
    await bench.ask(INCIDENTS, ALICE, "/runs", starts_with("No runs"))


# -- stopping --------------------------------------------------------------------------------


async def test_an_outbox_sender_stopped_as_it_claims_a_chat_gives_the_lease_back(
    settings: Settings,
) -> None:
    """Stopped while its claim of a chat's delivery lease commits (the commit is in, its
    answer not back yet), the sender still gives the lease back: a restarted bot delivers
    the chat at once instead of waiting for the lease to run out."""
    service = await RunService.open(settings, executes_runs=False)
    chat = ChatStore(service.database)
    claimed = asyncio.Event()
    claim = chat.claim_chat

    async def claim_then_linger(chat_id: int, owner: str, ttl: float) -> bool:
        held = await claim(chat_id, owner, ttl)
        claimed.set()
        await asyncio.sleep(0.5)  # the answer on its way back when the stop comes
        return held

    chat.claim_chat = claim_then_linger  # type: ignore[method-assign]
    sender = OutboxSender(service, chat, Bot(TOKEN), progress_interval=0.3)
    try:
        await service.start("leased", LATENCY, origin=Origin("telegram", INCIDENTS))
        task = asyncio.create_task(sender.run(), name="test:outbox-sender")
        await asyncio.wait_for(claimed.wait(), 5)
        assert [row[0] for row in raw_rows(settings.db, "SELECT chat_id FROM chat_leases")] == [
            INCIDENTS
        ]
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert raw_rows(settings.db, "SELECT chat_id, owner FROM chat_leases") == []
    finally:
        await service.close()


async def test_an_outbox_sender_stopped_as_it_gives_a_chat_back_still_gives_it_back(
    settings: Settings,
) -> None:
    """A drain that ended (nothing due) gives the chat's lease back; a bot stopping at that
    moment cancels the drain in the middle of it. The lease is still given back: a restarted
    bot delivers the chat at once instead of waiting for the lease to run out."""
    service = await RunService.open(settings, executes_runs=False)
    chat = ChatStore(service.database)
    releasing = asyncio.Event()
    release = chat.release_chat

    async def slow_release(chat_id: int, owner: str) -> None:
        releasing.set()
        await asyncio.sleep(0.3)  # the stop comes now
        await release(chat_id, owner)

    async def nothing_due(chat_id: int) -> bool:
        return False

    chat.release_chat = slow_release  # type: ignore[method-assign]
    sender = OutboxSender(service, chat, Bot(TOKEN), progress_interval=0.3)
    sender._drain_batch = nothing_due  # type: ignore[method-assign]
    try:
        await service.start("given-back", LATENCY, origin=Origin("telegram", INCIDENTS))
        task = asyncio.create_task(sender.run(), name="test:outbox-sender")
        await asyncio.wait_for(releasing.wait(), 5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert raw_rows(settings.db, "SELECT chat_id, owner FROM chat_leases") == []
    finally:
        await service.close()


async def test_outbox_sender_stops_when_cancelled_just_after_a_wake(settings: Settings) -> None:
    """serve_bot stops by cancelling the outbox task and gathering it (bot/gateway.py). A run
    that commits a chat message at that moment sets `outbox_ready` just before the cancel:
    the sender must still stop, or `loom-ops telegram` never exits on SIGTERM."""
    service = await RunService.open(settings)
    chat = ChatStore(service.database)
    sender = OutboxSender(service, chat, Bot(TOKEN), progress_interval=0.3)
    task = asyncio.create_task(sender.run(), name="test:outbox-sender")
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        # Parked: nothing to deliver, waiting on the store's wake-up event.
        while not service.store.outbox_ready._waiters:  # type: ignore[attr-defined]
            assert loop.time() < deadline, "the sender never waited for work"
            await asyncio.sleep(0.01)
        service.store.outbox_ready.set()  # a commit that queued a message...
        task.cancel()  # ...as the gateway stops
        done, _ = await asyncio.wait([task], timeout=1.5)
        assert task in done, "the outbox sender ignored its cancellation and kept running"
    finally:
        for _ in range(3):
            if task.done():
                break
            task.cancel()
            await asyncio.wait([task], timeout=3)
        await service.close()
