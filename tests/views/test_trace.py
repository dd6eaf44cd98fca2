"""The offline HTML trace: self-contained, escaped, complete, and rendered by a real browser."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import struct
import subprocess
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.cli_helpers import Cli, make_cli_workspace

SHOTS = Path(tempfile.gettempdir())  # trace-wide.png and trace-phone.png, to look at
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


# -- the waterfall of a supervised incident, in a real browser ---------------------------------

# Fails on its first run (a retry follows), then succeeds.
FLAKY = """\
import pathlib, sys
mark = pathlib.Path("flaky.mark")
if not mark.exists():
    mark.write_text("tried")
    sys.stderr.write("dial tcp 10.0.0.7:5432: connection refused\\n")
    sys.exit(3)
print("connected on the second try")
"""
# Hangs on its first run (its driver is killed meanwhile: in doubt), returns at once after.
HANG_ONCE = """\
import pathlib, sys, time
mark = pathlib.Path("hang.mark")
if not mark.exists():
    mark.write_text("started")
    time.sleep(60)
print("restarted the cache")
"""
WATERFALL_DRILL = """\
id: waterfall-drill
title: Waterfall drill
triggers: [waterfall drill]
approvers: [group:approvers]
params:
  service:
    pattern: "[a-z-]+"
    default: checkout
steps:
  - id: connect
    title: Connect to the database
    run: "{python} flaky.py"
    retries: 1
  - id: restart-cache
    title: Restart the cache
    run: "{python} hang_once.py"
  - id: scale-out
    title: Scale out
    run: "{python} append.py two"
    approval: required
  - id: verify
    title: Health check
    check:
      url: http://127.0.0.1:9/healthz
"""
SAM = "telegram:100000001"  # in the tests' people file, an approver


@dataclass(frozen=True)
class Incident:
    """A supervised incident's trace, and what its database recorded."""

    html: Path
    runs: list[str]
    root: tuple[float, float]  # its created_at, finished_at
    waits: dict[int, tuple[float, float]]  # approval number -> created_at, decided_at


