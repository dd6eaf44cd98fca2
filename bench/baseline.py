"""Older code measured beside this code in the same run: the baseline an issue's figures came from.

An absolute target ("at most 200 µs of CPU, about 440 µs today") holds on the machine the issue
was measured on; on a slower or busier machine the same code takes longer. Measuring the code
the issue measured (its commit) interleaved with this code gives the ratio that carries over
from one machine to another: this code's figure over that code's, against the target over the
issue's figure. A benchmark's `--against COMMIT` does that.

The baseline is that commit's tree (`git archive`) with a virtual environment of its own (its
dependencies may differ from ours), made once under bench/.baseline/<commit>/. Making it needs
the package index (as `make test` does); measuring needs nothing more.
"""

from __future__ import annotations

import argparse
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

# The last commit before issue 14's work, the code whose figures the issue gave (on its
# machine): a dry-run step about 440 µs of CPU (target 200), `runs` 230-290 ms to start
# (target 150), a PostgreSQL worker 1.6-2.2 ms of CPU per step (target 0.8).
ISSUE_14_CODE = "f7d0156"
# Counts every instruction the process runs, its threads' too (the database's).
VALGRIND = ("valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null")


def can_count_instructions() -> bool:
    """Whether valgrind is here to count (Debian's package `valgrind`)."""
    return shutil.which(VALGRIND[0]) is not None


# Run by each code's interpreter with that code first on sys.path: a warm-up N-step dry-run
# run (mock policy), then `runs` more in the same service; prints the best CPU time per step
# of those (nan for none). It imports the service from before and after issue 14's move
# into packages.
_STEP_PROBE = """
import asyncio, sys, time
from pathlib import Path
try:
    from agent.service.runs import RunService
except ImportError:  # the flat layout before the packages
    from agent.service import RunService
from agent.settings import Settings

async def main(directory: Path, steps: int, runs: int) -> None:
    books = directory / "runbooks"
    books.mkdir(parents=True, exist_ok=True)
    lines = ["id: probe", "title: Probe", "triggers: [probe]", "steps:"]
    for i in range(steps):
        lines += [f"  - id: s{i}", f"    title: Step {i}", f"    run: echo step {i}"]
    (books / "probe.yaml").write_text("\\n".join(lines) + "\\n")
    settings = Settings(
        _env_file=None, db=str(directory / "probe.sqlite"), workspace=directory,
        mock_llm=True, max_steps=steps + 10, max_tool_calls=steps + 10,
    )
    service = await RunService.open(settings)
    try:
        await service.start("warm-up", "probe")
        spent = []
        for n in range(runs):
            cpu = time.process_time()
            run = await service.start(f"probe-{n}", "probe")
            spent.append(time.process_time() - cpu)
            assert run.status == "succeeded", (run.status, run.error)
    finally:
        await service.close()
    print(min(spent) / steps if spent else "nan")

asyncio.run(main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
"""


class BaselineError(Exception):
    """The baseline's code could not be made ready (an unknown commit, an install that failed)."""


@dataclass(frozen=True)
class Code:
    """One version of the code: its source tree and the interpreter that runs it."""

    label: str
    root: Path
    python: Path

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
            counts.append(int(re.findall(r"Collected : (\d+)", done.stderr)[-1]))
        return (counts[1] - counts[0]) / steps

    def _probe(self, directory: Path, steps: int, runs: int) -> float:
        """Run the step probe in `directory` (its store: probe.sqlite there)."""
        return float(self._run_probe(directory, steps, runs).stdout.split()[-1])

    def _run_probe(
        self, directory: Path, steps: int, runs: int, wrapper: Sequence[str] = (), **settings: str
    ) -> subprocess.CompletedProcess[str]:
        directory.mkdir(exist_ok=True)
        done = subprocess.run(
            [*wrapper, str(self.python), "-c", _STEP_PROBE, str(directory), str(steps), str(runs)],
            env=self.env(**settings),
            cwd=directory,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise BaselineError(f"{self.label}: the step probe failed: {done.stderr.strip()}")
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
            raise BaselineError(f"{self.label}: bench/{script} failed: {done.stderr.strip()}")
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


def add_against(parser: argparse.ArgumentParser) -> None:
    """A benchmark's `--against [COMMIT]` option (alone: the code issue 14 measured)."""
    parser.add_argument(
        "--against",
        nargs="?",
        const=ISSUE_14_CODE,
        metavar="COMMIT",
        help=f"also measure the code at COMMIT (alone: {ISSUE_14_CODE}, which issue 14 measured)",
    )


def this_code() -> Code:
    """The code this benchmark is part of, run by this interpreter."""
    return Code("this code", REPO, Path(sys.executable))


def baseline(commit: str | None) -> Code | None:
    """The code at `commit`, with its own virtual environment (made on first use, before
    anything is measured); None without a commit, or, with one line saying why, when it
    cannot be made (a shallow clone, no package index): the benchmark then runs without it,
    as it runs without PostgreSQL."""
    if commit is None:
        return None
    try:
        sha = _git("rev-parse", "--verify", f"{commit}^{{commit}}").strip()
        root = CACHE / sha[:12]
        if not (root / ".ready").exists():
            _make(sha, root)
    except BaselineError as exc:
        print(f"  against {commit}: skipped ({exc})")
        return None
    return Code(sha[:7], root, root / ".venv" / "bin" / "python")


def _make(sha: str, root: Path) -> None:
    print(f"  making the baseline {sha[:7]} under {root} (once) ...", file=sys.stderr)
    root.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", sha], cwd=REPO, capture_output=True)
    if archive.returncode != 0:
        raise BaselineError(f"git archive {sha[:7]}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive.stdout, check=True)
    for step in (
        [sys.executable, "-m", "venv", str(root / ".venv")],
        # Not editable: its dependencies come along; PYTHONPATH puts the tree first anyway.
        [str(root / ".venv" / "bin" / "pip"), "install", "--quiet", str(root)],
    ):
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            raise BaselineError(f"making the baseline failed: {done.stderr.strip()[-500:]}")
    (root / ".ready").touch()


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise BaselineError(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout
