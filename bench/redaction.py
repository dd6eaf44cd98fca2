"""Micro-benchmark of secret redaction: what a step's redaction costs, every pattern on every
string (`Redactor.slow_text`, what `text` did before the prefilter and the cache) against the
fast path (`Redactor.text`), on the same strings in the same run.

Prints figures and ratios; asserts nothing. Run with `python bench/redaction.py` (`make bench`).

Two corpora, each a list of steps, each step the strings the kernel hands the redactor:

- dry-run: recorded from a real dry-run run (mock policy, SQLite) through RunService, by
  wrapping its Redactor's `text` (which `data` calls for every string, keys included);
- live: the same steps, each outcome also carrying 2 KiB of command output (kubectl-like
  lines with timestamps, URLs and `key=value` pairs, no secret), as a live shell step has.

Fast path figures: cold, a new Redactor per step (nothing cached); warm, one Redactor over the
whole run (the steady state of a long-lived process).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
# Run as a script, bench/ comes first on sys.path, and bench/http.py would shadow the
# standard library's `http` (httpx needs it): put the repo there instead.
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != BENCH]

from agent.redaction import Redactor  # noqa: E402
from agent.service.runs import RunService  # noqa: E402
from agent.settings import Settings  # noqa: E402

OUTPUT_LINE = (
    "2026-05-01T10:{minute:02d}:07Z checkout-api-7d9f8b6c5-x{n}q2 1/1 Running 0 3h "
    "10.42.{n}.17 node-{n} GET https://checkout.internal/api/v1/orders?page={n} status=200 "
    "latency_ms={n}3\n"
)


async def recorded_steps(directory: Path, steps: int) -> list[list[str]]:
    """The strings the redactor saw in a `steps`-step dry-run run, one list per tool call."""
    workspace = directory / "ws"
    (workspace / "runbooks").mkdir(parents=True)
    lines = ["id: bench-redaction", "title: Redaction benchmark", "triggers: [bench]", "steps:"]
    for i in range(steps):
        lines += [f"  - id: s{i}", f"    title: Step {i}", f"    run: echo step {i}"]
    (workspace / "runbooks" / "bench-redaction.yaml").write_text("\n".join(lines) + "\n")
    settings = Settings(
        _env_file=None,
        db=str(directory / "run.sqlite"),
        workspace=workspace,
        mock_llm=True,
        max_steps=steps + 10,
        max_tool_calls=steps + 10,
    )
    service = await RunService.open(settings)
    seen: list[str] = []
    redactor = service.redactor
    text = redactor.text

    def recording(value: str) -> str:
        seen.append(value)
        return text(value)

    redactor.text = recording  # type: ignore[method-assign]
    try:
        run = await service.start("bench-redaction", "bench")
        assert run.status == "succeeded", (run.status, run.error)
        calls = len(await service.store.list_tool_calls("bench-redaction"))
    finally:
        await service.close()
    # Spread evenly: what matters is the strings per step, not which step each came from.
    per = max(1, len(seen) // calls)
    return [seen[i : i + per] for i in range(0, per * calls, per)]


def with_output(steps: list[list[str]], size: int) -> list[list[str]]:
    """Each step with `size` characters of (secret-free) command output added."""
    out = []
    for n, strings in enumerate(steps):
        lines = [OUTPUT_LINE.format(minute=k % 60, n=n + k) for k in range(64)]
        out.append([*strings, "".join(lines)[:size], "stderr", "exit_code"])
    return out


def per_step(steps: list[list[str]], redact: Callable[[int], Callable[[str], str]]) -> float:
    """Best of five: seconds of CPU per step for `redact(step number)` over every string."""
    best = float("inf")
    for _ in range(5):
        started = time.process_time()
        for n, strings in enumerate(steps):
            fn = redact(n)
            for value in strings:
                fn(value)
        best = min(best, (time.process_time() - started) / len(steps))
    return best


def report(label: str, steps: list[list[str]]) -> None:
    """Print slow against fast (cold, warm) per step for one corpus."""
    strings = sum(len(s) for s in steps) / len(steps)
    chars = sum(len(v) for s in steps for v in s) / len(steps)
    slow = per_step(steps, lambda n: Redactor().slow_text)
    cold_redactors = [Redactor() for _ in range(5 * len(steps))]  # made outside the clock
    fresh = iter(cold_redactors)
    cold = per_step(steps, lambda n: next(fresh).text)
    warm_redactor = Redactor()
    warm = per_step(steps, lambda n: warm_redactor.text)
    print(f"  {label}: {strings:.0f} strings, {chars:,.0f} characters per step")
    print(f"    every pattern on every string (before)  {slow * 1e6:9.1f} µs/step")
    print(
        f"    prefilter, cold cache                   {cold * 1e6:9.1f} µs/step"
        f"   {slow / cold:6.1f}x faster"
    )
    print(
        f"    prefilter + warm cache (after)          {warm * 1e6:9.1f} µs/step"
        f"   {slow / warm:6.1f}x faster"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--steps", type=int, default=200, help="steps of the recorded run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="loom-bench-redaction-") as tmp:
        steps = await recorded_steps(Path(tmp), args.steps)
    print("loom-ops redaction benchmark (CPU time, best of five; same strings both ways)")
    report("dry-run steps", steps)
    report("live steps, 2 KiB of output each", with_output(steps, 2048))


if __name__ == "__main__":
    asyncio.run(main())
