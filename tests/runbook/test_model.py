"""Runbook format: shipped runbooks, precise load errors, params, command templating."""

from __future__ import annotations

import json
import os
import re
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck as HypothesisHealthCheck
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import ParamError, RenderError, RunbookError
from agent.records import Delay
from agent.runbook.model import (
    MAX_FILE_BYTES,
    Runbook,
    RunbookCatalog,
    current_catalog,
    load_catalog,
    load_runbook,
    read_yaml_mapping,
    render_command,
    render_text,
    render_url,
    runbook_json_schema,
    sample_commands,
    validate_runbooks,
)
from agent.service.runs import RunService
from agent.tools.allowlist import ShellAllowlist
from tests.cli_helpers import REPO

ROOT = REPO
RUNBOOKS = ROOT / "runbooks"
ALLOWLIST = ROOT / "ops.shell.allowlist.json"
SHIPPED = ("api-latency-spike", "disk-almost-full", "failed-deploy-rollback")

# A small valid runbook; the error tests below edit one thing in it at a time.
VALID = """\
id: restart-web
title: Restart the web tier
triggers: [web, "502"]
params:
  service:
    pattern: "[a-z][a-z0-9-]*"
    default: web
  namespace:
    choices: [production, staging]
    default: staging
  port:
    type: integer
    default: 8080
  dry_run:
    type: boolean
    default: false
  ticket:
    description: Incident ticket id
env: [KUBECONFIG]
steps:
  - id: look
    title: Look at the pods
    run: kubectl get pods -n {{ namespace }} -l app={{ service }}
    idempotent: true
  - id: restart
    title: Restart
    run: kubectl rollout restart deployment/{{ service }} -n {{ namespace }}
    approval: required
    rollback:
      note: Nothing to undo; a restart is its own rollback.
  - id: probe
    title: Probe
    check:
      url: http://127.0.0.1:{{ port }}/healthz
      expect_status: 200
  - id: tell
    title: Tell people
    note: Ticket {{ ticket }} can be closed.
"""


def write(directory: Path, text: str, name: str = "rb.yaml") -> Path:
    """Write a runbook file (dedented) and return its path."""
    path = directory / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load_error(directory: Path, text: str) -> RunbookError:
    """Load text as a runbook file and return the RunbookError it must raise."""
    path = write(directory, text)
    with pytest.raises(RunbookError) as info:
        load_runbook(path)
    return info.value


def valid_runbook() -> Runbook:
    """The VALID runbook, loaded from memory."""
    return Runbook.model_validate(yaml.safe_load(VALID))


# --- shipped runbooks ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def catalog() -> RunbookCatalog:
    """The runbooks shipped in the repository."""
    return load_catalog(RUNBOOKS)


def test_shipped_runbooks_all_load(catalog: RunbookCatalog) -> None:
    assert [str(e) for e in catalog.errors] == []
    assert sorted(catalog.runbooks) == sorted(SHIPPED)
    for path in sorted(RUNBOOKS.glob("*.yaml")):
        assert load_runbook(path).id == path.stem  # file name and id agree


@pytest.mark.parametrize("runbook_id", SHIPPED)
def test_shipped_runbook_shape(catalog: RunbookCatalog, runbook_id: str) -> None:
    runbook = catalog.get(runbook_id)
    assert 4 <= len(runbook.steps) <= 8
    assert runbook.triggers and runbook.description and runbook.approvers
    kinds = {step.action_kind for step in runbook.steps}
    assert kinds == {"run", "check", "note"}
    gated = [step for step in runbook.steps if step.needs_approval]
    assert gated and all(step.rollback is not None for step in gated)
    for step in runbook.steps:
        if step.action_kind == "run" and not step.needs_approval:
            assert step.idempotent, f"{runbook_id}.{step.id}: diagnostics must be idempotent"
        if step.run is not None and step.run.startswith("kubectl"):
            assert "KUBECONFIG" in runbook.env
    assert all(param.default is not None for param in runbook.params.values())


@pytest.mark.parametrize("runbook_id", SHIPPED)
def test_shipped_templates_render_with_defaults(catalog: RunbookCatalog, runbook_id: str) -> None:
    runbook = catalog.get(runbook_id)
    params = runbook.resolve_params({})
    for step in runbook.steps:
        if step.run is not None:
            assert render_command(step.run, params)
        if step.rollback is not None and step.rollback.run is not None:
            assert render_command(step.rollback.run, params)
        if step.check is not None:
            url = render_url(step.check.url, params)
            assert url.startswith(("http://127.0.0.1:", "http://localhost:"))
        if step.note is not None:
            assert "{{" not in render_text(step.note, params)


def _allowlist_rules() -> list[list[str]]:
    return [rule["argv"] for rule in json.loads(ALLOWLIST.read_text())["rules"]]


def _token_matches(token: str, arg: str) -> bool:
    if token == "*":
        return bool(arg) and not arg.startswith("-")
    if token.startswith("re:"):
        return re.fullmatch(token[3:], arg) is not None
    return token == arg


def _rule_matches(rule: list[str], argv: list[str]) -> bool:
    """The allowlist format: whole-argv match, `**` only last (a tail of non-option args)."""
    if rule[-1] == "**":
        fixed = rule[:-1]
        tail = argv[len(fixed) :]
        if len(argv) < len(fixed) or any(not a or a.startswith("-") for a in tail):
            return False
    else:
        fixed = rule
        if len(argv) != len(fixed):
            return False
    return all(_token_matches(t, a) for t, a in zip(fixed, argv, strict=False))


