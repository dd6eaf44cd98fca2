"""The shell allowlist: which exact argv a runbook step may execute.

The allowlist is a JSON file (by default `<workspace>/ops.shell.allowlist.json`):

    {"rules": [{"argv": ["kubectl", "get", "pods", "-n", "*"]},
               {"argv": ["systemctl", "restart", "re:nginx|api-gateway"]},
               {"argv": ["df", "-h", "**"]}],
     "path": ["/usr/local/bin", "/usr/bin", "/bin"]}

A rule matches an argv position by position over the WHOLE argv (never as a prefix), so
`["kubectl", "get", "pods"]` admits neither `kubectl delete` nor `kubectl get pods -A`.
Tokens of a rule:

- a literal: the argument must equal it exactly;
- `*`: exactly one argument that is not empty and does not start with `-` (so an option, or
  `--`, cannot be smuggled into a wildcard slot);
- `re:<regex>`: the argument must `re.fullmatch` the regex. The regex is the rule author's
  responsibility: `re:.*` admits options too. It is also the escape for a literal that would
  otherwise read as a token: `re:\\*` is the literal `*`, `re:re:x` the literal `re:x`;
- `**`: only as the last token; zero or more remaining arguments, each of which, like `*`, is
  not empty and does not start with `-`.

The first token is the binary and must be a literal: a bare name, looked up in the allowlist's
`path` directories (first executable file wins), or a normalised absolute path. A runbook's
argv[0] must be exactly that bare name or exactly that absolute path; `./kubectl`,
`../bin/kubectl` or `/tmp/kubectl` never match a bare-name rule. Nothing is ever run through a
shell, so `;`, `&&`, `$(...)` and backticks inside an argument are ordinary characters that a
rule must spell out literally to admit.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent.errors import AllowlistError, CommandDenied
from agent.records import record

DEFAULT_PATH: tuple[str, ...] = (
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
)

_ONE = "*"
_REST = "**"
_REGEX_PREFIX = "re:"
# Denial messages quote the argv; cap it so a huge argv cannot flood a log line or a chat.
_MAX_QUOTED = 300


# --- the file schema -------------------------------------------------------------------------


class RuleSpec(BaseModel):
    """One rule as written in the file: the argv pattern."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    argv: list[str] = Field(min_length=1)

    @field_validator("argv")
    @classmethod
    def _check_tokens(cls, argv: list[str]) -> list[str]:
        binary = argv[0]
        if binary in (_ONE, _REST) or binary.startswith(_REGEX_PREFIX):
            raise ValueError("the first token (the binary) must be a literal")
        _check_binary(binary)
        for index, token in enumerate(argv):
            if "\0" in token:
                raise ValueError(f"token {index} contains a NUL byte")
            if token == _REST and index != len(argv) - 1:
                raise ValueError("'**' is only allowed as the last token")
            if token.startswith(_REGEX_PREFIX):
                try:
                    re.compile(token[len(_REGEX_PREFIX) :])
                except re.error as exc:
                    raise ValueError(f"token {index} {token!r}: bad regex: {exc}") from None
        return argv


