"""Benchmark of scale-out: runs per second with 1, 2 and 4 `loom-ops worker` processes on
PostgreSQL, next to one process on SQLite, all on this machine.

Prints one table and the ratios; asserts nothing. Run with `python bench/scale.py [--runs 200]`
(`--quick` for a sanity pass of 40 runs).

Workload: `--runs` runs of a bench-only runbook with `--steps` gate-free steps (a note, dry-run
`run:` steps, a synthetic health check), mock policy, no approval gate, so what is measured is
the engine (claims, leases, the journal), not a human or an LLM. Each run makes steps + 2 tool
calls (read_runbook, the steps, record_audit).

Each configuration gets a fresh store (a new PostgreSQL schema, dropped afterwards, or a new
SQLite file) and a fresh workspace. The workers are started first and left idle; then this
process creates every run through a RunService opened with `executes_runs=False` (it only
records). Throughput is N / (last run's `finished_at` - first run's `created_at`), both read
from the store; the counts of tool calls and events come from the journal. Per-step overhead
is that wall time, the workers' CPU time, and the whole machine's busy CPU time (the PostgreSQL
server, this process's creates and polling, the OS) divided by the journaled tool calls.

A worker on SQLite sees runs another process created at its next poll (every second): the
`wake` column, which the SQLite worker's runs/s includes. PostgreSQL wakes it by NOTIFY.

"sqlite in-process" is the same runs driven by this process alone: RunService.start(wait=False)
on a SQLite file, no worker (every run is driven at once, no concurrency cap).

Store round trips are counted in a separate pass (counting costs CPU, so its figures are kept
out of the table): one worker on PostgreSQL, run through `bench/roundtrips.py`, which counts
every store call and every network round trip (psycopg waiting for the server: a statement, a
COMMIT, a pipeline's sync) by the store method that made it. A snapshot is taken (SIGUSR1) as
the first run is created and after the last one finished: the difference, over the journaled
tool calls, is the worker's round trips per step. This process's own (creating the runs) are
counted apart, per run. Then the issue's targets: at most 6 round trips and at most 0.8 ms of
worker CPU per PostgreSQL step ("met" / "not met"; nothing fails).

With `--against COMMIT` (alone: the code issue 14 measured), each round also runs that commit's
own bench/scale.py for one PostgreSQL worker (its interpreter, its tree: bench/baseline.py) and
reads its worker CPU per step: the target as a ratio to the figure the issue gave for that
code, which carries over to a machine slower or faster than the issue's.

PostgreSQL: LOOM_OPS_BENCH_PG_DSN, else LOOM_OPS_TEST_PG_DSN, else
postgresql://postgres@127.0.0.1/test. Without a reachable server the PostgreSQL rows are skipped.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, bench/ comes first on sys.path, and bench/http.py would shadow the
# standard library's `http` (httpx needs it): put the repo there instead.
BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != BENCH]

import argparse  # noqa: E402
import asyncio  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import secrets  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402
from urllib.parse import quote  # noqa: E402

import psycopg  # noqa: E402

from agent.records import TERMINAL_STATUSES  # noqa: E402
from agent.service.runs import RunService  # noqa: E402
from agent.settings import Settings  # noqa: E402
from agent.store.postgres import redact_url  # noqa: E402
from bench.baseline import (  # noqa: E402
    ISSUE_14_WORKER_CPU_MS,
    TARGET_WORKER_CPU_MS,
    BaselineError,
    Code,
    add_against,
    baseline_asked,
)
from bench.roundtrips import RoundTrips, count_postgres, count_store  # noqa: E402

DEFAULT_DSN = "postgresql://postgres@127.0.0.1/test"
TICK = os.sysconf("SC_CLK_TCK")
POLL = 0.05  # seconds between "are all runs finished?" looks
READY_TIMEOUT = 60.0
SNAPSHOT_TIMEOUT = 10.0
TARGET_ROUND_TRIPS = 6
ONE_WORKER = "postgresql, 1 worker"
FINISH_TIMEOUT = 600.0
TERMINAL = tuple(sorted(str(status) for status in TERMINAL_STATUSES))


# -- workload -------------------------------------------------------------------------------


def write_workspace(root: Path, steps: int) -> Path:
    """A workspace holding only the bench runbook: `steps` gate-free steps."""
    (root / "runbooks").mkdir(parents=True, exist_ok=True)
    lines = [
        "id: bench-scale",
        "title: Scale benchmark",
        "triggers: [bench scale]",
        "steps:",
        "  - id: s0",
        "    title: Say what is about to happen",
        "    note: nothing runs for real (dry-run)",
    ]
    for i in range(1, steps - 1):
        lines += [f"  - id: s{i}", f"    title: Step {i}", f"    run: echo step {i}"]
    lines += [
        f"  - id: s{steps - 1}",
        "    title: Health check",
        "    check:",
        "      url: http://127.0.0.1:9/healthz",
    ]
    (root / "runbooks" / "bench-scale.yaml").write_text("\n".join(lines) + "\n")
    return root


def settings_for(workspace: Path, db: str) -> Settings:
    """Mock LLM, dry-run shell, synthetic checks; otherwise the product's defaults."""
    return Settings(_env_file=None, db=db, workspace=workspace, mock_llm=True, user="bench")


