"""Benchmark of the supervisor team: the demo incident through `supervise --mock-llm`.

Prints figures; asserts nothing. Run with `python bench/supervise.py`.

- wall time of one supervised incident (planner, executor and verifier children, the
  executor's approval decided), in-process and as whole CLI processes (supervise + approve);
- the same for 20 supervised incidents at once in one process;
each the median of several runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
# Run as a script, bench/ comes first on sys.path, and bench/http.py would shadow the
# standard library's `http` (httpx needs it): put the repo there instead.
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != BENCH]

from agent.records import Decision, RunStatus  # noqa: E402
from agent.service.runs import RunService  # noqa: E402
from agent.settings import Settings  # noqa: E402

INCIDENT = "incident: API latency spike"


def workspace(directory: Path) -> Path:
    """A workspace with the shipped runbooks, and oncall in the group they name."""
    shutil.copytree(REPO / "runbooks", directory / "runbooks")
    (directory / "people.yaml").write_text(
        "people:\n  - name: oncall\n    cli: oncall\n    groups: [approvers]\n"
    )
    return directory


async def one_incident(service: RunService, run_id: str) -> None:
    """Supervise, approve the executor's gate through the root, check the tree succeeded."""
    await service.start(run_id, INCIDENT, role="supervisor")
    await service.decide(run_id, Decision.APPROVE, "cli:oncall")
    run = await service.get(run_id)
    assert run.status == RunStatus.SUCCEEDED, (run.status, run.error)


async def in_process(directory: Path, runs: int, concurrent: int) -> list[float]:
    """Seconds per round of `concurrent` incidents, over `runs` rounds."""
    times = []
    for round_ in range(runs):
        ws = workspace(directory / f"inproc-{concurrent}-{round_}")
        settings = Settings(_env_file=None, db=str(ws / "ops.sqlite"), workspace=ws, mock_llm=True)
        service = await RunService.open(settings)
        try:
            service.catalog()
            started = time.perf_counter()
            await asyncio.gather(*(one_incident(service, f"inc-{i}") for i in range(concurrent)))
            times.append(time.perf_counter() - started)
        finally:
            await service.close()
    return times


def as_processes(directory: Path, runs: int) -> list[float]:
    """Seconds for `loom-ops supervise` then `loom-ops approve`, as two real processes."""
    times = []
    for round_ in range(runs):
        ws = workspace(directory / f"cli-{round_}")
        env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_OPS_")}
        env.update(LOOM_OPS_DB=str(ws / "ops.sqlite"), LOOM_OPS_MOCK_LLM="1")
        env["PYTHONPATH"] = str(REPO)
        cli = [sys.executable, "-m", "agent.frontends.cli"]
        started = time.perf_counter()
        subprocess.run(
            [*cli, "supervise", INCIDENT, "--run-id", "inc"],
            cwd=ws,
            env=env,
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [*cli, "approve", "--run-id", "inc"],
            cwd=ws,
            env=env | {"LOOM_OPS_USER": "oncall"},  # the approver's login
            check=True,
            capture_output=True,
        )
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--runs", type=int, default=5, help="rounds per measurement")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="loom-bench-") as tmp:
        directory = Path(tmp)
        single = asyncio.run(in_process(directory, args.runs, 1))
        twenty = asyncio.run(in_process(directory, args.runs, 20))
        processes = as_processes(directory, args.runs)
    median = statistics.median
    print(f"loom-ops supervise benchmark (mock policy, dry-run; median of {args.runs} runs)")
    print(f"  one incident, in-process                 {median(single) * 1e3:8.1f} ms")
    print(f"  one incident, supervise + approve CLIs   {median(processes) * 1e3:8.1f} ms")
    print(
        f"  20 incidents at once, in-process         {median(twenty) * 1e3:8.1f} ms"
        f"   ({median(twenty) / 20 * 1e3:.1f} ms per incident)"
    )


if __name__ == "__main__":
    main()
