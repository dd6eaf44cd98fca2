"""The chat in people's words: the approval card carries what a person needs to decide (LIVE
or DRY-RUN, where, #N, the deadline as "in 9 min (05:14 UTC)", the rollback, what the steps so
far found); a failed step says what it said; a rejection reads as one, once; identities are
@names; and nothing shows kernel words or JSON."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

from agent.records import ApprovalKind, ApprovalRecord, ApprovalStatus, Origin, RunStatus
from agent.settings import Settings
from bot.messages import approval_text, in_words, shown_status, until
from tests.bot_harness import (
    ALICE,
    BOB,
    INCIDENTS,
    JSON,
    approval_messages,
    chat_bench,
    confirm_run,
    from_bot,
    keyboard_data,
    run_id_of,
    summaries,
    wait_for,
    wait_for_approval,
)
from tests.support import open_service, write_runbook

FAIL_RUNBOOK = """\
id: fail-drill
title: Failing fetch drill
description: Its first command fails, saying why on stderr.
triggers: [fail drill]
approvers: [telegram:100000001]
steps:
  - id: fetch
    title: Fetch the release list
    run: "{python} fail.py"
  - id: act
    title: Act on it
    run: "{python} append.py one"
    approval: required
"""

FAIL_SCRIPT = """\
import sys
print("fetching releases from https://10.0.0.1/releases", file=sys.stderr)
print("dial tcp 10.0.0.1:443: connect: connection refused", file=sys.stderr)
sys.exit(1)
"""


def _progress(standin: object, run_id: str) -> JSON:
    head = re.compile(rf"^\S+ Run {re.escape(run_id)} · ")
    [message] = [m for m in from_bot(standin, INCIDENTS) if head.match(m["text"])]  # type: ignore[arg-type]
    return message


def _allow(workspace: Path, argv: list[str]) -> None:
    path = workspace / "ops.shell.allowlist.json"
    allowlist = json.loads(path.read_text())
    allowlist["rules"].append({"argv": argv})
    path.write_text(json.dumps(allowlist))


async def test_the_approval_card_carries_what_a_decision_needs(settings: Settings) -> None:
    """DRY-RUN, where it runs, #1, the root run id only, the deadline in minutes and as a
    time, the rollback, the evidence of the steps already run, and the command to type."""
    async with chat_bench(settings) as (standin, _):
        # Bob has spoken in the chat, so the bot knows him by name.
        standin.inject_message(INCIDENTS, BOB, "/help")
        await wait_for(standin, lambda: from_bot(standin, INCIDENTS))
        await confirm_run(standin, INCIDENTS, ALICE, "incident: API latency spike")
        request = await wait_for_approval(standin, INCIDENTS)
        run_id = run_id_of(request)
        text = request["text"]
        lines = text.splitlines()
        assert lines[0] == "🛑 Approval needed #1"
        assert lines[1] == "🧪 DRY-RUN: nothing is executed for real"
        assert lines[2].startswith("Runs on: this host (")
        assert f"Run: {run_id}" in lines and ":sub:" not in text
        assert re.search(r"^Deadline: in 10 min \(\d\d:\d\d UTC\)$", text, re.M), text
        assert "Rollback: kubectl scale deployment/checkout-api -n production --replicas=3" in text
        assert "What the steps so far found:" in text
        evidence = [e for e in request.get("entities", []) if e["type"] == "pre"]
        assert len(evidence) == 1
        assert "logs: ok" in text
        assert f"Or type /approve {run_id} #1 · /reject {run_id} #1 reason" in text
        assert "Approvers: group:approvers" in text

        approve = next(d for d in keyboard_data(request) if d.endswith(":y"))
        standin.inject_callback(INCIDENTS, request["message_id"], BOB, approve)
        await wait_for(standin, lambda: summaries(standin, INCIDENTS, run_id))
        [decided] = [m for m in from_bot(standin, INCIDENTS) if m["text"].startswith("🛑 Appr")]
        # Decided: the deadline is a date, the command hint is gone, who decided is said.
        assert re.search(r"^Deadline: \d{4}-\d\d-\d\d \d\d:\d\d UTC$", decided["text"], re.M)
        assert "/approve" not in decided["text"] and "✅ Approved by @bob at " in decided["text"]


async def test_a_live_card_says_live_and_a_failed_step_says_why(
    settings: Settings, workspace: Path
) -> None:
    """With commands run for real the card says LIVE; a command that fails shows the tail of
    its stderr in the progress message, /status and the summary, not just "exit 1: argv"."""
    python = str(Path(sys.executable).absolute())
    (workspace / "runbooks" / "fail-drill.yaml").write_text(FAIL_RUNBOOK.format(python=python))
    (workspace / "fail.py").write_text(FAIL_SCRIPT)
    _allow(workspace, [python, "fail.py"])
    live = settings.model_copy(update={"allow_shell": True})
    async with chat_bench(live, progress_interval=0.1) as (standin, service):
        card = await confirm_run(standin, INCIDENTS, ALICE, "crash drill")
        assert "🔴 LIVE: 2 of 4 steps act for real" in card["text"]
        request = await wait_for_approval(standin, INCIDENTS)
        assert request["text"].splitlines()[1] == "🔴 LIVE: this acts for real"
        assert "append-one: ok" in request["text"]

        await confirm_run(standin, INCIDENTS, ALICE, "fail drill")
        await wait_for(
            standin,
            lambda: any(
                re.match(r"^\S+ Run tg-\w+ · .* · fail-drill", m["text"])
                for m in from_bot(standin, INCIDENTS)
            ),
        )
        roots = [r for r in await service.store.list_runs() if r.parent_id is None]
        [failing] = [r for r in roots if "fail drill" in r.request]
        await wait_for(standin, lambda: summaries(standin, INCIDENTS, failing.id), 20)
        said = "exit 1: dial tcp 10.0.0.1:443: connect: connection refused"
        # The progress message is edited at most every progress_interval: the failed step
        # shows while the run still says running, and the run's end comes in a later edit.
        failed_head = f"💥 Run {failing.id} · failed · fail-drill"
        await wait_for(
            standin, lambda: _progress(standin, failing.id)["text"].startswith(failed_head)
        )
        progress = _progress(standin, failing.id)["text"]
        assert f"Steps: 0 of 2 done; last fetch failed: {said}" in progress
        [summary] = summaries(standin, INCIDENTS, failing.id)
        assert said.split(": ", 1)[1] in summary["text"]

        asked = standin.inject_message(INCIDENTS, ALICE, f"/status {failing.id}")

        def answer() -> list[JSON]:
            return [
                m
                for m in from_bot(standin, INCIDENTS)
                if m["message_id"] > asked["message_id"] and m["text"].startswith("💥")
            ]

        await wait_for(standin, answer)
        assert f"last fetch failed: {said}" in answer()[0]["text"]


async def test_a_rejection_reads_as_rejected_once(settings: Settings) -> None:
    """The executor is rejected, so the supervised run fails: the chat says rejected (the
    progress message, the summary, /runs), by @bob, with the reason once."""
    async with chat_bench(settings, progress_interval=0.1) as (standin, service):
        await confirm_run(standin, INCIDENTS, ALICE, "incident: API latency spike")
        request = await wait_for_approval(standin, INCIDENTS)
        run_id = run_id_of(request)
        standin.inject_message(INCIDENTS, BOB, f"/reject {run_id} #1 the canary looks fine")
        await wait_for(standin, lambda: summaries(standin, INCIDENTS, run_id))
        assert (await service.get(run_id)).status == RunStatus.FAILED  # as the kernel has it
        await wait_for(
            standin, lambda: _progress(standin, run_id)["text"].startswith(f"❌ Run {run_id} ·")
        )
        assert "rejected" in _progress(standin, run_id)["text"].splitlines()[0]
        [summary] = summaries(standin, INCIDENTS, run_id)
        text = summary["text"]
        assert text.startswith(f"Run {run_id}: REJECTED") and "FAILED" not in text
        assert text.count("the canary looks fine") == 1, text
        assert "rejected by @bob (telegram:100000001)" in text
        asked = standin.inject_message(INCIDENTS, ALICE, "/runs")
        await wait_for(
            standin,
            lambda: any(
                m["message_id"] > asked["message_id"] and m["text"].startswith("Recent")
                for m in from_bot(standin, INCIDENTS)
            ),
        )
        listing = from_bot(standin, INCIDENTS)[-1]["text"]
        assert f"❌ {run_id} rejected · api-latency-spike · by @alice" in listing
        for kernel_word in ("💥", "failed", "waiting_", ":sub:", "telegram:"):
            assert kernel_word not in listing, kernel_word


# -- the words themselves ---------------------------------------------------------------------


def test_a_deadline_reads_as_time_left_and_a_clock() -> None:
    now = 1_800_000_000.0  # 2027-01-15 08:00 UTC
    assert until(now + 9 * 60 + 10, now) == "in 9 min (08:09 UTC)"
    assert until(now + 20, now) == "in less than a minute (08:00 UTC)"
    assert until(now + 2 * 3600 + 5 * 60, now) == "in 2 h 5 min (10:05 UTC)"
    assert until(now + 3600, now) == "in 1 h (09:00 UTC)"
    assert until(now - 60, now) == "passed (07:59 UTC)"
    assert until(now + 3 * 86400, now) == "in 72 h (2027-01-18 08:00 UTC)"


def test_identities_in_free_text_become_names() -> None:
    names = {"telegram:100000001": "@bob"}
    who = lambda identity: names.get(identity, identity)  # noqa: E731
    text = "executor rejected: rejected by telegram:100000001: no; telegram:5 asked"
    assert in_words(text, who) == "executor rejected: rejected by @bob: no; telegram:5 asked"


def test_the_status_a_person_reads_for_a_tree() -> None:
    failed, rejected = RunStatus.FAILED, RunStatus.REJECTED
    assert shown_status(failed, [RunStatus.SUCCEEDED, rejected], False) == rejected
    assert shown_status(failed, [RunStatus.EXPIRED], False) == RunStatus.EXPIRED
    assert shown_status(failed, [RunStatus.FAILED], False) == failed
    assert shown_status(RunStatus.WAITING_CHILDREN, [], True) == RunStatus.WAITING_APPROVAL
    assert shown_status(RunStatus.WAITING_CHILDREN, [], False) == RunStatus.RUNNING
    assert shown_status(RunStatus.SUCCEEDED, [rejected], False) == RunStatus.SUCCEEDED


def _record(**changes: object) -> ApprovalRecord:
    values: dict[str, object] = {
        "id": 41,
        "token": "t0k3n",
        "run_id": "inc-1:sub:executor",
        "call_key": "inc-1:sub:executor#3.0",
        "kind": ApprovalKind.GATE,
        "step_id": "scale-out",
        "action": "kubectl scale deployment/web --replicas=6",
        "reason": "Scale the deployment out",
        "rollback": None,
        "deciders": ["telegram:100000001"],
        "four_eyes": False,
        "requested_by": "telegram:100000050",
        "status": ApprovalStatus.PENDING,
        "decided_by": None,
        "decided_at": None,
        "note": None,
        "created_at": 1_800_000_000.0,
        "deadline_at": 1_800_000_600.0,
    }
    return ApprovalRecord(**(values | changes))  # type: ignore[arg-type]


def test_a_card_of_an_older_request_leaves_out_what_it_lacks() -> None:
    """A request recorded before cards carried a number, mode, place and evidence renders
    without them; the outbox entry's payload fills in what it has."""
    names = {"telegram:100000001": "@bob", "telegram:100000050": "@alice"}

    def who(identity: str) -> str:
        return names.get(identity, identity)

    old = approval_text(_record(), "inc-1", "api-latency-spike", "telegram:100000050", who, 1.8e9)
    assert old.splitlines()[0] == "🛑 <b>Approval needed</b>"
    for absent in ("LIVE", "DRY-RUN", "Runs on", "found", "/approve", "#"):
        assert absent not in old, absent
    assert "Run: <code>inc-1</code>\n" in old and "Rollback: none" in old
    assert "Deadline: in 10 min (08:10 UTC)" in old and "Asked by: @alice" in old

    facts = {"number": 2, "mode": "live", "runs_on": "any worker", "evidence": ["pods: ok"]}
    filled = approval_text(
        _record(), "inc-1", "api-latency-spike", "telegram:100000050", who, 1.8e9, facts
    )
    assert filled.splitlines()[:3] == [
        "🛑 <b>Approval needed #2</b>",
        "🔴 <b>LIVE</b>: this acts for real",
        "Runs on: any worker",
    ]
    assert "<pre>pods: ok</pre>" in filled
    assert "<code>/approve inc-1 #2</code>" in filled
    # The record's own values win over the payload's.
    own = approval_text(
        _record(number=1, mode="dry-run", evidence=["logs: ok"]),
        "inc-1",
        None,
        "telegram:100000050",
        who,
        time.time(),
        facts,
    )
    assert "#1</b>" in own and "DRY-RUN" in own and "logs: ok" in own and "pods" not in own