def _shipped_commands(catalog: RunbookCatalog, given: dict[str, str]) -> list[list[str]]:
    commands = []
    for runbook in catalog.runbooks.values():
        params = runbook.resolve_params({k: v for k, v in given.items() if k in runbook.params})
        for step in runbook.steps:
            for template in (step.run, step.rollback.run if step.rollback else None):
                if template is not None:
                    commands.append(render_command(template, params))
    return commands


def test_allowlist_admits_exactly_the_shipped_commands(catalog: RunbookCatalog) -> None:
    rules = _allowlist_rules()
    commands = _shipped_commands(catalog, {})
    for argv in commands:
        assert any(_rule_matches(rule, argv) for rule in rules), f"not allowlisted: {argv}"
    for rule in rules:
        assert any(_rule_matches(rule, argv) for argv in commands), f"unused rule: {rule}"


def test_allowlist_admits_other_valid_params_but_not_other_verbs(catalog: RunbookCatalog) -> None:
    rules = _allowlist_rules()
    given = {"service": "payments", "namespace": "staging", "replicas": "12", "mount": "/srv"}
    for argv in _shipped_commands(catalog, given):
        assert any(_rule_matches(rule, argv) for rule in rules), f"not allowlisted: {argv}"
    for argv in (
        ["kubectl", "delete", "deployment/checkout-api", "-n", "production"],
        ["kubectl", "get", "pods", "-n", "kube-system", "-l", "app=x", "-o", "wide"],
        ["kubectl", "get", "pods", "-n", "production", "-l", "app=x", "-o", "wide", "-A"],
        ["df", "-h", "/var/../etc"],
        ["journalctl", "--vacuum-size=0K"],
    ):
        assert not any(_rule_matches(rule, argv) for rule in rules), f"admitted: {argv}"


def test_json_schema_describes_runbooks() -> None:
    schema = runbook_json_schema()
    assert {"id", "title", "steps", "params"} <= set(schema["properties"])
    assert "steps" in schema["required"]
    json.dumps(schema)  # serialisable for editors


# --- precise load errors ---------------------------------------------------------------------


def test_error_format_names_file_line_and_field(tmp_path: Path) -> None:
    error = load_error(
        tmp_path,
        """\
        id: x
        title: X
        steps:
          - id: a
            title: A
            check:
              url: http://127.0.0.1/healthz
              expect_status: 600
        """,
    )
    assert (error.line, error.field) == (8, "steps[0].check.expect_status")
    assert str(error) == (
        f"{tmp_path / 'rb.yaml'}:8: steps[0].check.expect_status: "
        "Input should be less than or equal to 599"
    )


def test_error_wrong_type(tmp_path: Path) -> None:
    error = load_error(tmp_path, VALID.replace("    idempotent: true", "    retries: lots"))
    assert (error.line, error.field) == (24, "steps[0].retries")
    assert "valid integer" in error.message


def test_error_missing_steps(tmp_path: Path) -> None:
    error = load_error(tmp_path, "# a comment first\nid: x\ntitle: X\n")
    assert (error.line, error.field) == (2, "steps")
    assert error.message == "required field is missing"


def test_error_unknown_field_suggests_the_right_one(tmp_path: Path) -> None:
    error = load_error(tmp_path, VALID.replace("approval: required", "aproval: required"))
    assert (error.line, error.field) == (28, "steps[1].aproval")
    assert error.message == "unknown field 'aproval' (did you mean 'approval'?)"


def test_error_step_with_two_actions(tmp_path: Path) -> None:
    text = VALID.replace("    idempotent: true", "    note: also a note")
    error = load_error(tmp_path, text)
    assert (error.line, error.field) == (24, "steps[0].note")
    assert "exactly one action" in error.message and "run and note" in error.message


def test_error_step_without_action(tmp_path: Path) -> None:
    text = VALID.replace("    note: Ticket {{ ticket }} can be closed.\n", "")
    error = load_error(tmp_path, text)
    assert (error.line, error.field) == (36, "steps[3]")
    assert "found none" in error.message


def test_error_duplicate_step_ids(tmp_path: Path) -> None:
    error = load_error(tmp_path, VALID.replace("- id: probe", "- id: look"))
    assert (error.line, error.field) == (31, "steps[2].id")
    assert "duplicate step id 'look'" in error.message


def test_error_duplicate_yaml_key(tmp_path: Path) -> None:
    text = VALID.replace("    default: web\n", "    default: web\n    default: api\n")
    error = load_error(tmp_path, text)
    assert (error.line, error.field) == (8, "params.service.default")
    assert error.message == "duplicate key 'default' (first on line 7)"


def test_error_duplicate_top_level_key(tmp_path: Path) -> None:
    error = load_error(tmp_path, VALID + "title: Again\n")
    assert (error.line, error.field) == (39, "title")


def test_error_bad_regex_pattern(tmp_path: Path) -> None:
    error = load_error(tmp_path, VALID.replace('"[a-z][a-z0-9-]*"', '"[a-z"'))
    assert (error.line, error.field) == (6, "params.service.pattern")
    assert error.message.startswith("invalid regular expression")


def test_error_default_not_matching_pattern(tmp_path: Path) -> None:
    error = load_error(tmp_path, VALID.replace("default: web", "default: Web Tier"))
    assert (error.line, error.field) == (7, "params.service.default")
    assert "does not match pattern" in error.message


