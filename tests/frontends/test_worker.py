"""Workers: real `loom-ops worker` processes share the runs of one store through leases.

The acceptance test of the worker pool: three workers on one PostgreSQL schema drive 60
crash-drill runs (200 in the soak, `bench/soak.py`), each stopping at an approval gate that
this test, recording only, approves; one worker is killed with SIGKILL while it holds runs.
Every run must still succeed, every side effect must have happened exactly once, and the
journal must show that no run was ever driven by two workers at once: only the dead worker's
runs were taken over, and only after it died. A small SQLite test shows the polling path (no
LISTEN/NOTIFY there). A worker in process shows how it treats a run whose LLM is down and what
a stop in mid-claim leaves.

Side effects are real (LOOM_OPS_ALLOW_SHELL=1): the drill's live steps run `mark.py`, which
appends `<line> <run tag>` to the workspace's out.txt, so each run's effects can be counted
on their own. A kill can land while such a command runs; the step is then in doubt and the
new owner asks a human. The test decides like a careful operator would: it waits until no
command of that run is still running (the command runs in its own session, so it outlives
the worker), then looks at out.txt: the marker is there, so skip; it is missing, so retry.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psycopg
import pytest

from agent.chain import first_broken_link
from agent.errors import PolicyUnavailable
from agent.frontends.worker import Worker, run_worker
from agent.policy.base import PolicyContext, PolicyDecision
from agent.policy.mock import MockPolicy
from agent.records import Decision, Effects, Origin, RunLimits
from agent.service.runs import RunService
from agent.settings import Settings
from agent.store import NewRun, RunStore
from tests.cli_helpers import LOOM_OPS, cli_env
from tests.conftest import make_workspace, postgres_schema
from tests.support import LATENCY, PYTHON, allow, lines, raw_rows, write_runbook

APPROVER = "cli:approver"  # the drill runbook's only approver
LEASE_TTL = 2.0
TERMINAL = ("succeeded", "failed", "rejected", "cancelled", "expired")
LIVE_STEPS = ("append-one", "append-two")

# One write with O_APPEND: the marker line is either wholly in out.txt or not at all. The
# sleeps widen the window in which a SIGKILL of the worker finds the command running.
MARK_SCRIPT = """\
import os, sys, time
time.sleep(0.02)
fd = os.open("out.txt", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
os.write(fd, (sys.argv[1] + " " + sys.argv[2] + "\\n").encode())
os.close(fd)
time.sleep(0.05)
"""


def drill_workspace(root: Path) -> Path:
    """The crash-drill workspace, its drill given a `tag` param that each live step writes
    into its marker line (`one w007`), so every run's side effects can be told apart."""
    workspace = make_workspace(root)
    drill = workspace / "runbooks" / "crash-drill.yaml"
    text = drill.read_text()
    for line in ("one", "two", "undo-two"):
        # -S: no site import; 400 interpreter starts on two cores must stay cheap.
        text = text.replace(f'append.py {line}"', f'-S mark.py {line} {{{{ tag }}}}"')
    text = text.replace(
        "approvers: [cli:approver]\n",
        'approvers: [cli:approver]\nparams:\n  tag:\n    pattern: "w[0-9]{3}"\n',
    )
    assert text.count("mark.py") == 3 and "append.py" not in text, text
    drill.write_text(text)
    (workspace / "mark.py").write_text(MARK_SCRIPT)
    allowlist = {
        "rules": [{"argv": [PYTHON, "-S", "mark.py", "re:one|two|undo-two", "re:w[0-9]{3}"]}],
        "path": [str(Path(PYTHON).parent)],
    }
    (workspace / "ops.shell.allowlist.json").write_text(json.dumps(allowlist))
    return workspace


def markers(workspace: Path) -> Counter[str]:
    """How often each marker line was written to out.txt."""
    path = workspace / "out.txt"
    return Counter(path.read_text().splitlines() if path.exists() else [])


def commands_running(tag: str) -> list[int]:
    """Pids of `mark.py` commands of run `tag` still alive (orphans of a killed worker)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"mark.py" in argv and tag.encode() in argv and state != "Z":
            pids.append(int(entry.name))
    return pids


# -- worker processes ---------------------------------------------------------------------------


@dataclass
class WorkerProc:
    """One `loom-ops worker` subprocess, its stderr in a file, and its lease owner id."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    owner: str = ""
    killed_at: float | None = None

    def stderr(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.stderr().splitlines()[-lines:])


def start_worker(
    name: str,
    workspace: Path,
    db: str,
    logs: Path,
    concurrency: int,
    ttl: float,
    failpoint: str | None = None,
) -> WorkerProc:
    log = logs / f"{name}.stderr"
    env = cli_env(
        LOOM_OPS_DB=db,
        LOOM_OPS_WORKSPACE=str(workspace),
        LOOM_OPS_ALLOW_SHELL="1",
        LOOM_OPS_LEASE_TTL=str(ttl),
        **({"LOOM_OPS_FAILPOINT": failpoint} if failpoint else {}),
    )
    with log.open("wb") as handle:
        proc = subprocess.Popen(
            [LOOM_OPS, "worker", "--concurrency", str(concurrency), "--mock-llm"],
            cwd=workspace,  # no developer's .env is read
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=handle,
        )
    return WorkerProc(name, proc, log)


def await_ready(workers: list[WorkerProc], timeout: float = 30.0) -> None:
    """Wait until each worker announced itself, and learn its lease owner id from that line
    (`loom-ops: worker <owner> on <store>, ...`); the owner names the worker's pid."""
    deadline = time.monotonic() + timeout
    for worker in workers:
        while not worker.owner:
            for line in worker.stderr().splitlines():
                if line.startswith("loom-ops: worker "):
                    worker.owner = line.split()[2]
            if worker.owner:
                break
            assert worker.proc.poll() is None, f"{worker.name} exited:\n{worker.tail()}"
            assert time.monotonic() < deadline, f"{worker.name} never started:\n{worker.tail()}"
            time.sleep(0.05)
        assert worker.owner.split(":")[1] == str(worker.proc.pid), worker.owner


@contextmanager
def worker_pool(
    count: int, workspace: Path, db: str, logs: Path, concurrency: int = 8, ttl: float = LEASE_TTL
) -> Iterator[list[WorkerProc]]:
    """Start `count` workers; on exit stop every one still running (SIGTERM, then SIGKILL)."""
    workers: list[WorkerProc] = []
    try:
        for i in range(count):
            workers.append(start_worker(f"worker{i}", workspace, db, logs, concurrency, ttl))
        await_ready(workers)
        yield workers
    finally:
        stop_workers(workers)


def stop_workers(workers: list[WorkerProc]) -> None:
    for worker in workers:
        if worker.proc.poll() is None:
            worker.proc.send_signal(signal.SIGTERM)
    for worker in workers:
        try:
            worker.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            worker.proc.kill()
            worker.proc.wait(timeout=10)


@asynccontextmanager
async def recording_service(workspace: Path, db: str) -> AsyncIterator[RunService]:
    """A RunService in this process that records starts and decisions only: workers drive.
    Its runs run their commands live (what a run does live is fixed where it starts)."""
    settings = Settings(
        _env_file=None, db=db, workspace=workspace, mock_llm=True, user="tester", allow_shell=True
    )
    service = await RunService.open(settings, executes_runs=False)
    try:
        yield service
    finally:
        await service.close()


# -- the operator ---------------------------------------------------------------------------


@dataclass
class Operator:
    """Approves each gate as it opens; decides in-doubt steps from what out.txt shows."""

    service: RunService
    db: str
    workspace: Path
    decided: set[int] = field(default_factory=set)
    log: list[tuple[int, str, str, str, str]] = field(default_factory=list)  # id, run, kind...

    async def decide_pending(self) -> None:
        rows = raw_rows(
            self.db,
            "SELECT id, run_id, kind, step_id, number FROM approvals WHERE status = 'pending' "
            "ORDER BY id",
        )
        for approval_id, run_id, kind, step_id, number in rows:
            if approval_id in self.decided:
                continue
            if kind == "gate":
                decision = Decision.APPROVE
            else:
                assert kind == "in_doubt" and step_id in LIVE_STEPS, (run_id, kind, step_id)
                if commands_running(run_id):
                    continue  # the dead worker's command still runs: look again later
                marker = f"{step_id.removeprefix('append-')} {run_id}"
                decision = Decision.SKIP if markers(self.workspace)[marker] else Decision.APPROVE
            result = await self.service.decide(run_id, decision, APPROVER, approval_number=number)
            assert result.changed, (approval_id, run_id, result.message)
            self.decided.add(approval_id)
            self.log.append((approval_id, run_id, kind, step_id, str(decision)))

    def retried(self) -> set[tuple[str, str]]:
        """(run, step) of in-doubt steps this operator said to run again."""
        return {(r, s) for _, r, k, s, d in self.log if k == "in_doubt" and d == "approve"}

    def skipped(self) -> set[tuple[str, str]]:
        """(run, step) of in-doubt steps this operator marked as done."""
        return {(r, s) for _, r, k, s, d in self.log if k == "in_doubt" and d == "skip"}


def statuses(db: str) -> Counter[str]:
    return Counter(
        dict(raw_rows(db, "SELECT status, COUNT(*) FROM runs GROUP BY status"))  # type: ignore[arg-type]
    )


def run_status(db: str, run_id: str) -> str:
    return str(raw_rows(db, "SELECT status FROM runs WHERE id = ?", (run_id,))[0][0])


def held_runs(db: str) -> dict[str, list[str]]:
    """Running runs by the lease owner that holds them."""
    held: dict[str, list[str]] = defaultdict(list)
    for run_id, owner in raw_rows(
        db, "SELECT id, lease_owner FROM runs WHERE status = 'running' ORDER BY id"
    ):
        if owner is not None:
            held[owner].append(run_id)
    return held


def diagnostics(db: str, workers: list[WorkerProc], operator: Operator | None) -> str:
    parts = [f"statuses: {dict(statuses(db))}"]
    held = held_runs(db)
    for worker in workers:
        state = "killed" if worker.killed_at else f"exit={worker.proc.poll()}"
        parts.append(
            f"--- {worker.name} {worker.owner} ({state}), holds {len(held.get(worker.owner, []))}"
            f" run(s); stderr tail:\n{worker.tail()}"
        )
    if operator is not None:
        parts.append(f"in-doubt decisions: {[e for e in operator.log if e[2] != 'gate']}")
    return "\n".join(parts)


# -- the journal ----------------------------------------------------------------------------


@dataclass
class JournalReport:
    """What a walk over every run's events found."""

    claims: Counter[str] = field(default_factory=Counter)  # owner -> run_claimed events
    # run -> each drive's hold of it in order: (owner, how it ended: "self" by a park or the
    # end, "taken" over, "interrupted", or None while it lasts)
    holds: dict[str, list[list[Any]]] = field(default_factory=lambda: defaultdict(list))
    takeovers: list[tuple[str, str, str, float]] = field(default_factory=list)  # run, from, to, ts
    violations: list[str] = field(default_factory=list)
    attempts: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    ok_outcomes: Counter[str] = field(default_factory=Counter)  # call_key -> 'ok' outcomes
    interrupted: list[str] = field(default_factory=list)


# Written by a drive while it holds the run's lease, between its claim and its park or end.
DRIVE_EVENTS = {
    "policy_turn",
    "tool_intent",
    "tool_outcome",
    "audit",
    "approval_requested",
    "run_finished",
}


def walk_journal(db: str) -> JournalReport:
    """Walk each run's events in order, tracking which owner's drive holds the run.

    A claim starts a drive; `approval_requested` (a park) or `run_finished` ends it. Between
    those, only that drive writes (the store fences every drive write by lease owner), and
    a claim may only land while another drive holds the run as a takeover naming that
    holder. Outside a drive, only the run's creation and a human's decision (with the gate
    outcome it records) may appear.
    """
    report = JournalReport()
    rows = raw_rows(db, "SELECT run_id, idx, ts, type, data FROM events ORDER BY run_id, idx")
    by_run: dict[str, list[tuple[int, float, str, dict[str, Any]]]] = defaultdict(list)
    for run_id, idx, ts, type_, data in rows:
        by_run[run_id].append(
            (idx, ts, type_, data if isinstance(data, dict) else json.loads(data))
        )
    for run_id, events in by_run.items():
        holder: str | None = None
        finished = False
        previous = ""
        for idx, ts, type_, data in events:
            where = f"{run_id}#{idx} {type_}"
            if finished:
                report.violations.append(f"{where}: written after the run finished")
            if type_ == "run_claimed":
                owner = data["owner"]
                report.claims[owner] += 1
                taken_from = data.get("taken_over_from")
                if holder is not None:
                    report.takeovers.append((run_id, holder, owner, ts))
                    report.holds[run_id][-1][1] = "taken"
                    if taken_from != holder:
                        report.violations.append(
                            f"{where}: claimed by {owner} while {holder}'s drive held it, "
                            f"taken_over_from={taken_from!r}"
                        )
                elif taken_from is not None:
                    report.violations.append(
                        f"{where}: claims a takeover from {taken_from} of a run nobody held"
                    )
                holder = owner
                report.holds[run_id].append([owner, None])
            elif type_ == "run_interrupted":
                report.interrupted.append(f"{where}: {data}")
                if holder is not None:
                    report.holds[run_id][-1][1] = "interrupted"
                holder = None  # the drive handed the lease back
            elif type_ == "approval_decided":
                if holder is not None:
                    report.violations.append(f"{where}: decided while {holder} drove the run")
            elif type_ == "tool_outcome" and previous == "approval_decided" and holder is None:
                pass  # the decided gate's outcome, in the decision's own transaction
            elif type_ == "run_created":
                if idx != 1:
                    report.violations.append(f"{where}: not the first event")
            elif type_ in DRIVE_EVENTS:
                if holder is None:
                    report.violations.append(f"{where}: written by no drive (run not claimed)")
                if type_ in ("approval_requested", "run_finished"):
                    if holder is not None:
                        report.holds[run_id][-1][1] = "self"
                    holder = None
            else:
                report.violations.append(f"{where}: unexpected event type")
            if type_ == "run_finished":
                finished = True
            if type_ == "tool_intent":
                report.attempts[data["call_key"]].append(data["attempt"])
            if type_ == "tool_outcome" and data["status"] == "ok":
                report.ok_outcomes[data["call_key"]] += 1
            previous = type_
        if not finished:
            report.violations.append(f"{run_id}: never finished")
    return report


# -- the PostgreSQL acceptance test ---------------------------------------------------------

KILL_AFTER = 0.2  # the share of runs done before the kill: some dozens in the soak
KILL_ANYWAY_AFTER = 100  # ...ideally inside a live command; from here on, at any moment


def choose_victim(
    db: str, workspace: Path, workers: list[WorkerProc], succeeded: int
) -> WorkerProc | None:
    """The worker to kill now, if any: one holding at least two runs, preferably while one
    of its live commands runs (marker not written yet), so that a step is left in doubt.
    The orphaned command still finishes (it has its own session), so the operator usually
    finds its marker and skips; a retry is only needed when the kill lands between the
    intent's commit and the command's start. Which case happens varies; the assertions
    hold for each."""
    held = held_runs(db)
    candidates = [w for w in workers if len(held.get(w.owner, [])) >= 2]
    if not candidates:
        return None
    open_live = raw_rows(
        db,
        "SELECT r.lease_owner, c.run_id, c.step_id FROM tool_calls c JOIN runs r ON r.id = "
        "c.run_id WHERE c.status = 'intent' AND c.tool = 'execute_step' AND r.status = 'running'",
    )
    written = markers(workspace)
    for worker in candidates:
        for owner, run_id, step_id in open_live:
            line = f"{str(step_id).removeprefix('append-')} {run_id}"
            if owner == worker.owner and step_id in LIVE_STEPS and not written[line]:
                return worker
    if succeeded >= KILL_ANYWAY_AFTER:
        return max(candidates, key=lambda w: len(held[w.owner]))
    return None


FINISH_WITHIN = 90.0  # a failure bound, not a speed assert: a healthy run takes far less


@pytest.mark.parametrize(
    "runs", [60, pytest.param(200, marks=pytest.mark.slow, id="200-soak")], ids=str
)
async def test_three_workers_share_the_runs_and_survive_a_sigkill(
    tmp_path: Path, runs: int
) -> None:
    """Three workers on PostgreSQL drive `runs` runs (the soak: 200, in `bench/soak.py`); one
    is SIGKILLed holding runs. Every run succeeds, every side effect happens once, and no run
    is ever driven by two workers at once."""
    with postgres_schema() as db:
        workspace = drill_workspace(tmp_path / "ws")
        logs = tmp_path / "logs"
        logs.mkdir()
        run_ids = [f"w{i:03d}" for i in range(runs)]
        with worker_pool(3, workspace, db, logs) as workers:
            async with recording_service(workspace, db) as service:
                operator = Operator(service, db, workspace)
                for run_id in run_ids:
                    run = await service.start(run_id, f"crash-drill tag={run_id}")
                    assert run.status in ("queued", "running", "waiting_approval"), run

                victim: WorkerProc | None = None
                held_at_kill: dict[str, float] = {}  # run -> when the dead worker's lease ends
                deadline = time.monotonic() + FINISH_WITHIN
                while True:
                    await operator.decide_pending()
                    counts = statuses(db)
                    if victim is None and counts["succeeded"] >= runs * KILL_AFTER:
                        victim = choose_victim(db, workspace, workers, counts["succeeded"])
                        if victim is not None:
                            victim.killed_at = time.time()
                            victim.proc.send_signal(signal.SIGKILL)
                            victim.proc.wait(timeout=10)
                            # What it held when it died: its leases now only expire.
                            held_at_kill = dict(
                                raw_rows(
                                    db,
                                    "SELECT id, lease_expires_at FROM runs WHERE lease_owner = ?",
                                    (victim.owner,),
                                )
                            )
                    if victim is not None and sum(counts[s] for s in TERMINAL) == runs:
                        break
                    for worker in workers:
                        assert worker is victim or worker.proc.poll() is None, (
                            f"{worker.name} died\n{diagnostics(db, workers, operator)}"
                        )
                    assert time.monotonic() < deadline, (
                        f"runs did not finish (victim={victim and victim.name})\n"
                        f"{diagnostics(db, workers, operator)}"
                    )
                    if victim is None:
                        assert counts["succeeded"] < runs, (
                            "every run ended before a worker could be killed holding runs\n"
                            f"{diagnostics(db, workers, operator)}"
                        )
                    time.sleep(0.1 if victim else 0.03)

            assert victim is not None
            survivors = [w for w in workers if w is not victim]
            stop_workers(survivors)
            diag = diagnostics(db, workers, operator)
            for worker in survivors:
                assert worker.proc.returncode == 0, diag
                assert "Traceback" not in worker.stderr(), diag

        # 1. Every run succeeded.
        final = dict(raw_rows(db, "SELECT id, status FROM runs"))
        assert final == {run_id: "succeeded" for run_id in run_ids}, diag

        # 2. Every side effect happened exactly once: one marker per live step per run.
        assert markers(workspace) == Counter(
            f"{line} {run_id}" for run_id in run_ids for line in ("one", "two")
        ), diag

        # 3. No step was executed twice: one call per step, one 'ok' outcome per call, and a
        #    second attempt only where a human said to retry an in-doubt step.
        calls = raw_rows(
            db,
            "SELECT run_id, step_id, call_key, status FROM tool_calls "
            "WHERE tool = 'execute_step' ORDER BY run_id, turn, position",
        )
        steps = Counter((run_id, step_id) for run_id, step_id, _, _ in calls)
        assert steps == Counter(
            (run_id, step) for run_id in run_ids for step in ("prepare", *LIVE_STEPS)
        ), diag
        for run_id, step_id, _, status in calls:
            expected = "skipped" if (run_id, step_id) in operator.skipped() else "ok"
            assert status == expected, (run_id, step_id, status, diag)
        report = walk_journal(db)
        assert [k for k, n in report.ok_outcomes.items() if n > 1] == [], diag
        retried_keys = {
            key for run_id, step_id, key, _ in calls if (run_id, step_id) in operator.retried()
        }
        repeatable = dict(raw_rows(db, "SELECT call_key, repeatable FROM tool_calls"))
        rerun: set[str] = set()
        for key, attempts in report.attempts.items():
            assert attempts == list(range(1, len(attempts) + 1)), (key, attempts)
            if len(attempts) > 1:
                rerun.add(key)
                # A second attempt is a human's retry, or a call safe to repeat (a read, a
                # synthetic check, a deduplicated audit line) that the new owner ran again.
                assert key in retried_keys or repeatable[key], (key, attempts, diag)
                assert len(attempts) == 2, (key, attempts, diag)

        # 4. No run was driven by two workers at once.
        assert report.violations == [], "\n".join(report.violations[:20]) + "\n" + diag
        assert report.interrupted == [], report.interrupted
        owners = {w.owner for w in workers}
        assert set(report.claims) == owners, (dict(report.claims), diag)

        # 5. Only the dead worker's runs were taken over, after it died, by the survivors;
        #    and exactly the runs it held when it died.
        assert victim.killed_at is not None
        assert held_at_kill, f"{victim.name} held no run when killed\n{diag}"
        # A commit the victim sent just before it died can land after the kill (PostgreSQL
        # had it): a run whose last hold by the victim it ended itself was no longer held.
        held_at_kill = {
            run_id: until
            for run_id, until in held_at_kill.items()
            if [how for who, how in report.holds[run_id] if who == victim.owner][-1:] != ["self"]
        }
        assert {frm for _, frm, _, _ in report.takeovers} == {victim.owner}, report.takeovers
        assert {to for _, _, to, _ in report.takeovers} <= {w.owner for w in survivors}
        # (Before its lease ran out, too, where a survivor looked at the leases' owners first:
        # the victim died on this host, which they can tell. That no run was ever driven by
        # two workers at once is point 4.)
        assert all(ts > victim.killed_at for *_, ts in report.takeovers), report.takeovers
        assert {run_id for run_id, *_ in report.takeovers} == set(held_at_kill), (
            report.takeovers,
            held_at_kill,
        )
        # Only a step the kill interrupted can be in doubt.
        in_doubt_runs = {run_id for _, run_id, kind, _, _ in operator.log if kind == "in_doubt"}
        assert in_doubt_runs <= set(held_at_kill), (in_doubt_runs, held_at_kill)
        assert {key.partition("#")[0] for key in rerun} <= set(held_at_kill), (rerun, held_at_kill)

        # 6. The work was shared: both survivors claimed runs, the dead one had too.
        for worker in workers:
            assert report.claims[worker.owner] > 0, (worker.name, dict(report.claims))
        print(
            f"claims by worker: { {w.name: report.claims[w.owner] for w in workers} }; "
            f"{victim.name} killed holding {len(held_at_kill)} run(s), taken over: "
            f"{Counter(to for _, _, to, _ in report.takeovers)}; in-doubt decisions: "
            f"{[e for e in operator.log if e[2] == 'in_doubt']}; calls run again: {sorted(rerun)}"
        )


# -- SQLite: the polling path -----------------------------------------------------------------


async def test_one_worker_drives_a_recorded_run_on_sqlite(tmp_path: Path) -> None:
    """No NOTIFY on SQLite: the worker finds the new run, and the run after its approval,
    by polling; the run waits at its gate, is approved here, and ends succeeded."""
    workspace = drill_workspace(tmp_path / "ws")
    db = str(tmp_path / "ops.sqlite")
    logs = tmp_path / "logs"
    logs.mkdir()
    with worker_pool(1, workspace, db, logs, concurrency=2, ttl=10.0) as workers:
        (worker,) = workers
        async with recording_service(workspace, db) as service:
            run = await service.start("w001", "crash-drill tag=w001")
            assert run.status == "queued"  # recorded only: this process drives nothing

            def wait_for(status: str) -> None:
                deadline = time.monotonic() + 30
                while (now := run_status(db, "w001")) != status:
                    assert now not in TERMINAL, diagnostics(db, workers, None)
                    assert worker.proc.poll() is None, worker.tail()
                    assert time.monotonic() < deadline, diagnostics(db, workers, None)
                    time.sleep(0.1)

            wait_for("waiting_approval")
            assert markers(workspace) == Counter(["one w001"])
            result = await service.decide("w001", Decision.APPROVE, APPROVER)
            assert result.changed and result.run.status == "queued", result
            wait_for("succeeded")

        stop_workers(workers)
        assert worker.proc.returncode == 0, worker.tail()
        assert "Traceback" not in worker.stderr(), worker.tail()
    assert "up to 2 runs at once, acting live: shell" in worker.stderr(), worker.tail()
    assert markers(workspace) == Counter(["one w001", "two w001"])
    report = walk_journal(db)
    assert report.violations == [], report.violations
    assert report.claims == Counter({worker.owner: 2})  # once to its gate, once after it
    assert report.takeovers == []


DRAIN_DRILL = """\
id: drain-drill
title: Drain drill
description: A live step that takes a while, then one more.
triggers: [drain drill]
approvers: [cli:approver]
steps:
  - id: slow
    title: Take two seconds
    run: "{python} append.py slow SECONDS"
    timeout: 60
  - id: after
    title: Then this
    run: "{python} append.py after"
"""


def _drain_drill(root: Path, seconds: int) -> tuple[Path, str, Path]:
    """(workspace, database, logs) of the drain drill, its first step `seconds` long."""
    workspace = make_workspace(root / "ws")
    write_runbook(workspace, "drain-drill", DRAIN_DRILL.replace("SECONDS", str(seconds)))
    allow(workspace, "append.py", "slow", str(seconds))
    allow(workspace, "append.py", "after")
    logs = root / "logs"
    logs.mkdir()
    return workspace, str(root / "ops.sqlite"), logs


async def _start_the_slow_step(workspace: Path, db: str, worker: WorkerProc) -> None:
    """Start run `d` of the drain drill and return once `worker` runs its slow step."""
    async with recording_service(workspace, db) as service:
        await service.start("d", "drain-drill")
    deadline = time.monotonic() + 30
    while lines(workspace) != ["slow"]:  # written as the step starts; it then sleeps
        assert time.monotonic() < deadline, diagnostics(db, [worker], None)
        await asyncio.sleep(0.05)


async def test_a_stopped_worker_lets_its_step_in_flight_finish_and_hands_the_run_back(
    tmp_path: Path,
) -> None:
    """SIGTERM while a live step runs (a rolling restart): the worker waits for the step
    (LOOM_OPS_DRAIN_SECONDS), keeps its outcome and hands the run back, so the next worker
    goes on from there; nobody is asked whether the step ran, and it ran once."""
    workspace, db, logs = _drain_drill(tmp_path, seconds=2)
    with worker_pool(1, workspace, db, logs, concurrency=2, ttl=10.0) as (first,):
        await _start_the_slow_step(workspace, db, first)
        first.proc.send_signal(signal.SIGTERM)
        assert first.proc.wait(timeout=30) == 0, first.tail()
    [(status, outcome)] = raw_rows(
        db, "SELECT status, outcome_idx IS NOT NULL FROM tool_calls WHERE step_id = 'slow'"
    )
    assert (status, outcome) == ("ok", 1), diagnostics(db, [first], None)
    assert run_status(db, "d") == "queued" and lines(workspace) == ["slow"]
    assert raw_rows(db, "SELECT lease_owner FROM runs WHERE id = 'd'") == [(None,)]

    with worker_pool(1, workspace, db, logs, concurrency=2, ttl=10.0) as (second,):
        deadline = time.monotonic() + 30
        while run_status(db, "d") != "succeeded":
            assert time.monotonic() < deadline, diagnostics(db, [second], None)
            await asyncio.sleep(0.05)
    assert lines(workspace) == ["slow", "after"]
    assert raw_rows(db, "SELECT kind FROM approvals WHERE run_id = 'd'") == []


async def test_a_worker_takes_over_at_once_a_run_whose_driver_died_on_its_host(
    tmp_path: Path, db_url: str
) -> None:
    """A worker SIGKILLed mid-step on this host (the OOM killer, say): another worker here
    takes its run over at once, as `serve` does, not when the dead one's lease runs out
    (60 s here); the step cut short goes to a person, in doubt. On both engines."""
    workspace, _, logs = _drain_drill(tmp_path, seconds=30)
    db = db_url
    with worker_pool(1, workspace, db, logs, concurrency=2, ttl=60.0) as (first,):
        await _start_the_slow_step(workspace, db, first)
        first.proc.kill()
        first.proc.wait(timeout=10)
    second = start_worker("second", workspace, db, logs, 2, 60.0)
    try:
        await_ready([second])
        deadline = time.monotonic() + 20
        while run_status(db, "d") != "waiting_approval":
            assert time.monotonic() < deadline, diagnostics(db, [first, second], None)
            await asyncio.sleep(0.05)
    finally:
        stop_workers([second])
    claims = [
        json.loads(row[0])
        for row in raw_rows(db, "SELECT data FROM events WHERE type = 'run_claimed' ORDER BY seq")
    ]
    assert claims[-1]["owner"] == second.owner, claims
    assert claims[-1]["taken_over_from"] == first.owner, claims
    assert raw_rows(db, "SELECT kind, step_id FROM approvals WHERE run_id = 'd'") == [
        ("in_doubt", "slow")
    ]


async def test_a_second_sigterm_stops_a_draining_worker_at_once(tmp_path: Path) -> None:
    """Whoever sends a second SIGTERM (or Ctrl-C) will not wait: the worker hands the run
    back at once, its step in flight in doubt, as before there was a drain."""
    workspace, db, logs = _drain_drill(tmp_path, seconds=30)
    with worker_pool(1, workspace, db, logs, concurrency=2, ttl=10.0) as (worker,):
        await _start_the_slow_step(workspace, db, worker)
        worker.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while "a second signal stops at once" not in worker.stderr():
            assert time.monotonic() < deadline, worker.tail()
            await asyncio.sleep(0.05)
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.proc.wait(timeout=15) == 0, worker.tail()  # not the step's 30 s
    assert "d still in a step: handed back" in worker.stderr(), worker.tail()
    assert run_status(db, "d") == "queued"
    assert raw_rows(db, "SELECT status FROM tool_calls WHERE step_id = 'slow'") == [("intent",)]
    [(why,)] = raw_rows(db, "SELECT data FROM events WHERE type = 'run_interrupted'")
    assert "this process stopped while call d#" in why


async def test_two_workers_drive_supervised_incidents_whose_children_end_together(
    tmp_path: Path, db_url: str
) -> None:
    """Supervised incidents over two in-process workers, each with its own connections: the
    planner, executor and verifier of one incident land on either worker, and a child's end
    must wake its waiting sibling and, with the last child, its parent, even when two
    children of one family end at the same moment on two workers. A lost wake-up leaves an
    incident waiting forever, and a claimed run left undriven waits out its 30 s lease; the
    20 s deadline below turns either into a failure (the whole test takes about 2 s)."""
    import asyncio

    from agent.frontends.worker import Worker

    workspace = make_workspace(tmp_path / "ws")
    settings = Settings(
        _env_file=None,
        db=db_url,
        workspace=workspace,
        mock_llm=True,
        user="oncall",
        lease_ttl=30.0,
    )
    drivers = [await RunService.open(settings) for _ in range(2)]
    recorder = await RunService.open(settings, executes_runs=False)
    tasks = [asyncio.create_task(Worker(d, 8, poll_interval=0.2).run()) for d in drivers]
    incidents = [f"sup-{n:02d}" for n in range(12)]
    try:
        for run_id in incidents:
            await recorder.start(run_id, "incident: API latency spike", role="supervisor")
        deadline = time.monotonic() + 20
        decided: set[str] = set()
        while True:
            runs = {run_id: await recorder.get(run_id) for run_id in incidents}
            if all(run.status.is_terminal for run in runs.values()):
                break
            assert time.monotonic() < deadline, {k: v.status for k, v in runs.items()}
            for run_id in runs:
                pending = await recorder.pending_approval(run_id)
                if pending is not None and pending.id not in decided:
                    await recorder.decide(
                        pending.run_id,
                        Decision.APPROVE,
                        "cli:oncall",
                        approval_number=pending.number,
                    )
                    decided.add(pending.id)
            await asyncio.sleep(0.05)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for service in (*drivers, recorder):
            await service.close()
    assert {run.status for run in runs.values()} == {"succeeded"}
    owners = raw_rows(
        db_url,
        "SELECT DISTINCT data FROM events WHERE type = 'run_claimed'",
    )
    claimed_by = {json.loads(row[0])["owner"] for row in owners}
    assert len(claimed_by) == 2, claimed_by  # both workers drove runs


WAITS_UNDRIVEN = "run api-1 waits and no live process drives runs: start `loom-ops worker`"


async def test_the_api_without_a_worker_records_and_a_worker_drives(
    tmp_path: Path, db_url: str
) -> None:
    """`loom-ops serve --no-worker` records a run, drives none of it and logs that it waits
    for a process that drives runs; a `loom-ops worker` started later drives it to its gate,
    the API records the approval, and the worker resumes it to the end."""
    import asyncio

    import httpx

    from tests.http_harness import ServeProcess, free_port

    workspace = drill_workspace(tmp_path / "ws")
    api = ServeProcess(
        workspace,
        db_url,
        free_port(),
        "--no-worker",
        LOOM_OPS_API_USER=APPROVER,
        LOOM_OPS_ALLOW_SHELL="1",  # the runs it records run their commands live
    ).start()
    workers: list[WorkerProc] = []
    try:
        async with httpx.AsyncClient(base_url=api.url, timeout=10) as client:
            created = await client.post(
                "/runs", json={"message": "crash-drill tag=w901", "run_id": "api-1"}
            )
            assert created.status_code == 201, created.text
            deadline = time.monotonic() + 20
            while WAITS_UNDRIVEN not in api.output():  # once it waited 6 s for nobody
                assert time.monotonic() < deadline, api.output()
                await asyncio.sleep(0.1)
            assert (await client.get("/runs/api-1")).json()["status"] == "queued"

            workers.append(start_worker("w", workspace, db_url, tmp_path, 2, LEASE_TTL))
            await_ready(workers)
            deadline = time.monotonic() + 30
            while (run := (await client.get("/runs/api-1")).json())["approval"] is None:
                assert time.monotonic() < deadline, (run, workers[0].log.read_text())
                await asyncio.sleep(0.1)
            decided = await client.post("/runs/api-1/approve", json={})
            assert decided.status_code == 200, decided.text
            while (run := (await client.get("/runs/api-1")).json())["status"] != "succeeded":
                assert time.monotonic() < deadline, (run, workers[0].log.read_text())
                await asyncio.sleep(0.1)
    finally:
        stop_workers(workers)
        api.stop()
    assert markers(workspace) == Counter({"one w901": 1, "two w901": 1})
    assert api.output().count(WAITS_UNDRIVEN) == 1, api.output()  # never while a worker lives
    owners = {
        json.loads(row[0])["owner"]
        for row in raw_rows(db_url, "SELECT data FROM events WHERE type = 'run_claimed'")
    }
    assert owners == {workers[0].owner}  # the worker drove every claim; the API none


async def test_a_front_end_names_the_runs_no_live_worker_may_act(
    tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Live runs wait beside a `--no-worker` front end (without LOOM_OPS_ALLOW_SHELL
    itself: the runs were started elsewhere): a live worker without that setting does not
    drive them, so they are named as waiting, with the setting the runs need; a run that
    does nothing live is that worker's."""
    from agent.service import maintenance

    monkeypatch.setattr(maintenance, "PROCESS_LIVE_WITHIN", 0.0)  # name a waiting run at once
    settings = Settings(
        _env_file=None,
        db=db_url,
        workspace=make_workspace(tmp_path / "ws"),
        user="tester",
    )
    service = RunService(await RunStore.open(db_url), settings, executes_runs=False)
    try:
        live = replace(queued_run("live"), effects=Effects(shell=True))
        await service.store.create_run(live)
        await service.store.create_run(replace(queued_run("dry"), effects=Effects()))
        assert sorted(await service.runs_nobody_drives()) == ["dry", "live"]
        # Processes of another host, live by their heartbeat: a dry worker, then one that may.
        await service.store.beat_process("elsewhere:1:dry", "worker", True, Effects())
        assert await service.runs_nobody_drives() == ["live"]
        with caplog.at_level("WARNING", logger=maintenance.log.name):
            warning = asyncio.create_task(maintenance.warn_of_undriven_runs_forever(service, set()))
            deadline = time.monotonic() + 10
            while "run live waits" not in caplog.text:
                assert time.monotonic() < deadline, caplog.text
                await asyncio.sleep(0.05)
            warning.cancel()
            await asyncio.gather(warning, return_exceptions=True)
        await service.store.beat_process("elsewhere:2:live", "worker", True, Effects(shell=True))
        assert await service.runs_nobody_drives() == []
    finally:
        await service.close()
    assert (
        "run live waits and no live process that drives runs may act it: start `loom-ops worker` "
        "with LOOM_OPS_ALLOW_SHELL=1 (this process was started with --no-worker)"
    ) in caplog.text


def _process_state(pid: int) -> str:
    """The state letter of a process (T: stopped), or "" when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def _out_lines(workspace: Path) -> list[str]:
    path = workspace / "out.txt"
    return path.read_text().splitlines() if path.exists() else []


async def test_a_worker_frozen_between_intent_and_spawn_starts_nothing_once_it_lost_the_run(
    tmp_path: Path,
) -> None:
    """A worker SIGSTOPped right after committing a step's intent loses its lease; another
    worker takes the run over, a person says retry, the step runs once. After SIGCONT the
    frozen worker starts nothing: one effect per step, and the journal is intact."""
    with postgres_schema() as db:
        workspace = make_workspace(tmp_path / "ws")  # crash drill: prepare, append-one, ...
        logs = tmp_path / "logs"
        logs.mkdir()
        # Stopped right before its first live effect, append-one's command, after its intent.
        frozen = start_worker("frozen", workspace, db, logs, 1, 1.0, "before_effect:1:stop")
        other: WorkerProc | None = None
        try:
            await_ready([frozen])
            async with recording_service(workspace, db) as service:
                await service.start("stall", "crash-drill")
                deadline = time.monotonic() + 30
                while _process_state(frozen.proc.pid) != "T":
                    assert time.monotonic() < deadline, frozen.tail()
                    time.sleep(0.02)
                assert _out_lines(workspace) == []

                other = start_worker("other", workspace, db, logs, 1, 1.0)
                await_ready([other])
                deadline = time.monotonic() + 30
                while (pending := await service.pending_approval("stall")) is None:
                    assert time.monotonic() < deadline, other.tail()
                    time.sleep(0.05)
                assert (pending.kind, pending.step_id) == ("in_doubt", "append-one")
                assert "no process of attempt 1 is left" in pending.reason, pending.reason
                result = await service.decide(
                    "stall", Decision.APPROVE, APPROVER, approval_number=pending.number
                )
                assert result.changed, result.message
                deadline = time.monotonic() + 30
                while (pending := await service.pending_approval("stall")) is None:
                    assert time.monotonic() < deadline, other.tail()
                    time.sleep(0.05)
                assert (pending.kind, pending.step_id) == ("gate", "append-two")
                await service.decide(
                    "stall", Decision.APPROVE, APPROVER, approval_number=pending.number
                )
                deadline = time.monotonic() + 30
                while (await service.get("stall")).status != "succeeded":
                    assert time.monotonic() < deadline, other.tail()
                    time.sleep(0.05)

                frozen.proc.send_signal(signal.SIGCONT)
                time.sleep(3)  # the woken worker would spawn append-one now, were it allowed
                assert frozen.proc.poll() is None, frozen.tail()
                assert _out_lines(workspace) == ["one", "two"]
                events = await service.store.list_events("stall")
                assert first_broken_link(events) is None
                intents = [
                    e.data["attempt"]
                    for e in events
                    if e.type == "tool_intent" and e.data.get("step_id") == "append-one"
                ]
                assert intents == [1, 2]  # the frozen attempt and the one a person allowed
        finally:
            stop_workers([frozen, *([other] if other else [])])
        assert "Traceback" not in frozen.stderr(), frozen.tail()


# -- a worker in process: an LLM outage, a stop in the middle of a claim --------------------


def queued_run(run_id: str) -> NewRun:
    """A queued root run as a front end records it."""
    return NewRun(
        id=run_id,
        role="runbook",
        request=LATENCY,
        requested_by="cli:tester",
        origin=Origin(kind="cli"),
        limits=RunLimits(max_steps=10, max_tool_calls=10, deadline_seconds=600),
    )


class LlmDown(MockPolicy):
    """A policy whose endpoint is down: every decision is PolicyUnavailable (counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def decide(self, context: PolicyContext) -> PolicyDecision:
        self.calls += 1
        raise PolicyUnavailable("LLM endpoint answered 503 Service Unavailable")


async def test_a_worker_does_not_hammer_a_run_whose_llm_is_down(
    db_url: str, tmp_path: Path
) -> None:
    """An interrupted run is handed back and announced as runnable, so a worker gets it back
    within milliseconds: without a pause it would ask the dead endpoint hundreds of times in
    two seconds (a dozen on PostgreSQL) and journal as many `run_interrupted` events. Within
    one lease TTL it asks at most twice."""
    settings = Settings(
        _env_file=None, db=db_url, workspace=make_workspace(tmp_path / "ws"), user="tester"
    )
    policy = LlmDown()
    service = RunService(await RunStore.open(db_url), settings, policy=policy)
    try:
        await service.store.create_run(queued_run("r-llm-down"))
        worker = asyncio.create_task(Worker(service, concurrency=4, poll_interval=1.0).run())
        await asyncio.sleep(2.0)
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
        events = await service.store.list_events("r-llm-down")
    finally:
        await service.close()
    interrupted = sum(event.type == "run_interrupted" for event in events)
    assert policy.calls <= 2, (
        f"{policy.calls} LLM calls and {interrupted} run_interrupted events in 2 s "
        f"(lease TTL {settings.lease_ttl} s)"
    )


def _waiting_behind(spy: psycopg.Connection, holder_pid: int) -> int:
    """How many sessions wait for a lock `holder_pid` holds."""
    row = spy.execute(
        "SELECT count(*) FROM pg_locks WHERE NOT granted AND %s = ANY(pg_blocking_pids(pid))",
        (holder_pid,),
    ).fetchone()
    return int(row[0]) if row else 0


async def test_a_worker_stopped_during_a_claim_hands_the_run_back(tmp_path: Path) -> None:
    """`run_worker` cancels the Worker task on stop, but a cancelled `claim_runnable` still
    commits on its database thread. The worker must hand back what that claim took (README:
    'hands its runs back on SIGTERM'), or a rolling restart under load parks runs, 'running',
    for a whole lease TTL.

    The claim is held in flight deterministically by holding the journal advisory lock from
    another session, as a busy journal writer of another process would."""
    with postgres_schema() as url:
        settings = Settings(
            _env_file=None,
            db=url,
            workspace=make_workspace(tmp_path / "ws"),
            mock_llm=True,
            user="tester",
            lease_ttl=60.0,
        )
        store = await RunStore.open(url)
        await store.create_run(queued_run("r-claimed"))
        await store.close()
        with (
            psycopg.connect(url, autocommit=True) as holder,
            psycopg.connect(url, autocommit=True) as spy,
        ):
            holder.execute(
                "SELECT pg_advisory_lock(hashtextextended(current_schema() || "
                "'/loom-ops/journal', 0))"
            )
            stop = asyncio.Event()
            worker = asyncio.create_task(run_worker(settings, 4, stop, poll_interval=0.2))
            deadline = time.monotonic() + 10
            while _waiting_behind(spy, holder.info.backend_pid) == 0:
                assert time.monotonic() < deadline, "the worker never tried to claim"
                await asyncio.sleep(0.02)
            stop.set()  # what SIGTERM does
            await asyncio.sleep(0.3)  # the worker is stopping, its claim still in flight
            holder.execute("SELECT pg_advisory_unlock_all()")  # the journal writer commits
            assert await asyncio.wait_for(worker, 10) == 0
            while _waiting_behind(spy, holder.info.backend_pid):
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)  # the abandoned claim's commit
            [(status, owner, expires)] = raw_rows(
                url, "SELECT status, lease_owner, lease_expires_at FROM runs"
            )
    left = f"{expires - time.time():.0f} s" if expires else "-"
    assert (status, owner) == ("queued", None), (
        f"the worker exited but run r-claimed is {status} under its lease {owner} "
        f"(expires in {left})"
    )
