"""Runbooks: the YAML format, its loader with file/line/field errors, and command templating.

A runbook is an ordered list of steps, each with exactly one action (`run`, `check` or `note`).
Commands are Jinja2 templates rendered in a sandbox; every `{{ expr }}` output is shell-quoted
so that after `shlex.split` a parameter value is always exactly one argv element. Commands are
executed without a shell elsewhere (see the shell tool); this module only builds the argv.
Every render is bounded in time and size (see `agent.runbook.templates`); it is synchronous, so
callers on the event loop render in a worker thread.

Loading never half-loads: a file either yields a fully validated `Runbook` or one `RunbookError`
naming the file, the 1-based line and the field (`steps[2].check.expect_status`).
`validate_runbooks` (what `loom-ops runbooks validate` runs) reports every error of every file
in one pass instead, and checks each command against the shell allowlist.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import re
import shlex
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

import jinja2
import jinja2.meta
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from agent.errors import ParamError, RenderError, RenderLimitError, RunbookError
from agent.records import IDENTITY_PATTERN, Delay, record
from agent.runbook.templates import DEFAULT_LIMITS, BoundedSandbox, RenderLimits

__all__ = [
    "MAX_FILE_BYTES",
    "AlertRoute",
    "HealthCheck",
    "McpAction",
    "ParamError",
    "RenderError",
    "RenderLimitError",
    "RenderLimits",
    "RollbackAction",
    "Runbook",
    "RunbookCatalog",
    "RunbookError",
    "RunbookParam",
    "RunbookReport",
    "Step",
    "load_catalog",
    "load_runbook",
    "render_command",
    "render_text",
    "render_url",
    "runbook_json_schema",
    "validate_runbooks",
]

MAX_FILE_BYTES = 256 * 1024
# Aliases let a small file expand into a huge tree ("billion laughs"); validation walks the
# expanded tree, so the expanded size is capped, not just the file size.
MAX_EXPANDED_NODES = 20_000
# A single parameter value ends up as one argv element; keep it to a sane size.
MAX_PARAM_CHARS = 4096

SLUG_PATTERN = r"[a-z0-9][a-z0-9_-]{0,62}"
PARAM_NAME_PATTERN = r"[a-z_][a-z0-9_]{0,31}"
ENV_NAME_PATTERN = r"[A-Za-z_][A-Za-z0-9_]{0,127}"
APPROVER_PATTERN = IDENTITY_PATTERN
# `group:<name>` in approvers or starters names every person in a group (agent.people).
GROUP_ENTRY_PATTERN = rf"group:{SLUG_PATTERN}"
# `runbook=<id>` in a request names the runbook (agent.runbook.request): no param may be called so.
RESERVED_PARAM_NAMES = frozenset({"runbook"})

_TRUE_WORDS = frozenset({"true", "yes", "1"})
_FALSE_WORDS = frozenset({"false", "no", "0"})
_INTEGER_RE = re.compile(r"[+-]?[0-9]{1,18}")


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class _FieldError(ValueError):
    """Raised inside validators to point below the validated object (e.g. `steps[3].id`).

    Pydantic keeps the original exception in the error's ctx, so the loader can append `loc`
    to pydantic's own location and report the precise line instead of the enclosing object's.
    """

    def __init__(
        self,
        loc: tuple[str | int, ...],
        message: str,
        more: Sequence[tuple[tuple[str | int, ...], str]] = (),
    ) -> None:
        super().__init__(message)
        self.loc = loc
        # Further problems the same validator found: a validator raises once, yet a person
        # fixing a file wants every problem of it at once.
        self.more = tuple(more)

    @classmethod
    def of(cls, problems: Sequence[tuple[tuple[str | int, ...], str]]) -> _FieldError:
        """One error carrying every (location, message) found; problems must not be empty."""
        (loc, message), *more = problems
        return cls(loc, message, more)


# --------------------------------------------------------------------------------------------
# Templating
# --------------------------------------------------------------------------------------------


def _text_value(value: object) -> str:
    """Render a value the way commands and texts expect (booleans as true/false)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _shell_finalize(value: object) -> str:
    """Quote every `{{ expr }}` output so it can never split into several argv elements."""
    return shlex.quote(_text_value(value))


# Two environments: commands quote every expression output, texts (URLs, notes) do not.
_COMMAND_ENV = BoundedSandbox(
    undefined=jinja2.StrictUndefined, autoescape=False, finalize=_shell_finalize
)
_TEXT_ENV = BoundedSandbox(undefined=jinja2.StrictUndefined, autoescape=False, finalize=_text_value)


def _render(
    template: str, params: Mapping[str, object], command: bool, limits: RenderLimits
) -> str:
    """Render in the bounded sandbox; every failure becomes a RenderError."""
    if "{" not in template:
        return template  # nothing to render; compiling costs ~0.5 ms per distinct template
    env = _COMMAND_ENV if command else _TEXT_ENV
    return env.render_bounded(template, params, limits)


# What makes shlex differ from a plain split on its whitespace: quotes, backslashes, and other
# whitespace (which shlex keeps inside a word and str.split would not).
_NEEDS_SHLEX = re.compile(r"['\"\\]|[^\S \t\r\n]")
_SHLEX_SPACE = re.compile(r"[ \t\r\n]+")


def split_argv(command: str) -> list[str]:
    """`shlex.split(command)`, without shlex's per-character loop for the common command
    that quotes nothing (the same words either way)."""
    if _NEEDS_SHLEX.search(command):
        return shlex.split(command)
    return [word for word in _SHLEX_SPACE.split(command) if word]


def render_command(
    template: str, params: Mapping[str, object], limits: RenderLimits = DEFAULT_LIMITS
) -> list[str]:
    """Render a command template to argv; each `{{ expr }}` output stays inside one element."""
    rendered = _render(template, params, command=True, limits=limits)
    try:
        argv = split_argv(rendered)
    except ValueError as exc:
        raise RenderError(f"rendered command is not valid shell syntax: {exc}") from exc
    if not argv:
        raise RenderError("command template rendered to an empty command")
    if any("\x00" in arg for arg in argv):
        # execve cannot carry NUL bytes; fail here with a clear message, not in the executor.
        raise RenderError("rendered command contains a NUL byte")
    return argv


def render_text(
    template: str, params: Mapping[str, object], limits: RenderLimits = DEFAULT_LIMITS
) -> str:
    """Render a plain text template (notes, URLs) in the sandbox, without shell quoting."""
    return _render(template, params, command=False, limits=limits)


def render_url(
    template: str, params: Mapping[str, object], limits: RenderLimits = DEFAULT_LIMITS
) -> str:
    """Render a health-check URL and verify it is an absolute http(s) URL with a host."""
    url = render_text(template, params, limits)
    if any(ch.isspace() or ord(ch) < 0x20 for ch in url):
        raise RenderError(f"rendered URL contains whitespace or control characters: {url!r}")
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise RenderError(f"rendered URL is invalid: {exc}") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RenderError(f"rendered URL must be http:// or https:// with a host: {url!r}")
    return url


# Tags that load another template: a runbook's templates have none to load (no loader).
_LOADING_TAGS = {
    jinja2.nodes.Extends: "extends",
    jinja2.nodes.Include: "include",
    jinja2.nodes.Import: "import",
    jinja2.nodes.FromImport: "from … import",
}