def child_env(workspace: Path, db: str) -> dict[str, str]:
    """The workers' environment: ours without any LOOM_OPS_ setting, plus the bench's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_OPS_")}
    env.update(
        LOOM_OPS_DB=db,
        LOOM_OPS_WORKSPACE=str(workspace),
        LOOM_OPS_MOCK_LLM="1",
        LOOM_OPS_USER="bench",
        PYTHONPATH=str(REPO),
    )
    return env


def loom_ops() -> list[str]:
    """The `loom-ops` console script of this environment (else `-m agent.frontends.cli`)."""
    script = Path(sys.executable).parent / "loom-ops"
    return [str(script)] if script.exists() else [sys.executable, "-m", "agent.frontends.cli"]


# -- CPU accounting -------------------------------------------------------------------------


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a live process (children not included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14, 15)


def machine_busy() -> float:
    """Busy CPU seconds of the whole machine, all cores (everything but idle and iowait)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
    return (user + nice + system + irq + softirq + steal) / TICK


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- one configuration ----------------------------------------------------------------------


@dataclass
class Result:
    label: str
    runs: int  # created; `succeeded` of them succeeded
    succeeded: int
    elapsed: float  # first created_at -> last finished_at
    create_time: float  # first created_at -> last created_at
    first_claim: float  # first created_at -> first run_claimed event (the wake-up)
    tool_calls: int
    events: int
    worker_cpu: float | None  # None: no worker processes (in-process drive)
    bench_cpu: float
    machine_cpu: float
    background: float  # busy cores while the workers sat idle, just before (other jobs)
    worker_trips: RoundTrips | None = None  # counted pass only: the worker's, in the window
    create_trips: RoundTrips | None = None  # counted pass only: this process's creates

    @property
    def runs_per_s(self) -> float:
        return self.runs / self.elapsed

    def per_step_ms(self, seconds: float) -> float:
        return seconds * 1000 / self.tool_calls


async def journal_counts(service: RunService) -> dict[str, Any]:
    """What the store says about the runs: counts, and the times throughput is taken from."""

    def count(conn: Any) -> dict[str, Any]:
        def one(sql: str) -> Any:
            return conn.execute(sql).fetchone()[0]

        return {
            "succeeded": one("SELECT COUNT(*) FROM runs WHERE status = 'succeeded'"),
            "calls": one("SELECT COUNT(*) FROM tool_calls"),
            "events": one("SELECT COUNT(*) FROM events"),
            "first_created": one("SELECT MIN(created_at) FROM runs"),
            "last_created": one("SELECT MAX(created_at) FROM runs"),
            "last_finished": one("SELECT MAX(finished_at) FROM runs"),
            "first_claim": one("SELECT MIN(ts) FROM events WHERE type = 'run_claimed'"),
        }

    return await service.store.db.read(count)


async def unfinished(service: RunService) -> int:
    marks = ", ".join("?" for _ in TERMINAL)
    return (
        await service.store.db.read(
            lambda c: c.execute(
                f"SELECT COUNT(*) FROM runs WHERE status NOT IN ({marks})", TERMINAL
            ).fetchone()
        )
    )[0]


async def wait_finished(service: RunService) -> None:
    deadline = time.monotonic() + FINISH_TIMEOUT
    while await unfinished(service):
        if time.monotonic() > deadline:
            raise TimeoutError(f"runs still unfinished after {FINISH_TIMEOUT:.0f} s")
        await asyncio.sleep(POLL)


