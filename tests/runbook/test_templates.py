"""Template renders are bounded in time and size, off the event loop, and checked by validate.

A runbook template that passes the schema can still be a bomb (nested loops, `'a' * 10**9`,
a dict of 60000 keys that all hash alike, built inside one C call that holds the GIL).
`runbooks validate` renders every template with the params' defaults and rejects one past the
bounds; one that explodes only under other params is stopped at run time, in a worker thread,
while `loom-ops serve` keeps answering.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator, Mapping
from pathlib import Path

import httpx
import jinja2
import jinja2.sandbox
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.errors import RenderError, RenderLimitError, RunbookError
from agent.records import RunStatus
from agent.runbook.model import (
    RenderLimits,
    load_runbook,
    render_command,
    render_text,
    render_url,
    split_argv,
)
from agent.runbook.templates import MAX_NUMBER, MAX_SAME_HASH, MAX_SOURCE_CHARS
from agent.service.runs import RunService
from agent.tools.toolbox import describe_action
from tests.cli_helpers import Cli, assert_usage_error, make_cli_workspace
from tests.http_harness import TERMINAL, ServeProcess, free_port, poll_run
from tests.support import write_runbook

NESTED_LOOPS = "{% for i in range(n) %}{% for j in range(n) %}{% endfor %}{% endfor %}"
BIG = 100_000  # range() allows at most this many items; n * n rounds never end in time

# One file per template field, each a bomb with the declared defaults.
BOMBS = {
    "nested-loops": """\
id: nested-loops
title: Nested loops
params:
  n: {type: integer, default: 100000}
steps:
  - id: spin
    title: Spin
    run: 'echo {% for i in range(n) %}{% for j in range(n) %}{% endfor %}{% endfor %}x'
""",
    "string-times": """\
id: string-times
title: String multiplication
steps:
  - id: inflate
    title: Inflate
    note: hello
  - id: explode
    title: Explode
    run: "echo {{ 'a' * 200000000 }}"
""",
    "url-bomb": """\
id: url-bomb
title: URL bomb
params:
  host: {choices: [example.org, example.com]}
steps:
  - id: probe
    title: Probe
    check:
      url: "http://{{ host }}/{{ 'x'.ljust(1000000000) }}"
""",
    "mcp-bomb": """\
id: mcp-bomb
title: MCP argument bomb
params:
  copies: {type: integer, min: 300000, max: 400000}
steps:
  - id: restart
    title: Restart
    mcp:
      tool: restart_service
      arguments: {service: "{{ 'svc-' * copies }}"}
""",
    "note-bomb": """\
id: note-bomb
title: Note bomb
steps:
  - id: explain
    title: Explain
    note: >-
      {% set n = namespace(s='ab') %}{% for i in range(64) %}
      {% set n.s = n.s ~ n.s %}{% endfor %}{{ n.s }}
""",
    "rollback-bomb": """\
id: rollback-bomb
title: Rollback bomb
params:
  width: {type: integer, default: 900000000}
steps:
  - id: scale
    title: Scale
    run: echo scale
    rollback: {run: "echo {{ '%0*d' % (width, 1) }}"}
""",
}

# A hash-collision bomb: multiples of 2**61 - 1 all hash to 0, so with count=60000
# dict.fromkeys compared every key with every other inside one C call (22 s with the GIL
# held). Harmless with count=1, yet refused by validate for its out-of-bound literal.
HASH_BOMB_TEMPLATE = (
    "echo {{ {}.fromkeys(range(0, 2305843009213693951 * count, 2305843009213693951))|length }}"
)
HASH_BOMB = f"""\
id: hash-bomb
title: Hash-collision bomb
triggers: [hash bomb]
params:
  count: {{type: integer, default: 1, min: 1, max: 100000}}
steps:
  - id: render
    title: renders a dict of colliding keys
    run: {HASH_BOMB_TEMPLATE}
"""
NUMBER_REFUSED = "template exceeded the render limit (numbers within \u00b12**53)"
# A render out of time names its CPU bound, or, when a loaded machine starved it of the CPU,
# its wall-clock ceiling; which one fires depends on the load. Tests further down pin each.
OUT_OF_TIME = "it ran longer than "

# Fine with the defaults; a bomb only when someone asks for n=100000.
PARAM_BOMB = """\
id: param-bomb
title: Param bomb
triggers: [param bomb]
params:
  n: {type: integer, default: 1, min: 1, max: 100000}
  name: {pattern: "[a-z]+"}
steps:
  - id: explode
    title: Explode
    run: 'echo {% for i in range(n) %}{% for j in range(n) %}{% endfor %}{% endfor %}done'
  - id: unknowable
    title: Uses a param with no default and no value to derive
    note: "{{ name * 100000000 }}"
"""

# A gated step whose action explodes under a non-default param: the approver could not read it.
GATED_BOMB = """\
id: gated-bomb
title: Gated bomb
triggers: [gated bomb]
approvers: [cli:oncall]
params:
  copies: {type: integer, default: 2, min: 1, max: 1000000000}
steps:
  - id: fan-out
    title: Fan out
    run: "echo {{ 'x' * copies }}"
    approval: required