class AllowlistSpec(BaseModel):
    """The whole allowlist file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rules: list[RuleSpec]
    path: list[str] = Field(default_factory=lambda: list(DEFAULT_PATH))

    @field_validator("path")
    @classmethod
    def _check_path(cls, path: list[str]) -> list[str]:
        for directory in path:
            # A relative directory would resolve against whatever the cwd happens to be.
            if "\0" in directory or not os.path.isabs(directory):
                raise ValueError(f"path entries must be absolute directories: {directory!r}")
        return path


def _check_binary(binary: str) -> None:
    if not binary or "\0" in binary:
        raise ValueError("the binary must be a non-empty name without NUL bytes")
    if os.path.isabs(binary):
        # Only normalised paths, so "exactly the rule's path" has one spelling.
        if os.path.normpath(binary) != binary or binary.endswith("/"):
            raise ValueError(f"absolute binary path must be normalised: {binary!r}")
    elif "/" in binary or binary in (".", ".."):
        raise ValueError(f"the binary must be a bare name or an absolute path: {binary!r}")


# --- compiled rules --------------------------------------------------------------------------


@record
class _Token:
    kind: Literal["literal", "one", "regex"]
    text: str
    regex: re.Pattern[str] | None = None

    def matches(self, arg: str) -> bool:
        if self.kind == "literal":
            return arg == self.text
        if self.kind == "one":
            return _is_plain_word(arg)
        assert self.regex is not None
        return self.regex.fullmatch(arg) is not None


def _is_plain_word(arg: str) -> bool:
    """What `*` and `**` accept: a non-empty argument that cannot be read as an option."""
    return bool(arg) and not arg.startswith("-")


def _compile_token(token: str) -> _Token:
    if token == _ONE:
        return _Token("one", token)
    if token.startswith(_REGEX_PREFIX):
        return _Token("regex", token, re.compile(token[len(_REGEX_PREFIX) :]))
    return _Token("literal", token)


@record
class Rule:
    """A compiled rule: the binary, the argument tokens, and whether a `**` tail follows."""

    argv: tuple[str, ...]
    binary: str
    args: tuple[_Token, ...]
    rest: bool

    @classmethod
    def compile(cls, spec: RuleSpec) -> Rule:
        """Compile a validated rule spec."""
        tokens = spec.argv[1:]
        rest = bool(tokens) and tokens[-1] == _REST
        if rest:
            tokens = tokens[:-1]
        return cls(
            argv=tuple(spec.argv),
            binary=spec.argv[0],
            args=tuple(_compile_token(t) for t in tokens),
            rest=rest,
        )

    def matches(self, argv: Sequence[str]) -> bool:
        """True if argv (argv[0] as given by the runbook) matches this rule entirely."""
        if argv[0] != self.binary:
            return False
        args = argv[1:]
        fixed = len(self.args)
        if len(args) < fixed or (not self.rest and len(args) != fixed):
            return False
        if not all(token.matches(arg) for token, arg in zip(self.args, args, strict=False)):
            return False
        return all(_is_plain_word(arg) for arg in args[fixed:])


# --- the allowlist ---------------------------------------------------------------------------


@record
class ShellAllowlist:
    """The rules a shell step's argv must match, and where bare binary names are looked up."""

    rules: tuple[Rule, ...] = ()
    path: tuple[str, ...] = DEFAULT_PATH
    source: str = "<empty>"
    found: bool = True  # False: loaded from a file that does not exist (it denies everything)

    @classmethod
    def load(cls, path: Path) -> ShellAllowlist:
        """Read the allowlist file; a missing file gives an allowlist that denies everything."""
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls(source=f"{path} (missing)", found=False)
        except (OSError, UnicodeDecodeError) as exc:
            raise AllowlistError(f"{path}: cannot read allowlist: {exc}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise AllowlistError(
                f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
            ) from None
        return cls.from_data(data, source=str(path))

    @classmethod
    def from_data(cls, data: object, *, source: str = "<memory>") -> ShellAllowlist:
        """Build an allowlist from already-parsed JSON data (raises AllowlistError)."""
        try:
            spec = AllowlistSpec.model_validate(data)
        except ValidationError as exc:
            raise AllowlistError(f"{source}: invalid allowlist: {_one_line(exc)}") from None
        return cls(
            rules=tuple(Rule.compile(r) for r in spec.rules),
            path=tuple(spec.path),
            source=source,
        )

    def admit(self, argv: list[str]) -> list[str]:
        """Return argv with argv[0] replaced by the binary's absolute path.

        Raises CommandDenied if no rule matches the whole argv or the binary cannot be found.
        """
        if not argv:
            raise CommandDenied("command denied: empty argv")
        for index, arg in enumerate(argv):
            if not isinstance(arg, str):
                raise CommandDenied(f"command denied: argument {index} is not a string")
            if "\0" in arg:
                raise CommandDenied(
                    f"command denied: argument {index} contains a NUL byte: {_quote(argv)}"
                )
        rule = self.rule_for(argv)
        if rule is not None:
            return [self._resolve(rule.binary, argv), *argv[1:]]
        if not self.found:  # say so: "no rule matches" would send people to edit its rules
            raise CommandDenied(
                f"command denied: there is no allowlist file at "
                f"{self.source.removesuffix(' (missing)')}, so no command runs live: "
                f"{_quote(argv)}"
            )
        raise CommandDenied(f"command denied: no allowlist rule matches {_quote(argv)}")

    def rule_for(self, argv: Sequence[str]) -> Rule | None:
        """The first rule that admits the whole argv, or None (the binary is not looked up)."""
        if not argv:
            return None
        return next((rule for rule in self.rules if rule.matches(argv)), None)

    def which(self, binary: str) -> str | None:
        """Where `binary` is found: itself when absolute, else the first executable file of
        that name in the allowlist's `path`; None when there is none."""
        if os.path.isabs(binary):
            return binary if os.path.isfile(binary) and os.access(binary, os.X_OK) else None
        for directory in self.path:
            candidate = os.path.join(directory, binary)
            if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
                return candidate
        return None

    def _resolve(self, binary: str, argv: Sequence[str]) -> str:
        if os.path.isabs(binary):
            # The rule names the exact file; whether it exists is for the exec to report.
            return binary
        found = self.which(binary)
        if found is not None:
            return found
        raise CommandDenied(
            f"command denied: {binary!r} is not an executable in the allowlist path "
            f"({os.pathsep.join(self.path)}): {_quote(argv)}"
        )


def _quote(argv: Sequence[str]) -> str:
    # JSON keeps it on one line whatever the arguments contain (newlines, quotes, unicode).
    text = json.dumps(list(argv), ensure_ascii=False)
    return text if len(text) <= _MAX_QUOTED else text[: _MAX_QUOTED - 1] + "…"


def _one_line(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "<root>"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


def read_allowlist(path: Path) -> tuple[ShellAllowlist | None, str | None]:
    """The allowlist at `path` (None when it cannot be read) and what is wrong with it (None:
    nothing), in the words doctor and `runbooks validate` both use."""
    try:
        allowlist = ShellAllowlist.load(path)
    except AllowlistError as exc:
        return None, f"{exc}; fix the file"
    if not allowlist.found:
        return allowlist, (
            f"no allowlist at {path}: every live command would be refused "
            "(create it, or set LOOM_OPS_SHELL_ALLOWLIST)"
        )
    return allowlist, None