# Filters that name another filter or test by a string: the kind, and which argument.
_NAMING_FILTERS = {
    "map": ("filter", 0),
    "select": ("test", 0),
    "reject": ("test", 0),
    "selectattr": ("test", 1),
    "rejectattr": ("test", 1),
}


def _named_by_string(node: jinja2.nodes.Filter) -> tuple[str, str] | None:
    """The filter or test a `map`/`select`-like filter names by a literal string (`kind`,
    `name`), or None (another filter, a name computed at run time, `map(attribute=…)`)."""
    spec = _NAMING_FILTERS.get(node.name)
    if spec is None or len(node.args) <= spec[1]:
        return None
    named = node.args[spec[1]]
    if isinstance(named, jinja2.nodes.Const) and isinstance(named.value, str):
        return spec[0], named.value
    return None


def _compiled(env: jinja2.Environment, source: str) -> tuple[set[str], str | None]:
    """The names a template reads that it does not set itself, and why it cannot compile
    (its syntax, a filter or test the sandbox does not have, a tag that loads another
    template), or None.

    Jinja checks a filter's name when it compiles the template, but one inside an `{% if %}`,
    every test, and one named by a string (`map('upper')`) only when a render reaches them:
    all are checked here, so a runbook with a misspelt filter is refused when it loads
    rather than failing its step at run time."""
    try:
        ast = env.parse(source)
        for node in ast.find_all((jinja2.nodes.Filter, jinja2.nodes.Test, *_LOADING_TAGS)):
            where = f"template error (template line {node.lineno})"
            if type(node) in _LOADING_TAGS:
                tag = _LOADING_TAGS[type(node)]
                return set(), f"{where}: {{% {tag} %}} has no other template to load here"
            filter_ = isinstance(node, jinja2.nodes.Filter)
            if node.name not in (env.filters if filter_ else env.tests):
                return set(), f"{where}: no {'filter' if filter_ else 'test'} named {node.name!r}"
            named = _named_by_string(node) if filter_ else None
            if named is not None and named[1] not in (
                env.filters if named[0] == "filter" else env.tests
            ):
                return set(), f"{where}: no {named[0]} named {named[1]!r} (in {node.name})"
        return jinja2.meta.find_undeclared_variables(ast), None  # compiles it
    except jinja2.TemplateSyntaxError as exc:  # the compiler's TemplateAssertionError too
        return set(), f"template syntax error (template line {exc.lineno}): {exc.message}"
    except ValueError as exc:  # the lexer's int() of a literal past Python's 4,300 digits
        return set(), f"template error: {str(exc).split(';')[0]}"


def _template_problem(source: str, declared: set[str], command: bool) -> str | None:
    """Return why a template is unusable (syntax, unknown filters and tests, undeclared
    names, quoting), or None."""
    if "{" not in source:
        return None  # plain text: nothing for Jinja to parse or to quote
    env = _COMMAND_ENV if command else _TEXT_ENV
    names, problem = _compiled(env, source)
    if problem:
        return problem
    unknown = names - declared - set(env.globals)
    if unknown:
        names = ", ".join(sorted(unknown))
        return f"template references undeclared param(s): {names}"
    if command:
        return _quoting_problem(source)
    return None


def _quoting_problem(source: str) -> str | None:
    """Refuse `'{{ x }}'`, `"{{ x }}"` and `\\{{ x }}`: the output is already quoted, and
    quoting it again would let the value split into several argv elements."""
    quote: str | None = None
    escaped = False
    for _, token, value in _COMMAND_ENV.lex(source):
        if token == "variable_begin" and (quote is not None or escaped):
            return (
                "a {{ expression }} must not be inside quotes or after a backslash: "
                "its output is shell-quoted already"
            )
        if token != "data":
            continue
        for ch in value:
            if escaped:
                escaped = False
            elif quote == "'":
                quote = None if ch == "'" else quote
            elif ch == "\\":
                escaped = True
            elif quote == '"':
                quote = None if ch == '"' else quote
            elif ch in "'\"":
                quote = ch
    return None


def _template_problems(
    fields: Iterator[tuple[tuple[str | int, ...], str, bool]], declared: set[str]
) -> list[tuple[tuple[str | int, ...], str]]:
    """Every unusable template among `fields`, as (location, why)."""
    found = []
    for loc, source, command in fields:
        problem = _template_problem(source, declared, command)
        if problem:
            found.append((loc, problem))
    return found


def _template_fields(document: object) -> Iterator[tuple[tuple[str | int, ...], str, bool]]:
    """Every template of a runbook document (plain data): (location, source, is_command).

    Works on a document that failed validation too (whatever is not where a template belongs
    is skipped), so `validate_runbooks` can report template problems in the same pass as the
    field errors that stop the model's own check from running."""
    steps = document.get("steps") if isinstance(document, dict) else None
    for index, step in enumerate(steps if isinstance(steps, list) else []):
        if not isinstance(step, dict):
            continue
        loc: tuple[str | int, ...] = ("steps", index)
        if isinstance(step.get("run"), str):
            yield (*loc, "run"), step["run"], True
        check = step.get("check") if isinstance(step.get("check"), dict) else {}
        if isinstance(check.get("url"), str):
            yield (*loc, "check", "url"), check["url"], False
        for where, action in ((("mcp",), step.get("mcp")), (("check", "mcp"), check.get("mcp"))):
            arguments = action.get("arguments") if isinstance(action, dict) else None
            for name, value in (arguments if isinstance(arguments, dict) else {}).items():
                if isinstance(value, str):
                    yield (*loc, *where, "arguments", name), value, False
        if isinstance(step.get("note"), str):
            yield (*loc, "note"), step["note"], False
        rollback = step.get("rollback") if isinstance(step.get("rollback"), dict) else {}
        if isinstance(rollback.get("run"), str):
            yield (*loc, "rollback", "run"), rollback["run"], True
        if isinstance(rollback.get("note"), str):
            yield (*loc, "rollback", "note"), rollback["note"], False


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


