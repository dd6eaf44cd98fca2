"""The run kernel through the real RunService: the gate and the checks hold against a rogue
policy, budgets end runs, live steps fail readably, secrets never reach the database, journaled
policy turns are reused, cancels stop what runs, many runs share one process, and leases keep
two drivers apart and are handed back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.chain import first_broken_link
from agent.errors import RunBusy
from agent.policy.base import PolicyContext, PolicyDecision, ToolCall
from agent.records import Decision, Origin, RunLimits, RunStatus
from agent.run.leases import owner_is_dead
from agent.service.runs import RunService
from agent.settings import Settings
from agent.store import NewRun, RunStore
from bench.roundtrips import count_store
from tests.support import (
    DEPLOY,
    DISK,
    LATENCY,
    CountingPolicy,
    ScriptedPolicy,
    allow,
    call,
    final,
    lines,
    open_service,
    raw_rows,
    table_text,
    turn,
    write_runbook,
)

LIVE_DRILL = """\
id: live-drill
title: Live drill
triggers: [live drill]
approvers: [cli:approver]
params:
  mode:
    description: What act.py does
    choices: [fail, leak, nul, ok]
    default: ok
steps:
  - id: act
    title: Act
    run: "{python} act.py {{ mode }}"
    retries: 2
  - id: gate
    title: Gated finish
    note: finishing
    approval: required
"""

ACT_SCRIPT = """\
import sys
with open("attempts.txt", "a") as handle:
    handle.write(sys.argv[1] + "\\n")
if sys.argv[1] == "fail":
    print("boom: the disk is on fire", file=sys.stderr)
    sys.exit(3)
if sys.argv[1] == "leak":
    print("export GITHUB_TOKEN=ghp_A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8")
    print("Authorization: Bearer abcdefghijklmnopqrstuvwxyz0123")
if sys.argv[1] == "nul":
    print("before\\0after")
"""

DENY_DRILL = """\
id: deny-drill
title: Deny drill
triggers: [deny drill]
steps:
  - id: three
    title: Not admitted by the allowlist
    run: "{python} append.py three"
    retries: 2
  - id: touch
    title: Never reached
    run: touch pwned
"""

SLOW_DRILL = """\
id: slow-drill
title: Slow drill
triggers: [slow drill]
steps:
  - id: slow
    title: Takes a while
    run: "{python} append.py slow {{ seconds }}"
    idempotent: true
  - id: fast
    title: Quick
    run: "{python} append.py fast"
params:
  seconds:
    description: How long the slow step sleeps
    pattern: "[0-9.]+"
    default: "0.8"
"""

GITHUB_TOKEN = "ghp_A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"
SECRETS = (
    "hunter2secret",
    GITHUB_TOKEN,
    "abcdefghijklmnopqrstuvwxyz0123",
)
JOURNAL_TABLES = ("events", "tool_calls")


@pytest.fixture
def live(settings: Settings, workspace: Path) -> Settings:
    """Settings that run allowlisted commands for real, with the drills' scripts in place."""
    write_runbook(workspace, "live-drill", LIVE_DRILL)
    write_runbook(workspace, "deny-drill", DENY_DRILL)
    write_runbook(workspace, "slow-drill", SLOW_DRILL)
    (workspace / "act.py").write_text(ACT_SCRIPT)
    allow(workspace, "act.py", "re:fail|leak|nul|ok")
    allow(workspace, "append.py", "re:slow|fast", "**")
    return settings.model_copy(update={"allow_shell": True})


async def _calls(service: RunService, run_id: str) -> list[tuple[str, str | None, str]]:
    """(tool, step_id, status) of each tool call of a run, in order."""
    return [(c.tool, c.step_id, c.status) for c in await service.store.list_tool_calls(run_id)]


async def _event_types(service: RunService, run_id: str) -> list[str]:
    """The types of a run's journal entries, in order."""
    return [event.type for event in await service.store.list_events(run_id)]


# -- the kernel's checks against a rogue policy -----------------------------------------------


async def test_the_gate_holds_whatever_the_policy_says(settings: Settings, workspace: Path) -> None:
    """A policy that skips await_approval gets a refusal; the gated command never runs."""
    policy = ScriptedPolicy(
        [
            turn(call("read_runbook", runbook_id="crash-drill")),
            turn(
                call("execute_step", step_id="append-one"),
                call("execute_step", step_id="append-two"),
            ),
            turn(call("execute_step", step_id="append-two")),  # insists
            final("failed", "the kernel would not let me"),
        ]
    )
    async with open_service(settings.model_copy(update={"allow_shell": True}), policy) as service:
        run = await service.start("rogue", "crash-drill")

        assert run.status == RunStatus.FAILED
        assert run.error == "the kernel would not let me"
        assert lines(workspace) == ["one"]  # live mode works; "two" never ran
        calls = await service.store.list_tool_calls("rogue")
        gated = [c for c in calls if c.step_id == "append-two"]
        assert [c.status for c in gated] == ["refused", "refused"]
        for record in gated:
            assert record.outcome is not None
            assert "requires approval" in record.outcome["refused"]
            assert record.duration_ms is not None
        assert await service.store.list_approvals("rogue") == []
        types = await _event_types(service, "rogue")
        assert "run_interrupted" not in types
        assert first_broken_link(await service.store.list_events("rogue")) is None