def test_error_default_not_in_choices(tmp_path: Path) -> None:
    error = load_error(tmp_path, VALID.replace("default: staging", "default: prod"))
    assert (error.line, error.field) == (10, "params.namespace.default")
    assert "not one of: production, staging" in error.message


def test_error_default_of_wrong_type(tmp_path: Path) -> None:
    error = load_error(tmp_path, VALID.replace("default: 8080", 'default: "8080"'))
    assert (error.line, error.field) == (13, "params.port.default")
    assert "not an integer" in error.message


def test_error_pattern_and_choices_together(tmp_path: Path) -> None:
    text = VALID.replace("    default: staging\n", "    default: staging\n    pattern: '.*'\n")
    error = load_error(tmp_path, text)
    assert (error.line, error.field) == (9, "params.namespace.choices")


def test_error_template_references_undeclared_param(tmp_path: Path) -> None:
    error = load_error(tmp_path, VALID.replace("-l app={{ service }}", "-l app={{ servce }}"))
    assert (error.line, error.field) == (23, "steps[0].run")
    assert "undeclared param(s): servce" in error.message


def test_error_undeclared_param_in_url_and_rollback(tmp_path: Path) -> None:
    error = load_error(tmp_path, VALID.replace("127.0.0.1:{{ port }}", "{{ host }}:{{ port }}"))
    assert (error.line, error.field) == (34, "steps[2].check.url")
    text = VALID.replace("note: Nothing to undo; a restart is its own rollback.", "run: x {{ y }}")
    error = load_error(tmp_path, text)
    assert (error.line, error.field) == (30, "steps[1].rollback.run")


def test_error_template_syntax(tmp_path: Path) -> None:
    error = load_error(tmp_path, VALID.replace("-l app={{ service }}", "-l app={{ service }"))
    assert (error.line, error.field) == (23, "steps[0].run")
    assert "template syntax error" in error.message


def test_error_expression_inside_quotes(tmp_path: Path) -> None:
    # '{{ x }}' would unquote the already-quoted output and split a value into several args.
    error = load_error(tmp_path, VALID.replace("-l app={{ service }}", "-l 'app={{ service }}'"))
    assert (error.line, error.field) == (23, "steps[0].run")
    assert "inside quotes" in error.message


def test_error_url_scheme(tmp_path: Path) -> None:
    error = load_error(tmp_path, VALID.replace("http://127.0.0.1", "file:///etc/passwd#"))
    assert (error.line, error.field) == (34, "steps[2].check.url")


def test_error_yaml_syntax(tmp_path: Path) -> None:
    error = load_error(tmp_path, "id: x\ntitle: [unclosed\nsteps: []\n")
    assert error.line == 3 and error.field == ""
    assert str(error).startswith(f"{tmp_path / 'rb.yaml'}:3: YAML syntax error")


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        (
            "id: x\nsteps:\n\t- id: a\n",
            3,
            "while scanning for the next token, found character '\\t' that cannot start any token",
        ),
        ("id: x\ntitle: a: b\n", 2, "mapping values are not allowed here"),
        ("id: x\ntitle: *title\n", 2, "found undefined alias 'title'"),
    ],
)
def test_a_yaml_error_names_what_is_wrong(tmp_path: Path, text: str, line: int, words: str) -> None:
    """libyaml parses, but its messages leave out the tab or the alias: a refused file is
    described in PyYAML's own words, at the same line."""
    error = load_error(tmp_path, text)
    assert (error.line, error.field) == (line, "")
    assert error.message == f"YAML syntax error: {words}"


@pytest.mark.parametrize(
    ("text", "title"),
    [
        ("%FOO bar\n---\nid: x\ntitle: directive\n", "directive"),
        ('id: x\ntitle: "a\\uD800b"\n', "a\ud800b"),
    ],
)
def test_a_file_only_pyyaml_reads_loads_as_it_always_did(
    tmp_path: Path, text: str, title: str
) -> None:
    """libyaml refuses an unknown directive and a lone surrogate escape; PyYAML read both
    before the change to libyaml, so they still load, with PyYAML's values."""
    path = tmp_path / "rb.yaml"
    path.write_text(text)
    _, document = read_yaml_mapping(path, "id: ...")
    assert document == {"id": "x", "title": title}


def test_an_escape_pyyaml_cannot_scan_is_one_error_not_a_crash(tmp_path: Path) -> None:
    """libyaml refuses `"\\U00110000"` (past Unicode); PyYAML's own scanner, asked for its
    words, raises a ValueError instead: the file is still one error, and the catalog loads."""
    error = load_error(tmp_path, 'id: x\ntitle: "\\U00110000"\n')
    assert (error.line, error.field) == (2, "")
    assert error.message.startswith("YAML syntax error: ")
    assert [str(e) for e in load_catalog(tmp_path).errors] == [str(error)]


def test_error_bad_slug_and_bad_param_name(tmp_path: Path) -> None:
    error = load_error(tmp_path, VALID.replace("- id: probe", "- id: Probe Step"))
    assert (error.line, error.field) == (31, "steps[2].id")
    error = load_error(tmp_path, VALID.replace("  dry_run:", "  DryRun:"))
    assert (error.line, error.field) == (14, "params.DryRun")


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("- a\n- b\n", 1, "top level must be a mapping"),
        ("just text\n", 1, "top level must be a mapping"),
        ("", None, "file is empty"),
        ("# only a comment\n", None, "file is empty"),
        ("id: x\n---\nid: y\n", 2, "single document"),
        ("id: x\ntitle: !!python/object:os.system x\n", 2, "YAML error"),
        ("id: x\nsteps: !!int nope\n", 2, "invalid value"),
        ("a: &a [*a]\n", 1, "recursive alias"),
        ("id: x\ntitle: \x01\n", 2, "#x0001"),
        ("id: x\ntitle: t\nsteps: *nowhere\n", 3, "YAML"),
    ],
)
def test_error_malformed_documents(
    tmp_path: Path, text: str, line: int | None, fragment: str
) -> None:
    error = load_error(tmp_path, text)
    assert error.line == line
    assert fragment in str(error)


