"""Older code measured beside this code in the same run: the baseline an issue's figures came from.

An absolute target ("at most 200 µs of CPU, about 440 µs today") holds on the machine the issue
was measured on; on a slower or busier machine the same code takes longer. Measuring the code
the issue measured (its commit) interleaved with this code gives the ratio that carries over
from one machine to another: this code's figure over that code's, against the target over the
issue's figure. A benchmark's `--against COMMIT` does that.

The baseline is that commit's tree (`git archive`) with a virtual environment of its own,
made once per commit and Python version under bench/.baseline/: its dependencies at the
versions this environment has (pip's constraints from our `pip freeze`), the ones we lack as
pip picks them, so that the code is what differs. Making it needs the package index (as
`make test` does) and takes about 45 s; measuring needs nothing more.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "bench" / ".baseline"
PROBE = REPO / "bench" / "step_probe.py"

# The last commit before issue 14's work, the code whose figures the issue gave (on its
# machine), and those figures with the targets. Where the issue gave a range, its top: the
# smallest fraction, the strictest reading.
ISSUE_14_CODE = "f7d0156"
ISSUE_14_STEP_CPU_US, TARGET_STEP_CPU_US = 440, 200  # a dry-run step's CPU
ISSUE_14_STARTUP_MS, TARGET_STARTUP_MS = 290, 150  # `runs`, `approve`: 230-290 ms
ISSUE_14_WORKER_CPU_MS, TARGET_WORKER_CPU_MS = 2.2, 0.8  # a PostgreSQL step: 1.6-2.2 ms
# Counts every instruction the process runs, its threads' too (the database's).
VALGRIND = ("valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null")


def can_count_instructions() -> bool:
    """Whether valgrind is here to count (Debian's package `valgrind`)."""
    return shutil.which(VALGRIND[0]) is not None


class BaselineError(Exception):
    """The baseline's code could not be made ready (an unknown commit, an install that failed)."""


@dataclass(frozen=True)
class Code:
    """One version of the code: its source tree, the interpreter that runs it, and its commit
    (None for this checkout, which may hold changes no commit has)."""

    label: str
    root: Path
    python: Path
    sha: str | None = None

    @property
    def is_issue_14s(self) -> bool:
        """Whether this is the code issue 14 measured, whose figures its targets divide."""
        return self.sha is not None and self.sha.startswith(ISSUE_14_CODE)

    def env(self, **settings: str) -> dict[str, str]:
        """This shell's environment without LOOM_OPS_ settings, with `settings` and this code
        first on the path (bytecode cached, as installed)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_OPS_")}
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env.update(settings, PYTHONPATH=str(self.root))
        return env

    def cli(self) -> list[str]:
        """The command line of this code's `loom-ops`."""
        packaged = (self.root / "agent" / "frontends" / "cli.py").exists()
        return [str(self.python), "-m", "agent.frontends.cli" if packaged else "agent.cli"]

    def step_cpu(self, steps: int, runs: int) -> float:
        """CPU seconds per step of an N-step dry-run run: the best of `runs` in one service,
        in a process of this code's own."""
        with tempfile.TemporaryDirectory(prefix="loom-probe-") as tmp:
            return self._probe(Path(tmp), steps, runs)

    def step_instructions(self, steps: int) -> float:
        """Machine instructions per step of an N-step dry-run run in a warm process, counted
        by valgrind (callgrind): the process with one run more, less the process without
        it. Unlike CPU time, the same on every run of the same code on the same Python (string
        hashing seeded): a comparison no noise moves. System calls are not counted."""
        counts = []
        for runs in (0, 1):
            with tempfile.TemporaryDirectory(prefix="loom-probe-") as tmp:
                done = self._run_probe(Path(tmp), steps, runs, VALGRIND, PYTHONHASHSEED="0")
            collected = re.findall(r"Collected : (\d+)", done.stderr)
            if not collected:
                raise BaselineError(f"{self.label}: valgrind counted nothing: {_last(done.stderr)}")
            counts.append(int(collected[-1]))
        return (counts[1] - counts[0]) / steps

    def _probe(self, directory: Path, steps: int, runs: int) -> float:
        """The step probe's CPU seconds per step, run in `directory` (its store there)."""
        return float(self._run_probe(directory, steps, runs).stdout.split()[-1])

    def _run_probe(
        self, directory: Path, steps: int, runs: int, wrapper: Sequence[str] = (), **settings: str
    ) -> subprocess.CompletedProcess[str]:
        """bench/step_probe.py run by this code (under `wrapper`, e.g. valgrind)."""
        directory.mkdir(exist_ok=True)
        done = subprocess.run(
            [*wrapper, str(self.python), str(PROBE), str(directory), str(steps), str(runs)],
            env=self.env(**settings),
            cwd=directory,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise BaselineError(f"{self.label}: the step probe failed: {_last(done.stderr)}")
        return done

    def bench(self, script: str, args: list[str], **settings: str) -> str:
        """What this code's own benchmark `script` (under bench/) prints, run by this code."""
        done = subprocess.run(
            [str(self.python), str(self.root / "bench" / script), *args],
            env=self.env(**settings),
            cwd=self.root,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise BaselineError(f"{self.label}: bench/{script} failed: {_last(done.stderr)}")
        return done.stdout

    def startup(self, argv: list[str], workspace: Path) -> float:
        """Wall time of one `loom-ops <argv>` in `workspace`, on a store of this code's own
        there holding two short runs (made first, by the step probe), bytecode cached beside
        it (so, for a best-of, the first call writes it)."""
        slug = self.root.name
        store = workspace / f"store-{slug}"
        if not (store / "probe.sqlite").exists():
            self._probe(store, 1, 1)
        env = self.env(
            LOOM_OPS_DB=str(store / "probe.sqlite"),
            LOOM_OPS_WORKSPACE=str(workspace),
            PYTHONPYCACHEPREFIX=str(workspace / f"pycache-{slug}"),
        )
        started = time.perf_counter()
        subprocess.run([*self.cli(), *argv], env=env, cwd=workspace, capture_output=True)
        return time.perf_counter() - started


def this_code() -> Code:
    """The code this benchmark is part of, run by this interpreter."""
    return Code("this code", REPO, Path(sys.executable))


def baseline(commit: str) -> Code:
    """The code at `commit`, with its own virtual environment, made on first use (one process
    at a time: others wait for it); BaselineError, one line, when it cannot be made."""
    if _git("rev-parse", "--is-shallow-repository").strip() == "true":
        raise BaselineError("this clone is shallow: `git fetch --unshallow` first")
    sha = _git("rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}").strip()
    # Its own interpreter is this one's version: a venv keeps the interpreter it was made by.
    root = CACHE / f"{sha[:12]}-py{sys.version_info.major}.{sys.version_info.minor}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / ".ready").exists():
            _make(sha, root)
    return Code(sha[:7], root, root / ".venv" / "bin" / "python", sha)


def add_against(parser: argparse.ArgumentParser) -> None:
    """A benchmark's `--against [COMMIT]` option (alone: the code issue 14 measured)."""
    parser.add_argument(
        "--against",
        nargs="?",
        const=ISSUE_14_CODE,
        metavar="COMMIT",
        help=f"also measure the code at COMMIT (alone: {ISSUE_14_CODE}, which issue 14 measured)",
    )


def baseline_asked(parser: argparse.ArgumentParser, commit: str | None) -> Code | None:
    """The baseline `--against` asked for, made before anything is measured; None when none
    was asked for. One that cannot be made ends the benchmark with its one-line reason when a
    commit was named; the default one (the issue's code) is skipped with it instead (a shallow
    CI clone), as PostgreSQL's rows are when no server answers."""
    if commit is None:
        return None
    try:
        return baseline(commit)
    except BaselineError as exc:
        if commit != ISSUE_14_CODE:
            parser.error(f"--against {commit}: {exc}")
        print(f"  against {commit}: skipped ({exc})")
        return None


def _make(sha: str, root: Path) -> None:
    """Make the baseline from nothing (whatever an earlier attempt left goes first)."""
    print(f"  making the baseline {sha[:7]} under {root} (once) ...", file=sys.stderr)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", sha], cwd=REPO, capture_output=True)
    if archive.returncode != 0:
        raise BaselineError(f"git archive {sha[:7]}: {_last(archive.stderr.decode())}")
    unpacked = subprocess.run(["tar", "-x", "-C", str(root)], input=archive.stdout)
    if unpacked.returncode != 0:
        raise BaselineError(f"unpacking {sha[:7]} under {root} failed")
    ours = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
        capture_output=True,
        text=True,
    )
    constraints = root / "constraints.txt"
    constraints.write_text(ours.stdout)
    pip = str(root / ".venv" / "bin" / "pip")
    for step in (
        [sys.executable, "-m", "venv", str(root / ".venv")],
        # Not editable: its dependencies come along; PYTHONPATH puts the tree first anyway.
        [pip, "install", "--quiet", "--constraint", str(constraints), str(root)],
    ):
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            raise BaselineError(f"making the baseline failed: {_last(done.stderr)}")
    (root / ".ready").touch()


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        what = _last(done.stderr) or "no such commit"
        raise BaselineError(f"git {' '.join(args)}: {what}")
    return done.stdout


def _last(stderr: str) -> str:
    """The line of a failed command's output that says why: its last ERROR line, else its
    last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("ERROR", "error", "fatal"))]
    return (errors or lines or [""])[-1]