async def test_one_approval_runs_a_gated_step_once(settings: Settings, workspace: Path) -> None:
    """A policy that asks to execute the approved step twice: the approved command runs once."""
    script = [
        turn(call("read_runbook", runbook_id="crash-drill")),
        turn(call("await_approval", step_id="append-two", reason="scale")),
        turn(call("execute_step", step_id="append-two")),
        turn(call("execute_step", step_id="append-two")),  # the same risky step, again
        final("succeeded", "done"),
    ]
    live = settings.model_copy(update={"allow_shell": True})
    async with open_service(live, ScriptedPolicy(script)) as service:
        run = await service.start("again", "crash-drill")
        assert run.status == RunStatus.WAITING_APPROVAL
        await service.decide("again", Decision.APPROVE, "cli:approver")

        assert lines(workspace) == ["two"], "the approved command ran more than once"


BAD_CALLS: list[tuple[str, ToolCall, str, str]] = [
    ("unknown-tool", call("delete_everything", path="/"), "refused", "unknown tool"),
    ("other-role", call("rollback_step", step_id="append-two"), "refused", "not available"),
    ("missing-arg", call("execute_step", step="append-one"), "refused", "invalid arguments"),
    ("wrong-type", call("execute_step", step_id=2), "refused", "invalid arguments"),
    ("extra-arg", call("execute_step", step_id="append-one", sudo=True), "refused", "invalid"),
    ("no-such-step", call("execute_step", step_id="rm-rf"), "refused", "not in runbook"),
    ("second-runbook", call("read_runbook", runbook_id="disk-almost-full"), "error", "committed"),
    ("ungated-approval", call("await_approval", step_id="append-one"), "refused", "does not need"),
    ("not-a-check", call("check_health", step_id="append-one"), "refused", "not a health check"),
]


@pytest.mark.parametrize(
    ("bad", "status", "fragment"),
    [pytest.param(c, s, f, id=name) for name, c, s, f in BAD_CALLS],
)
async def test_a_bad_call_is_an_observation_not_a_crash(
    settings: Settings, workspace: Path, bad: ToolCall, status: str, fragment: str
) -> None:
    """Unknown tools, other roles' tools, bad args, foreign steps, a second runbook: refused."""
    policy = ScriptedPolicy(
        [
            turn(call("read_runbook", runbook_id="crash-drill")),
            turn(bad, call("execute_step", step_id="prepare")),
            final("succeeded", "carried on after the refusal"),
        ]
    )
    async with open_service(settings.model_copy(update={"allow_shell": True}), policy) as service:
        run = await service.start("bad", "crash-drill")

        # The kernel went on with the next call; the model's "succeeded" does not make the
        # run succeed with three of its four steps never run.
        assert run.status == RunStatus.FAILED
        assert run.error == (
            "the model reported success; 1 of 4 steps ran; not run: append-one, append-two, verify"
        )
        records = await service.store.list_tool_calls("bad")
        assert [r.tool for r in records] == ["read_runbook", bad.name, "execute_step"]
        observed = records[1]
        assert observed.status == status
        assert observed.outcome is not None
        message = observed.outcome.get("refused") or observed.outcome.get("error")
        assert fragment in str(message)
        assert records[2].status == "ok"
        assert (await service.get("bad")).runbook_id == "crash-drill"
        assert lines(workspace) == []
        assert "run_interrupted" not in await _event_types(service, "bad")


async def test_a_step_before_any_runbook_is_refused(settings: Settings) -> None:
    """Executing a step with no runbook pinned is refused and the policy is told why."""
    policy = ScriptedPolicy([turn(call("execute_step", step_id="append-one"))])
    async with open_service(settings, policy) as service:
        run = await service.start("early", "crash-drill")
        records = await service.store.list_tool_calls("early")
        assert [(r.tool, r.status) for r in records] == [("execute_step", "refused")]
        assert records[0].outcome is not None
        assert "no runbook chosen yet" in records[0].outcome["refused"]
        assert run.status == RunStatus.FAILED and run.error == "script over"