class RunbookParam(BaseModel):
    """A typed runbook parameter; it is required exactly when it has no default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["string", "integer", "boolean"] = "string"
    description: str = ""
    default: str | int | bool | None = None
    pattern: str | None = None
    choices: list[str] | None = None
    min: int | None = Field(default=None, strict=True)  # integers only: inclusive bounds
    max: int | None = Field(default=None, strict=True)

    @field_validator("default", mode="before")
    @classmethod
    def _default_is_scalar(cls, value: object) -> object:
        # Without this, a list default yields three union errors ("valid string/int/bool").
        if value is not None and not isinstance(value, (str, int, bool)):
            raise ValueError("default must be a string, an integer or a boolean")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> RunbookParam:
        if self.pattern is not None and self.choices is not None:
            raise _FieldError(("choices",), "use either pattern or choices, not both")
        if self.type != "string" and (self.pattern is not None or self.choices is not None):
            key = "pattern" if self.pattern is not None else "choices"
            raise _FieldError((key,), f"{key} applies only to string params, not {self.type}")
        if self.type != "integer" and (self.min is not None or self.max is not None):
            key = "min" if self.min is not None else "max"
            raise _FieldError((key,), f"{key} applies only to integer params, not {self.type}")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise _FieldError(("max",), f"max {self.max} is below min {self.min}")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise _FieldError(("pattern",), f"invalid regular expression: {exc}") from None
        if self.choices is not None:
            if not self.choices:
                raise _FieldError(("choices",), "choices must not be empty")
            if len(set(self.choices)) != len(self.choices):
                raise _FieldError(("choices",), "choices must be unique")
        if self.default is not None:
            problem = self._default_problem(self.default)
            if problem:
                raise _FieldError(("default",), problem)
        return self

    @property
    def required(self) -> bool:
        """True when the user must give a value (there is no default)."""
        return self.default is None

    def _sample(self) -> str | int | bool | None:
        """A valid value to try templates with: the default, else one that is easy to derive
        (the first choice, the minimum, false, "x"), else None (a patterned string)."""
        if self.default is not None:
            return self.default
        if self.choices:
            return self.choices[0]
        if self.type == "integer":
            if self.min is not None:
                return self.min
            return 0 if self.max is None or self.max >= 0 else self.max
        if self.type == "boolean":
            return False
        return "x" if self.pattern is None else None

    def _default_problem(self, value: str | int | bool) -> str | None:
        """Why a default does not fit the declared type/pattern/choices, or None."""
        if self.type == "string" and not isinstance(value, str):
            return f"default {value!r} is not a string (quote it in YAML)"
        if self.type == "integer" and (isinstance(value, bool) or not isinstance(value, int)):
            return f"default {value!r} is not an integer"
        if self.type == "boolean" and not isinstance(value, bool):
            return f"default {value!r} is not a boolean (true or false)"
        if isinstance(value, str):
            return self._string_problem(value)
        if self.type == "integer":
            return self._range_problem(value)
        return None

    def _range_problem(self, value: int) -> str | None:
        """Why an integer is out of the declared bounds, or None."""
        if self.min is not None and value < self.min:
            return f"{value} is below the minimum {self.min}"
        if self.max is not None and value > self.max:
            return f"{value} is above the maximum {self.max}"
        return None

    def _string_problem(self, value: str) -> str | None:
        """Why a string value is refused (NUL, length, pattern, choices), or None."""
        if "\x00" in value:
            return "value contains a NUL byte"
        if len(value) > MAX_PARAM_CHARS:
            return f"value is longer than {MAX_PARAM_CHARS} characters"
        if self.pattern is not None and re.fullmatch(self.pattern, value) is None:
            return f"{value!r} does not match pattern {self.pattern}"
        if self.choices is not None and value not in self.choices:
            return f"{value!r} is not one of: {', '.join(self.choices)}"
        return None

    def _convert(self, name: str, raw: object) -> str | int | bool:
        """Convert one user-given value (text from chat/CLI, or a JSON scalar) to the type."""
        if self.type == "integer":
            if isinstance(raw, int) and not isinstance(raw, bool):
                number = raw
            elif isinstance(raw, str) and _INTEGER_RE.fullmatch(raw.strip()):
                number = int(raw.strip())
            else:
                raise ParamError(name, f"param {name!r}: {_short(raw)} is not an integer")
            problem = self._range_problem(number)
            if problem:
                raise ParamError(name, f"param {name!r}: {problem}")
            return number
        if self.type == "boolean":
            if isinstance(raw, bool):
                return raw
            word = raw.strip().lower() if isinstance(raw, str) else None
            if word in _TRUE_WORDS:
                return True
            if word in _FALSE_WORDS:
                return False
            raise ParamError(
                name, f"param {name!r}: {_short(raw)} is not a boolean (true/false, yes/no, 1/0)"
            )
        if not isinstance(raw, str):
            raise ParamError(name, f"param {name!r}: {_short(raw)} is not text")
        problem = self._string_problem(raw)
        if problem:
            raise ParamError(name, f"param {name!r}: {problem}")
        return raw


def _short(value: object, limit: int = 80) -> str:
    """repr() capped, so one bad value cannot flood a chat message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class McpAction(BaseModel):
    """A call of a tool on a configured MCP server: the mapped tool name and its arguments.

    String argument values are templates rendered from the params (no shell is involved).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    tool: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    arguments: dict[str, str | int | bool | float] = Field(default_factory=dict)


class HealthCheck(BaseModel):
    """A health check: an HTTP GET (URL template, expected status, latency limit) or an MCP
    tool whose call must succeed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str | None = None
    mcp: McpAction | None = None
    # strict: YAML already types numbers and booleans; "5" or `true` here is a mistake.
    expect_status: int = Field(default=200, ge=100, le=599, strict=True)
    max_latency_ms: int = Field(default=2000, gt=0, strict=True)

    @field_validator("url")
    @classmethod
    def _http_scheme(cls, value: str | None) -> str | None:
        # The scheme must be literal so a parameter can never turn a health check into a
        # file:// or gopher:// fetch; render_url re-checks the rendered result.
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("url must start with http:// or https://")
        return value

    @model_validator(mode="after")
    def _url_or_mcp(self) -> HealthCheck:
        if (self.url is None) == (self.mcp is None):
            raise ValueError("a check has exactly one of: url, mcp")
        return self


class RollbackAction(BaseModel):
    """What undoes a step: a command template (`run`) or an instruction for a human (`note`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run: str | None = None
    note: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> RollbackAction:
        if (self.run is None) == (self.note is None):
            raise ValueError("a rollback has exactly one of: run, note")
        return self


class ApprovalRule(BaseModel):
    """Who must approve a risky step: `required` distinct people, from `from` (groups or
    identities; empty: the runbook's approvers), none of them the requester with four eyes."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, serialize_by_alias=True
    )

    required: int = Field(default=1, ge=1, le=20, strict=True)
    from_: list[str] = Field(default_factory=list, alias="from")
    four_eyes: bool = Field(default=False, strict=True)

    @field_validator("from_")
    @classmethod
    def _deciders(cls, value: list[str]) -> list[str]:
        return _people_entries(value, "approver")


