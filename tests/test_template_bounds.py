"""Template renders are bounded in time and size, off the event loop, and checked by validate.

A runbook template that passes the schema can still be a bomb (nested loops, `'a' * 10**9`).
`runbooks validate` renders every template with the params' defaults and rejects one past the
bounds; one that explodes only under other params is stopped at run time, in a worker thread,
while `loom-ops serve` keeps answering.
"""

from __future__ import annotations

import asyncio
import threading
import time
import tracemalloc
from pathlib import Path

import httpx
import jinja2
import jinja2.sandbox
import pytest

from agent.records import RunStatus
from agent.runbook import (
    RenderError,
    RenderLimitError,
    RenderLimits,
    RunbookError,
    load_runbook,
    render_command,
    render_text,
    render_url,
)
from agent.service import RunService
from agent.tools import describe_action
from tests.cli_helpers import Cli, assert_usage_error, make_cli_workspace
from tests.http_harness import ServeProcess, free_port, poll_run
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
    for name, text in {**BOMBS, "param-bomb": PARAM_BOMB}.items():
        (cli.workspace / "runbooks" / f"{name}.yaml").write_text(text)
    return cli


# -- runbooks validate (the real CLI) -----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "field", "detail"),
    [
        ("nested-loops", "steps[0].run", "it ran longer than 1 s"),
        ("string-times", "steps[1].run", "a repeated value would be larger than 64 KiB"),
    ],
)
def test_validate_rejects_a_template_bomb_in_one_line(
    tmp_path: Path, name: str, field: str, detail: str
) -> None:
    cli = bomb_workspace(tmp_path)
    path = cli.workspace / "runbooks" / f"{name}.yaml"
    started = time.monotonic()
    result = cli("runbooks", "validate", str(path))
    line = assert_usage_error(
        result, f"{path}:", field, "exceeded the render limit (1 s / 64 KiB)", detail
    )
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
    assert set(errors) == set(BOMBS), result.describe()
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
    assert not set(BOMBS) & set(ok)


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


def test_serve_answers_healthz_while_a_run_renders_a_bomb(tmp_path: Path) -> None:
    workspace = make_cli_workspace(tmp_path / "ws")
    write_runbook(workspace, "param-bomb", PARAM_BOMB)
    server = ServeProcess(
        workspace, tmp_path / "ops.sqlite", free_port(), LOOM_OPS_API_USER="cli:oncall"
    )
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            body = {"message": f"param bomb n={BIG} name=abc", "run_id": "bomb", "role": "runbook"}
            started = time.monotonic()
            assert client.post("/runs", json=body).status_code == 201
            latencies: list[float] = []
            run = client.get("/runs/bomb").json()
            while run["status"] not in ("succeeded", "failed", "rejected", "cancelled"):
                for _ in range(5):  # healthz back to back, the run's status now and then
                    asked = time.monotonic()
                    assert client.get("/healthz", timeout=5).status_code == 200
                    latencies.append(time.monotonic() - asked)
                assert time.monotonic() - started < 30, run
                run = client.get("/runs/bomb").json()
            elapsed = time.monotonic() - started
            run = poll_run(client, "bomb")
    finally:
        server.stop()
    assert run["status"] == "failed", run
    assert "step 'explode' run: template exceeded the render limit (1 s / 64 KiB)" in (
        run["error"] or ""
    ), run
    assert "it ran longer than 1 s" in run["error"], run
    # The render ran to its bound (a second) and the server answered all along.
    assert elapsed >= 1.0, elapsed
    assert len(latencies) >= 10, latencies
    assert max(latencies) < 0.5, latencies


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
    assert max(gaps) < 0.25, max(gaps)


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
    assert 0.3 <= elapsed < 1.5, elapsed


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
        "{{ 10 ** 10000000 }}",
        "{{ (5).to_bytes(1000000000, 'big') }}",
        "{{ ('ab' * 500).replace('a', 'x' * 1000) }}",
        "{{ ('\t' * 1000).expandtabs(100000) }}",
        "{{ ('y' * 1000).join(['a'] * 300) }}",
        "{{ (['a'] * 300)|join('y' * 1000) }}",
        "{{ 'abc'.translate({97: 'z' * 1000}) }}",
        "{% set x = 'a' * 1000 %}{% set x = x ~ x %}{% set x = x ~ x %}{{ x }}",
        "{% set ns = namespace(s='ab') %}{% for i in range(64) %}"
        "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
        "{% set x %}{% for i in range(100000) %}0123456789{% endfor %}{% endset %}{{ x|length }}",
        "{{ 'a b'|wordwrap(1, wrapstring='-' * 1000) }}",
    ],
)
def test_amplifying_operations_are_refused_before_they_allocate(template: str) -> None:
    tracemalloc.start()
    try:
        started = time.monotonic()
        with pytest.raises(RenderLimitError, match=r"\(0\.3 s / 1 KiB\)"):
            render_text(template, {}, SHORT)
        elapsed = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024, f"{peak} bytes allocated before the refusal"
    assert elapsed < 0.3, "refused by size, not by running into the deadline"


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