async def test_the_gate_also_holds_for_a_gated_health_check(
    settings: Settings, workspace: Path
) -> None:
    """A gated `check` step must not be reachable through check_health without approval."""
    hits: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hits.append((await reader.read(4096)).split(b"\r\n")[0])
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    write_runbook(
        workspace,
        "gated-check",
        "id: gated-check\ntitle: Gated check\ntriggers: [gated check]\napprovers: [cli:approver]\n"
        "steps:\n  - id: poke\n    title: Flush the cache\n    approval: required\n"
        f"    check:\n      url: http://127.0.0.1:{port}/admin/flush-cache\n",
    )
    policy = ScriptedPolicy(
        [
            turn(call("read_runbook", runbook_id="gated-check")),
            turn(call("check_health", step_id="poke")),
            final("succeeded", "poked"),
        ]
    )
    try:
        async with open_service(
            settings.model_copy(update={"live_checks": True}), policy
        ) as service:
            await service.start("poke", "gated check")
            statuses = [r.status for r in await service.store.list_tool_calls("poke")]
    finally:
        server.close()
        await server.wait_closed()
    assert hits == []
    assert statuses == ["ok", "refused"]


async def test_an_approved_action_cannot_be_changed_by_re_reading_the_runbook(
    settings: Settings,
) -> None:
    """What runs after approval is exactly the action the approval request showed."""
    policy = ScriptedPolicy(
        [
            turn(call("read_runbook", runbook_id="api-latency-spike", params={"replicas": "6"})),
            turn(call("await_approval", step_id="scale-out")),
            turn(
                call(
                    "read_runbook",
                    runbook_id="api-latency-spike",
                    params={"replicas": "600", "namespace": "staging"},
                ),
                call("execute_step", step_id="scale-out"),
            ),
            final("succeeded", "scaled"),
        ]
    )
    async with open_service(settings, policy) as service:
        await service.start("swap", "scale it")
        pending = await service.pending_approval("swap")
        assert pending is not None
        shown = pending.action
        assert shown == "kubectl scale deployment/checkout-api -n production --replicas=6"
        await service.decide("swap", Decision.APPROVE, "cli:oncall")
        executed = [
            r
            for r in await service.store.list_tool_calls("swap")
            if r.tool == "execute_step" and r.status == "ok"
        ]
    # Either the re-read is refused, or what ran is what was approved.
    for record in executed:
        assert record.outcome is not None
        assert " ".join(record.outcome["argv"]) == shown


# -- budgets -----------------------------------------------------------------------------------


async def test_a_new_runs_first_drive_reads_nothing_back_and_a_later_drive_reads_its_journal(
    service: RunService,
) -> None:
    """A run that has taken no turn has journaled no call, gate approval or policy answer:
    its first drive reads none of them back. The drive after its approval does, and goes on
    from them to the end."""
    reads = ("list_tool_calls", "approved_gate_counts", "get_policy_turn")
    counts = count_store(service.store.db)
    run = await service.start("fresh", "incident: API latency spike")
    assert run.status == RunStatus.WAITING_APPROVAL
    first = counts.snapshot()
    assert [label for label in first.calls if label.endswith(reads)] == []
    await service.decide("fresh", Decision.APPROVE, "cli:oncall")
    later = counts.since(first)
    assert sorted(label.rsplit(".", 1)[-1] for label in later.calls if label.endswith(reads)) == [
        "approved_gate_counts",
        "get_policy_turn",
        "list_tool_calls",
    ]
    assert (await service.get("fresh")).status == RunStatus.SUCCEEDED


async def test_a_run_nobody_needs_to_decide_only_writes(
    settings: Settings, workspace: Path
) -> None:
    """A three-step dry run asks the store to create it, claim it, commit each step (with the
    last one's outcome) and end it, and reads nothing: the run it returns is the one its end
    wrote."""
    steps = "\n".join(f"  - id: s{i}\n    title: S{i}\n    run: echo {i}" for i in range(3))
    write_runbook(workspace, "three", f"id: three\ntitle: Three\nsteps:\n{steps}\n")
    service = await RunService.open(settings)
    try:
        counts = count_store(service.store.db)
        run = await service.start("three", "three")
        assert run.status == RunStatus.SUCCEEDED and run.finished_at is not None
        assert {label.rsplit(".", 1)[-1]: n for label, n in counts.calls.items()} == {
            "create_run": 1,
            "claim_run": 1,
            "_begin_call": 5,  # read_runbook, three steps, record_audit
            "_finish": 1,
        }
        assert run == await service.get("three")
    finally:
        await service.close()


async def test_max_steps_ends_the_run(service: RunService) -> None:
    """A run out of policy turns fails with `budget exhausted`, never asking a fourth time."""
    run = await service.start("steps", LATENCY, max_steps=3)
    assert run.status == RunStatus.FAILED
    assert run.error == "budget exhausted: max_steps=3"
    assert run.limits.max_steps == 3
    assert run.checkpoint.steps_used == 3
    assert len(await service.store.list_policy_turns("steps")) == 3
    assert await service.store.list_approvals("steps") == []


async def test_max_tool_calls_ends_the_run(settings: Settings) -> None:
    """A run out of tool calls fails before the next intent is written; the answer that
    asked for that call is journaled all the same, as every answer the policy gave."""
    async with open_service(settings.model_copy(update={"max_tool_calls": 2})) as service:
        run = await service.start("tools", LATENCY)
        assert run.status == RunStatus.FAILED
        assert run.error == "budget exhausted: max_tool_calls=2"
        assert len(await service.store.list_tool_calls("tools")) == 2
        assert run.lease_owner is None
        turns = await service.store.list_policy_turns("tools")
        assert [t.turn for t in turns] == list(range(run.checkpoint.steps_used))