class Escalation(BaseModel):
    """When an unanswered approval request reminds its deciders, and whom it adds as
    deciders later (`escalate_to` at `escalate_after`); a delay left out is the settings'
    (LOOM_OPS_REMIND_AFTER, LOOM_OPS_ESCALATE_AFTER), `0` is never."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # A share of the deadline (`50%`) or a duration (`10m`, `90s`, a number of seconds).
    remind_after: str | float | None = None
    escalate_after: str | float | None = None
    escalate_to: list[str] = Field(default_factory=list)

    @field_validator("remind_after", "escalate_after", mode="before")
    @classmethod
    def _delay(cls, value: object) -> object:
        if value is not None:
            Delay.parse(value)
        return value

    @field_validator("escalate_to")
    @classmethod
    def _escalate_to(cls, value: list[str]) -> list[str]:
        return _people_entries(value, "escalate_to entry")

    @model_validator(mode="after")
    def _escalation_complete(self) -> Escalation:
        later = self.escalate_after is not None and Delay.parse(self.escalate_after) is not None
        if later and not self.escalate_to:
            raise _FieldError(("escalate_after",), "escalate_after needs escalate_to (whom)")
        if self.escalate_to and not later:
            raise _FieldError(("escalate_to",), "escalate_to needs escalate_after (when)")
        return self

    def remind(self, default: Delay | None) -> Delay | None:
        """When to remind: this block's delay, else `default` (the settings')."""
        return default if self.remind_after is None else Delay.parse(self.remind_after)

    def escalate(self, default: Delay | None) -> Delay | None:
        """When to escalate: this block's delay, else `default` (the settings')."""
        return default if self.escalate_after is None else Delay.parse(self.escalate_after)


class Step(BaseModel):
    """One runbook step with exactly one action: run (command), check (HTTP) or note."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=f"^{SLUG_PATTERN}$")
    title: str = Field(min_length=1)
    run: str | None = None
    check: HealthCheck | None = None
    mcp: McpAction | None = None
    note: str | None = None
    # `required` (one approver's decision), `none`, or a rule: {required: 2, from: [...]}.
    approval: Literal["required", "none"] | ApprovalRule = "none"
    timeout: float = Field(default=60, gt=0, le=3600, allow_inf_nan=False, strict=True)
    retries: int = Field(default=0, ge=0, le=5, strict=True)
    idempotent: bool = Field(default=False, strict=True)
    # A policy may leave an optional step out; the run can still succeed without it.
    optional: bool = Field(default=False, strict=True)
    rollback: RollbackAction | None = None

    @field_validator("approval", mode="before")
    @classmethod
    def _approval_rule(cls, value: object) -> object:
        # Validated here so a bad rule is reported at its own field (`approval.required`),
        # not as "not 'required' or 'none'" from the union's other member.
        if not isinstance(value, dict):
            if value in ("required", "none"):
                return value
            raise ValueError(
                "approval must be required, none, or a rule like "
                "{required: 2, from: [group:oncall], four_eyes: true}"
            )
        try:
            return ApprovalRule.model_validate(value)
        except ValidationError as exc:
            raise _FieldError.of([_rule_problem(error) for error in exc.errors()]) from None

    @model_validator(mode="after")
    def _exactly_one_action(self) -> Step:
        present = [
            name for name in ("run", "check", "mcp", "note") if getattr(self, name) is not None
        ]
        if not present:
            raise ValueError(
                "a step needs exactly one action: run, check, mcp or note (found none)"
            )
        if len(present) > 1:
            # Point at the second action: that is the line to delete or move to a new step.
            found = " and ".join(present)
            raise _FieldError(
                (present[1],),
                f"a step has exactly one action: run, check, mcp or note (found {found})",
            )
        if self.run is not None and not self.run.strip():
            raise _FieldError(("run",), "run must not be empty")
        return self

    @property
    def action_kind(self) -> Literal["run", "check", "mcp", "note"]:
        """Which action this step performs."""
        if self.run is not None:
            return "run"
        if self.check is not None:
            return "check"
        if self.mcp is not None:
            return "mcp"
        return "note"

    @property
    def needs_approval(self) -> bool:
        """True when a human must approve before the step runs."""
        return self.approval != "none"

    @property
    def approval_rule(self) -> ApprovalRule | None:
        """The step's approval rule when it names one (`approval: {required: 2, ...}`)."""
        return self.approval if isinstance(self.approval, ApprovalRule) else None