"""


def bomb_workspace(root: Path) -> Cli:
    """A CLI over a workspace with the shipped runbooks, every bomb and the param bomb."""
    cli = Cli(make_cli_workspace(root / "ws"), root / "ops.sqlite")
    for name, text in {**BOMBS, "param-bomb": PARAM_BOMB, "hash-bomb": HASH_BOMB}.items():
        (cli.workspace / "runbooks" / f"{name}.yaml").write_text(text)
    return cli


# -- runbooks validate (the real CLI) -----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "field", "detail"),
    [
        ("nested-loops", "steps[0].run", OUT_OF_TIME),
        ("string-times", "steps[1].run", "a repeated value would be larger than 64 KiB"),
        ("hash-bomb", "steps[0].run", "a number in the template is 2305843009213693951"),
    ],
)
def test_validate_rejects_a_template_bomb_in_one_line(
    tmp_path: Path, name: str, field: str, detail: str
) -> None:
    cli = bomb_workspace(tmp_path)
    path = cli.workspace / "runbooks" / f"{name}.yaml"
    started = time.monotonic()
    result = cli("runbooks", "validate", str(path))
    bound = NUMBER_REFUSED if name == "hash-bomb" else "exceeded the render limit (1 s / 64 KiB)"
    line = assert_usage_error(result, f"{path}:", field, bound, detail)
    assert "(rendered with" in line
    assert time.monotonic() - started < 20, "the render bound kept validate short"


def test_validate_reports_bombs_in_every_template_field_and_passes_the_rest(
    tmp_path: Path,
) -> None:
    cli = bomb_workspace(tmp_path)
    result = cli("runbooks", "validate")
    assert result.returncode == 2, result.describe()
    assert "Traceback" not in result.stderr
    errors = {line.split("/runbooks/")[1].split(".yaml")[0]: line for line in result.stderr_lines()}
    assert set(errors) == {*BOMBS, "hash-bomb"}, result.describe()
    # The hash bomb is harmless with count=1, but its literal is past the number bound.
    hash_bomb = errors.pop("hash-bomb")
    for needle in ("steps[0].run", "step 'render'", NUMBER_REFUSED, "count=1"):
        assert needle in hash_bomb, f"{needle!r} not in {hash_bomb!r}"
    expected = {
        "nested-loops": ("steps[0].run", "step 'spin'", "n=100000"),
        "string-times": ("steps[1].run", "step 'explode'", "no params"),
        "url-bomb": ("steps[0].check.url", "step 'probe'", "host=example.org"),
        "mcp-bomb": ("steps[0].mcp.arguments.service", "step 'restart'", "copies=300000"),
        "note-bomb": ("steps[0].note", "step 'explain'", "no params"),
        "rollback-bomb": ("steps[0].rollback.run", "step 'scale'", "width=900000000"),
    }
    for name, needles in expected.items():
        line = errors[name]
        assert line.startswith("loom-ops: "), line
        assert "exceeded the render limit (1 s / 64 KiB)" in line, line
        for needle in needles:
            assert needle in line, f"{needle!r} not in {line!r}"
    # Shipped runbooks and the param bomb (fine with its defaults) are valid.
    ok = sorted(line.split()[1] for line in result.stdout.splitlines())
    assert "param-bomb" in ok and "api-latency-spike" in ok, result.describe()
    assert not {*BOMBS, "hash-bomb"} & set(ok)


UNKNOWN_NAMES = {
    "a filter": ('run: "echo {{ 1|nosuchfilter }}"', "steps[0].run", "no filter named"),
    "a filter inside an if": (
        'run: "echo {% if 1 %}{{ 2|nosuchfilter }}{% endif %}"',
        "steps[0].run",
        "no filter named",
    ),
    "a filter block": (
        'note: "{% filter nosuchfilter %}x{% endfilter %}"',
        "steps[0].note",
        "no filter named",
    ),
    "a test": ('run: "echo {% if 1 is nosuchtest %}x{% endif %}"', "steps[0].run", "no test named"),
    "a filter named by map": (
        "note: \"{{ [1]|map('nosuchfilter')|list }}\"",
        "steps[0].note",
        "no filter named 'nosuchfilter' (in map)",
    ),
    "a test named by selectattr": (
        "note: \"{{ [{'a': 1}]|selectattr('a', 'nosuchtest')|list }}\"",
        "steps[0].note",
        "no test named 'nosuchtest' (in selectattr)",
    ),
    "an include": (
        "note: \"{% include 'other' %}\"",
        "steps[0].note",
        "{% include %} has no other template to load here",
    ),
    "a literal past Python's digits": (
        f'note: "{{{{ 1{"0" * 5000} }}}}"',
        "steps[0].note",
        "Exceeds the limit (4300 digits) for integer string conversion",
    ),
}


@pytest.mark.parametrize("case", list(UNKNOWN_NAMES))
def test_an_unknown_filter_or_test_is_refused_in_one_line_when_the_runbook_loads(
    tmp_path: Path, case: str
) -> None:
    # Jinja names an unknown filter only when it compiles the template (and one inside an
    # `if`, or a test, only when a render reaches it): the load used to raise that out of
    # every command, a traceback even for runs of other runbooks.
    action, field, problem = UNKNOWN_NAMES[case]
    cli = _misspelt_workspace(tmp_path, action)
    path = cli.workspace / "runbooks" / "misspelt.yaml"
    with pytest.raises(RunbookError, match=re.escape(problem)) as caught:
        load_runbook(path)
    assert caught.value.field == field and caught.value.line == 7
    assert_usage_error(cli("runbooks", "validate", str(path)), f"{path}:7", field, problem)


def test_filters_and_tests_named_by_strings_that_exist_load_and_render(tmp_path: Path) -> None:
    path = tmp_path / "named.yaml"
    path.write_text(
        "id: named\ntitle: Named\ntriggers: [named]\nsteps:\n  - id: s\n    title: S\n"
        "    note: \"{{ ['a', 'b']|map('upper')|join }} {{ [1, 2, 3]|select('odd')|list }} "
        "{{ [1, 2]|reject('even')|list }} {{ [{'a': 1}]|selectattr('a', 'equalto', 1)|list }} "
        "{{ [{'a': 1}]|map(attribute='a')|list }} {{ [1]|map(name)|list }}\"\n"
        "params:\n  name:\n    default: string\n"
    )
    runbook = load_runbook(path, render_templates=True)
    note = render_text(runbook.steps[0].note or "", {"name": "string"}, SHORT)
    assert note == "AB [1, 3] [1] [{'a': 1}] [1] ['1']", note


def test_a_runbook_with_an_unknown_filter_leaves_the_others_usable(tmp_path: Path) -> None:
    cli = _misspelt_workspace(tmp_path, UNKNOWN_NAMES["a filter"][0])
    listed = cli("runbooks", "list")
    assert listed.returncode == 2 and "Traceback" not in listed.stderr, listed.describe()
    assert "misspelt.yaml:7" in listed.stderr, listed.describe()
    run = cli("runbook", "api-latency-spike", "--mock-llm")
    assert run.returncode == 0 and "waiting for request #1" in run.stdout, run.describe()


def _misspelt_workspace(root: Path, action: str) -> Cli:
    """A CLI over the shipped runbooks and `misspelt.yaml`, whose one step has `action`."""
    cli = Cli(make_cli_workspace(root / "ws"), root / "ops.sqlite")
    (cli.workspace / "runbooks" / "misspelt.yaml").write_text(
        "id: misspelt\ntitle: Misspelt\ntriggers: [misspelt]\nsteps:\n"
        f"  - id: s\n    title: S\n    {action}\n"
    )
    return cli


def test_an_unknown_filter_in_an_alert_param_is_refused_when_the_runbook_loads(
    tmp_path: Path,
) -> None:
    path = tmp_path / "alerted.yaml"
    path.write_text(
        "id: alerted\ntitle: Alerted\ntriggers: [alerted]\nparams:\n  service: {}\n"
        "alerts:\n  - match: {alertname: Down}\n"
        "    params: {service: '{{ labels.service|nosuchfilter }}'}\n"
        "steps:\n  - id: s\n    title: S\n    run: echo {{ service }}\n"
    )
    with pytest.raises(RunbookError, match="no filter named 'nosuchfilter'") as caught:
        load_runbook(path)
    assert caught.value.field == "alerts[0].params.service"


# Templates that fail on every run leaving their params out, beside ones whose failure is a
# derived value's (`m` has no default) or an alert's labels' to decide.
ALWAYS_FAILING = """\
id: always-failing
title: Always failing
triggers: [always failing]
params:
  n: {type: integer, default: 0}
  m: {type: integer, min: 0}