async def test_a_tiny_deadline_ends_the_run(settings: Settings) -> None:
    """A run past its running-time deadline fails with `deadline`, before any tool runs."""
    async with open_service(settings.model_copy(update={"run_deadline": 1e-6})) as service:
        run = await service.start("deadline", LATENCY)
        assert run.status == RunStatus.FAILED
        assert run.error is not None and "deadline" in run.error
        assert await service.store.list_tool_calls("deadline") == []


async def test_the_deadline_cuts_a_running_command_short(live: Settings, workspace: Path) -> None:
    """A command that would outlive the run's deadline is stopped at it, and the run fails."""
    async with open_service(live.model_copy(update={"run_deadline": 0.5})) as service:
        started = time.monotonic()
        run = await service.start("cut", "slow-drill seconds=30")
        elapsed = time.monotonic() - started
        assert run.status == RunStatus.FAILED
        assert run.error is not None and "deadline" in run.error
        assert elapsed < 5, elapsed
        slow = [r for r in await service.store.list_tool_calls("cut") if r.step_id == "slow"]
        assert len(slow) == 1 and slow[0].status == "error"
        assert slow[0].outcome is not None and slow[0].outcome["timed_out"] is True


# -- live steps --------------------------------------------------------------------------------


async def test_a_failing_command_is_an_outcome_and_is_retried(
    live: Settings, workspace: Path
) -> None:
    """Exit code 3 is an error outcome; `retries: 2` means three attempts; a readable end."""
    async with open_service(live) as service:
        run = await service.start("fail", "live-drill mode=fail")

        assert run.status == RunStatus.FAILED
        assert run.error == "Live drill: step act failed (exit code 3)"
        assert run.summary == run.error
        assert lines(workspace, "attempts.txt") == ["fail", "fail", "fail"]
        acts = [r for r in await service.store.list_tool_calls("fail") if r.step_id == "act"]
        assert [(r.tool, r.status) for r in acts] == [("execute_step", "error")] * 3
        for record in acts:
            assert record.outcome is not None
            assert record.outcome["exit_code"] == 3
            assert "the disk is on fire" in record.outcome["stderr"]
        assert await service.store.list_approvals("fail") == []
        assert "run_interrupted" not in await _event_types(service, "fail")


async def test_a_denied_command_never_runs(live: Settings, workspace: Path) -> None:
    """A command the allowlist does not admit is an outcome `denied`; nothing is executed."""
    async with open_service(live) as service:
        run = await service.start("deny", "deny-drill")

        assert run.status == RunStatus.FAILED
        assert run.error is not None and "command denied" in run.error
        records = [r for r in await service.store.list_tool_calls("deny") if r.step_id]
        # Denied once is denied always: the step's retries are not spent on it.
        assert [r.step_id for r in records] == ["three"]
        for record in records:
            assert record.status == "error"
            assert record.outcome is not None
            assert "no allowlist rule matches" in record.outcome["denied"]
            assert "exit_code" not in record.outcome
        assert lines(workspace) == []
        assert not (workspace / "pwned").exists()


async def test_secrets_never_reach_the_database(live: Settings, workspace: Path) -> None:
    """A password in the request, tokens in a command's output and in a note: all redacted."""
    async with open_service(live) as service:
        run = await service.start(
            "leak",
            "live-drill mode=leak (password=hunter2secret)",
            origin=Origin(kind="telegram", chat_id=42),
        )
        assert run.status == RunStatus.WAITING_APPROVAL
        result = await service.decide(
            "leak", Decision.APPROVE, "cli:approver", "ok, token: hunter2secret"
        )
        assert result.run.status == RunStatus.SUCCEEDED
        act = next(r for r in await service.store.list_tool_calls("leak") if r.step_id == "act")
        assert act.outcome is not None
        assert (
            act.outcome["stdout"] == "export GITHUB_TOKEN=[REDACTED]\nAuthorization: [REDACTED]\n"
        )

    texts = table_text(live.db, (*JOURNAL_TABLES, "runs", "approvals", "outbox"))
    for table, text in texts.items():
        for secret in SECRETS:
            assert secret not in text, f"{secret!r} found in table {table}"
    # A call's arguments and outcome are its journal events (`tool_calls` keeps where they are).
    for table in ("events", "runs"):
        assert "[REDACTED]" in texts[table], table
    for path in Path(live.db).parent.glob(Path(live.db).name + "*"):
        data = path.read_bytes()
        for secret in SECRETS:
            assert secret.encode() not in data, f"{secret!r} found in {path.name}"
    memory = (workspace / ".loom-ops" / "memory.txt").read_text()
    assert not any(secret in memory for secret in SECRETS)