async def create_runs(service: RunService, runs: int) -> None:
    for n in range(runs):
        await service.start(f"scale-{n:05d}", "bench scale", requested_by="cli:bench")


def start_workers(
    count: int,
    concurrency: int,
    workspace: Path,
    db: str,
    logs: Path,
    counted_to: Path | None = None,
) -> list[tuple[subprocess.Popen[bytes], Path]]:
    """`count` workers; with `counted_to`, each runs through bench/roundtrips.py, which
    appends its counts to that file at every SIGUSR1."""
    command = loom_ops()
    if counted_to is not None:
        command = [sys.executable, str(BENCH / "roundtrips.py"), str(counted_to), "--"]
    workers = []
    for k in range(count):
        log = logs / f"worker-{k}.log"
        with open(log, "wb") as handle:
            process = subprocess.Popen(
                [*command, "worker", "--concurrency", str(concurrency)],
                env=child_env(workspace, db),
                cwd=workspace,
                stdout=subprocess.DEVNULL,
                stderr=handle,
            )
        workers.append((process, log))
    return workers


async def wait_ready(workers: list[tuple[subprocess.Popen[bytes], Path]]) -> None:
    """Until every worker printed its banner (it then claims and listens)."""
    deadline = time.monotonic() + READY_TIMEOUT
    for process, log in workers:
        while "loom-ops: worker" not in log.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start:\n{log.read_text(errors='replace')}")
            await asyncio.sleep(0.05)


async def snapshot(
    workers: list[tuple[subprocess.Popen[bytes], Path]], counted_to: Path
) -> RoundTrips:
    """The counts of the (one) counted worker now: SIGUSR1, then its new line in the file."""
    [(process, _)] = workers
    before = len(counted_to.read_text().splitlines()) if counted_to.exists() else 0
    process.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + SNAPSHOT_TIMEOUT
    while True:
        lines = counted_to.read_text().splitlines() if counted_to.exists() else []
        if len(lines) > before and lines[-1].endswith("}"):
            return RoundTrips.from_json(lines[-1])
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"worker {process.pid} wrote no round-trip counts")
        await asyncio.sleep(0.02)


def stop_workers(workers: list[tuple[subprocess.Popen[bytes], Path]]) -> None:
    for process, _ in workers:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process, log in workers:
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        errors = [
            line
            for line in log.read_text(errors="replace").splitlines()
            if " ERROR " in line or "Traceback" in line
        ]
        if errors:
            print(f"  (worker {process.pid}: {len(errors)} error line(s) logged; {errors[0]})")


async def measure(
    label: str,
    directory: Path,
    db: str,
    runs: int,
    steps: int,
    workers: int,
    concurrency: int,
    counted: bool = False,
) -> Result:
    """One configuration: `workers` worker processes (0: drive in this process); `counted`
    (one worker): count store round trips, the worker's and this process's creates."""
    workspace = write_workspace(directory / "ws", steps)
    service = await RunService.open(settings_for(workspace, db), executes_runs=workers == 0)
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []
    counted_to = directory / "roundtrips.jsonl" if counted else None
    creates = count_store(service.store.db) if counted else RoundTrips()
    uncount = count_postgres(creates) if counted else None
    worker_trips = create_trips = None
    try:
        service.catalog()  # parse the runbook before the clock starts
        if workers:
            procs = start_workers(workers, concurrency, workspace, db, directory, counted_to)
            await wait_ready(procs)
            await asyncio.sleep(0.5)  # start-up work (imports, recovery, LISTEN) is done
        # One idle second, measured: what else keeps this machine busy (other jobs skew it all).
        idle0, idle_started = machine_busy(), time.monotonic()
        await asyncio.sleep(1.0)
        background = (machine_busy() - idle0) / (time.monotonic() - idle_started)
        pids = [p.pid for p, _ in procs]
        cpu0 = [process_cpu(pid) for pid in pids]
        machine0, bench0 = machine_busy(), self_cpu()
        if counted_to is not None:
            window = await snapshot(procs, counted_to)
            created = creates.snapshot()
        if workers:
            await create_runs(service, runs)
            if counted_to is not None:
                create_trips = creates.since(created)
        else:
            for n in range(runs):
                await service.start(
                    f"scale-{n:05d}", "bench scale", requested_by="cli:bench", wait=False
                )
        await wait_finished(service)
        machine1, bench1 = machine_busy(), self_cpu()
        if counted_to is not None:
            worker_trips = (await snapshot(procs, counted_to)).since(window)
        worker_cpu = sum(process_cpu(pid) for pid in pids) - sum(cpu0) if workers else None
        journal = await journal_counts(service)
    finally:
        stop_workers(procs)
        await service.close()
        if uncount is not None:
            uncount()
    first = journal["first_created"]
    return Result(
        label=label,
        runs=runs,
        succeeded=journal["succeeded"],
        elapsed=journal["last_finished"] - first,
        create_time=journal["last_created"] - first,
        first_claim=journal["first_claim"] - first,
        tool_calls=journal["calls"],
        events=journal["events"],
        worker_cpu=worker_cpu,
        bench_cpu=bench1 - bench0,
        machine_cpu=machine1 - machine0,
        background=background,
        worker_trips=worker_trips,
        create_trips=create_trips,
    )