alerts:
  - match: {alertname: Spin}
    params:
      m: "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
  - match: {alertname: Count}
    params:
      m: "{{ labels.count }}"
steps:
  - id: too-big
    title: A range past the sandbox's
    run: "echo {% for i in range(10**9) %}{% endfor %}"
  - id: by-zero
    title: Divides by zero
    run: "echo {{ 1 / 0 }}"
  - id: by-default
    title: Divides by the default
    run: "echo {{ 10 / n }}"
  - id: by-derived
    title: Divides by a derived value
    run: "echo {{ 10 / m }}"
  - id: listed
    title: Lists a range past the sandbox's
    note: "{{ range(10**8)|list|length }}"
"""


def test_validate_refuses_templates_that_fail_with_the_defaults_and_alert_bombs(
    tmp_path: Path,
) -> None:
    cli = Cli(make_cli_workspace(tmp_path / "ws"), tmp_path / "ops.sqlite")
    path = cli.workspace / "runbooks" / "always-failing.yaml"
    path.write_text(ALWAYS_FAILING)
    result = cli("runbooks", "validate", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.describe()
    lines = result.stderr_lines()
    expected = [
        ("alerts[0].params.m", OUT_OF_TIME, "no labels or annotations"),
        ("steps[0].run", "step 'too-big'", "Range too big", "no params"),
        ("steps[1].run", "step 'by-zero'", "division by zero", "no params"),
        ("steps[2].run", "step 'by-default'", "division by zero", "n=0"),
        ("steps[4].note", "step 'listed'", "Range too big", "no params"),
    ]
    assert len(lines) == len(expected), result.describe()
    for line, needles in zip(lines, expected, strict=True):
        for needle in needles:
            assert needle in line, f"{needle!r} not in {line!r}"


def test_runbooks_list_does_not_render_templates(tmp_path: Path) -> None:
    cli = bomb_workspace(tmp_path)
    started = time.monotonic()
    result = cli("runbooks", "list", "--json")
    assert result.returncode == 0, result.describe()
    assert "nested-loops" in {r["id"] for r in result.json()["runbooks"]}
    assert time.monotonic() - started < 10


def test_load_runbook_render_check_uses_defaults_and_derivable_values(tmp_path: Path) -> None:
    path = tmp_path / "param-bomb.yaml"
    path.write_text(PARAM_BOMB)
    # n=1 renders instantly; `name` has only a pattern, so its note is not rendered at all.
    assert load_runbook(path, render_templates=True).id == "param-bomb"
    for name, text in BOMBS.items():
        bomb = tmp_path / f"{name}.yaml"
        bomb.write_text(text)
        assert load_runbook(bomb).id == name  # the schema alone accepts every bomb
        with pytest.raises(RunbookError, match="exceeded the render limit") as caught:
            load_runbook(bomb, render_templates=True)
        assert caught.value.line is not None and caught.value.field.startswith("steps[")


# -- at run time: `loom-ops serve` keeps answering ----------------------------------------------


def watch_run(
    client: httpx.Client, run_id: str, at_least: float
) -> tuple[dict[str, object], float, list[float]]:
    """Ask /healthz back to back (the run's status now and then) until the run has ended and
    `at_least` seconds have passed; return the run, when it ended and every healthz latency.

    `at_least` covers the time a render could hold the GIL even when the run fails at once."""
    started = time.monotonic()
    latencies: list[float] = []
    run = client.get(f"/runs/{run_id}").json()
    ended: float | None = None
    while ended is None or time.monotonic() - started < at_least:
        for _ in range(5):
            asked = time.monotonic()
            assert client.get("/healthz", timeout=5).status_code == 200
            latencies.append(time.monotonic() - asked)
        assert time.monotonic() - started < 30, run
        run = client.get(f"/runs/{run_id}").json()
        if ended is None and run["status"] in TERMINAL:
            ended = time.monotonic() - started
    return poll_run(client, run_id), ended, latencies


def test_serve_answers_healthz_while_a_run_renders_a_bomb(tmp_path: Path) -> None:
    workspace = make_cli_workspace(tmp_path / "ws")
    write_runbook(workspace, "param-bomb", PARAM_BOMB)
    write_runbook(workspace, "hash-bomb", HASH_BOMB)
    server = ServeProcess(
        workspace, tmp_path / "ops.sqlite", free_port(), LOOM_OPS_API_USER="cli:oncall"
    )
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            body = {"message": f"param bomb n={BIG} name=abc", "run_id": "bomb", "role": "runbook"}
            assert client.post("/runs", json=body).status_code == 201
            run, elapsed, latencies = watch_run(client, "bomb", at_least=0)
            # count=60000: before the number bound, 22 s in one C call and no /healthz at all.
            body = {"message": "hash bomb count=60000", "run_id": "hash", "role": "runbook"}
            assert client.post("/runs", json=body).status_code == 201
            hashed, _, hash_latencies = watch_run(client, "hash", at_least=3)
    finally:
        server.stop()
    assert run["status"] == "failed", run
    assert "step 'explode' run: template exceeded the render limit (1 s / 64 KiB)" in (
        run["error"] or ""
    ), run
    assert OUT_OF_TIME in run["error"], run
    # The render ran to its bound (a second) and the server answered all along.
    assert elapsed >= 1.0, elapsed
    assert len(latencies) >= 10, latencies
    assert max(latencies) < 2.0, latencies  # a freeze was 22 s; a shared machine adds noise
    # The hash bomb is refused at once, by the bound it hits, and the server never paused.
    assert hashed["status"] == "failed", hashed
    assert hashed["params"] == {"count": 60000}, hashed
    refusal = (
        f"step 'render' run: {NUMBER_REFUSED}: a number in the template is 2305843009213693951"
    )
    assert refusal in (hashed["error"] or ""), hashed
    assert len(hash_latencies) >= 10, hash_latencies
    assert max(hash_latencies) < 2.0, hash_latencies


# -- at run time, in process ---------------------------------------------------------------------


async def test_a_rendering_step_never_stalls_the_event_loop(service: RunService) -> None:
    write_runbook(service.settings.workspace, "param-bomb", PARAM_BOMB)
    runbook = service.catalog().get("param-bomb")
    params = {"n": BIG, "name": "abc"}
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.monotonic()
        while not done.is_set():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    ticking = asyncio.create_task(ticker())
    try:
        step = runbook.step("explode")
        result = await service.toolbox.execute_step(step, runbook, params, timeout=30)
        with pytest.raises(RenderLimitError):
            await describe_action(step, params)
    finally:
        done.set()
        await ticking
    assert result.status == "error", result
    assert result.outcome["error"].startswith("step 'explode' run: template exceeded"), result
    assert sum(gaps) >= 1.9, "both renders ran to their one-second bound"
    assert max(gaps) < 1.0, max(gaps)


async def test_every_step_field_fails_with_a_clear_error_at_run_time(service: RunService) -> None:
    workspace = service.settings.workspace
    for name in ("url-bomb", "mcp-bomb", "note-bomb", "rollback-bomb"):
        write_runbook(workspace, name, BOMBS[name])
    catalog = service.catalog()
    cases = [
        ("url-bomb", "probe", False, {"host": "example.org"}, "url"),
        ("mcp-bomb", "restart", False, {"copies": 300000}, "arguments: template"),
        ("note-bomb", "explain", False, {}, "step 'explain' note: template"),
        ("rollback-bomb", "scale", True, {"width": 900000000}, "step 'scale' rollback run:"),
    ]
    for runbook_id, step_id, rollback, params, needle in cases:
        runbook = catalog.get(runbook_id)
        step = runbook.step(step_id)
        result = await service.toolbox.execute_step(
            step, runbook, params, timeout=30, rollback=rollback
        )
        assert result.status == "error", (runbook_id, result)
        message = result.outcome["error"]
        assert "exceeded the render limit (1 s / 64 KiB)" in message, message
        assert needle in message or needle in result.outcome, (needle, result.outcome)
        assert "\n" not in message


async def test_a_gate_whose_action_cannot_render_is_refused_not_opened(
    service: RunService,
) -> None:
    write_runbook(service.settings.workspace, "gated-bomb", GATED_BOMB)
    run = await service.start("gated", "gated bomb copies=900000000")
    assert run.status == RunStatus.FAILED, run
    assert run.error is not None
    assert "refused await_approval" in run.error, run.error
    assert "step 'fan-out' cannot be shown to an approver" in run.error, run.error
    assert "a repeated value would be larger than 64 KiB" in run.error, run.error
    # The same runbook with a sane value opens its gate as before.
    waiting = await service.start("gated-ok", "gated bomb copies=3")
    assert waiting.status == RunStatus.WAITING_APPROVAL, waiting


# -- the bounds on the render functions ---------------------------------------------------------

SHORT = RenderLimits(seconds=0.3, chars=1024)


def test_time_bound_stops_nested_loops_at_the_deadline() -> None:
    started = time.monotonic()
    with pytest.raises(RenderLimitError, match=r"\(0\.3 s / 1 KiB\): it ran longer than 0\.3 s"):
        render_command(f"echo {NESTED_LOOPS}", {"n": BIG}, SHORT)
    elapsed = time.monotonic() - started
    assert 0.3 <= elapsed < 5.0, elapsed  # stopped at its deadline, not after the loops


# A render in a process of its own: says when it starts, then what it came to, the CPU seconds
# of its thread and the wall seconds it took, on one line each.
RENDER_IN_A_PROCESS = f"""
import json, sys, time
from agent.runbook.templates import RenderLimits
from agent.runbook.model import render_text
from agent.errors import RenderLimitError
print("rendering", flush=True)
cpu, wall = time.thread_time(), time.monotonic()
try:
    outcome = render_text({NESTED_LOOPS!r}, {{"n": {BIG}}}, RenderLimits(seconds=0.5))
except RenderLimitError as exc:
    outcome = str(exc)
print(json.dumps([outcome, time.thread_time() - cpu, time.monotonic() - wall]), flush=True)
"""


def test_a_render_is_charged_its_cpu_not_the_time_its_process_was_stopped() -> None:
    # A loaded machine, or a process stopped for a while, must not refuse a render that has
    # done little: the bound is the CPU it used. Before, the deadline was wall time, and a
    # render stopped past it was refused at once when it went on, its CPU far from spent.
    child = subprocess.Popen(
        [sys.executable, "-c", RENDER_IN_A_PROCESS],
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "rendering\n"
        time.sleep(0.05)
        child.send_signal(signal.SIGSTOP)
        time.sleep(0.5)  # past its 0.5 s, well within its wall-clock ceiling of 1.5 s
        child.send_signal(signal.SIGCONT)
        outcome, cpu, wall = json.loads(child.stdout.readline())
    finally:
        child.kill()
        child.wait()
    if outcome.endswith("most of it waiting for the CPU"):
        # A loaded machine gave it less than half a core after its stop: it went on all the
        # same, to its ceiling, instead of being refused the moment it was continued.
        assert wall >= 1.5, (outcome, cpu, wall)
    else:
        assert outcome.endswith("it ran longer than 0.5 s"), outcome
        assert cpu >= 0.5, (cpu, wall)  # refused once its CPU was spent, not when it went on
    assert wall >= 1.0, (cpu, wall)  # ...which was past its stop


def test_renders_contending_for_the_gil_stop_at_their_wall_clock_ceiling() -> None:
    # Eight bombs at once share one GIL: bounded by CPU alone, each would hold its thread
    # (a worker shared with the process's other work) about 8 times its 0.5 s, 4 s in all.
    # Each stops at three times its bound on the wall clock instead.
    outcomes: list[str] = []

    def bomb() -> None:
        try:
            render_text(NESTED_LOOPS, {"n": BIG}, RenderLimits(seconds=0.5))
        except RenderLimitError as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=bomb) for _ in range(8)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    assert len(outcomes) == 8, outcomes
    assert all("it ran longer than" in outcome for outcome in outcomes), outcomes
    assert any(
        outcome.endswith("it ran longer than 1.5 s, most of it waiting for the CPU")
        for outcome in outcomes
    ), outcomes
    assert elapsed < 3.0, (elapsed, outcomes)


def test_time_bound_stops_loops_over_a_plain_string() -> None:
    # No range(), no call, no filter: only the loop guard sees these rounds.
    template = (
        "{% for a in s %}{% for b in s %}{% for c in s %}{% endfor %}{% endfor %}{% endfor %}"
    )
    with pytest.raises(RenderLimitError, match=r"ran longer than 0\.3 s"):
        render_text(template, {"s": "x" * 4096}, SHORT)


def test_size_bound_stops_the_output_past_the_cap() -> None:
    template = "echo {% for i in range(100) %}{{ word }}{% endfor %}"
    assert len(render_command(template, {"word": "abcd"}, SHORT)[1]) == 400
    with pytest.raises(RenderLimitError, match="its output is longer than 1 KiB"):
        render_command(template, {"word": "abcdefghijklmnop"}, SHORT)


@pytest.mark.parametrize(
    "template",
    [
        "{{ 'a' * 200000000 }}",
        "{{ ['a'] * 200000000 }}",
        "{{ 'a'.ljust(1000000000) }}",
        "{{ 'a'.center(1000000000, '-') }}",
        "{{ 'a'|center(1000000000) }}",
        "{{ 'a\nb'|indent(1000000000) }}",
        "{{ '%0999999999d' % 1 }}",
        "{{ '%s'|format('x') ~ '%0999999999d'|format(1) }}",
        "{{ '{:>999999999}'.format(1) }}",
        "{{ ('{0}' * 300).format('y' * 300) }}",
        "{{ ('%(a)s' * 150) % {'a': 'y' * 300} }}",
        "{{ (5).to_bytes(1000000000, 'big') }}",
        "{{ ('ab' * 500).replace('a', 'x' * 1000) }}",
        "{{ ('\t' * 1000).expandtabs(100000) }}",
        "{{ ('y' * 1000).join(['a'] * 300) }}",
        "{{ (['a'] * 300)|join('y' * 1000) }}",
        "{{ 'abc'.translate({97: 'z' * 1000}) }}",
        "{% set x = 'a' * 1000 %}{% set x = x ~ x %}{% set x = x ~ x %}{{ x }}",
        "{% set ns = namespace(s='ab') %}{% for i in range(64) %}"
        "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
        "{% set x %}{% for i in range(10000) %}0123456789{% endfor %}{% endset %}{{ x|length }}",
        "{{ 'a b'|wordwrap(1, wrapstring='-' * 1000) }}",
    ],
)
def test_amplifying_operations_are_refused_before_they_allocate(template: str) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(RenderLimitError, match=r"\(0\.3 s / 1 KiB\)") as refused:
            render_text(template, {}, SHORT)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024, f"{peak} bytes allocated before the refusal"
    assert "ran longer" not in str(refused.value), "refused by size, not by the deadline"


def test_limits_belong_to_each_render_and_each_thread() -> None:
    failures: list[BaseException] = []

    def bomb() -> None:
        try:
            render_text(NESTED_LOOPS, {"n": BIG}, RenderLimits(seconds=1.0))
        except RenderLimitError:
            return
        except BaseException as exc:
            failures.append(exc)
            return
        failures.append(AssertionError("the bomb rendered"))

    worker = threading.Thread(target=bomb)
    worker.start()
    rendered = 0
    # Meanwhile this thread renders, many times, within a 3-character budget of its own.
    while worker.is_alive():
        assert render_text("{{ a }}-{{ b }}", {"a": 1, "b": 2}, RenderLimits(0.5, 3)) == "1-2"
        rendered += 1
    worker.join()
    assert not failures, failures
    assert rendered > 10
    # A render after a stopped one starts with a fresh budget.
    assert render_text("{{ 'x' * 3 }}", {}, SHORT) == "xxx"


@pytest.mark.parametrize(
    ("template", "needle"),
    [
        ("echo {{ 1 / 0 }}", "template error: ZeroDivisionError: division by zero"),
        ("echo {{ missing }}", "'missing' is undefined"),
        ("echo {{ s.__class__ }}", "unsafe"),
        ("{% macro m() %}{{ m() }}{% endmacro %}echo {{ m() }}", "RecursionError"),
        ("echo {{ range(10000000) }}", "Range too big"),
        ("echo {{ lipsum(1000000) }}", "'lipsum' is undefined"),
    ],
)
def test_other_render_failures_stay_one_line_render_errors(template: str, needle: str) -> None:
    with pytest.raises(RenderError) as caught:
        render_command(template, {"s": "x"})
    assert not isinstance(caught.value, RenderLimitError)
    assert needle in str(caught.value) and "\n" not in str(caught.value)


# Templates a runbook may reasonably hold, rendered by plain Jinja and by the bounded sandbox.
NORMAL_TEMPLATES = [
    "kubectl scale deployment/{{ service }} -n {{ zone }} --replicas={{ replicas * 2 }}",
    "{% for i in range(replicas) %}{{ service }}-{{ i }}{% if not loop.last %},{% endif %}"
    "{% endfor %}",
    "{% for x in items %}{{ loop.index }}/{{ loop.length }}:{{ x|upper }} {% endfor %}",
    "{{ items|join(',') }} {{ ','.join(items) }} {{ items|map('upper')|list }}",
    "{{ '%s=%d'|format(service, replicas) }} {{ '{}:{:>5}'.format(service, replicas) }}",
    "{{ service|replace('-', '_') }} {{ service|center(20) }} {{ 'ab' * 3 }} {{ 2 ** 10 }}",
    "{% set ns = namespace(total=0) %}{% for i in range(10) %}{% set ns.total = ns.total + i %}"
    "{% endfor %}{{ ns.total }} {{ [1, 2, 3]|sum }} {{ [[1], [2]]|sum(start=[]) }}",
    "{% macro tag(k, v) %}{{ k }}={{ v }}{% endmacro %}{{ tag('app', service) }} "
    "{{ service ~ '-' ~ zone }} {% set block %}{{ zone }}!{% endset %}{{ block }}",
    "{{ items|batch(2, 'x')|list }} {{ items|slice(2)|list }} {{ {'a': [1, 2]}|tojson(2) }}",
    "{{ 'a\nb'|indent(2, true) }} {{ 'one two three'|wordwrap(4) }} {{ items|length }}",
    "{{ ('%05d' % replicas) ~ ('x' + 'y') }} {{ service.upper().ljust(15, '.') }}",
    "{% for k, v in {'a': 1, 'b': 2}|dictsort %}{{ k }}{{ v }}{% else %}none{% endfor %}",
    # Numbers up to the bound, every operator (all are intercepted now), and the dict, set and
    # unique paths that are checked for colliding keys.
    "{{ 2 ** 53 }} {{ -(2 ** 53) }} {{ 9007199254740992 - 1 }} {{ 7 // 2 }} {{ 7 / 2 }} "
    "{{ 10 - 3 }} {{ 7 % 3 }} {{ 1.5e-300 * 2 }} {{ 0.1 + 0.2 }} {{ 2 ** -2 }} {{ 5e-324 }}",
    "{{ ['b', 'A', 'a', 'b']|unique|list }} {{ ['A', 'a']|unique(case_sensitive=true)|list }} "
    "{{ [{'k': 1}, {'k': 1}, {'k': 2}]|unique(attribute='k')|list }}",
    "{{ {}.fromkeys(items)|list }} {{ dict([('a', 1), ('b', 2)])|tojson }} {{ dict(a=1) }} "
    "{% set d = {'x': 1} %}{% set _ = d.update({'y': 2}) %}{{ d|dictsort }} "
    "{{ ({'a': 1, 'b': 2}.keys() - items)|list }} {{ d.get('x') }} {{ d.setdefault('z', 3) }}",
    "{{ 1234.5678|round(2) }} {{ 1234|round(-2, 'floor') }} {{ 'abc'.encode('utf-8') }} "
    "{{ range(0, 2 ** 53, 2 ** 50)|list }} {{ (2.5).as_integer_ratio() }}",
]


@pytest.mark.parametrize("template", NORMAL_TEMPLATES)
def test_normal_templates_render_exactly_as_plain_jinja_does(template: str) -> None:
    params = {
        "service": "checkout-api",
        "zone": "production",
        "replicas": 6,
        "items": ["a", "b", "c"],
    }
    plain = jinja2.sandbox.SandboxedEnvironment(undefined=jinja2.StrictUndefined)
    assert render_text(template, params) == plain.from_string(template).render(params)


def test_url_and_command_renders_keep_their_checks_under_the_bounds() -> None:
    assert render_url("http://{{ h }}:{{ p }}/healthz", {"h": "127.0.0.1", "p": 80}) == (
        "http://127.0.0.1:80/healthz"
    )
    assert render_command("echo {{ s }}", {"s": "a b"}) == ["echo", "a b"]
    with pytest.raises(RenderLimitError, match="1 s / 64 KiB"):
        render_url("http://h/{{ 'x' * (1024 * 1024) }}", {})


# -- numbers, hash collisions, template length ------------------------------------------------


class Foreign:
    """A value from outside the template that is not a plain container: the render checks the
    numbers it gives out where they enter (attribute, item, loop, call), not at the door."""

    big = 2**60

    def __getitem__(self, key: object) -> int:
        return 2**60

    def __iter__(self) -> Iterator[int]:
        return iter([1, 2**60])

    def __call__(self) -> int:
        return 2**60


@pytest.mark.parametrize(
    ("template", "params", "detail"),
    [
        ("{{ 2305843009213693951 }}", {}, "a number in the template is 2305843009213693951"),
        ("{{ 9007199254740993 }}", {}, "a number in the template is 9007199254740993"),
        ("{{ 1e400 }}", {}, "a number in the template is inf"),
        ("{{ n }}", {"n": 2**53 + 1}, "param 'n' is 9007199254740993"),
        ("{{ n }}", {"n": [1, {"k": -(2**60)}]}, "param 'n' holds -1152921504606846976"),
        ("{{ n }}", {"n": float("nan")}, "param 'n' is nan"),
        ("{{ 2 ** 61 - 1 }}", {}, "2 ** 61 would be larger"),
        ("{{ 10 ** 10000000 }}", {}, "10 ** 10000000 would be larger"),
        ("{{ 3 ** 34 }}", {}, "the result of `**` is 16677181699666569"),
        ("{{ 4503599627370496 * 4 }}", {}, "the result of `*` is 18014398509481984"),
        ("{{ 9007199254740992 + 1 }}", {}, "the result of `+` is 9007199254740993"),
        # `-`, `/` and `//` used to be folded at compile time, out of every hook's sight.
        ("{{ 4503599627370496 - -4503599627370497 }}", {}, "the result of `-` is 900719925"),
        ("{{ 1 / 1e-300 }}", {}, "the result of `/` is 9.99999"),
        ("{{ 9007199254740992 // 0.5 }}", {}, "the result of `//` is 1.8014398509481984e+16"),
        ("{{ (-1) ** 0.5 }}", {}, "the result of `**` is the complex number (6.1"),
        ("{{ '1e300'|float }}", {}, "the result of the float filter is 1e+300"),
        ("{{ 'inf'|float }}", {}, "the result of the float filter is inf"),
        ("{{ '99999999999999999'|int }}", {}, "the int filter is 99999999999999999"),
        ("{{ (0).from_bytes('abcdefgh'.encode(), 'big') }}", {}, "a call is 7017280452245743464"),
        ("{{ (5e-324).as_integer_ratio() }}", {}, "the result of a call holds a 1075-bit"),
        ("{{ x.big }}", {"x": Foreign()}, "attribute 'big' is 1152921504606846976"),
        ("{{ x[0] }}", {"x": Foreign()}, "an item is 1152921504606846976"),
        ("{% for i in x %}{% endfor %}", {"x": Foreign()}, "a loop item is 1152921504606846976"),
        ("{{ x() }}", {"x": Foreign()}, "the result of a call is 1152921504606846976"),
    ],
)
def test_numbers_past_2_to_the_53_are_refused_where_they_appear(
    template: str, params: dict[str, object], detail: str
) -> None:
    started = time.monotonic()
    with pytest.raises(RenderLimitError) as caught:
        render_text(template, params)
    message = str(caught.value)
    assert message.startswith(f"{NUMBER_REFUSED}: "), message
    assert detail in message and "\n" not in message, message
    assert caught.value.bound == "numbers within \u00b12**53"
    assert time.monotonic() - started < 2.0, "refused before any long computation"


def test_the_number_bound_is_inclusive_and_symmetric() -> None:
    assert MAX_NUMBER == 2**53
    template = "{{ n }} {{ -n }} {{ n - 1 }} {{ 9007199254740992 }} {{ 2 ** 53 }} {{ n * 1.0 }}"
    assert render_text(template, {"n": 2**53}) == (
        "9007199254740992 -9007199254740992 9007199254740991 9007199254740992 "
        "9007199254740992 9007199254740992.0"
    )
    with pytest.raises(RenderLimitError, match=r"the result of `\+` is -9007199254740993"):
        render_text("{{ -n + -1 }}", {"n": 2**53})


@pytest.mark.parametrize(
    ("template", "bound", "detail"),
    [
        ("{{ 5|round(-100000000) }}", "rounding to at most 400 digits", "round() to -100000000"),
        ("{{ 5|round(100000000, 'floor') }}", "rounding to at most 400 digits", "100000000 dig"),
        # Pure-Python and quadratic: 8000 characters took 8 s without touching a hook.
        ("{{ s.encode('punycode') }}", "codecs utf-8, ascii", "'punycode' codec is not one"),
        ("{{ s.encode(encoding='idna') }}", "codecs utf-8, ascii", "'idna' codec is not one"),
        ("{{ s.encode().decode('punycode') }}", "codecs utf-8, ascii", "'punycode' codec"),
    ],
)
def test_single_calls_with_unbounded_cost_are_refused_before_they_run(
    template: str, bound: str, detail: str
) -> None:
    started = time.monotonic()
    with pytest.raises(RenderLimitError, match="template exceeded the render limit") as caught:
        render_text(template, {"s": "\u4e00\u4e8c" * 4000})
    assert bound in str(caught.value) and detail in str(caught.value), str(caught.value)
    assert time.monotonic() - started < 2.0


def test_a_template_source_is_at_most_16_kib() -> None:
    assert MAX_SOURCE_CHARS == 16 * 1024
    padding = "x" * (MAX_SOURCE_CHARS - len("{{ 1 }}"))
    assert render_text("{{ 1 }}" + padding, {}, RenderLimits(chars=32 * 1024)).startswith("1x")
    with pytest.raises(RenderLimitError) as caught:
        render_text("{{ 1 }}" + padding + "x", {})
    assert str(caught.value) == (
        "template exceeded the render limit (templates up to 16 KiB): "
        "its source has 16385 characters"
    )


# CPython's tuple hash (xxHash-based, 3.8+) mixes the items' hashes in one by one, so with the
# first items fixed, the last one decides the hash and can be solved for. About once in 2**10
# tries the solution is within +-2**53: colliding keys need no big number, only crafting.
_M64 = (1 << 64) - 1
_XX_PRIME_1 = 11400714785074694791
_XX_PRIME_2 = 14029467366897019727
_XX_PRIME_5 = 2870177450012600261
_XX_INVERSE_2 = pow(_XX_PRIME_2, -1, 1 << 64)


def _xx_state(lanes: tuple[int, ...]) -> int:
    """The tuple hash's state once items with these hashes are added, before the last item's
    rotation and multiplication (both one-to-one: equal states here mean equal hashes)."""
    acc = _XX_PRIME_5
    for lane in lanes[:-1]:
        acc = (acc + (lane & _M64) * _XX_PRIME_2) & _M64
        acc = (((acc << 31) | (acc >> 33)) & _M64) * _XX_PRIME_1 & _M64
    return (acc + (lanes[-1] & _M64) * _XX_PRIME_2) & _M64


def _last_item(prefix: tuple[int, ...], target: int, limit: int) -> int | None:
    """The int within +-limit that, after items `prefix`, brings the state to `target`."""
    lane = ((target - _xx_state((*prefix, 0))) * _XX_INVERSE_2) & _M64
    if lane <= limit:
        value = lane
    elif lane >= (1 << 64) - limit:
        value = lane - (1 << 64)
    else:
        return None
    return None if value in (0, -1) else value  # hash(-1) is -2, not -1


def colliding_pairs(count: int) -> list[tuple[int, int]]:
    """`count` distinct 2-tuples of ints within +-2**53 that all have one hash."""
    target = _xx_state((0, 1))
    pairs = [(0, 1)]
    for first in itertools.count(1):
        second = _last_item((first,), target, MAX_NUMBER)
        if second is not None:
            pairs.append((first, second))
            if len(pairs) == count:
                break
    assert len({hash(pair) for pair in pairs}) == 1, "the tuple hash is not the one modelled"
    return pairs


def colliding_ranges(count: int) -> list[tuple[int, int, int]]:
    """(start, stop, step) of `count` ranges with one hash, every bound within +-2**53: a range
    of two or more items hashes as the tuple (length, start, step)."""
    target = _xx_state((2, 1, 1))
    ranges = [(1, 3, 1)]
    for start in itertools.count(2):
        step = _last_item((2, start), target, MAX_NUMBER // 4)
        if step is not None:
            ranges.append((start, start + 2 * step, step))
            if len(ranges) == count:
                break
    assert len({hash(range(*bounds)) for bounds in ranges}) == 1, "range hash not as modelled"
    return ranges


def timed_render(template: str, params: Mapping[str, object]) -> tuple[float, float, str]:
    """Render while another thread wakes every 2 ms: (CPU seconds the render took, the most
    CPU the rendering thread used between two of those wake-ups, the output or the error).
    A C call holding the GIL shows up as CPU spent while the other thread cannot wake; a
    render that keeps handing the GIL over does not. CPU, not wall time: on a loaded machine
    the whole process may wait for a core, which holds nothing."""
    gaps: list[float] = []
    done = threading.Event()
    rendering = time.pthread_getcpuclockid(threading.get_ident())

    def ticker() -> None:
        last = time.clock_gettime(rendering)
        while not done.is_set():
            time.sleep(0.002)
            now = time.clock_gettime(rendering)
            gaps.append(now - last)
            last = now

    thread = threading.Thread(target=ticker)
    thread.start()
    time.sleep(0.01)
    started = time.thread_time()
    try:
        outcome = render_text(template, params)
    except RenderError as exc:
        outcome = str(exc)
    finally:
        spent = time.thread_time() - started
        done.set()
        thread.join()
    return spent, max(gaps), outcome


M = 2**61 - 1  # every multiple of it hashes to 0
COLLIDING_TUPLES = list(itertools.islice(itertools.product(colliding_pairs(20), repeat=3), 8000))
COLLISIONS = f"template exceeded the render limit ({MAX_SAME_HASH} keys per hash value)"
FROM_RANGES = "{% set rs = [] %}{% for b in bounds %}{% set _ = rs.append(range(*b)) %}{% endfor %}"

# The worst cases found, each with the outcome it must now have: refused (by the bound named)
# or rendered. Before these bounds, the first held the GIL 22 s in one C call (2.5 s at
# count=20000) and its `unique` variant ran 4.8 s at 20000; the 8000 crafted tuples held it
# 0.8 s in dict.fromkeys or dict(), 0.9 s in set.union (5 to 6.5 s at 20000) and took 1.8 s
# through unique (12 s at 20000).
WORST_CASES: dict[str, tuple[str, dict[str, object], str]] = {
    "ints: the fromkeys bomb (multiples of 2**61 - 1), count=60000": (
        HASH_BOMB_TEMPLATE,
        {"count": 60000},
        NUMBER_REFUSED,
    ),
    "ints: the unique bomb": (
        f"{{{{ range(0, {M} * count, {M})|unique|list|length }}}}",
        {"count": 60000},
        NUMBER_REFUSED,
    ),
    "ints: 2**61 - 1 computed, not written": (
        "{% set m = 2 ** 60 * 2 - 1 %}{{ {}.fromkeys(range(0, m * count, m))|length }}",
        {"count": 60000},
        NUMBER_REFUSED,
    ),
    "ints: 2**61 - 1 as a param": (
        "{{ {}.fromkeys(range(0, m * count, m))|length }}",
        {"m": M, "count": 60000},
        NUMBER_REFUSED,
    ),
    "ints: 65536 multiples of 2**37, which share their low bits": (
        "{{ {}.fromkeys(range(0, 2 ** 53, 2 ** 37))|length }}",
        {},
        "the result of a call would be larger than 64 KiB",
    ),
    "ints: 64 multiples of 2**47, rendered": (
        "{{ {}.fromkeys(range(0, 2 ** 53, 2 ** 47))|length }}",
        {},
        "64",
    ),
    "floats: 2**-61k all hash to 1": (
        "{% set fs = [1.0] %}{% for i in range(17) %}"
        "{% set _ = fs.append(fs[-1] * 2.0 ** -61) %}{% endfor %}{{ {}.fromkeys(fs)|length }}",
        {},
        COLLISIONS,
    ),
    "complex: k * (1000003 - 1j) all hash to 0": (
        "{% set j = (-1) ** 0.5 %}{% set z = 1000003 - (j - j.real) %}{% set l = [] %}"
        "{% for k in range(1, count) %}{% set _ = l.append(z * k) %}{% endfor %}"
        "{{ {}.fromkeys(l)|length }}",
        {"count": 60000},
        NUMBER_REFUSED,
    ),
    "strings: 2000 big-int-like numbers (hash-randomized), rendered": (
        "{{ {}.fromkeys(numbers)|length }} {{ numbers|unique|list|length }}",
        {"numbers": [str(M * k) for k in range(2000)]},
        "2000 2000",
    ),
    "tuples: 8000 crafted, dict.fromkeys": (
        "{{ {}.fromkeys(items)|length }}",
        {"items": COLLIDING_TUPLES},
        f"{COLLISIONS}: dict.fromkeys() was given more than",
    ),
    "tuples: 8000 crafted, unique": (
        "{{ items|unique|list|length }}",
        {"items": COLLIDING_TUPLES},
        f"{COLLISIONS}: the unique filter was given",
    ),
    "tuples: 8000 crafted, as dict() keys of (key, value) pairs": (
        "{{ dict(pairs)|length }}",
        {"pairs": [[item, index] for index, item in enumerate(COLLIDING_TUPLES)]},
        f"{COLLISIONS}: dict() was given",
    ),
    "tuples: 8000 crafted, update()": (
        "{% set d = {} %}{{ d.update(pairs) }}",
        {"pairs": [(item, 1) for item in COLLIDING_TUPLES]},
        f"{COLLISIONS}: dict.update() was given",
    ),
    "tuples: 8000 crafted, unbound dict.update(d, pairs)": (
        "{% set d = {} %}{{ dict.update(d, pairs) }}",
        {"pairs": [(item, 1) for item in COLLIDING_TUPLES]},
        f"{COLLISIONS}: dict.update() was given",
    ),
    "tuples: 8000 crafted, keys() - items": (
        "{{ ({1: 2}.keys() - items)|length }}",
        {"items": COLLIDING_TUPLES},
        f"{COLLISIONS}: `-` was given",
    ),
    "tuples: 8000 crafted, set.union()": (
        "{{ ({1: 2}.keys() - []).union(items)|length }}",
        {"items": COLLIDING_TUPLES},
        f"{COLLISIONS}: set.union() was given",
    ),
    "tuples: 8000 crafted, one setdefault() at a time": (
        "{% set d = {} %}{% for item in items %}{% set _ = d.setdefault(item) %}{% endfor %}",
        {"items": COLLIDING_TUPLES},
        f"{COLLISIONS}: dict.setdefault() was given",
    ),
    "tuples: crafted pairs written in the template": (
        f"{{{{ {{}}.fromkeys({colliding_pairs(MAX_SAME_HASH + 1)!r})|length }}}}",
        {},
        COLLISIONS,
    ),
    "tuples: 16 crafted pairs are fine": (
        f"{{{{ {{}}.fromkeys({colliding_pairs(MAX_SAME_HASH)!r})|length }}}}",
        {},
        "16",
    ),
    "ranges: crafted in the template (a range object weighs nothing)": (
        FROM_RANGES + "{{ {}.fromkeys(rs)|length }}",
        {"bounds": colliding_ranges(MAX_SAME_HASH + 1)},
        COLLISIONS,
    ),
    "sorting filters hash nothing: groupby, sort, dictsort on crafted tuples": (
        "{{ items|groupby(0)|length }} {{ items|sort|length }} "
        "{{ {'a': items[0], 'b': items[1]}|dictsort(by='value')|length }}",
        {"items": COLLIDING_TUPLES[:200]},
        "1 200 2",
    ),
}


@pytest.mark.parametrize("case", list(WORST_CASES))
def test_hash_collision_worst_cases_are_refused_or_fast_and_never_hold_the_gil(case: str) -> None:
    template, params, expected = WORST_CASES[case]
    elapsed, held, outcome = timed_render(template, params)
    assert expected in outcome, outcome
    assert "\n" not in outcome
    # CPU seconds, which a loaded machine does not inflate: the slowest of these takes 0.1 s,
    # far under what they cost without the bounds (a GIL held 1-22 s).
    assert elapsed < 2.0, (elapsed, outcome)
    assert held < 1.0, (held, outcome)


def test_literals_alone_stay_cheap_within_the_source_bound() -> None:
    # As many crafted keys as fit in 16 KiB, in a dict literal: built by Python's BUILD_MAP
    # with no hook (and its compiler hashes every constant tuple), so only the source bound
    # limits what they cost. Without it, 8000 such keys held the GIL 1 s in compile() alone.
    # `==` and `in` compare keys with no hook either; any call on the dict is refused.
    pairs = colliding_pairs(520)
    literal = "{" + ", ".join(f"{pair!r}: 1" for pair in pairs) + "}"
    template = f"{{% set d = {literal} %}}{{{{ d|length }}}} {{{{ d == d }}}} {{{{ (1, 2) in d }}}}"
    assert len(template) <= MAX_SOURCE_CHARS
    elapsed, held, outcome = timed_render(template, {})
    assert outcome == "520 true false"
    assert elapsed < 2.0 and held < 1.0, (elapsed, held)
    with pytest.raises(RenderLimitError, match=r"dict\.copy\(\) was given more than 16"):
        render_text(template + "{{ d.copy()|length }}", {})


@given(st.text(alphabet=st.sampled_from(list("ab 1=-/.\t\r\n\x0b\xa0'\"\\#$;")), max_size=40))
def test_splitting_a_rendered_command_agrees_with_shlex(command: str) -> None:
    """The fast split of a command that quotes nothing gives shlex's words, and anything it
    cannot vouch for goes to shlex itself (errors included)."""
    try:
        expected = shlex.split(command)
    except ValueError:
        with pytest.raises(ValueError):
            split_argv(command)
        return
    assert split_argv(command) == expected