async def test_a_nul_in_a_commands_output_is_kept_as_a_replacement_character(
    live: Settings, workspace: Path, db_url: str
) -> None:
    """PostgreSQL's JSON cannot hold U+0000: a command that prints one (binary output, `-print0`)
    leaves U+FFFD in its outcome, and the request of the gated step after it, which quotes that
    output to its approvers, opens and is decided on either engine."""
    async with open_service(live.model_copy(update={"db": db_url})) as service:
        run = await service.start(
            "nul", "live-drill mode=nul", origin=Origin(kind="telegram", chat_id=42)
        )
        assert run.status == RunStatus.WAITING_APPROVAL, run.error
        act = next(r for r in await service.store.list_tool_calls("nul") if r.step_id == "act")
        assert act.outcome is not None and act.outcome["stdout"] == "before\ufffdafter\n"
        [request] = await service.store.list_approvals("nul")
        assert request.evidence == ["act: ok\n  before\ufffdafter"]
        result = await service.decide("nul", Decision.APPROVE, "cli:approver")
        assert result.run.status == RunStatus.SUCCEEDED
        assert (await service.verify_audit("nul")).intact


async def test_secrets_in_an_interruption_are_redacted(settings: Settings) -> None:
    """An exception that carries a secret (e.g. an LLM client error) is journaled redacted."""
    error = "upstream 502 from https://admin:hunter2secret@llm.internal/v1 (token=hunter2secret)"
    policy = CountingPolicy(fail_on=[2], error=error)
    async with open_service(settings, policy) as service:
        run = await service.start("outage", LATENCY)
        assert run.status == RunStatus.QUEUED  # interrupted, resumable
        assert "run_interrupted" in await _event_types(service, "outage")
    text = table_text(settings.db, JOURNAL_TABLES)
    assert "hunter2secret" not in text["events"]


async def test_a_secret_in_an_argument_key_never_reaches_the_journal(settings: Settings) -> None:
    """A token the policy puts in an argument's key (not its value) is redacted too."""
    script = [
        turn(ToolCall(name="record_audit", args={"entry": "note", GITHUB_TOKEN: "x"})),
        final("failed", "done"),
    ]
    async with open_service(settings, ScriptedPolicy(script)) as service:
        await service.start("keyleak", "crash-drill")
    dumped = table_text(settings.db, JOURNAL_TABLES)
    leaked = [table for table, text in dumped.items() if GITHUB_TOKEN in text]
    assert leaked == []


# -- resume and journaled policy turns ---------------------------------------------------------


async def test_resuming_a_finished_run_changes_nothing(service: RunService) -> None:
    """Resume of a run that ended returns it as it is, without touching the journal."""
    run = await service.start("done", LATENCY)
    run = (await service.decide("done", Decision.APPROVE, "cli:oncall")).run
    assert run.status == RunStatus.SUCCEEDED
    events = await service.store.list_events("done")
    turns = await service.store.list_policy_turns("done")

    again = await service.resume("done")

    assert again == run
    assert await service.store.list_events("done") == events
    assert await service.store.list_policy_turns("done") == turns


def _turn_counts(db: str, run_id: str) -> list[tuple[int, int]]:
    """(turn, answers) of a run's journaled policy turns, straight from the file."""
    return raw_rows(
        db,
        "SELECT json_extract(data, '$.turn') AS turn, COUNT(*) FROM events "
        "WHERE run_id = ? AND type = 'policy_turn' GROUP BY turn ORDER BY turn",
        (run_id,),
    )


async def test_an_approval_resumes_with_the_journaled_turn(settings: Settings) -> None:
    """The turn that asked for approval is replayed from the journal, not asked again."""
    policy = CountingPolicy()
    async with open_service(settings, policy) as service:
        await service.start("reuse", LATENCY)
        asked_before = policy.asked
        rows_before = _turn_counts(settings.db, "reuse")
        assert len(rows_before) == asked_before
        await service.decide("reuse", Decision.APPROVE, "cli:oncall")

        counts = _turn_counts(settings.db, "reuse")
        assert all(n == 1 for _, n in counts)
        assert [t for t, _ in counts] == list(range(len(counts)))
        assert policy.asked == len(counts)  # one question per turn, none twice
        assert (await service.get("reuse")).status == RunStatus.SUCCEEDED


async def test_an_interrupted_policy_turn_is_asked_again_only_once(settings: Settings) -> None:
    """A failed (unjournaled) turn is asked again on resume; journaled ones never are."""
    policy = CountingPolicy(fail_on=[3])
    async with open_service(settings, policy) as service:
        run = await service.start("flaky", LATENCY)
        assert run.status == RunStatus.QUEUED and run.lease_owner is None
        types = await _event_types(service, "flaky")
        assert types[-1] == "run_interrupted"
        assert len(_turn_counts(settings.db, "flaky")) == 2

        run = await service.resume("flaky")

        assert run.status == RunStatus.WAITING_APPROVAL
        counts = _turn_counts(settings.db, "flaky")
        assert all(n == 1 for _, n in counts)
        assert [t for t, _ in counts] == list(range(len(counts)))
        assert policy.asked == len(counts) + 1  # only the failed question was repeated
        assert first_broken_link(await service.store.list_events("flaky")) is None


