"""Soak tests: the suite's tests marked `slow`, too long for every CI run.

Runs `pytest -m slow` (the 200-run, three-worker SIGKILL drill on PostgreSQL when
LOOM_OPS_TEST_PG_DSN names a server; the Dockerfile's build commands in a fresh venv) and
prints each test's outcome and wall time. Exits with pytest's status, so a failing soak is
seen; prints and asserts nothing else. Run with `python bench/soak.py` or `make bench`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    """Run the slow tests once, in one process, and report their durations."""
    argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split())).parse_args()
    print("loom-ops soak tests (pytest -m slow)", flush=True)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "slow", "-q", "-p", "no:cacheprovider",
         "--durations=0", "-rs"],
        cwd=REPO,
    )  # fmt: skip
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