def _rule_problem(error: Any) -> tuple[tuple[str | int, ...], str]:
    """An approval rule's validation error as (location below `approval`, message)."""
    loc = tuple("from" if part == "from_" else part for part in error["loc"])
    original = (error.get("ctx") or {}).get("error")
    if isinstance(original, _FieldError):
        return (*loc, *original.loc), str(original)
    if error["type"] == "missing":
        return loc, "required field is missing"
    if error["type"] == "extra_forbidden":
        fields = ["required", "from", "four_eyes"]
        close = difflib.get_close_matches(str(loc[-1]), fields, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return loc, f"unknown field {loc[-1]!r} in an approval rule{hint}"
    return loc, error["msg"]


def _people_entries(value: list[str], who: str) -> list[str]:
    """Check approvers, starters or an approval rule's `from`: identities or groups."""
    for index, entry in enumerate(value):
        if entry.startswith("group:"):
            if not re.fullmatch(GROUP_ENTRY_PATTERN, entry):
                raise _FieldError(
                    (index,), f"{who} {entry!r}: a group name must match {SLUG_PATTERN}"
                )
        elif not re.fullmatch(APPROVER_PATTERN, entry):
            raise _FieldError(
                (index,),
                f"{who} {entry!r} must be an identity like cli:alice or telegram:12345, "
                "or a group like group:oncall",
            )
    return value


# A Prometheus label name: what an alert route's `match` keys must be.
LABEL_NAME_PATTERN = r"[a-zA-Z_][a-zA-Z0-9_]{0,127}"
# What an alert route's param templates may read: the alert group's labels and annotations.
ALERT_TEMPLATE_NAMES = frozenset({"labels", "annotations"})


class AlertRoute(BaseModel):
    """One kind of alert a runbook answers: every `match` label equal, `params` rendered from
    the alert's labels and annotations, and whether its run starts on its own (`auto`) or the
    incident chat decides (`ask`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    match: dict[str, str] = Field(min_length=1)
    params: dict[str, str] = Field(default_factory=dict)
    start: Literal["auto", "ask"] = "ask"

    @field_validator("match")
    @classmethod
    def _label_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not re.fullmatch(LABEL_NAME_PATTERN, name):
                raise _FieldError((name,), f"{name!r} is not a label name ({LABEL_NAME_PATTERN})")
        return value

    def matches(self, labels: Mapping[str, str]) -> bool:
        """True when every label the route names has exactly its value in `labels`."""
        return all(labels.get(name) == value for name, value in self.match.items())

    def render_params(
        self, labels: Mapping[str, str], annotations: Mapping[str, str]
    ) -> dict[str, str]:
        """The params this route gives its runbook for one alert (bounded sandbox renders);
        RenderError names the param whose template failed (e.g. a label the alert lacks)."""
        values = {"labels": dict(labels), "annotations": dict(annotations)}
        rendered = {}
        for name, template in self.params.items():
            try:
                rendered[name] = render_text(template, values)
            except RenderError as exc:
                raise RenderError(f"alert param {name!r}: {exc}") from None
        return rendered


def _alert_template_problem(source: str) -> str | None:
    """Why an alert route's param template is unusable (syntax, unknown names), or None."""
    if "{" not in source:
        return None
    names, problem = _compiled(_TEXT_ENV, source)
    if problem:
        return problem
    unknown = names - ALERT_TEMPLATE_NAMES - set(_TEXT_ENV.globals)
    if unknown:
        names = ", ".join(sorted(unknown))
        return f"template references {names}: alert params may use labels and annotations"
    return None


class Runbook(BaseModel):
    """A validated runbook: identity, triggers, typed params, approvers and ordered steps."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=f"^{SLUG_PATTERN}$")
    title: str = Field(min_length=1)
    description: str = ""
    triggers: list[str] = Field(default_factory=list)
    params: dict[str, RunbookParam] = Field(default_factory=dict)
    approvers: list[str] = Field(default_factory=list)
    # Who may start it (identities or groups); empty: whoever may start runs at all.
    starters: list[str] = Field(default_factory=list)
    four_eyes: bool = Field(default=False, strict=True)
    approval_timeout: float | None = Field(default=None, gt=0, allow_inf_nan=False, strict=True)
    on_reject: Literal["stop", "rollback"] = "stop"
    # Unanswered requests: reminders and escalation (settings' defaults where it says
    # nothing), and what expiry does: stop, or roll back the completed steps. Never consent.
    escalation: Escalation = Field(default_factory=Escalation)
    on_expiry: Literal["stop", "rollback"] = "stop"
    env: list[str] = Field(default_factory=list)
    steps: list[Step] = Field(min_length=1)
    # The alerts it answers (`POST /alerts/...`), first match first.
    alerts: list[AlertRoute] = Field(default_factory=list)

    @field_validator("triggers")
    @classmethod
    def _triggers_not_blank(cls, value: list[str]) -> list[str]:
        for index, trigger in enumerate(value):
            if not trigger.strip():
                raise _FieldError((index,), "a trigger must not be blank")
        return value

    @field_validator("params")
    @classmethod
    def _param_names(cls, value: dict[str, RunbookParam]) -> dict[str, RunbookParam]:
        for name in value:
            if not re.fullmatch(PARAM_NAME_PATTERN, name):
                raise _FieldError((name,), f"param name {name!r} must match {PARAM_NAME_PATTERN}")
            if name in RESERVED_PARAM_NAMES:
                raise _FieldError(
                    (name,), f"param name {name!r} is reserved: runbook=<id> names the runbook"
                )
        return value

    @field_validator("approvers", "starters")
    @classmethod
    def _people_entries(cls, value: list[str], info: ValidationInfo) -> list[str]:
        return _people_entries(value, "approver" if info.field_name == "approvers" else "starter")

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: list[str]) -> list[str]:
        for index, name in enumerate(value):
            if not re.fullmatch(ENV_NAME_PATTERN, name):
                raise _FieldError((index,), f"{name!r} is not an environment variable name")
        return value

    @field_validator("steps")
    @classmethod
    def _unique_step_ids(cls, value: list[Step]) -> list[Step]:
        seen: dict[str, int] = {}
        problems: list[tuple[tuple[str | int, ...], str]] = []
        for index, step in enumerate(value):
            if step.id in seen:
                problems.append(
                    ((index, "id"), f"duplicate step id {step.id!r} (also steps[{seen[step.id]}])")
                )
                continue
            seen[step.id] = index
        if problems:
            raise _FieldError.of(problems)
        return value

    @model_validator(mode="after")
    def _templates(self, info: ValidationInfo) -> Runbook:
        # Checked here, not per step: only the runbook knows which params are declared.
        if info.context and info.context.get("snapshot"):
            return self  # a run's pinned copy was checked in full when it was pinned
        problems = _template_problems(self._template_fields(), set(self.params))
        if problems:
            raise _FieldError.of(problems)
        return self

    @model_validator(mode="after")
    def _alert_params(self) -> Runbook:
        # Here, not in AlertRoute: only the runbook knows which params it declares.
        problems: list[tuple[tuple[str | int, ...], str]] = []
        for index, route in enumerate(self.alerts):
            for name, template in route.params.items():
                loc: tuple[str | int, ...] = ("alerts", index, "params", name)
                if name not in self.params:
                    known = ", ".join(sorted(self.params)) or "none"
                    problems.append((loc, f"{name!r} is not a param of {self.id} ({known})"))
                    continue
                problem = _alert_template_problem(template)
                if problem:
                    problems.append((loc, problem))
        if problems:
            raise _FieldError.of(problems)
        return self

    def alert_route(self, labels: Mapping[str, str]) -> AlertRoute | None:
        """The first of its alert routes that matches `labels`, or None."""
        return next((route for route in self.alerts if route.matches(labels)), None)

    def _template_fields(self) -> Iterator[tuple[tuple[str | int, ...], str, bool]]:
        """Every template in the runbook: (location, source, is_command)."""
        return _template_fields(self.model_dump(exclude_none=True))

    @classmethod
    def from_snapshot(cls, data: Mapping[str, Any]) -> Runbook:
        """Rebuild a run's pinned runbook; skips the template parsing its first load did."""
        return cls.model_validate(data, context={"snapshot": True})

    def step(self, step_id: str) -> Step:
        """The step with this id; KeyError if there is none."""
        return self.steps[self.step_index(step_id)]

    @functools.cached_property
    def _step_positions(self) -> dict[str, int]:
        # Looked up on every turn of a run: a dict keeps long runbooks O(1) per step.
        return {step.id: i for i, step in enumerate(self.steps)}

    def step_index(self, step_id: str) -> int:
        """The position of the step with this id; KeyError if there is none."""
        try:
            return self._step_positions[step_id]
        except KeyError:
            raise KeyError(f"runbook {self.id!r} has no step {step_id!r}") from None

    def resolve_params(self, given: Mapping[str, str]) -> dict[str, str | int | bool]:
        """Check and convert user-given values, fill defaults; ParamError names the param."""
        for name in given:
            if name not in self.params:
                known = ", ".join(sorted(self.params)) or "none"
                raise ParamError(
                    str(name), f"unknown param {_short(name)} for {self.id} (known: {known})"
                )
        resolved: dict[str, str | int | bool] = {}
        for name, param in self.params.items():
            if name in given:
                resolved[name] = param._convert(name, given[name])
            elif param.default is not None:
                resolved[name] = param.default
            else:
                hint = f" ({param.description})" if param.description else ""
                raise ParamError(name, f"param {name!r} is required{hint}")
        return resolved


def runbook_json_schema() -> dict[str, Any]:
    """The JSON Schema of a runbook file, for editors and linters."""
    schema = Runbook.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _yaml_error(path: Path, text: str, exc: yaml.YAMLError) -> RunbookError:
    """Turn a PyYAML error into a RunbookError with the line of its problem mark."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    line = mark.line + 1 if mark is not None else None
    if isinstance(exc, yaml.reader.ReaderError):
        line = text.count("\n", 0, exc.position) + 1
        character = f"#x{exc.character:04x}" if isinstance(exc.character, int) else "?"
        return RunbookError(path, line, "", f"character {character} is not allowed in YAML")
    problem = getattr(exc, "problem", None)
    context = getattr(exc, "context", None)
    if problem:
        message = f"{context}, {problem}" if context else str(problem)
    else:
        message = str(exc).splitlines()[0]
    kind = (
        "YAML error" if isinstance(exc, yaml.constructor.ConstructorError) else "YAML syntax error"
    )
    return RunbookError(path, line, "", f"{kind}: {message}")


def _check_tree(path: Path, root: yaml.Node) -> None:
    """Refuse duplicate keys, recursive aliases and oversized alias expansions."""
    sizes: dict[int, int] = {}
    visiting: set[int] = set()

    def walk(node: yaml.Node, loc: tuple[str | int, ...]) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in visiting:
            raise RunbookError(path, node.start_mark.line + 1, _field(loc), "recursive alias")
        visiting.add(key)
        size = 1
        if isinstance(node, yaml.MappingNode):
            first_line: dict[tuple[str, str], int] = {}
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode):
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        size += walk(value_node, loc)
                        continue
                    ident = (key_node.tag, key_node.value)
                    line = key_node.start_mark.line + 1
                    if ident in first_line:
                        raise RunbookError(
                            path,
                            line,
                            _field((*loc, key_node.value)),
                            f"duplicate key {key_node.value!r} (first on line {first_line[ident]})",
                        )
                    first_line[ident] = line
                    size += walk(value_node, (*loc, key_node.value))
                else:
                    size += walk(key_node, loc) + walk(value_node, loc)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                size += walk(item, (*loc, index))
        visiting.discard(key)
        if size > MAX_EXPANDED_NODES:
            raise RunbookError(
                path,
                node.start_mark.line + 1,
                _field(loc),
                f"document expands to more than {MAX_EXPANDED_NODES} nodes (alias bomb?)",
            )
        sizes[key] = size
        return size

    walk(root, ())


def _field(loc: tuple[object, ...]) -> str:
    """Render a location like `steps[2].check.expect_status`."""
    out = ""
    for part in loc:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        elif isinstance(part, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", part):
            out += f".{part}" if out else part
        else:
            out += f"[{str(part)!r}]"
    return out


def _locate(root: yaml.Node, loc: tuple[object, ...]) -> tuple[int, tuple[object, ...]]:
    """Follow loc down the YAML tree: the 1-based line of the deepest node on the path, and
    the part of loc worth showing (trailing union-member tags below a scalar are dropped)."""
    node = root
    line = root.start_mark.line + 1
    for depth, part in enumerate(loc):
        if isinstance(node, yaml.MappingNode):
            # Last match wins, like the dict the constructor built (merge keys come first).
            match = None
            for key_node, value_node in node.value:
                if _key_matches(key_node, part):
                    match = (key_node, value_node)
            if match is None:
                return line, loc  # a missing field: report where its parent is
            # The key's line is what a human looks for, even when the value is a block below.
            line = match[0].start_mark.line + 1
            node = match[1]
        elif isinstance(node, yaml.SequenceNode):
            if not isinstance(part, int) or not 0 <= part < len(node.value):
                return line, loc
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line, loc[:depth]  # below a scalar: only union-member tags remain
    return line, loc


def _key_matches(key_node: yaml.Node, part: object) -> bool:
    """Does this YAML key stand for loc element `part`? (`1`, `null` and `true` are keys too.)"""
    if not isinstance(key_node, yaml.ScalarNode):
        return False
    if key_node.value == str(part):
        return True
    try:
        key = yaml.constructor.SafeConstructor().construct_object(key_node)
    except (yaml.YAMLError, ValueError, TypeError, OverflowError):
        return False
    return key == part or str(key) == str(part)


def _validation_errors(path: Path, root: yaml.Node, exc: ValidationError) -> list[RunbookError]:
    """Every error, by line (ties in pydantic's order), located in the YAML tree; one per
    field and line (a value that fails a union gets one error per member: the first says it)."""
    found: list[tuple[int, int, RunbookError]] = []
    seen: set[tuple[int, str]] = set()
    order = 0
    for error in exc.errors():
        loc: tuple[object, ...] = tuple(error["loc"])
        problems: list[tuple[tuple[object, ...], str]] = [(loc, error["msg"])]
        original = (error.get("ctx") or {}).get("error")
        if isinstance(original, _FieldError):
            problems = [((*loc, *original.loc), str(original))]
            problems += [((*loc, *more_loc), text) for more_loc, text in original.more]
        elif isinstance(original, ValueError):
            # Our own messages are complete sentences; drop pydantic's "Value error, " prefix.
            problems = [(loc, str(original))]
        for where, message in problems:
            if where and where[-1] == "[key]":
                where = where[:-1]
                message = f"invalid key: {message}"
            elif error["type"] == "missing":
                message = "required field is missing"
            elif error["type"] == "extra_forbidden" and where:
                message = _unknown_field_message(where)
            line, shown = _locate(root, where)
            key = (line, _field(shown))
            if key in seen:
                continue
            seen.add(key)
            found.append((line, order, RunbookError(path, line, _field(shown), message)))
            order += 1
    found.sort(key=lambda item: (item[0], item[1]))
    return [item[2] for item in found]


def _unknown_field_message(loc: tuple[object, ...]) -> str:
    """'unknown field' with a did-you-mean from the fields of the model at that place."""
    parent = loc[:-1]
    model: type[BaseModel] = Runbook
    if len(parent) == 2 and parent[0] == "params":
        model = RunbookParam
    elif len(parent) == 2 and parent[0] == "steps":
        model = Step
    elif len(parent) == 3 and parent[0] == "steps" and parent[2] == "check":
        model = HealthCheck
    elif len(parent) == 3 and parent[0] == "steps" and parent[2] == "rollback":
        model = RollbackAction
    elif len(parent) == 2 and parent[0] == "alerts":
        model = AlertRoute
    elif parent == ("escalation",):
        model = Escalation
    name = str(loc[-1])
    close = difflib.get_close_matches(name, list(model.model_fields), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown field {name!r}{hint}"


def _render_problems(
    runbook: Runbook, first_only: bool = False
) -> list[tuple[tuple[str | int, ...], str]]:
    """The templates that fail to render with the params' defaults (or an easily derived
    valid value), as (location, message); only the first when `first_only`.

    A template past the render bounds is reported whatever values it was given. Any other
    failure is reported when the template reads no param without a default: every run that
    leaves those params out fails there. With a derived value the value may be at fault, so
    such a failure waits for a run's own values. Templates that use a param with no usable
    value are skipped. An alert route's param templates are rendered with no labels and no
    annotations, against the bounds alone: an alert brings its own."""
    values = _sample_values(runbook)
    defaulted = {name for name, param in runbook.params.items() if param.default is not None}
    found: list[tuple[tuple[str | int, ...], str]] = []
    for loc, source, command in runbook._template_fields():
        if "{" not in source:
            continue
        used = _used_params(source, command, runbook.params)
        if not used <= values.keys():
            continue
        try:
            _render(source, values, command, DEFAULT_LIMITS)
        except RenderError as exc:
            if not isinstance(exc, RenderLimitError) and not used <= defaulted:
                continue
            step = runbook.steps[int(loc[1])]
            given = " ".join(f"{name}={_text_value(values[name])}" for name in sorted(used))
            found.append(
                (loc, f"step {step.id!r}: {exc} (rendered with {_short(given or 'no params')})")
            )
            if first_only:
                return found
    nothing: dict[str, object] = {"labels": {}, "annotations": {}}
    for index, route in enumerate(runbook.alerts):
        for name, source in route.params.items():
            try:
                render_text(source, nothing)
            except RenderLimitError as exc:
                message = f"alert param {name!r}: {exc} (rendered with no labels or annotations)"
                found.append((("alerts", index, "params", name), message))
                if first_only:
                    return found
            except RenderError:
                continue
    return found


def _sample_values(runbook: Runbook) -> dict[str, str | int | bool]:
    """The params' defaults, or easily derived valid values (`RunbookParam._sample`)."""
    samples = {name: param._sample() for name, param in runbook.params.items()}
    return {name: value for name, value in samples.items() if value is not None}


def _used_params(source: str, command: bool, params: Mapping[str, object]) -> set[str]:
    """The names a (valid) template reads: its params (a param may shadow a Jinja global,
    such as `namespace`) and any other name that is not a global."""
    env = _COMMAND_ENV if command else _TEXT_ENV
    ast = env.parse(source)
    # find_undeclared_variables counts a name the environment's globals define as declared.
    loaded = {node.name for node in ast.find_all(jinja2.nodes.Name) if node.ctx == "load"}
    undeclared = jinja2.meta.find_undeclared_variables(ast) - set(env.globals)
    return undeclared | (loaded & set(params))


@record
class SampleCommand:
    """A command of a runbook (a step's `run` or its rollback's) rendered with the params'
    defaults: what a run without params would execute."""

    loc: tuple[str | int, ...]
    step_id: str
    rollback: bool
    argv: list[str] | None  # None: not renderable without a value the runbook does not give
    params: dict[str, str | int | bool]  # the values it was rendered with
    problem: str | None = None  # why argv is None

    def describe(self) -> str:
        """`step 'scale-out'` or `step 'scale-out' rollback`, for messages."""
        return f"step {self.step_id!r}" + (" rollback" if self.rollback else "")

    def given(self) -> str:
        """`service=checkout-api namespace=production`, or `no params`."""
        text = " ".join(f"{k}={_text_value(v)}" for k, v in sorted(self.params.items()))
        return _capped(text or "no params")


def sample_commands(runbook: Runbook) -> list[SampleCommand]:
    """Every command of the runbook rendered with the params' defaults (see SampleCommand)."""
    values = _sample_values(runbook)
    commands = []
    for loc, source, command in runbook._template_fields():
        if not command:
            continue
        step = runbook.steps[int(loc[1])]
        rollback = "rollback" in loc
        used = _used_params(source, command, runbook.params) if "{" in source else set()
        params = {name: values[name] for name in sorted(used) if name in values}
        missing = sorted(used - values.keys())
        if missing:
            problem = f"needs a value for {', '.join(missing)} (no default)"
            commands.append(SampleCommand(loc, step.id, rollback, None, params, problem))
            continue
        try:
            argv = render_command(source, values)
        except RenderError as exc:
            commands.append(SampleCommand(loc, step.id, rollback, None, params, str(exc)))
            continue
        commands.append(SampleCommand(loc, step.id, rollback, argv, params))
    return commands


def quote_argv(argv: Sequence[str]) -> str:
    """An argv on one line, exactly (JSON: quotes, spaces and newlines stay visible)."""
    return _capped(json.dumps(list(argv), ensure_ascii=False), 300)


def _capped(text: str, limit: int = 120) -> str:
    """Text cut to `limit` characters (no repr quotes: it is shown as it is)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def load_runbook(path: Path, render_templates: bool = False) -> Runbook:
    """Load and validate one runbook file; any problem raises one precise RunbookError.

    `render_templates` also renders every template with the params' defaults and refuses one
    past the render bounds (up to a second per template: `runbooks validate` asks for it)."""
    return _load(Path(path), render_templates)[0]


def _load(path: Path, render_templates: bool = False) -> tuple[Runbook, yaml.Node]:
    """Load a runbook and keep its YAML tree, so later errors (duplicate id) get a line."""
    runbook, root, errors = _examine(path, render_templates, every=False)
    if errors:
        raise errors[0]
    assert runbook is not None and root is not None
    return runbook, root


def _examine(
    path: Path, render_templates: bool, every: bool
) -> tuple[Runbook | None, yaml.Node | None, list[RunbookError]]:
    """Load a runbook: (it, its YAML tree, []) or (None, the tree if it parsed, its errors by
    line). `every`: every error of the file, else the first one is enough (a run's loader
    stops there: one error keeps the file out, and the catalog is loaded often)."""
    try:
        root, document = read_yaml_mapping(path, "id: ..., steps: ...")
    except RunbookError as exc:  # unreadable or not YAML: nothing further can be checked
        return None, None, [exc]
    try:
        runbook = Runbook.model_validate(document)
    except ValidationError as exc:
        errors = _validation_errors(path, root, exc)
        if every:
            # The model checks templates only once every field is valid: check them on the
            # raw document too, so one pass shows a template typo beside a field typo.
            params = document.get("params") if isinstance(document, dict) else None
            declared = set(params) if isinstance(params, dict) else set()
            problems = _template_problems(_template_fields(document), declared)
            problems += _duplicate_step_ids(document)
            errors = _merged(errors, _located(path, root, problems))
        return None, root, errors
    except RecursionError:
        return None, root, [RunbookError(path, None, "", "runbook is nested too deeply")]
    if render_templates:
        problems = _render_problems(runbook, first_only=not every)
        if problems:
            return None, root, _located(path, root, problems)
    return runbook, root, []


def _duplicate_step_ids(document: object) -> list[tuple[tuple[str | int, ...], str]]:
    """Duplicate step ids of a raw document (the model finds them only in valid steps)."""
    steps = document.get("steps") if isinstance(document, dict) else None
    seen: dict[str, int] = {}
    found: list[tuple[tuple[str | int, ...], str]] = []
    for index, step in enumerate(steps if isinstance(steps, list) else []):
        step_id = step.get("id") if isinstance(step, dict) else None
        if not isinstance(step_id, str):
            continue
        if step_id in seen:
            message = f"duplicate step id {step_id!r} (also steps[{seen[step_id]}])"
            found.append((("steps", index, "id"), message))
        else:
            seen[step_id] = index
    return found


def _located(
    path: Path, root: yaml.Node, problems: Sequence[tuple[tuple[str | int, ...], str]]
) -> list[RunbookError]:
    """(location, message) problems as RunbookErrors with their lines, in file order."""
    errors = []
    for loc, message in problems:
        line, shown = _locate(root, loc)
        errors.append(RunbookError(path, line, _field(shown), message))
    return sorted(errors, key=lambda e: e.line or 0)


def _merged(first: list[RunbookError], second: list[RunbookError]) -> list[RunbookError]:
    """Both lists by line, without a second error for a field and line already reported."""
    seen = {(e.line, e.field) for e in first}
    extra = [e for e in second if (e.line, e.field) not in seen]
    return sorted([*first, *extra], key=lambda e: e.line or 0)  # stable: ties keep order


def read_yaml_mapping(
    path: Path, shape: str, empty: object | None = None
) -> tuple[yaml.MappingNode, object]:
    """Read a YAML file whose top level is a mapping (`shape` shows it in errors) within the
    size limit, with duplicate keys, alias bombs and non-printable text refused; raises
    RunbookError naming the line. An empty file is `empty` when given, else an error."""
    try:
        with path.open("rb") as handle:
            # Read one byte past the limit: never trust stat() for special or growing files.
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise RunbookError(path, None, "", f"cannot read file: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise RunbookError(path, None, "", f"file is larger than {MAX_FILE_BYTES // 1024} KiB")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise RunbookError(path, line, "", "file is not valid UTF-8 text") from None
    return _parse_yaml(path, text, shape, empty)


def _parse_yaml(
    path: Path, text: str, shape: str, empty: object | None
) -> tuple[yaml.MappingNode, object]:
    """Compose the node tree (marks, duplicate keys), then construct Python data from it.

    libyaml parses (about ten times faster: every run start loads the catalog); a file it
    refuses is parsed again by PyYAML's own parser, which loads the few files only it reads
    (a `%FOO` directive, a lone surrogate escape: they loaded before, so they still do), and
    whose messages name what is wrong ("found character '\\t'", "undefined alias 'db'")
    where libyaml's do not."""
    try:
        try:
            return _compose(path, text, shape, empty, _FastLoader)
        except yaml.YAMLError as fast_error:
            try:
                return _compose(path, text, shape, empty, _Loader)
            except yaml.YAMLError as exc:
                raise _yaml_error(path, text, exc) from None
            except (ValueError, OverflowError):
                pass  # PyYAML's scanner breaks on escapes such as "\U00110000": libyaml's words
            raise _yaml_error(path, text, fast_error) from None
    except RecursionError:
        raise RunbookError(path, None, "", "YAML is nested too deeply") from None


def _compose(
    path: Path, text: str, shape: str, empty: object | None, loader_class: type[_Loader]
) -> tuple[yaml.MappingNode, object]:
    loader = loader_class(text)  # the reader already refuses non-printable characters
    try:
        root = loader.get_single_node()
        if root is None:
            if empty is not None:
                return yaml.MappingNode("tag:yaml.org,2002:map", []), empty
            raise RunbookError(path, None, "", f"file is empty; expected a mapping ({shape})")
        if not isinstance(root, yaml.MappingNode):
            line = root.start_mark.line + 1
            raise RunbookError(path, line, "", f"top level must be a mapping ({shape})")
        _check_tree(path, root)
        return root, loader.construct_document(root)
    finally:
        loader.dispose()


class _MarkedValues:
    """A loader's scalar conversion errors carry the node's line."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        """Like SafeLoader's, but `!!int abc` or `!!timestamp 2024-13-01` become marked errors."""
        try:
            return super().construct_object(node, deep=deep)  # type: ignore[misc]
        except (ValueError, TypeError, OverflowError) as exc:
            # SafeConstructor lets int()/float()/datetime() errors escape without a mark.
            raise yaml.constructor.ConstructorError(
                None, None, f"invalid value: {exc}", node.start_mark
            ) from None


class _Loader(_MarkedValues, yaml.SafeLoader):
    """PyYAML's pure-Python SafeLoader, with marked value errors."""


# PyPI's wheels ship libyaml; without it the pure-Python parser does both jobs.
class _FastLoader(_MarkedValues, getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """libyaml's SafeLoader, with marked value errors: the same marks and character rule."""


@record
class RunbookCatalog:
    """All runbooks of a directory that loaded, by id, and the errors of those that did not."""

    runbooks: dict[str, Runbook]
    errors: list[RunbookError]

    def get(self, runbook_id: str) -> Runbook:
        """The runbook with this id; KeyError if it is unknown or failed to load."""
        try:
            return self.runbooks[runbook_id]
        except KeyError:
            raise KeyError(f"unknown runbook {runbook_id!r}") from None


def load_catalog(directory: Path, render_templates: bool = False) -> RunbookCatalog:
    """Load every *.yaml / *.yml file (sorted); bad files are reported, never half-loaded.

    `render_templates`: as for `load_runbook`, for every file."""
    directory = Path(directory)
    runbooks: dict[str, Runbook] = {}
    errors: list[RunbookError] = []
    if not directory.is_dir():
        return RunbookCatalog(
            {}, [RunbookError(directory, None, "", "runbook directory not found")]
        )
    sources: dict[str, Path] = {}
    try:
        files = sorted(p for p in directory.iterdir() if p.suffix in (".yaml", ".yml"))
    except OSError as exc:
        reason = f"cannot read the runbook directory: {exc.strerror or exc}"
        return RunbookCatalog({}, [RunbookError(directory, None, "", reason)])
    for path in files:
        try:
            runbook, root = _load(path, render_templates)
        except RunbookError as exc:
            errors.append(exc)
            continue
        if runbook.id in runbooks:
            line = _locate(root, ("id",))[0]
            errors.append(
                RunbookError(
                    path,
                    line,
                    "id",
                    f"duplicate runbook id {runbook.id!r} (also {sources[runbook.id]})",
                )
            )
            continue
        runbooks[runbook.id] = runbook
        sources[runbook.id] = path
    return RunbookCatalog(runbooks, errors)


# Catalogs kept by `current_catalog`, most recently used last: a process reads one workspace's
# directory; a few more cost little, and the bound keeps a test process's memory flat.
_CATALOGS: dict[Path, tuple[tuple[tuple[str, int, int, int, int], ...] | None, RunbookCatalog]] = {}
_CATALOGS_KEPT = 8


def current_catalog(directory: Path) -> RunbookCatalog:
    """`load_catalog(directory)`, read again only when a file in it changed (its name, inode,
    size, mtime or ctime, which no copy that keeps the mtime keeps): every run start asks for
    it, the CLI once before it opens the store and once after."""
    directory = Path(directory)
    stamp: tuple[tuple[str, int, int, int, int], ...] | None
    try:
        with os.scandir(directory) as entries:  # one stat per file
            stamp = tuple(
                sorted(
                    (e.name, (st := e.stat()).st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                    for e in entries
                )
            )
    except OSError:
        stamp = None  # missing or unreadable: not the same as empty
    kept = _CATALOGS.pop(directory, None)
    catalog = kept[1] if kept is not None and kept[0] == stamp else load_catalog(directory)
    _CATALOGS[directory] = (stamp, catalog)
    while len(_CATALOGS) > _CATALOGS_KEPT:
        del _CATALOGS[next(iter(_CATALOGS))]
    return catalog


# --------------------------------------------------------------------------------------------
# Validating (`loom-ops runbooks validate`, `loom-ops doctor`)
# --------------------------------------------------------------------------------------------


class CommandRules(Protocol):
    """What validation asks of a shell allowlist (`agent.tools.allowlist.ShellAllowlist`):
    its name, and the rule that admits a command, if any."""

    source: str

    def rule_for(self, argv: Sequence[str]) -> object | None:
        """The rule admitting `argv`, or None."""


@record
class RunbookReport:
    """What validating one runbook file found: the runbook (None when the file is invalid),
    every error of the file by line, and its commands that no allowlist rule admits."""

    path: Path
    runbook: Runbook | None
    file_errors: list[RunbookError] = field(default_factory=list)
    gaps: list[RunbookError] = field(default_factory=list)
    live_shell: bool = False  # gaps are errors when commands run for real

    @property
    def errors(self) -> list[RunbookError]:
        """What keeps the file (or, with live shell, one of its steps) from working."""
        return _by_line([*self.file_errors, *(self.gaps if self.live_shell else [])])

    @property
    def warnings(self) -> list[RunbookError]:
        """Allowlist gaps while commands are dry-run: they fail once live shell is on."""
        return [] if self.live_shell else self.gaps


def validate_runbooks(
    path: Path, allowlist: CommandRules | None = None, live_shell: bool = False
) -> list[RunbookReport]:
    """Validate one runbook file, or every *.yaml / *.yml file of a directory (sorted), in one
    pass: every error of every file, templates rendered against the bounds.

    With an allowlist, every command (a step's `run` and its rollback's, rendered with the
    params' defaults) that no rule admits is reported too: an error when `live_shell` (a run
    would be refused at that step), else a warning (dry-run never asks the allowlist)."""
    path = Path(path)
    files = (
        sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml"))
        if path.is_dir()
        else [path]
    )
    reports: list[RunbookReport] = []
    sources: dict[str, Path] = {}
    for file in files:
        runbook, root, errors = _examine(file, render_templates=True, every=True)
        gaps: list[RunbookError] = []
        if runbook is not None and root is not None:
            if runbook.id in sources:
                line = _locate(root, ("id",))[0]
                errors.append(
                    RunbookError(
                        file,
                        line,
                        "id",
                        f"duplicate runbook id {runbook.id!r} (also {sources[runbook.id]})",
                    )
                )
            else:
                sources[runbook.id] = file
            if allowlist is not None:
                gaps = _located(file, root, _allowlist_gaps(runbook, allowlist))
        valid = runbook if not errors else None
        reports.append(RunbookReport(file, valid, _by_line(errors), gaps, live_shell))
    return reports


def _allowlist_gaps(
    runbook: Runbook, allowlist: CommandRules
) -> list[tuple[tuple[str | int, ...], str]]:
    """Every command of the runbook, rendered with the defaults, that no rule admits."""
    gaps = []
    for sample in sample_commands(runbook):
        if sample.argv is None or allowlist.rule_for(sample.argv) is not None:
            continue  # one that cannot be rendered is for the run to report, with its values
        gaps.append(
            (
                sample.loc,
                f"{sample.describe()}: no rule of {allowlist.source} admits "
                f"{quote_argv(sample.argv)} (rendered with {sample.given()})",
            )
        )
    return gaps


def _by_line(errors: list[RunbookError]) -> list[RunbookError]:
    return sorted(errors, key=lambda e: e.line or 0)