class PgSchema:
    """A fresh schema on the PostgreSQL server: the URL whose search_path is it; dropped after."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.schema = f"loom_bench_{secrets.token_hex(6)}"
        self._admin: psycopg.Connection[Any] | None = None

    def __enter__(self) -> str:
        self._admin = psycopg.connect(self.dsn, autocommit=True, connect_timeout=5)
        self._admin.execute(f"CREATE SCHEMA {self.schema}")
        separator = "&" if "?" in self.dsn else "?"
        return f"{self.dsn}{separator}options={quote(f'-csearch_path={self.schema}')}"

    def __exit__(self, *exc: object) -> None:
        assert self._admin is not None
        with self._admin:
            self._admin.execute(f"DROP SCHEMA {self.schema} CASCADE")


def pg_reachable(dsn: str) -> str | None:
    """None when the server answers, else why not (one line)."""
    try:
        with psycopg.connect(dsn, connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return str(exc).strip().splitlines()[0]
    return None


# -- report ---------------------------------------------------------------------------------


def print_table(results: list[Result], steps: int, concurrency: int, rounds: int) -> None:
    usable = len(os.sched_getaffinity(0))
    first = results[0]
    print(
        f"loom-ops scale-out benchmark: {first.runs} runs of {steps} gate-free steps "
        f"({first.tool_calls // first.runs} tool calls per run),\n"
        f"  mock policy, dry-run shell; up to {concurrency} runs at once per worker; "
        f"best of {rounds} interleaved round(s) by runs/s"
    )
    print(f"  machine: {os.cpu_count()} cores ({usable} usable by this process)")
    if usable <= 2:
        print(
            f"  note: on {usable} cores 2 workers already fill the machine and 4 oversubscribe "
            "it\n  (the PostgreSQL server and this process share the same cores)"
        )
    print(
        f"  {'':<22}{'':>7}{'':>9}{'':>5}{'':>7}{'':>7}{'wake':>7}{'wall':>8}"
        f"{'---- CPU ms per step ----':>34}{'idle':>6}"
    )
    print(
        f"  {'configuration':<22}{'runs/s':>7}{'events/s':>9}{'ok':>5}{'wall s':>7}"
        f"{'create':>7}{'ms':>7}{'ms/step':>8}{'workers':>9}{'bench':>8}{'server':>8}"
        f"{'machine':>9}{'load':>6}"
    )
    print("  " + "-" * 112)
    for r in results:
        workers = "-" if r.worker_cpu is None else f"{r.per_step_ms(r.worker_cpu):.3f}"
        # Clock ticks (10 ms) read at slightly different moments: never print below zero.
        rest = max(0.0, r.machine_cpu - (r.worker_cpu or 0.0) - r.bench_cpu)
        print(
            f"  {r.label:<22}{r.runs_per_s:7.1f}{r.events / r.elapsed:9.0f}{r.succeeded:5d}"
            f"{r.elapsed:7.2f}{r.create_time:7.2f}{r.first_claim * 1000:7.0f}"
            f"{r.per_step_ms(r.elapsed):8.3f}{workers:>9}{r.per_step_ms(r.bench_cpu):8.3f}"
            f"{r.per_step_ms(rest):8.3f}{r.per_step_ms(r.machine_cpu):9.3f}{r.background:6.2f}"
        )
    print(
        "  runs/s: runs / (last finished_at - first created_at); create: s from the first to the\n"
        "  last created_at; wake: ms from the first created_at to the first run_claimed event;\n"
        "  a step is one journaled tool call; wall ms/step: the wall time / steps. CPU: the\n"
        "  worker processes' user+sys; this process's (creating, polling; in-process: also\n"
        "  driving); server: the rest of the machine's busy time (the PostgreSQL server, the OS,\n"
        "  other jobs); machine: all of it. idle load: cores busy in the idle second before."
    )
    noisy = [r.label for r in results if r.background > 0.2]
    if noisy:
        print(f"  WARNING: the machine was busy with other work before: {', '.join(noisy)}")
    base = next((r for r in results if r.label == ONE_WORKER), None)
    if base is None:
        return
    print(f"  vs {ONE_WORKER}:")
    for r in results:
        if r is base:
            continue
        line = (
            f"    {r.label:<22} runs/s {r.runs_per_s / base.runs_per_s:5.2f}x"
            f"   wall/step {r.elapsed / r.tool_calls / (base.elapsed / base.tool_calls):5.2f}x"
        )
        if r.worker_cpu is not None and base.worker_cpu is not None:
            ratio = r.per_step_ms(r.worker_cpu) / base.per_step_ms(base.worker_cpu)
            line += f"   worker CPU/step {ratio:5.2f}x"
        ratio = r.per_step_ms(r.machine_cpu) / base.per_step_ms(base.machine_cpu)
        print(line + f"   machine CPU/step {ratio:5.2f}x")


def print_targets(
    results: list[Result], counted: Result | None, older: tuple[Code, float, float] | None
) -> None:
    """The PostgreSQL targets of issue 14 against this run's figures (never a failure); with
    `older` (a code, its worker CPU ms per step and ours, each at its best round), the CPU
    target as a ratio to that code's figure too."""
    base = next((r for r in results if r.label == ONE_WORKER), None)
    if base is None or counted is None:
        return
    assert counted.worker_trips is not None and counted.create_trips is not None
    trips = counted.worker_trips.total_wire / counted.tool_calls
    print(
        f"  store round trips, counted in a separate pass (postgresql, 1 worker, "
        f"{counted.runs} runs, {counted.tool_calls} steps):"
    )
    print("    worker: " + "\n    ".join(counted.worker_trips.lines(counted.tool_calls)))
    print(
        "    this process, creating the runs: "
        + "\n    ".join(counted.create_trips.lines(counted.runs, unit="run", top=3))
    )
    assert base.worker_cpu is not None
    cpu = base.per_step_ms(base.worker_cpu)
    print("  targets (issue 14):")
    for what, met in (
        (
            f"PostgreSQL round trips per step {trips:.2f} <= {TARGET_ROUND_TRIPS}",
            trips <= TARGET_ROUND_TRIPS,
        ),
        (
            f"worker CPU per PostgreSQL step {cpu:.3f} ms <= {TARGET_WORKER_CPU_MS} ms",
            cpu <= TARGET_WORKER_CPU_MS,
        ),
    ):
        print(f"    {'target met    ' if met else 'target NOT met'}  {what}")
    if older is None:
        return
    code, theirs, ours = older
    ratio = ours / theirs
    print(
        f"  against the code at {code.label} (its own bench/scale.py, interleaved, best of each):"
        f"\n    worker CPU per PostgreSQL step  this code {ours:.3f} ms  {code.label} "
        f"{theirs:.3f} ms  {ratio:.2f}x"
    )
    if code.is_issue_14s:
        allowed = TARGET_WORKER_CPU_MS / ISSUE_14_WORKER_CPU_MS
        met = ratio <= allowed
        print(
            f"    {'target met    ' if met else 'target NOT met'}  worker CPU {ratio:.2f}x the "
            f"issue's code <= {TARGET_WORKER_CPU_MS}/{ISSUE_14_WORKER_CPU_MS} ms = {allowed:.2f}x"
        )