def test_error_alias_bomb_is_refused(tmp_path: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    error = load_error(tmp_path, "\n".join(lines) + "\n")
    assert "expands to more than" in error.message


def test_error_binary_and_non_utf8_files(tmp_path: Path) -> None:
    path = tmp_path / "rb.yaml"
    path.write_bytes(b"id: x\ntitle: caf\xe9\n")
    with pytest.raises(RunbookError, match=r":2: file is not valid UTF-8"):
        load_runbook(path)
    path.write_bytes(bytes(range(256)))
    with pytest.raises(RunbookError):
        load_runbook(path)


def test_error_oversized_and_missing_files(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("# " + "x" * MAX_FILE_BYTES + "\n")
    with pytest.raises(RunbookError, match="larger than 256 KiB"):
        load_runbook(path)
    with pytest.raises(RunbookError, match="cannot read file"):
        load_runbook(tmp_path / "missing.yaml")


def test_yaml_anchors_and_merge_keys_still_work(tmp_path: Path) -> None:
    text = (
        VALID.replace("  - id: look\n", "  - &look\n    id: look\n")
        + "  - <<: *look\n    id: look-again\n"
    )
    runbook = load_runbook(write(tmp_path, text))
    assert runbook.step("look-again").run == runbook.step("look").run


def test_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "rb.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + VALID.encode())
    assert load_runbook(path).id == "restart-web"


# --- the catalog -----------------------------------------------------------------------------


def test_catalog_loads_good_files_and_reports_bad_ones(tmp_path: Path) -> None:
    write(tmp_path, VALID, "a-good.yaml")
    write(
        tmp_path, VALID.replace("restart-web", "half").replace("- id: probe", "- id: look"), "b.yml"
    )
    write(tmp_path, "not: [a runbook", "c.yaml")
    (tmp_path / "notes.txt").write_text("ignored")
    catalog = load_catalog(tmp_path)
    assert list(catalog.runbooks) == ["restart-web"]
    assert catalog.get("restart-web").title == "Restart the web tier"
    assert [e.path.name for e in catalog.errors] == ["b.yml", "c.yaml"]
    with pytest.raises(KeyError):
        catalog.get("half")  # the bad file contributed nothing, not even its good steps


def test_catalog_duplicate_id_is_an_error_for_the_second_file(tmp_path: Path) -> None:
    write(tmp_path, VALID, "a.yaml")
    write(tmp_path, "# the same runbook again\n" + VALID, "b.yaml")
    catalog = load_catalog(tmp_path)
    assert list(catalog.runbooks) == ["restart-web"]
    [error] = catalog.errors
    assert (error.path.name, error.line, error.field) == ("b.yaml", 2, "id")
    assert "duplicate runbook id 'restart-web'" in error.message


def test_catalog_of_missing_directory(tmp_path: Path) -> None:
    catalog = load_catalog(tmp_path / "nowhere")
    assert catalog.runbooks == {}
    assert len(catalog.errors) == 1 and "not found" in str(catalog.errors[0])


# --- params ----------------------------------------------------------------------------------


def test_resolve_params_fills_defaults_and_converts() -> None:
    runbook = valid_runbook()
    assert runbook.resolve_params({"ticket": "INC-7", "port": "9090", "dry_run": "yes"}) == {
        "service": "web",
        "namespace": "staging",
        "port": 9090,
        "dry_run": True,
        "ticket": "INC-7",
    }
    assert runbook.params["ticket"].required and not runbook.params["port"].required


@pytest.mark.parametrize(
    ("given", "fragment"),
    [
        ({"ticket": "T", "sevice": "web"}, "unknown param 'sevice'"),
        ({}, "param 'ticket' is required (Incident ticket id)"),
        ({"ticket": "T", "service": "Web Tier"}, "param 'service': 'Web Tier' does not match"),
        ({"ticket": "T", "service": "web;rm"}, "param 'service'"),
        ({"ticket": "T", "namespace": "prod"}, "param 'namespace': 'prod' is not one of"),
        ({"ticket": "T", "port": "80.5"}, "param 'port': '80.5' is not an integer"),
        ({"ticket": "T", "port": "1_000"}, "param 'port'"),
        ({"ticket": "T", "port": "١٢"}, "param 'port'"),  # non-ASCII digits
        ({"ticket": "T", "dry_run": "maybe"}, "param 'dry_run': 'maybe' is not a boolean"),
        ({"ticket": "a\x00b"}, "param 'ticket': value contains a NUL byte"),
    ],
)
def test_resolve_params_errors_name_the_param(given: dict[str, str], fragment: str) -> None:
    with pytest.raises(ParamError) as info:
        valid_runbook().resolve_params(given)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("raw", "value"),
    [("true", True), ("YES", True), ("1", True), ("false", False), ("No", False), ("0", False)],
)
def test_resolve_boolean_words(raw: str, value: bool) -> None:
    assert valid_runbook().resolve_params({"ticket": "T", "dry_run": raw})["dry_run"] is value


def test_resolve_integers() -> None:
    runbook = valid_runbook()
    assert runbook.resolve_params({"ticket": "T", "port": " +42 "})["port"] == 42
    assert runbook.resolve_params({"ticket": "T", "port": "-3"})["port"] == -3


def test_step_lookup() -> None:
    runbook = valid_runbook()
    assert runbook.step("restart").needs_approval
    assert runbook.step("probe").action_kind == "check"
    with pytest.raises(KeyError):
        runbook.step("nope")


# --- command rendering -----------------------------------------------------------------------

INJECTIONS = [
    "a b; rm -rf /",
    "$(rm -rf /)",
    "`reboot`",
    "x' ; echo 'pwned",
    'x" ; echo "pwned',
    "two words",
    "line\nbreak",
    "--all-namespaces",
    "-- --force",
    "",
    "'",
    "\\",
    "a && b || c | d > /etc/passwd",
    "${HOME}",
    "*",
]


@pytest.mark.parametrize("value", INJECTIONS)
def test_render_command_keeps_each_value_in_one_argv_element(value: str) -> None:
    template = "kubectl get deployment/{{ service }} -n {{ namespace }}"
    argv = render_command(template, {"service": value, "namespace": value})
    assert argv == ["kubectl", "get", f"deployment/{value}", "-n", value]


def test_render_command_types() -> None:
    argv = render_command("tool --dry-run={{ d }} --port {{ p }}", {"d": False, "p": 8080})
    assert argv == ["tool", "--dry-run=false", "--port", "8080"]


def test_render_command_errors() -> None:
    with pytest.raises(RenderError, match="'missing' is undefined"):
        render_command("echo {{ missing }}", {})
    with pytest.raises(RenderError, match="empty command"):
        render_command("{% if false %}echo{% endif %}", {})
    with pytest.raises(RenderError, match="unsafe"):
        render_command("echo {{ s.__class__.__mro__ }}", {"s": "x"})
    with pytest.raises(RenderError, match="NUL"):
        render_command("echo {{ s }}", {"s": "a\x00b"})


def test_render_text_and_url() -> None:
    assert render_text("p99 above {{ ms }} ms: {{ on }}", {"ms": 800, "on": True}) == (
        "p99 above 800 ms: true"
    )
    assert render_url("http://{{ h }}:{{ p }}/healthz", {"h": "127.0.0.1", "p": 80}) == (
        "http://127.0.0.1:80/healthz"
    )
    for host in ("", "a b", "x\ny"):
        with pytest.raises(RenderError):
            render_url("http://{{ h }}/healthz", {"h": host})


# --- property-based --------------------------------------------------------------------------

PROPERTY_SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HypothesisHealthCheck.function_scoped_fixture],
)

YAML_ALPHABET = st.sampled_from([*":-[]{}&*!|>'\"#%@`,? \n\t\\abcidstep0129.", "\x00", "é"])


def _load_must_be_clean(path: Path) -> None:
    """load_runbook either returns a Runbook or raises RunbookError, nothing else."""
    try:
        assert isinstance(load_runbook(path), Runbook)
    except RunbookError as error:
        assert str(error).startswith(str(path))
        assert "\n" not in error.field


@PROPERTY_SETTINGS
@given(text=st.text() | st.text(alphabet=YAML_ALPHABET, max_size=200))
def test_property_arbitrary_text_never_crashes_the_loader(tmp_path: Path, text: str) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8")
    _load_must_be_clean(path)


@PROPERTY_SETTINGS
@given(data=st.binary(max_size=300))
def test_property_arbitrary_bytes_never_crash_the_loader(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(data)
    _load_must_be_clean(path)


SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**6), max_value=10**6)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
    | st.sampled_from(["{{ nope }}", "{{ service }}", "http://x/", "required", "[", "!!"])
)


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    # A named function: Hypothesis reads a lambda split over lines as one that never
    # recurses, and warns.
    return st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)


VALUES = st.recursive(SCALARS, _containers, max_leaves=8)
KEYS = st.sampled_from(
    [
        "id",
        "title",
        "run",
        "check",
        "note",
        "approval",
        "timeout",
        "retries",
        "rollback",
        "params",
        "steps",
        "default",
        "pattern",
        "choices",
        "type",
        "url",
        "expect_status",
    ]
) | st.text(max_size=8)


@PROPERTY_SETTINGS
@given(data=st.data())
def test_property_mutated_runbooks_load_or_fail_cleanly(
    tmp_path: Path, data: st.DataObject
) -> None:
    # Start from the small VALID runbook or one of the shipped ones.
    base = data.draw(
        st.sampled_from([VALID, *(p.read_text() for p in sorted(RUNBOOKS.glob("*.yaml")))])
    )
    document: Any = yaml.safe_load(base)
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        # Walk down to a random container, then put a random value at a random key/index.
        node = document
        while True:
            children = list(node.values()) if isinstance(node, dict) else list(node)
            children = [c for c in children if isinstance(c, (dict, list)) and c]
            if not children or data.draw(st.booleans()):
                break
            node = data.draw(st.sampled_from(children))
        value = data.draw(VALUES)
        if isinstance(node, dict):
            key = data.draw(st.sampled_from(sorted(node, key=str)) | KEYS)
            if data.draw(st.booleans()) and key in node:
                del node[key]
            else:
                node[key] = value
        elif node:
            node[data.draw(st.integers(min_value=0, max_value=len(node) - 1))] = value
    path = tmp_path / "mutated.yaml"
    path.write_text(yaml.safe_dump(document, allow_unicode=True), encoding="utf-8")
    _load_must_be_clean(path)


