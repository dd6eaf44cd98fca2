"""Settings: environment variables with the `LOOM_OPS_` prefix, a `.env` file, then CLI flags.

A settings model is declared as a pydantic model is (`Field`, `field_validator`, ...) and keeps
pydantic's rules, messages and `ValidationError`, but pydantic itself is imported only for a
value outside the plain forms settings come in (text from the environment, values of their
own type): every command builds settings, and importing pydantic would cost each one about a
third of its start-up (`loom-ops runs` in a shell loop; issue 14).
"""

from __future__ import annotations

import codecs
import copy
import getpass
import inspect
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypedDict

from agent.chain import AuditKey, Keyring
from agent.failpoints import Failpoints
from agent.records import IDENTITY_PATTERN, Delay, Effects

if TYPE_CHECKING:
    from typing import Self

    from pydantic import ValidationError


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry, e.g. in a bare container
        return "unknown"


MIN_AUDIT_KEY = 16  # characters of an audit key


def _split_keys(value: str) -> list[str]:
    """Comma-separated keys, each stripped as it is used."""
    return [key.strip() for key in value.split(",") if key.strip()]


def _first_line(path: Path) -> str:
    """The first line of a key file, stripped; ValueError (one line) when it cannot be read."""
    try:
        # A BOM (as Windows editors write) is no part of the key: with it, a process reading
        # a copy without one would hold another key and call every link broken.
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ValueError(f"cannot read {path}: {reason}") from None
    return lines[0].strip() if lines else ""


# -- the environment and the `.env` file ---------------------------------------------------------

ENV_FILE = ".env"  # read from the current directory, after the environment


def env_names(model: type[EnvSettings], field: str) -> list[str]:
    """The environment variables a settings field is read from, the first choice first: its
    aliases, else the model's prefix and the field's name."""
    info = model.model_fields.get(field)
    if info is not None and info.validation_alias is not None:
        return list(info.validation_alias.choices)
    return [f"{model.model_config.get('env_prefix', '')}{field}".upper()]


def setting_name(
    model: type[EnvSettings], field: str, env_file: str | Path | None = ENV_FILE
) -> str:
    """The variable an error about a settings field should name: the one it was read from,
    as the person wrote it (the environment first, then the `.env` file), else its first
    name."""
    names = env_names(model, field)
    try:
        found = _lookup(names, _sources(env_file))
    except ValueError:  # the file cannot be read: an error says so, not this
        found = None
    return found[0] if found is not None else names[0]


# A name as the environment or the file spells it, and its value (None: set without `=`).
_Source = dict[str, tuple[str, str | None]]


def _sources(env_file: str | Path | None) -> tuple[_Source, _Source]:
    """Where settings are read from, in order: the environment, then the `.env` file; each
    by lower-cased name (names are read in any case)."""
    environment = {name.lower(): (name, value) for name, value in os.environ.items()}
    path = Path(env_file).expanduser() if env_file is not None else None
    found = read_env_file(path) if path and (path.is_file() or path.is_fifo()) else {}
    return environment, {name.lower(): (name, value) for name, value in found.items()}


def _lookup(names: list[str], sources: tuple[_Source, ...]) -> tuple[str, str] | None:
    """The first of `names` set in the first source that sets any: (name as written, value)."""
    for source in sources:
        for name in names:
            written, value = source.get(name.lower(), (name, None))
            if value is not None:
                return written, value
    return None


# One `KEY=value` entry of a dotenv file, as python-dotenv (which pydantic-settings used) reads
# it (each part taken whole, hence the possessive `*+`): `export`, quotes (multi-line ones
# too), comments. A line that is no entry is skipped.
_DOTENV_ENTRY = re.compile(
    r"""\s*+(?:export[^\S\r\n]+)?+
    (?:'(?P<quoted_key>[^']+)'|(?P<key>(?!')[^=\#\s]+))[^\S\r\n]*+
    (?:(?P<equals>=[^\S\r\n]*+)
        (?:'(?P<single>(?:\\[\s\S]|[^'\\])*)'
          |"(?P<double>(?:\\[\s\S]|[^"\\])*)"
          |(?P<bare>(?!['"])[^\r\n]*)))?
    (?:[^\S\r\n]*\#[^\r\n]*)?[^\S\r\n]*(?:\r\n|\n|\r|$)""",
    re.VERBOSE,
)
_SINGLE_QUOTED_ESCAPES = re.compile(r"\\[\\']")
_DOUBLE_QUOTED_ESCAPES = re.compile(r"\\[\\'\"abfnrtv]")
_VARIABLE = re.compile(r"\$\{(?P<name>[^}:]*)(?::-(?P<default>[^}]*))?\}")