@pytest.fixture(scope="module")
def incident(tmp_path_factory: pytest.TempPathFactory) -> Incident:
    """A supervised incident with a retry (connect fails once), an in-doubt step (its driver
    SIGKILLed while restart-cache runs, then retried by a person) and a gate approved by
    @sam over chat; rendered to one trace file."""
    from agent.records import Decision
    from agent.service.runs import RunService
    from agent.settings import Settings
    from agent.views.trace import render_trace, trace_of
    from tests.cli_helpers import LOOM_OPS, cli_env
    from tests.conftest import make_workspace
    from tests.support import allow, raw_rows, write_runbook

    root = tmp_path_factory.mktemp("incident")
    workspace = make_workspace(root / "ws")
    db = root / "ops.sqlite"
    (workspace / "flaky.py").write_text(FLAKY)
    (workspace / "hang_once.py").write_text(HANG_ONCE)
    write_runbook(workspace, "waterfall-drill", WATERFALL_DRILL)
    allow(workspace, "flaky.py")
    allow(workspace, "hang_once.py")
    env = cli_env(LOOM_OPS_ALLOW_SHELL="1", LOOM_OPS_MOCK_LLM="1")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [LOOM_OPS, *args, "--workspace", str(workspace), "--db", str(db)]
        done = subprocess.run(argv, cwd=workspace, env=env, capture_output=True, text=True)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done
        return done

    where = ["--workspace", str(workspace), "--db", str(db)]
    driver = subprocess.Popen(
        [LOOM_OPS, "supervise", "waterfall-drill service=checkout", "--run-id", "inc", *where],
        cwd=workspace,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        mark = workspace / "hang.mark"
        while not mark.exists():  # the step is running: kill its driver under it
            assert driver.poll() is None, "the driver ended before the step started"
            time.sleep(0.01)
    finally:
        driver.kill()
        driver.wait()
    cli("resume", "--run-id", "inc")  # finds restart-cache in doubt and asks
    time.sleep(0.3)  # the person looks at the world before deciding
    cli("approve", "inc", "--as", "oncall", "--approval", "1", "--note", "the cache is down")
    raw_rows(
        db,
        "INSERT INTO chat_users (identity, display, updated_at) VALUES (?, ?, ?)",
        (SAM, "@sam", time.time()),
    )  # as the bot records a chat user it has seen
    time.sleep(0.8)  # a wait long enough to measure on the picture

    async def decide_and_render() -> str:
        settings = Settings(
            _env_file=None, db=str(db), workspace=workspace, mock_llm=True, allow_shell=True
        )
        service = await RunService.open(settings)
        try:
            await service.decide("inc", Decision.APPROVE, SAM, note="go", approval_number=2)
            tree = await service.run_tree("inc", calls=False, events=True)
            assert tree.root.status == "succeeded", tree.root
            return render_trace(trace_of(tree))
        finally:
            await service.close()

    html = root / "inc.html"
    html.write_text(asyncio.run(decide_and_render()))
    runs = [row[0] for row in raw_rows(db, "SELECT id FROM runs ORDER BY created_at, id")]
    (started, ended), *_ = raw_rows(db, "SELECT created_at, finished_at FROM runs WHERE id='inc'")
    waits = {
        number: (asked, decided)
        for number, asked, decided in raw_rows(
            db, "SELECT number, created_at, decided_at FROM approvals"
        )
    }
    return Incident(html, runs, (started, ended), waits)


CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
# What the page shows of itself, measured by the browser that laid it out.
MEASURE = """
const box = (el) => { const b = el.getBoundingClientRect(); return {x: b.left, w: b.width}; };
const lanes = [...document.querySelectorAll('#lanes g.lane')].map((g) => ({
  run: g.dataset.run,
  role: g.dataset.role,
  span: box(g.querySelector('rect.run-span')),
  bars: [...g.querySelectorAll('rect.bar')].map((r) => ({
    label: r.dataset.label, kind: r.getAttribute('class'), ...box(r),
    target: r.parentNode.getAttribute('href'),
  })),
  bands: [...g.querySelectorAll('rect.band')].map((r) => ({
    title: r.querySelector('title').textContent, ...box(r),
  })),
  turns: g.querySelectorAll('line.turn').length,
  ends: g.querySelectorAll('.run-end').length,
}));
const scroller = document.getElementById('lanes');
return {
  lanes: lanes,
  targets: [...document.querySelectorAll('ol.attempts li')].map((li) => '#' + li.id),
  resources: performance.getEntriesByType('resource').map((e) => e.name),
  pageWidth: document.documentElement.scrollWidth,
  lanesScroll: [scroller.scrollWidth, scroller.clientWidth, getComputedStyle(scroller).overflowX],
};
"""


def _chrome() -> Any:
    """Headless Chromium under selenium (Debian's chromedriver), logging its network."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None or not Path(CHROMEDRIVER).exists():
        pytest.skip("Debian's chromium and chromium-driver are missing (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.add_argument("--window-size=1200,900")
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def _requested(driver: Any) -> set[str]:
    """Every URL the browser asked for since the last look (its DevTools network log)."""
    urls = set()
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.add(message["params"]["request"]["url"])
    return urls


def _overlap(a: dict[str, float], b: dict[str, float]) -> bool:
    return a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"]


def test_the_waterfall_shows_the_incident_in_a_real_browser(incident: Incident) -> None:
    """From the DOM Chromium laid out: one lane per run, parents first; the executor's and
    the verifier's bars side by side in time; the retry and the in-doubt attempt as bars of
    their own, each linked to its details; a wait on @sam as wide as the recorded wait; and
    no request for anything but the file itself."""
    from selenium.webdriver.common.by import By

    driver = _chrome()
    try:
        driver.get(incident.html.as_uri())
        page = driver.execute_script(MEASURE)
        requested = _requested(driver)
        driver.save_screenshot(str(SHOTS / "trace-wide.png"))
        # A tap on the in-doubt bar shows that attempt's details (a link: no script needed).
        driver.find_element(By.CSS_SELECTOR, "rect.bar.in_doubt").click()
        shown = driver.execute_script("return document.querySelector(':target').textContent")
    finally:
        driver.quit()
    assert not _png_is_blank(SHOTS / "trace-wide.png")
    assert requested == {incident.html.as_uri()}, requested
    assert page["resources"] == []

    lanes = {lane["run"]: lane for lane in page["lanes"]}
    assert sorted(lanes) == sorted(incident.runs)  # one lane per run, parents first:
    assert list(lanes) == ["inc", "inc:sub:planner", "inc:sub:executor", "inc:sub:verifier"]
    assert [lanes[run]["role"] for run in ("inc", "inc:sub:executor", "inc:sub:verifier")] == [
        "supervisor",
        "executor",
        "verifier",
    ]
    executor, verifier = lanes["inc:sub:executor"], lanes["inc:sub:verifier"]
    assert any(_overlap(e, v) for e in executor["bars"] for v in verifier["bars"])
    assert _overlap(executor["span"], verifier["span"])

    # The retry: two bars of one step, failed then ok; the in-doubt attempt, then its retry.
    steps = [(bar["label"], bar["kind"]) for bar in executor["bars"]]
    assert steps[:2] == [("connect", "bar failed"), ("connect", "bar ok")]
    assert ("restart-cache", "bar in_doubt") in steps and ("restart-cache", "bar ok") in steps
    assert all(bar["target"] in page["targets"] for lane in page["lanes"] for bar in lane["bars"])
    assert all(lane["turns"] >= 1 and lane["ends"] == 1 for lane in page["lanes"])
    assert "restart-cache · in doubt" in shown and "retried by cli:oncall" in shown

    # The wait on @sam: as wide, on the root's scale, as the recorded wait.
    (gate,) = [band for band in executor["bands"] if "scale-out" in band["title"]]
    assert "approved by @sam" in gate["title"]
    asked, decided = incident.waits[2]
    started, ended = incident.root
    drawn = gate["w"] / lanes["inc"]["span"]["w"]
    recorded = (decided - asked) / (ended - started)
    assert drawn == pytest.approx(recorded, rel=0.03), (drawn, recorded)


def test_the_trace_is_usable_on_a_phone(incident: Incident) -> None:
    """At 390 px wide the page itself never scrolls sideways: the lanes scroll in their box,
    and the details stack."""
    driver = _chrome()
    try:
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True},
        )
        driver.get(incident.html.as_uri())
        page = driver.execute_script(MEASURE)
        driver.save_screenshot(str(SHOTS / "trace-phone.png"))
    finally:
        driver.quit()
    assert not _png_is_blank(SHOTS / "trace-phone.png")
    assert page["pageWidth"] <= 390, page["pageWidth"]
    scroll_width, client_width, overflow = page["lanesScroll"]
    assert overflow == "auto" and scroll_width > client_width


def _section(html: str, run_id: str) -> str:
    """The part of the page about one run."""
    start = html.index(f"<h2>{run_id} <span")
    end = html.find("<section", start)
    return html[start : end if end != -1 else len(html)]


def test_the_root_shows_the_runbook_its_tree_ran_and_its_parameters(incident: Incident) -> None:
    root = _section(incident.html.read_text(), "inc")
    assert "<dt>Runbook</dt><dd>waterfall-drill <code>service=checkout</code></dd>" in root


def test_people_are_shown_by_the_names_people_know(incident: Incident) -> None:
    html = incident.html.read_text()
    assert "approval #2 approved by @sam — go" in html
    assert "<td>@sam</td>" in html  # the approvals table's decider
    assert "#2 approved by @sam at " in html  # the waiting band's label


def test_each_attempt_reads_as_its_command_its_output_and_the_decision(
    incident: Incident,
) -> None:
    executor = _section(incident.html.read_text(), "inc:sub:executor")
    assert 'id="step-3-1"' in executor and "connect · failed · " in executor
    assert "flaky.py</code> → exit 3" in executor
    assert '<pre class="stderr">dial tcp 10.0.0.7:5432: connection refused' in executor
    assert '<pre class="stdout">connected on the second try' in executor
    assert "restart-cache · in doubt · " in executor
    assert "it may or may not have run" in executor
    assert "Decided: retried by cli:oncall — the cache is down" in executor
    assert "restart-cache · attempt 2 · ok · " in executor
    # Durations in human units, never "70.123 ms".
    assert re.search(r"execute_step \{&#34;step_id&#34;: &#34;connect&#34;\} · \d+ ms <", executor)


async def test_a_long_stderr_shows_its_end_where_the_error_is(tmp_path: Path) -> None:
    from agent.service.runs import RunService
    from agent.settings import Settings
    from agent.views.trace import MAX_BLOCK_CHARS, render_trace, trace_of
    from tests.conftest import make_workspace
    from tests.support import allow, write_runbook

    workspace = make_workspace(tmp_path / "ws")
    (workspace / "loud.py").write_text(
        f"import sys\nsys.stderr.write('noise ' * {MAX_BLOCK_CHARS})\n"
        "sys.stderr.write('\\nFATAL: disk full\\n')\nsys.exit(1)\n"
    )
    write_runbook(
        workspace,
        "loud",
        "id: loud\ntitle: Loud\ntriggers: [loud]\nsteps:\n"
        '  - id: speak\n    title: Speak\n    run: "{python} loud.py"\n',
    )
    allow(workspace, "loud.py")
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
        await service.start("loud-1", "loud")
        html = render_trace(trace_of(await service.run_tree("loud-1", calls=False, events=True)))
    finally:
        await service.close()
    assert '<pre class="stderr">… (' in html and "earlier characters)" in html
    assert "FATAL: disk full" in html