@PROPERTY_SETTINGS
@given(value=st.text())
def test_property_rendered_value_is_exactly_one_argv_element(value: str) -> None:
    params = {"service": value}
    if "\x00" in value:
        with pytest.raises(RenderError):
            render_command("kubectl get deployment/{{ service }}", params)
        return
    assert render_command("kubectl get deployment/{{ service }} {{ service }}", params) == [
        "kubectl",
        "get",
        f"deployment/{value}",
        value,
    ]


@PROPERTY_SETTINGS
@given(given=st.dictionaries(st.sampled_from(["service", "port", "dry_run", "x"]), st.text()))
def test_property_resolve_params_raises_only_param_errors(given: dict[str, str]) -> None:
    runbook = valid_runbook()
    try:
        resolved = runbook.resolve_params({"ticket": "T", **given})
    except ParamError as error:
        assert error.param in {"service", "port", "dry_run", "x"}
    else:
        assert set(resolved) == set(runbook.params)


def test_integer_bounds_are_enforced_on_user_values_and_defaults(tmp_path: Path) -> None:
    """`min`/`max` bound integer params: a user's value and the default alike."""
    runbook = load_catalog(REPO / "runbooks").get("api-latency-spike")
    assert runbook.resolve_params({"replicas": "12"})["replicas"] == 12
    for bad in ("-5", "0", "51"):
        with pytest.raises(ParamError, match="replicas"):
            runbook.resolve_params({"replicas": bad})
    path = tmp_path / "bounds.yaml"
    path.write_text(
        "id: bounds\ntitle: Bounds\nparams:\n  n:\n    type: integer\n    default: 9\n"
        "    min: 1\n    max: 5\nsteps:\n  - {id: a, title: A, note: hi}\n"
    )
    with pytest.raises(RunbookError, match=r"bounds.yaml:6: params.n.default: .*above the maximum"):
        load_runbook(path)
    path.write_text(
        "id: bounds\ntitle: Bounds\nparams:\n  s:\n    min: 1\n"
        "steps:\n  - {id: a, title: A, note: hi}\n"
    )
    with pytest.raises(RunbookError, match="min applies only to integer params"):
        load_runbook(path)


# --- validating: every error of every file in one pass ------------------------------------

# Five mistakes, each of a kind that used to hide the next: field typos in two steps, a bad
# value, a template naming an undeclared param, and a step id used twice.
FIVE_MISTAKES = """\
id: mistakes
title: Five mistakes
params:
  service: {default: web}
steps:
  - id: one
    title: One
    run: kubectl get pods -l app={{ servce }}
  - id: two
    titel: Two
    note: two
  - id: three
    title: Three
    check: {url: "http://127.0.0.1/", expect_status: "200"}
  - id: one
    title: Again
    note: again
    aproval: required
"""


def test_validate_runbooks_reports_every_error_of_a_file_by_line(tmp_path: Path) -> None:
    path = write(tmp_path, FIVE_MISTAKES)
    [report] = validate_runbooks(path)
    assert report.runbook is None
    assert [(e.line, e.field) for e in report.errors] == [
        (8, "steps[0].run"),
        (9, "steps[1].title"),
        (10, "steps[1].titel"),
        (14, "steps[2].check.expect_status"),
        (15, "steps[3].id"),
        (18, "steps[3].aproval"),
    ]
    messages = [e.message for e in report.errors]
    assert "undeclared param(s): servce" in messages[0]
    assert "did you mean 'title'" in messages[2]
    assert "duplicate step id 'one'" in messages[4]
    assert report.warnings == []


def test_load_runbook_still_raises_the_first_error_only(tmp_path: Path) -> None:
    error = load_error(tmp_path, FIVE_MISTAKES)
    assert (error.line, error.field) == (9, "steps[1].title")  # the model's first, by line


def test_validate_runbooks_covers_a_directory_and_duplicate_ids(tmp_path: Path) -> None:
    write(tmp_path, VALID, "a.yaml")
    write(tmp_path, VALID, "b.yaml")
    write(tmp_path, FIVE_MISTAKES, "c.yml")
    write(tmp_path, "not: [a runbook", "d.yaml")
    reports = validate_runbooks(tmp_path)
    assert [r.path.name for r in reports] == ["a.yaml", "b.yaml", "c.yml", "d.yaml"]
    assert reports[0].runbook is not None and reports[0].errors == []
    assert [str(e) for e in reports[1].errors] == [
        f"{tmp_path / 'b.yaml'}:1: id: duplicate runbook id 'restart-web' (also "
        f"{tmp_path / 'a.yaml'})"
    ]
    assert len(reports[2].errors) == 6
    assert len(reports[3].errors) == 1 and "YAML syntax error" in str(reports[3].errors[0])


def test_reserved_param_name_is_refused(tmp_path: Path) -> None:
    text = VALID.replace("  ticket:\n", "  runbook:\n")
    error = load_error(tmp_path, text)
    assert error.field == "params.runbook"
    assert "reserved" in error.message