def read_env_file(path: Path) -> dict[str, str | None]:
    """The variables a dotenv file sets (None: a name without `=`), each `${NAME}` or
    `${NAME:-default}` in a value taken from the file's earlier lines, else the environment.
    ValueError (one line) when it cannot be read."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # (a BOM, as Windows editors write, is none)
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ValueError(f"cannot read {path}: {reason}") from None
    if "\0" in text:  # no setting may hold one (no path, no URL): refused here, in one line
        line = text.count("\n", 0, text.index("\0")) + 1
        raise ValueError(f"cannot read {path}: line {line} holds a NUL character")
    values: dict[str, str | None] = {}
    at = 0
    while at < len(text):
        entry = _DOTENV_ENTRY.match(text, at)
        if entry is None:  # a comment, or a line that is no entry
            newline = text.find("\n", at)
            at = len(text) if newline < 0 else newline + 1
            continue
        at = entry.end()
        values[entry["quoted_key"] or entry["key"]] = _dotenv_value(entry, values)
    return values


def _dotenv_value(entry: re.Match[str], earlier: dict[str, str | None]) -> str | None:
    if entry["equals"] is None:
        return None
    if entry["single"] is not None:
        value = _unescape(_SINGLE_QUOTED_ESCAPES, entry["single"])
    elif entry["double"] is not None:
        value = _unescape(_DOUBLE_QUOTED_ESCAPES, entry["double"])
    elif len(entry["equals"]) > 1 and entry["bare"].startswith("#"):
        value = ""  # `KEY= # a comment`: the value is empty
    else:
        value = re.sub(r"\s+#.*", "", entry["bare"]).rstrip()
    if "${" not in value:
        return value
    known: dict[str, str | None] = {**os.environ, **earlier}
    return _VARIABLE.sub(
        lambda m: (known[m["name"]] if m["name"] in known else m["default"]) or "", value
    )


def _unescape(escapes: re.Pattern[str], value: str) -> str:
    return escapes.sub(lambda m: codecs.decode(m.group(0), "unicode-escape"), value)


# -- fields, validators and errors, as pydantic has them ----------------------------------------


class AliasChoices:
    """The names a field is read from, as keyword arguments and environment variables, the
    first choice first (pydantic's `AliasChoices`)."""

    def __init__(self, *choices: str) -> None:
        self.choices: list[str] = list(choices)


class SecretStr:
    """A secret's value, shown as asterisks (pydantic's `SecretStr`): `get_secret_value()`
    reads it."""

    __slots__ = ("_secret",)

    def __init__(self, secret: str) -> None:
        self._secret = secret

    def get_secret_value(self) -> str:
        """The secret itself."""
        return self._secret

    def __eq__(self, other: object) -> bool:
        secret = getattr(other, "get_secret_value", None)  # pydantic's SecretStr too
        return callable(secret) and self._secret == secret()

    def __hash__(self) -> int:
        return hash(self._secret)

    def __len__(self) -> int:
        return len(self._secret)

    def __str__(self) -> str:
        return "**********" if self._secret else ""

    def __repr__(self) -> str:
        return f"SecretStr('{self}')"


# The annotations a settings field may have (each also as `X | None`).
_KINDS = ("str", "int", "float", "bool", "Path", "SecretStr", "list[str]", "list[int]")


class FieldInfo:
    """A settings field: its type (`annotation`, as written), default and constraints."""

    def __init__(
        self,
        default: Any,
        default_factory: Callable[[], Any] | None,
        ge: float | None,
        gt: float | None,
        le: float | None,
        pattern: str | None,
        validation_alias: AliasChoices | None,
        description: str,
    ) -> None:
        self.annotation = ""  # set when its model is declared
        self.default = default
        self.default_factory = default_factory
        self.ge, self.gt, self.le, self.pattern = ge, gt, le, pattern
        self.validation_alias = validation_alias
        self.description = description
        # pydantic's `$` is the end of the text; Python's also matches before a final newline.
        self._pattern = re.compile(re.sub(r"\$$", r"\\Z", pattern)) if pattern else None
        self._adapter: Any = None  # pydantic's validator of this field, made when first needed

    def default_value(self) -> Any:
        """The value of a field left out."""
        return self.default_factory() if self.default_factory is not None else self.default

    def typed(self, name: str, value: Any) -> Any:
        """`value` as a value of this field: what pydantic would make of it, or _Refused with
        pydantic's errors."""
        plain = self._plain(value)
        return plain if plain is not _UNSURE else self._by_pydantic(name, value)

    def _plain(self, value: Any) -> Any:
        # The forms settings come in, checked here; any other (or a value out of bounds)
        # goes to pydantic, for its verdict and its words.
        nullable = self.annotation.endswith(" | None")
        if value is None and nullable:
            return None
        kind = self.annotation.removesuffix(" | None")
        typed = _plain_value(kind, value)
        if typed is _UNSURE:
            return _UNSURE
        bounded = isinstance(typed, int | float) and not isinstance(typed, bool)
        if bounded and (
            (self.ge is not None and not typed >= self.ge)
            or (self.gt is not None and not typed > self.gt)
            or (self.le is not None and not typed <= self.le)
        ):
            return _UNSURE
        if self._pattern is not None and not (typed.isascii() and self._pattern.search(typed)):
            return _UNSURE  # (beyond ASCII, pydantic's regex engine may see `\s` otherwise)
        return typed

    def _by_pydantic(self, name: str, value: Any) -> Any:
        from pydantic import TypeAdapter, ValidationError

        if self._adapter is None:
            self._adapter = TypeAdapter(self._pydantic_type())
        try:
            typed = self._adapter.validate_python(value)
        except ValidationError as exc:
            raise _Refused([{**e, "loc": (name, *e["loc"])} for e in exc.errors()]) from None
        secret = getattr(typed, "get_secret_value", None)
        return SecretStr(secret()) if callable(secret) else typed

    def _pydantic_type(self) -> Any:
        from typing import Annotated

        import pydantic

        kind = self.annotation.removesuffix(" | None")
        python: Any = {
            "str": str,
            "int": int,
            "float": float,
            "bool": bool,
            "Path": Path,
            "SecretStr": pydantic.SecretStr,
            "list[str]": list[str],
            "list[int]": list[int],
        }[kind]
        if self.annotation.endswith(" | None"):
            python = python | None
        bounds = {"ge": self.ge, "gt": self.gt, "le": self.le, "pattern": self.pattern}
        return Annotated[
            python, pydantic.Field(**{k: v for k, v in bounds.items() if v is not None})
        ]


def Field(  # pydantic's name: a settings model reads as a pydantic model
    default: Any = None,
    *,
    default_factory: Callable[[], Any] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    pattern: str | None = None,
    validation_alias: AliasChoices | None = None,
    description: str = "",
) -> Any:
    """A settings field: pydantic's `Field`, with the arguments settings use."""
    return FieldInfo(default, default_factory, ge, gt, le, pattern, validation_alias, description)


_UNSURE: Any = object()  # a form left to pydantic
# The password of a URL's `user:password@` (a database URL's): never shown in a repr.
_URL_PASSWORD = re.compile(r"(://[^/\s:@']+):[^/\s@']+@")
_MASKED = r"\1:***@"
_DIGITS = re.compile(r"[0-9]{1,18}")
_DECIMAL = re.compile(r"[0-9]{1,15}(?:\.[0-9]{1,15})?")
_BOOLEANS = {
    **dict.fromkeys(("0", "off", "f", "false", "n", "no"), False),
    **dict.fromkeys(("1", "on", "t", "true", "y", "yes"), True),
}
_EXACT_FLOATS = 2**53  # an int beyond is no float pydantic would make the same


def _plain_value(kind: str, value: Any) -> Any:
    """`value` as pydantic makes a value of `kind` from it, for the plain forms (text as the
    environment gives it, a value of the type itself); _UNSURE for any other form."""
    given = type(value)
    if kind == "str" and given is str:
        return value
    if kind == "int":
        if given is int:
            return value
        if given is str and _DIGITS.fullmatch(value):
            return int(value)
    elif kind == "float":
        if given is float or (given is int and abs(value) < _EXACT_FLOATS):
            return float(value)
        if given is str and _DECIMAL.fullmatch(value):
            return float(value)
    elif kind == "bool":
        if given is bool:
            return value
        if given is str and value.isascii():
            return _BOOLEANS.get(value.lower(), _UNSURE)
    elif kind == "Path" and (given is str or isinstance(value, Path)):
        return Path(value)
    elif kind == "SecretStr":
        if given is str:
            return SecretStr(value)
        if given is SecretStr:
            return value
    elif kind.startswith("list[") and given is list:
        item = str if kind == "list[str]" else int
        if all(type(each) is item for each in value):
            return list(value)
    return _UNSURE


class _Refused(Exception):
    """A field's value refused, with pydantic's error details."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(errors)
        self.errors = errors


def _validation_error(title: str, errors: list[dict[str, Any]]) -> ValidationError:
    """pydantic's ValidationError: pydantic-core words an error of its own types from the
    type and context; one of pydantic's (`path_type`) keeps the message it came with."""
    from typing import get_args

    from pydantic_core import PydanticCustomError, ValidationError, core_schema

    core = get_args(core_schema.ErrorType)
    details: list[Any] = []
    for e in errors:
        detail = {key: e[key] for key in ("type", "loc", "input", "ctx") if key in e}
        if e["type"] not in core:
            detail = {"type": PydanticCustomError(e["type"], e["msg"]), "loc": e["loc"]}
            detail["input"] = e["input"]
        details.append(detail)
    return ValidationError.from_exception_data(title, details)


class ValidationInfo:
    """What a validator is told besides the value (pydantic's `ValidationInfo`): `data`, the
    fields validated before this one."""

    def __init__(self, data: dict[str, Any], field_name: str | None = None) -> None:
        self.data = data
        self.field_name = field_name


def field_validator(
    *fields: str, mode: Literal["before", "after"] = "after"
) -> Callable[[Any], Any]:
    """Validate these fields with the decorated classmethod, pydantic's way: `before` on the
    value as given (the latest declared first), `after` on the typed one (in declared order);
    a ValueError refuses the value with its message."""

    def mark(method: Any) -> Any:
        target = method.__func__ if isinstance(method, classmethod) else method
        target.__settings_validator__ = (fields, mode)
        return method

    return mark


def model_validator(*, mode: Literal["after"]) -> Callable[[Any], Any]:
    """Run the decorated method on the model once every field is valid."""

    def mark(method: Any) -> Any:
        method.__settings_validator__ = ((), mode)
        return method

    return mark


class EnvConfig(TypedDict, total=False):
    """A settings model's config."""

    env_prefix: str  # before the name of a field without aliases


class EnvSettings:
    """A settings model: fields not given as arguments (by name or alias) are read from the
    environment, else from the `.env` file (`_env_file` names another, None none), else take
    their defaults, which are validated too; other arguments are ignored. A field is read from
    its aliases (the first one set wins), a field without any from the config's `env_prefix`
    and its name, in any case; lists arrive as text, for the fields' validators to split.
    Refused values raise pydantic's ValidationError."""

    model_config: ClassVar[EnvConfig] = EnvConfig()
    model_fields: ClassVar[dict[str, FieldInfo]] = {}
    _before: ClassVar[dict[str, list[Callable[..., Any]]]] = {}
    _after: ClassVar[dict[str, list[Callable[..., Any]]]] = {}
    _model_after: ClassVar[list[Callable[..., Any]]] = []

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        fields = dict(cls.model_fields)
        for name, annotation in inspect.get_annotations(cls).items():
            if str(annotation).startswith("ClassVar"):
                continue
            info = cls.__dict__.get(name)
            kind = str(annotation).removesuffix(" | None")
            if not isinstance(info, FieldInfo) or kind not in _KINDS:
                raise TypeError(f"{cls.__name__}.{name}: declare it `: <{_KINDS}> = Field(...)`")
            info.annotation = str(annotation)
            fields[name] = info
            delattr(cls, name)  # read from instances only, as pydantic's fields are
        cls.model_fields = fields
        cls._before = {name: [] for name in fields}
        cls._after = {name: [] for name in fields}
        cls._model_after = []
        for attribute in cls.__dict__.values():
            function = attribute.__func__ if isinstance(attribute, classmethod) else attribute
            names, mode = getattr(function, "__settings_validator__", (None, None))
            if names is None:
                continue
            if not names:
                cls._model_after.append(function)
            for name in names:
                if mode == "before":
                    cls._before[name].insert(0, getattr(cls, function.__name__))
                else:
                    cls._after[name].append(getattr(cls, function.__name__))

    def __init__(self, _env_file: str | Path | None = ENV_FILE, **values: Any) -> None:
        values = self._from_environment(values, _env_file)
        data: dict[str, Any] = {}
        errors: list[dict[str, Any]] = []
        for name, field in self.model_fields.items():
            given = self._given(name, field, values)
            try:
                data[name] = self._validated(name, field, given, ValidationInfo(data, name))
            except _Refused as refused:
                errors += refused.errors
            except ValueError as exc:
                errors.append(
                    {"type": "value_error", "loc": (name,), "input": given, "ctx": {"error": exc}}
                )
        if errors:
            raise _validation_error(type(self).__name__, errors)
        self.__dict__.update(data)
        for validator in self._model_after:
            try:
                validator(self)
            except ValueError as exc:
                error = {"type": "value_error", "loc": (), "input": values, "ctx": {"error": exc}}
                raise _validation_error(type(self).__name__, [error]) from None

    @staticmethod
    def _given(name: str, field: FieldInfo, values: Mapping[str, Any]) -> Any:
        """The value given for a field, by an alias (as pydantic prefers) or its name, else its
        default."""
        for key in (*(field.validation_alias.choices if field.validation_alias else ()), name):
            if key in values:
                return values[key]
        return field.default_value()

    def _validated(self, name: str, field: FieldInfo, value: Any, info: ValidationInfo) -> Any:
        for validator in self._before[name]:
            value = _call(validator, value, info)
        value = field.typed(name, value)
        for validator in self._after[name]:
            value = _call(validator, value, info)
        return value

    @classmethod
    def _from_environment(
        cls, values: dict[str, Any], env_file: str | Path | None
    ) -> dict[str, Any]:
        """`values` with each field they leave out that the environment or the file sets."""
        sources = _sources(env_file)
        merged = dict(values)
        for field in cls.model_fields:
            names = env_names(cls, field)
            if field in values or any(name in values for name in names):
                continue
            found = _lookup(names, sources)
            if found is not None:
                merged[field] = found[1]
        return merged

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy, with `update`'s values set as they are (not validated), as pydantic's."""
        copied = object.__new__(type(self))
        copied.__dict__.update(copy.deepcopy(self.__dict__) if deep else self.__dict__)
        copied.__dict__.update(update or {})
        return copied

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.__dict__ == self.__dict__

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{name}={_URL_PASSWORD.sub(_MASKED, repr(value))}"
            for name, value in self.__dict__.items()
        )
        return f"{type(self).__name__}({shown})"


def _call(validator: Callable[..., Any], value: Any, info: ValidationInfo) -> Any:
    """A validator called as pydantic calls it: with the info when it takes one."""
    function = getattr(validator, "__func__", validator)
    takes_info = function.__code__.co_argcount > 2  # (cls, value, info)
    return validator(value, info) if takes_info else validator(value)


# The setting that lets a process act each kind of effect (`Effects`) live.
EFFECT_SETTINGS = {
    "shell": "LOOM_OPS_ALLOW_SHELL",
    "mcp": "LOOM_OPS_ALLOW_MCP",
    "checks": "LOOM_OPS_LIVE_CHECKS",
}


def switched_on(kinds: Iterable[str]) -> str:
    """The settings that let a process act these kinds of effect live, as a person sets
    them: `LOOM_OPS_ALLOW_SHELL=1 LOOM_OPS_LIVE_CHECKS=1`."""
    return " ".join(f"{EFFECT_SETTINGS[kind]}=1" for kind in kinds)


class Settings(EnvSettings):
    """Every knob of loom-ops; `.env.example` documents each one."""

    model_config = EnvConfig(env_prefix="LOOM_OPS_")

    db: str = Field(
        "ops.sqlite",
        description="The store: a SQLite file (or sqlite:///path), or a postgresql:// URL.",
    )
    worker_concurrency: int = Field(
        16, ge=1, le=10_000, description="Runs one `loom-ops worker` process drives at once."
    )
    db_pool_size: int = Field(
        4, ge=1, le=100, description="PostgreSQL connections per process (SQLite uses one)."
    )
    workspace: Path = Field(Path("."), description="Runbooks are read from <workspace>/runbooks/.")
    mock_llm: bool = Field(False, description="Use the deterministic, key-free mock policy.")
    max_steps: int = Field(40, ge=1, le=100_000, description="Policy turns per run.")
    max_tool_calls: int = Field(100, ge=1, le=100_000, description="Tool calls per run.")
    run_deadline: float = Field(
        3600.0, gt=0, description="Seconds of running time per run (waiting for a human excluded)."
    )
    approval_timeout: float = Field(
        1800.0, gt=0, description="Seconds an approval request stays open before it expires."
    )
    approvers: list[str] = Field(
        default_factory=list,
        description="Who may decide anywhere; non-empty, it narrows every other list (empty: "
        "the people file and the runbooks say).",
    )
    telegram_approvers: list[str] = Field(
        default_factory=list,
        validation_alias=AliasChoices("TELEGRAM_APPROVER_IDS", "LOOM_OPS_TELEGRAM_APPROVER_IDS"),
        description="Telegram user ids who may decide: with LOOM_OPS_APPROVERS, group:approvers.",
    )
    remind_after: str = Field(
        "50%",
        description="When a pending approval reminds its deciders: a share of its deadline "
        "(50%) or a duration (10m); 0 or empty: never. A runbook's `escalation:` wins.",
    )
    escalate_after: str = Field(
        "",
        description="When a pending approval escalates to LOOM_OPS_ESCALATE_TO (as "
        "remind_after); empty: never.",
    )
    escalate_to: list[str] = Field(
        default_factory=list,  # checked against escalate_after even when left out
        description="Who is added as deciders at escalate_after: groups or identities.",
    )
    people_file: Path | None = Field(
        None, description="People, their identities and groups; default <workspace>/people.yaml."
    )
    allow_shell: bool = Field(False, description="Run `run` steps for real (else dry-run).")
    live_checks: bool = Field(False, description="Send real HTTP health checks (else synthetic).")
    shell_allowlist: Path | None = Field(
        None, description="Allowlist file; default <workspace>/ops.shell.allowlist.json."
    )
    allow_mcp: bool = Field(False, description="Call `mcp` step tools for real (else dry-run).")
    mcp_config: Path | None = Field(
        None, description="MCP servers and tool mapping; default <workspace>/ops.mcp.json."
    )
    output_cap: int = Field(64 * 1024, ge=1024, description="Bytes kept of a command's output.")
    redact_patterns: list[str] = Field(
        default_factory=list, description="Extra regexes whose matches are redacted."
    )
    lease_ttl: float = Field(30.0, gt=0, description="Seconds a run's lease lasts without beat.")
    drain_seconds: float = Field(
        30.0,
        ge=0,
        le=3600,
        description=(
            "On SIGTERM/SIGINT, how long a worker or serve lets the steps in flight finish "
            "(their outcomes kept) before it hands their runs back; a step still running then "
            "is in doubt for a person to decide. Keep the stop timeout above it."
        ),
    )
    memory_max_lines: int = Field(200, ge=1, description="Lines kept in the workspace memory.")
    failpoint: str | None = Field(
        None, description="Test hook: '<point>:<n>' kills the process with SIGKILL there."
    )
    api_token: SecretStr | None = Field(None, description="Bearer token of the HTTP API.")
    api_user: str = Field(
        "api:http",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}$",
        description="Who decisions made through the HTTP API are recorded as.",
    )
    host: str = Field("127.0.0.1", description="Address `loom-ops serve` binds.")
    public_hosts: list[str] = Field(
        default_factory=list,
        description="Host names `serve` answers besides loopback and its bind address "
        "(a reverse proxy's name, a Prometheus target's): others are refused (DNS rebinding).",
    )
    port: int = Field(8766, ge=0, le=65535, description="Port `loom-ops serve` binds.")
    max_active_runs: int = Field(
        32,
        ge=1,
        le=10_000,
        description="Incidents active at once (queued or running) before further starts "
        "from the API (429) and the chat are refused.",
    )
    max_body_bytes: int = Field(
        64 * 1024, ge=1024, description="Largest HTTP request body accepted (then 413)."
    )
    max_alert_body_bytes: int = Field(
        4 * 1024 * 1024,
        ge=1024,
        le=64 * 1024 * 1024,
        description="Largest alert webhook body accepted on /alerts/* (then 413): an alert "
        "storm's notification (up to 1000 alerts) is far larger than a request.",
    )
    openai_api_key: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("OPENAI_API_KEY", "LOOM_OPS_OPENAI_API_KEY"),
        description="Key of the OpenAI-compatible API (any value for a local server).",
    )
    openai_base_url: str | None = Field(
        None,
        validation_alias=AliasChoices("OPENAI_BASE_URL", "LOOM_OPS_OPENAI_BASE_URL"),
        description="Base URL of an OpenAI-compatible API (Ollama, vLLM, ...).",
    )
    openai_model: str = Field(
        "gpt-4o-mini",
        validation_alias=AliasChoices("OPENAI_MODEL", "LOOM_OPS_OPENAI_MODEL"),
        description="Model name.",
    )
    telegram_bot_token: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("TELEGRAM_BOT_TOKEN", "LOOM_OPS_TELEGRAM_BOT_TOKEN"),
        description="The Telegram bot's token (from @BotFather); redacted wherever it appears.",
    )
    alert_chat_id: int | None = Field(
        None,
        validation_alias=AliasChoices("TELEGRAM_ALERT_CHAT_ID", "LOOM_OPS_TELEGRAM_ALERT_CHAT_ID"),
        description="The incident chat alert cards go to (unset: the first group chat in "
        "TELEGRAM_ALLOWED_CHAT_IDS).",
    )
    telegram_chats: list[str] = Field(
        default_factory=list,
        validation_alias=AliasChoices(
            "TELEGRAM_ALLOWED_CHAT_IDS", "LOOM_OPS_TELEGRAM_ALLOWED_CHAT_IDS"
        ),
        description="The chats the bot serves (the bot checks them); alert cards go to the "
        "first group among them unless TELEGRAM_ALERT_CHAT_ID names one.",
    )
    alertmanager_url: str | None = Field(
        None,
        pattern=r"^https?://[^\s]+$",
        description="Alertmanager's base URL: an alert card's [Silence 1h] creates the silence "
        "through its API v2 (unset: the card has no such button).",
    )
    llm_timeout: float = Field(60.0, gt=0, description="Seconds per LLM request attempt.")
    llm_max_retries: int = Field(
        3, ge=0, le=10, description="Retries of a failed LLM request (the client's backoff)."
    )
    user: str = Field(default_factory=_os_user, description="Who the CLI acts as.")
    audit_key: SecretStr | None = Field(
        None,
        description="Secret the journal's chain is an HMAC under (at least 16 characters); "
        "kept outside the store. Unset: a plain hash chain a store writer could recompute.",
    )
    audit_key_file: Path | None = Field(
        None, description="A file holding the audit key instead (its first line)."
    )
    audit_previous_keys: SecretStr | None = Field(
        None,
        description="Keys the audit key replaced (comma-separated), for verifying runs they "
        "wrote; never used to write, never stored.",
    )
    audit_keyed_since: int | None = Field(
        None,
        ge=1,
        description="The number of the first run written under an audit key (`loom-ops doctor` "
        "prints it): from it on, an unkeyed run is a stripped one. Unset with a key: verify "
        "accepts no unkeyed run.",
    )

    @field_validator(
        "api_token",
        "openai_api_key",
        "telegram_bot_token",
        "audit_key",
        "audit_previous_keys",
        mode="before",
    )
    @classmethod
    def _blank_secret_is_unset(cls, value: object) -> object:
        # `LOOM_OPS_API_TOKEN=` must not read as "a token was given" anywhere: an empty
        # token would both pass the public-bind check and turn the bearer check off.
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("approvers", "redact_patterns", "public_hosts", "escalate_to", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        # A comma-separated env value is friendlier than JSON for a list of names; JSON is
        # there for items with a comma (a regex like `a{1,3}`).
        if not isinstance(value, str):
            return value
        if value.lstrip().startswith("["):
            try:
                return json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not a JSON list: {exc}") from None
        return [item.strip() for item in value.split(",") if item.strip()]

    @field_validator("approvers")
    @classmethod
    def _identities(cls, value: list[str]) -> list[str]:
        # `cli:` alone (an unset $USER in `cli:$USER`) would name nobody, silently.
        for entry in value:
            if not re.fullmatch(IDENTITY_PATTERN, entry):
                raise ValueError(
                    f"{entry!r} must be an identity like cli:alice or telegram:12345, or a "
                    "group like group:oncall"
                )
        return value

    @field_validator("telegram_approvers", "telegram_chats", mode="before")
    @classmethod
    def _telegram_ids(cls, value: object) -> object:
        # Kept as text: they become identities (`telegram:<id>`); the bot checks they are numbers.
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        if isinstance(value, list | tuple):
            return [str(item) for item in value]
        return value

    @field_validator("redact_patterns")
    @classmethod
    def _patterns_compile(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"invalid regex {pattern!r}: {exc}") from None
        return value

    @field_validator("audit_key")
    @classmethod
    def _audit_key_long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value().strip()) < MIN_AUDIT_KEY:
            raise ValueError(f"the audit key must be at least {MIN_AUDIT_KEY} characters")
        return value

    @field_validator("audit_previous_keys")
    @classmethod
    def _previous_keys_long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and any(
            len(k) < MIN_AUDIT_KEY for k in _split_keys(value.get_secret_value())
        ):
            raise ValueError(f"each previous audit key must be at least {MIN_AUDIT_KEY} characters")
        return value

    @field_validator("audit_key_file")
    @classmethod
    def _audit_key_file_usable(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        # Checked here, so a missing or short key file is a setting error before anything runs.
        if value is None:
            return None
        if info.data.get("audit_key") is not None:
            raise ValueError("set LOOM_OPS_AUDIT_KEY or LOOM_OPS_AUDIT_KEY_FILE, not both")
        if len(_first_line(value)) < MIN_AUDIT_KEY:
            raise ValueError(
                f"the audit key in {value} must be at least {MIN_AUDIT_KEY} characters"
            )
        return value

    @model_validator(mode="after")
    def _audit_key_from_file(self) -> Settings:
        # One place holds the key, whichever setting named it (redaction reads it there).
        if self.audit_key_file is not None:
            self.audit_key = SecretStr(_first_line(self.audit_key_file))
        return self

    @field_validator("remind_after", "escalate_after")
    @classmethod
    def _delay_parses(cls, value: str) -> str:
        Delay.parse(value)  # the runbooks' parser: one format for both
        return value

    @field_validator("escalate_to")
    @classmethod
    def _escalation_complete(cls, value: list[str], info: ValidationInfo) -> list[str]:
        if "escalate_after" not in info.data:  # refused already, with its own reason
            return value
        if bool(Delay.parse(info.data["escalate_after"])) != bool(value):
            raise ValueError(
                "set LOOM_OPS_ESCALATE_AFTER and LOOM_OPS_ESCALATE_TO together (when, and to whom)"
            )
        return value

    @property
    def remind_delay(self) -> Delay | None:
        """When a request reminds by default (None: never)."""
        return Delay.parse(self.remind_after)

    @property
    def escalate_delay(self) -> Delay | None:
        """When a request escalates by default (None: never)."""
        return Delay.parse(self.escalate_after)

    @field_validator("failpoint")
    @classmethod
    def _failpoint_parses(cls, value: str | None) -> str | None:
        Failpoints(value)  # the hook's own parser is the one truth
        return value

    @property
    def runbooks_dir(self) -> Path:
        """Where this workspace's runbooks live."""
        return self.workspace / "runbooks"

    @property
    def effects(self) -> Effects:
        """What a process with these settings may act live; a run it starts acts so."""
        return Effects(shell=self.allow_shell, mcp=self.allow_mcp, checks=self.live_checks)

    @property
    def live_switches(self) -> list[str]:
        """The settings that let a run act on the world (empty: every run is a dry run)."""
        switches = (
            ("LOOM_OPS_ALLOW_SHELL=1", self.allow_shell),
            ("LOOM_OPS_ALLOW_MCP=1", self.allow_mcp),
        )
        return [name for name, on in switches if on]

    @property
    def people_path(self) -> Path:
        """The people file in force (it need not exist unless LOOM_OPS_PEOPLE_FILE names it)."""
        return self.people_file or self.workspace / "people.yaml"

    @property
    def allowlist_path(self) -> Path:
        """The shell allowlist in force."""
        return self.shell_allowlist or self.workspace / "ops.shell.allowlist.json"

    @property
    def mcp_config_path(self) -> Path:
        """The MCP config in force."""
        return self.mcp_config or self.workspace / "ops.mcp.json"

    @property
    def memory_path(self) -> Path:
        """The bounded workspace memory file that later runs get as context."""
        return self.workspace / ".loom-ops" / "memory.txt"

    def bearer_token(self) -> str | None:
        """The HTTP API's token, or None when none (or a blank one) is set."""
        value = self.api_token.get_secret_value().strip() if self.api_token else ""
        return value or None

    def alert_chat(self) -> int | None:
        """The chat alert cards go to: TELEGRAM_ALERT_CHAT_ID, else the first group chat
        (a negative id) the bot serves, else None (no card is posted)."""
        if self.alert_chat_id is not None:
            return self.alert_chat_id
        groups = [int(chat) for chat in self.telegram_chats if re.fullmatch(r"-[0-9]{1,20}", chat)]
        return groups[0] if groups else None

    def alert_chat_refusal(self) -> str | None:
        """Why TELEGRAM_ALERT_CHAT_ID cannot be the incident chat (the bot does not serve it:
        its cards would never be sent), or None."""
        if self.alert_chat_id is None or str(self.alert_chat_id) in self.telegram_chats:
            return None
        return (
            f"TELEGRAM_ALERT_CHAT_ID {self.alert_chat_id} is not a chat the bot serves: "
            "add it to TELEGRAM_ALLOWED_CHAT_IDS, or name one of those"
        )

    def audit_secret(self) -> AuditKey | None:
        """The audit key the journal is chained under, or None (unkeyed)."""
        if self.audit_key is None:
            return None
        return AuditKey.of(self.audit_key.get_secret_value().strip())

    def audit_keys(self) -> Keyring:
        """Every audit key a verifier holds: the one in force and the ones it replaced."""
        previous = self.audit_previous_keys.get_secret_value() if self.audit_previous_keys else ""
        return Keyring(self.audit_secret(), tuple(AuditKey.of(k) for k in _split_keys(previous)))

    def secret_values(self) -> list[str]:
        """Values of secret settings as they are used (an audit key stripped, each previous
        key apart), redacted wherever they appear."""
        secrets = [self.api_token, self.openai_api_key, self.telegram_bot_token]
        values = [s.get_secret_value() for s in secrets if s and s.get_secret_value()]
        return values + [key.secret.decode() for key in self.audit_keys().keys]