def older_worker_cpu(code: Code, dsn: str, args: argparse.Namespace) -> float:
    """`code`'s worker CPU ms per step, from one round of its own bench/scale.py with one
    PostgreSQL worker (the workload's size as ours)."""
    size = ["--runs", str(args.runs), "--steps", str(args.steps)]
    size += ["--concurrency", str(args.concurrency)]
    one = ["--workers", "1", "--rounds", "1", "--no-inprocess"]
    table = code.bench("scale.py", [*one, *size], LOOM_OPS_BENCH_PG_DSN=dsn)
    lines = table.splitlines()
    try:
        header = next(line for line in lines if line.lstrip().startswith("configuration"))
        row = next(line for line in lines if line.lstrip().startswith(ONE_WORKER))
        # Right-aligned columns: the figure is the one that ends where the header's name does.
        end = header.index("workers") + len("workers")
        return float(row[:end].split()[-1])
    except (StopIteration, ValueError, IndexError):
        raise BaselineError(f"{code.label}: no worker CPU in its bench/scale.py table") from None


async def count_round_trips(root: Path, dsn: str, args: argparse.Namespace) -> Result:
    """The counted pass: one worker on PostgreSQL, its store round trips in the window."""
    directory = Path(tempfile.mkdtemp(dir=root))
    with PgSchema(dsn) as url:
        return await measure(
            "postgresql, counted", directory, url, args.runs, args.steps, 1, args.concurrency, True
        )