async def test_a_takeover_mid_turn_reuses_the_journaled_turn(
    live: Settings, workspace: Path
) -> None:
    """Another owner takes the lease while a two-call turn runs; the next driver replays the
    journaled turn (re-running only the idempotent in-flight call) instead of asking again."""
    script = [
        turn(call("read_runbook", runbook_id="slow-drill")),
        turn(call("execute_step", step_id="slow"), call("execute_step", step_id="fast")),
        final("succeeded", "both done"),
    ]
    first, second = ScriptedPolicy(script), ScriptedPolicy(script)
    async with open_service(live, first) as a, open_service(live, second) as b:
        driving = asyncio.create_task(a.start("mid", "slow-drill"))
        deadline = time.monotonic() + 10
        while "slow" not in lines(workspace):
            assert time.monotonic() < deadline and not driving.done()
            await asyncio.sleep(0.01)
        with pytest.raises(RunBusy):  # a's lease is live and a's process is alive
            await b.store.claim_run("mid", "intruder:1:x", 30, owner_is_dead)
        intruder = await b.store.claim_run("mid", "intruder:1:x", 30, lambda _: True)

        stopped = await driving  # a notices the lost lease and lets go
        assert stopped.status == RunStatus.RUNNING
        assert stopped.lease_owner == "intruder:1:x"
        assert lines(workspace) == ["slow"]  # a did not go on to the second call
        await intruder.release()

        run = await b.resume("mid")

        assert run.status == RunStatus.SUCCEEDED
        assert lines(workspace) == ["slow", "slow", "fast"]
        assert _turn_counts(live.db, "mid") == [(0, 1), (1, 1), (2, 1)]
        assert (first.asked, second.asked) == (2, 1)
        attempts = {r.step_id: r.attempt for r in await b.store.list_tool_calls("mid")}
        assert attempts == {None: 1, "slow": 2, "fast": 1}
        assert first_broken_link(await b.store.list_events("mid")) is None


async def test_cancelling_a_running_run_stops_the_command_in_flight(
    live: Settings, workspace: Path
) -> None:
    """Cancel while a command runs: the command is killed, nothing after it runs, the end sticks."""
    async with open_service(live) as service:
        driving = asyncio.create_task(service.start("stop", "slow-drill seconds=30"))
        deadline = time.monotonic() + 10
        while "slow" not in lines(workspace):
            assert time.monotonic() < deadline and not driving.done()
            await asyncio.sleep(0.01)

        cancelled = await service.cancel("stop", "cli:oncall")
        assert cancelled.status == RunStatus.CANCELLED

        # The 30 s command is killed at once; wait_for only keeps a bug from hanging the suite.
        after = await asyncio.wait_for(driving, timeout=20)
        assert after.status == RunStatus.CANCELLED and after.error == "cancelled by cli:oncall"
        await asyncio.sleep(0.1)
        assert lines(workspace) == ["slow"]  # `fast` never ran
        events = await service.store.list_events("stop")
        assert [e.type for e in events[-2:]] == ["run_finished", "tool_outcome"]
        assert events[-2].data["status"] == "cancelled"
        assert events[-1].data["status"] == "cancelled"
        assert first_broken_link(events) is None
        slow = next(c for c in await service.store.list_tool_calls("stop") if c.step_id == "slow")
        assert slow.status == "cancelled" and slow.outcome == {
            "cancelled": True,
            "may_have_run": True,
        }
        assert await service.resume("stop") == after
        # The drive is over: the store keeps no run head for a next write of it.
        assert "stop" not in service.store._kept_heads


async def test_a_cancel_from_another_process_stops_the_driver(
    live: Settings, workspace: Path
) -> None:
    """Cancelled through another connection, the driver sees its lease gone and stops."""
    quick = live.model_copy(update={"lease_ttl": 0.3})
    async with open_service(quick) as driver, open_service(quick) as other:
        driving = asyncio.create_task(driver.start("far", "slow-drill seconds=30"))
        deadline = time.monotonic() + 10
        while "slow" not in lines(workspace):
            assert time.monotonic() < deadline and not driving.done()
            await asyncio.sleep(0.01)
        await other.cancel("far", "cli:oncall")
        after = await asyncio.wait_for(driving, timeout=20)
        assert after.status == RunStatus.CANCELLED
        slow = next(c for c in await driver.store.list_tool_calls("far") if c.step_id == "slow")
        assert slow.status == "cancelled"


