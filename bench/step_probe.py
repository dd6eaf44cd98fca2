"""One code's dry-run step, timed in a process of its own: what bench/baseline.py runs.

`python bench/step_probe.py DIR STEPS RUNS`, with the code to measure first on PYTHONPATH (this
one's, or an older commit's): in DIR a runbook of STEPS dry-run command steps, a warm-up run
of it (mock policy), then RUNS more runs in the same service; prints the best CPU seconds per
step of those (nan for none). It imports the service from before and after issue 14's move
into packages, so it measures the code that issue measured as well; bench/kernel.py builds
its in-process runs from the same runbook and settings.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, bench/ comes first on sys.path, and bench/http.py would shadow the
# standard library's `http`: leave the code on PYTHONPATH first instead.
BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]

import asyncio  # noqa: E402
import time  # noqa: E402

try:
    from agent.service.runs import RunService
except ImportError:  # the flat layout before the packages
    from agent.service import RunService  # type: ignore[no-redef]
from agent.settings import Settings  # noqa: E402


def write_runbook(workspace: Path, steps: int) -> None:
    """A runbook of `steps` dry-run command steps."""
    (workspace / "runbooks").mkdir(parents=True, exist_ok=True)
    lines = [
        f"id: bench-{steps}",
        f"title: Benchmark with {steps} steps",
        f"triggers: [bench {steps}]",
        "steps:",
    ]
    for i in range(steps):
        lines += [f"  - id: s{i}", f"    title: Step {i}", f"    run: echo step {i}"]
    (workspace / "runbooks" / f"bench-{steps}.yaml").write_text("\n".join(lines) + "\n")


def settings_for(workspace: Path, db: Path, steps: int) -> Settings:
    """Mock LLM, dry-run, budgets large enough for the run."""
    return Settings(
        _env_file=None,
        db=str(db),
        workspace=workspace,
        mock_llm=True,
        max_steps=steps + 10,
        max_tool_calls=steps + 10,
    )


async def main(directory: Path, steps: int, runs: int) -> None:
    write_runbook(directory, steps)
    settings = settings_for(directory, directory / "probe.sqlite", steps)
    service = await RunService.open(settings)
    try:
        await service.start("warm-up", f"bench {steps}")
        spent = []
        for n in range(runs):
            cpu = time.process_time()
            run = await service.start(f"probe-{n}", f"bench {steps}")
            spent.append(time.process_time() - cpu)
            assert run.status == "succeeded", (run.status, run.error)
    finally:
        await service.close()
    print(min(spent) / steps if spent else "nan")


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