def test_sample_commands_render_the_defaults_and_say_what_they_lack() -> None:
    samples = {(s.step_id, s.rollback): s for s in sample_commands(valid_runbook())}
    look = samples[("look", False)]
    assert look.argv == ["kubectl", "get", "pods", "-n", "staging", "-l", "app=web"]
    assert look.given() == "namespace=staging service=web"
    assert set(samples) == {("look", False), ("restart", False)}  # notes and checks are no commands
    text = VALID.replace("run: kubectl get pods", "run: echo {{ ticket }} && kubectl get pods")
    # A patterned param without a default has no value to try a template with.
    text = text.replace(
        "Incident ticket id\n", 'Incident ticket id\n    pattern: "[A-Z]+-[0-9]+"\n'
    )
    lacking = sample_commands(Runbook.model_validate(yaml.safe_load(text)))[0]
    assert lacking.argv is None
    assert lacking.problem == "needs a value for ticket (no default)"


def test_allowlist_gaps_are_warnings_unless_live_shell(tmp_path: Path) -> None:
    path = write(tmp_path, VALID)
    allowlist = ShellAllowlist.from_data(
        {"rules": [{"argv": ["kubectl", "get", "pods", "-n", "*", "-l", "*"]}]}
    )
    [dry] = validate_runbooks(path, allowlist)
    assert dry.errors == [] and dry.runbook is not None
    [gap] = dry.warnings
    assert (gap.line, gap.field) == (27, "steps[1].run")
    assert gap.message == (
        "step 'restart': no rule of <memory> admits "
        '["kubectl", "rollout", "restart", "deployment/web", "-n", "staging"] '
        "(rendered with namespace=staging service=web)"
    )
    [live] = validate_runbooks(path, allowlist, live_shell=True)
    assert live.warnings == [] and [str(e) for e in live.errors] == [str(gap)]
    assert live.runbook is not None  # a gap is about the configuration, not the file
    everything = ShellAllowlist.from_data({"rules": [{"argv": ["kubectl", "**"]}]})
    # `**` admits no options: -n and -l are refused, so both commands are gaps.
    assert len(validate_runbooks(path, everything)[0].warnings) == 2


# --- alert routes -------------------------------------------------------------------------------

ALERTS = """\
alerts:
  - match: {alertname: WebDown, team: web}
    params:
      service: "{{ labels.service }}"
      ticket: "{{ annotations.ticket | default('none') }}"
    start: auto
"""


def with_alerts(block: str = ALERTS) -> str:
    """VALID with an `alerts:` block before its steps (line 20 is `alerts:`)."""
    return VALID.replace("steps:\n", block + "steps:\n", 1)


def test_an_alert_route_matches_labels_and_renders_its_params() -> None:
    runbook = Runbook.model_validate(yaml.safe_load(with_alerts()))
    assert runbook.alert_route({"alertname": "WebDown"}) is None  # every label must match
    route = runbook.alert_route({"alertname": "WebDown", "team": "web", "x": "y"})
    assert route is not None and route.start == "auto"
    params = route.render_params({"service": "web-eu"}, {"ticket": "INC-7"})
    assert params == {"service": "web-eu", "ticket": "INC-7"}
    assert runbook.resolve_params(params)["service"] == "web-eu"
    with pytest.raises(RenderError, match="alert param 'service'"):
        route.render_params({}, {})  # the alert lacks the label the template reads


def test_shipped_runbooks_answer_their_alerts(catalog: RunbookCatalog) -> None:
    answers = {
        "HighLatency": "api-latency-spike",
        "DiskAlmostFull": "disk-almost-full",
        "NodeFilesystemAlmostOutOfSpace": "disk-almost-full",
        "KubeDeploymentRolloutStuck": "failed-deploy-rollback",
    }
    for alertname, runbook_id in answers.items():
        runbook = catalog.get(runbook_id)
        route = runbook.alert_route({"alertname": alertname})
        assert route is not None, alertname
        runbook.resolve_params(route.render_params({"alertname": alertname}, {}))


@pytest.mark.parametrize(
    ("block", "line", "field", "message"),
    [
        (
            ALERTS.replace("    start: auto", "    strat: auto"),
            25,
            "alerts[0].strat",
            "unknown field 'strat' (did you mean 'start'?)",
        ),
        (ALERTS.replace("start: auto", "start: now"), 25, "alerts[0].start", "'auto' or 'ask'"),
        (
            ALERTS.replace("service: ", "replicas: "),
            23,
            "alerts[0].params.replicas",
            "'replicas' is not a param of restart-web",
        ),
        (
            ALERTS.replace("labels.service", "alert.service"),
            23,
            "alerts[0].params.service",
            "template references alert: alert params may use labels and annotations",
        ),
        (
            ALERTS.replace("{{ labels.service }}", "{{ labels.service"),
            23,
            "alerts[0].params.service",
            "template syntax error",
        ),
        (
            ALERTS.replace("{alertname: WebDown, team: web}", "{}"),
            21,
            "alerts[0].match",
            "at least 1 item",
        ),
        (
            ALERTS.replace("team: web", "team-name: web"),
            21,
            "alerts[0].match.team-name",
            "is not a label name",
        ),
    ],
)
def test_a_bad_alert_route_is_one_error_with_file_line_and_field(
    tmp_path: Path, block: str, line: int, field: str, message: str
) -> None:
    error = load_error(tmp_path, with_alerts(block))
    assert (error.line, error.field) == (line, field), error
    assert message in error.message
    assert str(error).startswith(f"{tmp_path / 'rb.yaml'}:{line}: {field}: ")


# --- reminders, escalation and expiry -------------------------------------------------------

ESCALATION = """\
escalation:
  remind_after: 50%
  escalate_after: 10m
  escalate_to: [group:leads]
on_expiry: rollback
"""