async def one_round(
    root: Path, dsn: str | None, counts: list[int], args: argparse.Namespace
) -> list[Result]:
    """Every configuration once, each on a fresh store and workspace."""
    runs, steps, concurrency = args.runs, args.steps, args.concurrency
    results = []
    for n in counts if dsn is not None else []:
        directory = Path(tempfile.mkdtemp(dir=root))
        with PgSchema(dsn) as url:
            label = f"postgresql, {n} worker{'s' if n > 1 else ''}"
            results.append(await measure(label, directory, url, runs, steps, n, concurrency))
    directory = Path(tempfile.mkdtemp(dir=root))
    db = str(directory / "ops.sqlite")
    results.append(await measure("sqlite, 1 worker", directory, db, runs, steps, 1, concurrency))
    if not args.no_inprocess:
        directory = Path(tempfile.mkdtemp(dir=root))
        db = str(directory / "ops.sqlite")
        results.append(await measure("sqlite, in-process", directory, db, runs, steps, 0, 0))
    return results


async def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--runs", type=int, default=200, help="runs per configuration")
    parser.add_argument("--steps", type=int, default=6, help="runbook steps per run (>= 3)")
    parser.add_argument("--concurrency", type=int, default=16, help="runs per worker at once")
    parser.add_argument("--workers", default="1,2,4", help="PostgreSQL worker counts")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; best kept")
    parser.add_argument("--quick", action="store_true", help="sanity pass: 40 runs, 1 round")
    parser.add_argument("--no-inprocess", action="store_true", help="skip sqlite in-process")
    add_against(parser)
    args = parser.parse_args()
    if args.quick:
        args.runs, args.rounds = 40, 1
    args.steps = max(3, args.steps)
    counts = [int(n) for n in args.workers.split(",") if n.strip()]
    dsn: str | None = (
        os.environ.get("LOOM_OPS_BENCH_PG_DSN", "").strip()
        or os.environ.get("LOOM_OPS_TEST_PG_DSN", "").strip()
        or DEFAULT_DSN
    )
    why_not = pg_reachable(dsn)
    if why_not is not None:
        print(f"PostgreSQL at {redact_url(dsn)} unreachable ({why_not}): its rows are skipped")
        dsn = None
    code = None
    if args.against and (dsn is None or 1 not in counts):
        print(f"  against {args.against}: skipped (it compares one PostgreSQL worker)")
    elif args.against:
        code = baseline_asked(parser, args.against)
    root = Path(tempfile.mkdtemp(prefix="loom-ops-bench-scale-"))
    try:
        # Interleaved rounds, so that noise hits every configuration alike; keep the best.
        rounds, theirs = [], []
        for _ in range(max(1, args.rounds)):
            rounds.append(await one_round(root, dsn, counts, args))
            if code is not None and dsn is not None:
                try:
                    theirs.append(older_worker_cpu(code, dsn, args))
                except BaselineError as exc:  # this code's figures stand
                    print(f"  against {code.label}: stopped ({exc})")
                    code, theirs = None, []
        counted = await count_round_trips(root, dsn, args) if dsn is not None else None
    finally:
        shutil.rmtree(root, ignore_errors=True)
    best = [max(column, key=lambda r: r.runs_per_s) for column in zip(*rounds, strict=True)]
    print_table(best, args.steps, args.concurrency, len(rounds))
    older = None
    if code is not None and theirs:
        ours = min(
            r.per_step_ms(r.worker_cpu)
            for results in rounds
            for r in results
            if r.label == ONE_WORKER and r.worker_cpu is not None
        )
        older = (code, min(theirs), ours)
    print_targets(best, counted, older)


if __name__ == "__main__":
    asyncio.run(main())