QUICK = """\
id: quick-look
title: A quick look
triggers: [quick look]
steps:
  - id: look
    title: Look around
    note: nothing to do
"""


async def test_an_approval_card_goes_out_ahead_of_a_flood_of_other_news(
    settings: Settings,
) -> None:
    """Twelve runs from the chat finished (their progress and summaries wait to be sent)
    before an incident asked for approval: the card is the first message the bot sends, so
    a flood of other runs' news cannot hold up the approver (at 20 messages a minute in a
    group, twelve of them would be half a minute)."""
    write_runbook(settings.workspace, "quick-look", QUICK)
    origin = Origin(kind="telegram", chat_id=INCIDENTS)
    async with open_service(settings) as service:
        for i in range(12):
            done = await service.start(f"noise-{i}", "quick-look", origin=origin)
            assert done.status == RunStatus.SUCCEEDED
        waiting = await service.start("incident", "incident: API latency spike", origin=origin)
        assert waiting.status == RunStatus.WAITING_APPROVAL
    async with chat_bench(settings) as (standin, _):
        await wait_for(standin, lambda: approval_messages(standin, INCIDENTS))
        await wait_for(standin, lambda: len(summaries(standin, INCIDENTS)) == 12)
        sent = from_bot(standin, INCIDENTS)
        assert "Approval needed" in sent[0]["text"], [m["text"][:40] for m in sent[:3]]