async def test_a_call_finished_after_a_remote_cancel_is_closed(
    live: Settings, workspace: Path
) -> None:
    """Cancelled from another process while its command runs on (a long lease, so the driver
    learns late): the command's end is recorded, and its call is not left in doubt."""
    roomy = live.model_copy(update={"lease_ttl": 30})
    async with open_service(roomy) as driver, open_service(roomy) as other:
        driving = asyncio.create_task(driver.start("far", "slow-drill seconds=0.5"))
        for _ in range(500):
            if "slow" in lines(workspace):
                break
            await asyncio.sleep(0.01)
        await other.cancel("far", "cli:oncall")
        after = await asyncio.wait_for(driving, timeout=10)
        assert after.status == RunStatus.CANCELLED
        slow = next(c for c in await other.store.list_tool_calls("far") if c.step_id == "slow")

    assert slow.status != "intent", "the command ran to its end but its call is still in doubt"


# -- many runs, one process --------------------------------------------------------------------


DEPLOY_RUNBOOK = "failed-deploy-rollback"


async def test_fifty_runs_at_once(service: RunService) -> None:
    """50 concurrent runs over the three shipped runbooks, then 50 concurrent approvals."""
    requests = [
        (LATENCY, "api-latency-spike", "cli:oncall"),
        (DISK, "disk-almost-full", "telegram:100000001"),
        (DEPLOY, DEPLOY_RUNBOOK, "cli:lead"),
    ]
    plan = {f"many-{n:02d}": requests[n % 3] for n in range(50)}

    started = await asyncio.gather(*(service.start(rid, req) for rid, (req, _, _) in plan.items()))

    assert {r.status for r in started} == {RunStatus.WAITING_APPROVAL}
    assert {r.id: r.runbook_id for r in started} == {rid: rb for rid, (_, rb, _) in plan.items()}
    results = await asyncio.gather(
        *(service.decide(rid, Decision.APPROVE, who) for rid, (_, _, who) in plan.items())
    )
    assert all(r.changed for r in results)
    # failed-deploy-rollback's rollback needs two people: oncall's approval completes it.
    deploys = [rid for rid, (_, runbook, _) in plan.items() if runbook == DEPLOY_RUNBOOK]
    await asyncio.gather(*(service.decide(rid, Decision.APPROVE, "cli:oncall") for rid in deploys))
    assert {(await service.get(run_id)).status for run_id in plan} == {RunStatus.SUCCEEDED}
    for run_id in plan:
        events = await service.store.list_events(run_id)
        assert first_broken_link(events) is None, run_id
        assert "run_interrupted" not in {e.type for e in events}
    assert len(await service.list(RunStatus.SUCCEEDED, limit=100)) == 50


# -- leases ------------------------------------------------------------------------------------


async def _queued_run(store: RunStore, run_id: str, request: str) -> None:
    """Create a queued run directly in the store, as another front end would."""
    await store.create_run(
        NewRun(
            id=run_id,
            role="runbook",
            request=request,
            requested_by="cli:tester",
            origin=Origin(),
            limits=RunLimits(max_steps=40, max_tool_calls=100, deadline_seconds=3600),
        )
    )


@pytest.fixture
async def other_process(settings: Settings) -> AsyncIterator[RunStore]:
    """A second connection to the same database file, standing in for another process."""
    store = await RunStore.open(settings.db)
    try:
        yield store
    finally:
        await store.close()


async def test_a_live_lease_keeps_a_second_owner_out(other_process: RunStore) -> None:
    """While the lease is live another owner gets RunBusy; once it expires it can take over."""
    await _queued_run(other_process, "leased", LATENCY)
    holder = "otherhost:4242:aaaa"  # another host: never declared dead, only its lease expires
    held = await other_process.claim_run("leased", holder, 0.3, owner_is_dead)
    run = held.run
    assert run.status == RunStatus.RUNNING and run.lease_owner == holder and run.lease_epoch == 1

    with pytest.raises(RunBusy, match="otherhost:4242:aaaa"):
        await other_process.claim_run("leased", "otherhost:5151:bbbb", 0.3, owner_is_dead)
    assert await other_process.runnable_run_ids(owner_is_dead) == []

    await asyncio.sleep(0.4)
    assert await other_process.runnable_run_ids(owner_is_dead) == ["leased"]
    taken = (await other_process.claim_run("leased", "otherhost:5151:bbbb", 0.3, owner_is_dead)).run
    assert taken.lease_owner == "otherhost:5151:bbbb"
    claimed = [e for e in await other_process.list_events("leased") if e.type == "run_claimed"]
    assert claimed[-1].data == {
        "owner": "otherhost:5151:bbbb",
        "epoch": 2,
        "taken_over_from": holder,
    }
    assert not await held.renew(0.3)  # the old owner lost it