def with_escalation(block: str) -> str:
    """VALID with `block` after its triggers (line 4 on)."""
    head, tail = VALID.split("params:\n", 1)
    return f"{head}{block}params:\n{tail}"


def test_escalation_and_on_expiry_load_with_their_delays(tmp_path: Path) -> None:
    runbook = load_runbook(write(tmp_path, with_escalation(ESCALATION)))
    assert runbook.on_expiry == "rollback"
    escalation = runbook.escalation
    assert escalation.escalate_to == ["group:leads"]
    remind, escalate = escalation.remind(None), escalation.escalate(None)
    assert remind is not None and remind.after(1000.0, 600.0) == 1300.0
    assert escalate is not None and escalate.after(1000.0, 1200.0) == 1600.0
    # Past the deadline a hop is no hop: a 10 minute escalation of a 5 minute request.
    assert escalate.after(1000.0, 300.0) is None


def test_a_runbook_without_escalation_takes_the_settings_and_stops_on_expiry() -> None:
    runbook = valid_runbook()
    assert runbook.on_expiry == "stop"
    default = Delay(fraction=0.5)
    assert runbook.escalation.remind(default) == default
    assert runbook.escalation.escalate(None) is None


def test_remind_after_zero_turns_the_settings_reminder_off(tmp_path: Path) -> None:
    runbook = load_runbook(write(tmp_path, with_escalation("escalation:\n  remind_after: 0\n")))
    assert runbook.escalation.remind(Delay(fraction=0.5)) is None


@pytest.mark.parametrize(
    ("block", "line", "field", "message"),
    [
        (
            ESCALATION.replace("remind_after", "remind_aftr"),
            5,
            "escalation.remind_aftr",
            "unknown field 'remind_aftr' (did you mean 'remind_after'?)",
        ),
        (
            ESCALATION.replace("50%", "150%"),
            5,
            "escalation.remind_after",
            "'150%': a share of the deadline is between 0% and 100%",
        ),
        (
            ESCALATION.replace("10m", "ten minutes"),
            6,
            "escalation.escalate_after",
            "'ten minutes': a delay is a share of the deadline like 50%, or a duration",
        ),
        (
            ESCALATION.replace("  escalate_to: [group:leads]\n", ""),
            6,
            "escalation.escalate_after",
            "escalate_after needs escalate_to (whom)",
        ),
        (
            ESCALATION.replace("  escalate_after: 10m\n", ""),
            6,
            "escalation.escalate_to",
            "escalate_to needs escalate_after (when)",
        ),
        (
            ESCALATION.replace("[group:leads]", "[leads]"),
            7,
            "escalation.escalate_to[0]",
            "must be an identity like cli:alice or telegram:12345, or a group",
        ),
        (
            ESCALATION.replace("on_expiry: rollback", "on_expiry: approve"),
            8,
            "on_expiry",
            "'stop' or 'rollback'",
        ),
    ],
)
def test_a_bad_escalation_is_one_error_with_file_line_and_field(
    tmp_path: Path, block: str, line: int, field: str, message: str
) -> None:
    error = load_error(tmp_path, with_escalation(block))
    assert (error.line, error.field) == (line, field), error
    assert message in error.message
    assert str(error).startswith(f"{tmp_path / 'rb.yaml'}:{line}: {field}: ")


async def test_the_services_catalog_follows_the_runbooks_directory(service: RunService) -> None:
    """A runbook added, edited in place or removed is in the next start's catalog; an
    unchanged directory is not parsed again."""
    directory = service.settings.runbooks_dir
    first = service.catalog()
    assert service.catalog() is first  # nothing changed: the same catalog
    added = directory / "added.yaml"
    added.write_text("id: added\ntitle: Added\nsteps:\n  - id: a\n    title: A\n    note: a\n")
    assert service.catalog().get("added").title == "Added"
    text = added.read_text().replace("title: Added", "title: Edits")  # the same size
    added.write_text(text)
    os.utime(added, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    assert service.catalog().get("added").title == "Edits"
    added.unlink()
    assert "added" not in service.catalog().runbooks
    # A copy that keeps size and mtime (cp -p, rsync -t, tar x) is a change all the same.
    before = (directory / "crash-drill.yaml").stat()
    replacement = directory.parent / "crash-drill.yaml"
    text = (directory / "crash-drill.yaml").read_text()
    replacement.write_text(text.replace("title: Crash drill", "title: Crash dri1l"))
    os.utime(replacement, ns=(before.st_atime_ns, before.st_mtime_ns))
    replacement.replace(directory / "crash-drill.yaml")
    assert service.catalog().get("crash-drill").title == "Crash dri1l"


def test_a_runbook_directory_created_after_a_look_is_read(tmp_path: Path) -> None:
    """Missing, then there and empty: not the same, so not the same catalog."""
    directory = tmp_path / "runbooks"
    assert "runbook directory not found" in str(current_catalog(directory).errors[0])
    directory.mkdir()
    assert current_catalog(directory).errors == []


async def test_a_catalog_is_parsed_once_per_process_while_its_files_stay_the_same(
    service: RunService,
) -> None:
    """The CLI reads the catalog before it opens the store and the service again after:
    both, and a second service on the same workspace, get the one parsed catalog."""
    directory = service.settings.runbooks_dir
    first = current_catalog(directory)
    for other in range(10):  # other workspaces read meanwhile (a test process has many)
        current_catalog(directory.parent / f"elsewhere-{other}")
        assert current_catalog(directory) is first
    assert service.catalog() is first
