"""`make demo`: an incident run that stops for approval, is approved, and prints its audit summary.

Runs on the embedded defaults (SQLite, mock LLM, dry-run execution) through the real CLI, and
prints each command first so the reader can type them next time.
"""

from __future__ import annotations

import os
import shlex
import sys
import time

from agent.frontends.cli import main as loom_ops

DEMO_DB = ".loom-ops/demo.sqlite"
# Who is who in the demo: the shipped example people file, in which sam is an approver.
DEMO_PEOPLE = "people.example.yaml"


def _step(title: str, argv: list[str], env: dict[str, str] | None = None) -> int:
    """Print the command as a person would type it, then run it (with `env` set for it)."""
    given = "".join(f"{name}={value} " for name, value in (env or {}).items())
    print(f"\n== {title}\n$ {given}loom-ops {shlex.join(argv)}\n", flush=True)
    saved = {name: os.environ.get(name) for name in env or {}}
    os.environ.update(env or {})
    try:
        return loom_ops(argv)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def main() -> int:
    """Play the incident flow; exit non-zero if any step does not do what it should."""
    run_id = time.strftime("inc-%Y%m%d-%H%M%S")
    common = ["--db", DEMO_DB, "--mock-llm"]
    people = {"LOOM_OPS_PEOPLE_FILE": DEMO_PEOPLE}
    if _step("Validate the shipped runbooks", ["runbooks", "validate"]) != 0:
        return 1
    started = _step(
        "An incident arrives: the agent picks a runbook and runs it until a risky step",
        ["runbook", "incident: API latency spike on checkout", "--run-id", run_id, *common],
    )
    if started != 0:
        return 1
    # A CLI decision is the login's: the demo plays sam logged in (LOOM_OPS_USER stands for
    # the OS login), an approver in the example people file.
    approved = _step(
        "Sam, an approver, approves the gated step from their login; the run finishes",
        ["approve", "--run-id", run_id, "--note", "LGTM, scale out", *common],
        env={**people, "LOOM_OPS_USER": "sam"},
    )
    if approved != 0:
        return 1
    _step("The timeline, for the postmortem", ["explain", "--run-id", run_id, "--db", DEMO_DB])
    print(f"\nDone. The run is in {DEMO_DB}; try: .venv/bin/loom-ops runs --db {DEMO_DB}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