async def test_the_kernel_waits_for_an_expired_lease_then_takes_over(
    settings: Settings, other_process: RunStore
) -> None:
    """resume refuses a run another live owner drives, and drives it once the lease expires."""
    await _queued_run(other_process, "orphan", LATENCY)
    await other_process.claim_run("orphan", "otherhost:4242:aaaa", 0.3, owner_is_dead)
    async with open_service(settings.model_copy(update={"lease_ttl": 0.3})) as service:
        with pytest.raises(RunBusy):
            await service.resume("orphan")
        assert await service.store.list_tool_calls("orphan") == []

        await asyncio.sleep(0.4)
        run = await service.resume("orphan")

        assert run.status == RunStatus.WAITING_APPROVAL
        claims = [
            e.data for e in await service.store.list_events("orphan") if e.type == "run_claimed"
        ]
        assert claims[-1]["taken_over_from"] == "otherhost:4242:aaaa"


async def test_a_waiting_run_holds_no_task_and_no_lease(service: RunService) -> None:
    """A run parked at an approval request keeps nothing in this process: no lease, no task."""
    run = await service.start("parked", LATENCY)
    assert run.status == RunStatus.WAITING_APPROVAL
    assert run.lease_owner is None and run.lease_expires_at is None
    assert service._drives == {}  # nothing of it stays in this process


async def test_close_does_not_strand_a_background_run(settings: Settings) -> None:
    """Closing a service while a run it started in the background is still going hands the
    run back: another process can resume it at once (no RunBusy from a lease held by a
    process that is still alive)."""
    service = await RunService.open(settings)
    await service.start("bg", LATENCY, wait=False)
    await service.close()
    await asyncio.sleep(0.1)

    async with open_service(settings) as other:
        run = await other.resume("bg")

    assert run.status == RunStatus.WAITING_APPROVAL


async def test_a_run_cancelled_elsewhere_while_this_process_drains_keeps_its_last_outcome(
    settings: Settings,
) -> None:
    """This process stops (drains) and hands the run back between two calls, but another
    process cancelled the run meanwhile: the call that ended keeps its outcome, closed as the
    cancel's, as it is when the lease loss is noticed first. No call is left an intent."""
    script = [
        turn(
            call("read_runbook", runbook_id="disk-almost-full"),
            call("record_audit", entry="checked the disk"),
        ),
        final("failed", "end"),
    ]
    gate, entered = asyncio.Event(), asyncio.Event()
    async with (
        open_service(settings, ScriptedPolicy(script)) as worker,
        open_service(settings, ScriptedPolicy(script)) as other,
    ):
        real = worker.kernel.toolbox.read_runbook

        async def held_read(*args: object) -> object:
            entered.set()
            await gate.wait()
            return await real(*args)

        worker.kernel.toolbox.read_runbook = held_read  # type: ignore[method-assign]
        await worker.start("r", "disk-almost-full", wait=False)
        await asyncio.wait_for(entered.wait(), 10)
        await other.cancel("r", by="cli:tester")
        draining = asyncio.create_task(worker.drain(10))
        await asyncio.sleep(0.1)  # the drain waits for the call in flight
        gate.set()
        await asyncio.wait_for(draining, 15)
    calls = raw_rows(settings.db, "SELECT tool, status FROM tool_calls WHERE run_id = 'r'")
    assert calls and all(status != "intent" for _, status in calls), calls
    assert raw_rows(settings.db, "SELECT status FROM runs WHERE id = 'r'") == [("cancelled",)]


async def test_an_answer_that_arrives_while_this_process_drains_is_kept_for_the_next_owner(
    settings: Settings, db_url: str
) -> None:
    """This process stops (drains) while the policy decides: its answer, which arrives after,
    goes with the run handed back, and whoever drives the run next acts on it without asking
    the policy that turn again (an LLM call is paid for once); on both engines."""
    settings = settings.model_copy(update={"db": db_url})
    script = [turn(call("read_runbook", runbook_id="disk-almost-full")), final("failed", "end")]
    gate, entered = asyncio.Event(), asyncio.Event()

    class HeldPolicy(ScriptedPolicy):
        async def decide(self, context: PolicyContext) -> PolicyDecision:
            entered.set()
            await gate.wait()
            return await super().decide(context)

    held, after = HeldPolicy(script), ScriptedPolicy(script)
    async with open_service(settings, held) as stopping:
        await stopping.start("h", "disk-almost-full", wait=False)
        await asyncio.wait_for(entered.wait(), 10)
        draining = asyncio.create_task(stopping.drain(10))
        await asyncio.sleep(0.1)  # the drain waits for the answer in flight
        gate.set()
        await asyncio.wait_for(draining, 15)
    assert raw_rows(settings.db, "SELECT status FROM runs WHERE id = 'h'") == [("queued",)]
    assert raw_rows(settings.db, "SELECT COUNT(*) FROM tool_calls WHERE run_id = 'h'") == [(0,)]
    async with open_service(settings, after) as next_owner:
        run = await next_owner.resume("h")
        turns = await next_owner.store.list_policy_turns("h")
        calls = await next_owner.store.list_tool_calls("h")
    assert (held.asked, after.asked) == (1, 1)  # the second process asked for turn 1 only
    assert [t.turn for t in turns] == [0, 1]
    assert [(c.tool, c.status) for c in calls] == [("read_runbook", "ok")]
    assert run.status == RunStatus.FAILED
