"""The offline HTML trace: self-contained, escaped, complete, and rendered by a real browser."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from tests.cli_helpers import Cli, make_cli_workspace

EXTERNAL = re.compile(
    r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//|url\(\s*["']?\s*(?:https?:)?//""", re.I
)


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> tuple[Cli, Path]:
    """An approved run whose trace was written by `runbook --trace` and then `trace`."""
    tmp_path = tmp_path_factory.mktemp("traced")
    cli = Cli(make_cli_workspace(tmp_path / "ws"), tmp_path / "ops.sqlite")
    early = tmp_path / "early.html"
    message = "incident: API latency spike <script>alert(1)</script> see https://evil.example/x"
    started = cli("runbook", message, "--run-id", "t1", "--mock-llm", "--trace", str(early))
    assert started.returncode == 0, started.describe()
    assert "waiting_approval" in early.read_text()
    assert (
        cli("approve", "--run-id", "t1", "--as", "oncall", "--note", "go", "--mock-llm").returncode
        == 0
    )
    out = tmp_path / "t1.html"
    done = cli("trace", "--run-id", "t1", "-o", str(out))
    assert done.returncode == 0 and f"wrote {out}" in done.stdout
    return cli, out


def test_the_trace_loads_nothing_from_anywhere(traced: tuple[Cli, Path]) -> None:
    html = traced[1].read_text()
    assert not EXTERNAL.search(html), EXTERNAL.search(html)
    assert "<link" not in html and not re.search(r"<script[^>]+src", html)
    assert "@import" not in html


def test_the_trace_escapes_what_the_run_carried(traced: tuple[Cli, Path]) -> None:
    html = traced[1].read_text()
    assert "<script>alert" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt; see https://evil.example/x" in html


def test_the_trace_shows_policy_turns_tool_calls_and_approvals(traced: tuple[Cli, Path]) -> None:
    html = traced[1].read_text()
    assert "Trace of run t1" in html and "succeeded" in html
    assert "turn 0 · mock → read_runbook" in html
    assert "execute_step {&#34;step_id&#34;: &#34;scale-out&#34;}" in html
    assert "approval #1 approved by cli:oncall — go" in html
    assert html.count("<details>") >= 10  # folds without any script


def _png_is_blank(path: Path) -> bool:
    """True when the PNG's filtered pixel stream has almost no distinct byte values.

    An empty white page compresses to a handful (filter types and 255); rendered text and
    colours give well over a hundred.
    """
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    offset, idat = 8, b""
    while offset < len(data):
        length, kind = struct.unpack(">I4s", data[offset : offset + 8])
        if kind == b"IDAT":
            idat += data[offset + 8 : offset + 8 + length]
        offset += 12 + length
    return len(set(zlib.decompress(idat))) < 16


def test_the_trace_renders_in_headless_chromium(traced: tuple[Cli, Path], tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    shot = tmp_path / "trace.png"
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1200,1400",
            traced[1].as_uri(),
        ],
        capture_output=True,
        timeout=90,
        check=True,
    )
    assert shot.exists() and not _png_is_blank(shot)


async def test_command_output_is_shown_as_text_stderr_first(tmp_path: Path) -> None:
    """What a live command printed reads as lines in the trace, not one JSON-escaped string."""
    from agent.service.runs import RunService
    from agent.settings import Settings
    from agent.views.trace import render_trace, trace_of
    from tests.conftest import make_workspace
    from tests.support import allow, write_runbook

    workspace = make_workspace(tmp_path / "ws")
    write_runbook(
        workspace,
        "noisy",
        "id: noisy\ntitle: Noisy\ntriggers: [noisy]\nsteps:\n"
        "  - id: speak\n    title: Speak\n"
        "    run: \"{python} -c \\\"import sys; print('line one'); print('line two'); "
        "sys.stderr.write('oops: refused\\\\n'); sys.exit(1)\\\"\"\n",
    )
    allow(workspace, "-c", "*")
    settings = Settings(
        _env_file=None,
        db=str(tmp_path / "ops.sqlite"),
        workspace=workspace,
        mock_llm=True,
        allow_shell=True,
        user="tester",
    )
    service = await RunService.open(settings)
    try:
        await service.start("noisy-1", "noisy")
        tree = await service.run_tree("noisy-1", calls=False, events=True)
        html = render_trace(trace_of(tree))
    finally:
        await service.close()
    assert "--- stderr ---\noops: refused" in html
    assert "--- stdout ---\nline one\nline two" in html
    assert html.index("--- stderr ---") < html.index("--- stdout ---")
