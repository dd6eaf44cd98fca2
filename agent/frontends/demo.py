"""`make demo`: an incident run that stops for approval, is approved, and prints its audit summary.

Runs on the embedded defaults (SQLite, mock LLM, dry-run execution) through the real CLI, and
prints each command first so the reader can type them next time.
"""

from __future__ import annotations

import shlex
import sys
import time

from agent.frontends.cli import main as loom_ops

DEMO_DB = ".loom-ops/demo.sqlite"


def _step(title: str, argv: list[str]) -> int:
    print(f"\n== {title}\n$ loom-ops {shlex.join(argv)}\n", flush=True)
    return loom_ops(argv)


def main() -> int:
    """Play the incident flow; exit non-zero if any step does not do what it should."""
    run_id = time.strftime("inc-%Y%m%d-%H%M%S")
    common = ["--db", DEMO_DB, "--mock-llm"]
    if _step("Validate the shipped runbooks", ["runbooks", "validate"]) != 0:
        return 1
    started = _step(
        "An incident arrives: the agent picks a runbook and runs it until a risky step",
        ["runbook", "incident: API latency spike on checkout", "--run-id", run_id, *common],
    )
    if started != 0:
        return 1
    approved = _step(
        "The on-call approver approves the gated step; the run resumes and finishes",
        ["approve", "--run-id", run_id, "--as", "oncall", "--note", "LGTM, scale out", *common],
    )
    if approved != 0:
        return 1
    _step("The timeline, for the postmortem", ["explain", "--run-id", run_id, "--db", DEMO_DB])
    print(f"\nDone. The run is in {DEMO_DB}; try: loom-ops runs --db {DEMO_DB}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
