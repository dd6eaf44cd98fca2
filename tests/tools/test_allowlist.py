"""The shell allowlist admits whole argvs by rule, never by prefix, and never a lookalike path."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from agent.errors import AllowlistError, CommandDenied
from agent.settings import Settings
from agent.tools.allowlist import ShellAllowlist

RULES: list[dict[str, Any]] = [
    {"argv": ["kubectl", "get", "pods"]},
    {"argv": ["kubectl", "get", "pods", "-n", "*"]},
    {"argv": ["systemctl", "restart", "re:nginx|api-gateway"]},
    {"argv": ["df", "-h", "**"]},
    {"argv": ["echo", "a;b"]},
]


@pytest.fixture
def bindir(tmp_path: Path) -> Path:
    """A directory of fake executables, so tests never depend on what the host has installed."""
    directory = tmp_path / "bin"
    directory.mkdir()
    for name in ("kubectl", "systemctl", "df", "echo"):
        exe = directory / name
        exe.write_text("#!/bin/sh\nexit 0\n")
        exe.chmod(0o755)
    (directory / "notexec").write_text("#!/bin/sh\n")
    return directory


@pytest.fixture
def allowlist(tmp_path: Path, bindir: Path) -> ShellAllowlist:
    """The allowlist loaded from a real file in the workspace."""
    path = Settings(workspace=tmp_path).allowlist_path
    path.write_text(json.dumps({"rules": RULES, "path": [str(bindir)]}))
    return ShellAllowlist.load(path)


def _denied(allowlist: ShellAllowlist, argv: list[str]) -> str:
    with pytest.raises(CommandDenied) as info:
        allowlist.admit(argv)
    return str(info.value)


def test_default_path_is_in_the_workspace(tmp_path: Path) -> None:
    assert Settings(workspace=tmp_path).allowlist_path == tmp_path / "ops.shell.allowlist.json"


def test_literal_rule_admits_the_exact_argv_with_an_absolute_binary(
    allowlist: ShellAllowlist, bindir: Path
) -> None:
    admitted = allowlist.admit(["kubectl", "get", "pods"])
    assert admitted == [str(bindir / "kubectl"), "get", "pods"]
    assert os.path.isabs(admitted[0])


def test_admit_does_not_mutate_the_callers_argv(allowlist: ShellAllowlist) -> None:
    argv = ["kubectl", "get", "pods"]
    allowlist.admit(argv)
    assert argv == ["kubectl", "get", "pods"]


@pytest.mark.parametrize(
    "argv",
    [
        ["kubectl", "delete", "pods"],
        ["kubectl", "get"],
        ["kubectl"],
        ["kubectl", "get", "pods", "--all-namespaces"],
        ["kubectl", "get", "pods", "extra"],
        ["kubectl", "get", "pods;", "rm", "-rf", "/"],
        ["kubectl", "get", "pods; rm -rf /"],
        ["kubectl", "get", "pods", ";", "rm", "-rf", "/"],
        ["kubectl", "get", "pods", "&&", "reboot"],
        ["kubectl", "get", "$(reboot)"],
        ["kubectl", "get", "`reboot`"],
        ["kubectl", "get", "pods", "-n"],
        ["KUBECTL", "get", "pods"],
        ["kubectl ", "get", "pods"],
    ],
)
def test_anything_but_the_whole_rule_is_denied(allowlist: ShellAllowlist, argv: list[str]) -> None:
    message = _denied(allowlist, argv)
    assert "\n" not in message
    assert json.dumps(argv) in message


def test_shell_metacharacters_are_literal_args(bindir: Path) -> None:
    rules = {"rules": [{"argv": ["echo", "a;b", "$(x)", "`y`", "&&"]}], "path": [str(bindir)]}
    allowlist = ShellAllowlist.from_data(rules)
    admitted = allowlist.admit(["echo", "a;b", "$(x)", "`y`", "&&"])
    assert admitted[1:] == ["a;b", "$(x)", "`y`", "&&"]
    _denied(allowlist, ["echo", "a", ";b", "$(x)", "`y`", "&&"])


@pytest.mark.parametrize(
    ("argv", "admitted"),
    [
        (["kubectl", "get", "pods", "-n", "prod"], True),
        (["kubectl", "get", "pods", "-n", "--all-namespaces"], False),
        (["kubectl", "get", "pods", "-n", "-A"], False),
        (["kubectl", "get", "pods", "-n", "--"], False),
        (["kubectl", "get", "pods", "-n", "-"], False),
        (["kubectl", "get", "pods", "-n", ""], False),
        (["kubectl", "get", "pods", "-n", "prod", "extra"], False),
    ],
)
def test_star_is_one_non_option_arg(
    allowlist: ShellAllowlist, argv: list[str], admitted: bool
) -> None:
    if admitted:
        assert allowlist.admit(argv)[1:] == argv[1:]
    else:
        _denied(allowlist, argv)


@pytest.mark.parametrize(
    ("unit", "admitted"),
    [
        ("nginx", True),
        ("api-gateway", True),
        ("nginx2", False),
        ("xnginx", False),
        ("nginx\n", False),
        ("postgres", False),
    ],
)
def test_regex_token_must_fullmatch(allowlist: ShellAllowlist, unit: str, admitted: bool) -> None:
    argv = ["systemctl", "restart", unit]
    if admitted:
        assert allowlist.admit(argv)[1:] == argv[1:]
    else:
        _denied(allowlist, argv)


@pytest.mark.parametrize(
    ("tail", "admitted"),
    [
        ([], True),
        (["/"], True),
        (["/", "/var", "/home"], True),
        (["/", "--total"], False),
        (["-x"], False),
        ([""], False),
    ],
)
def test_double_star_tail(allowlist: ShellAllowlist, tail: list[str], admitted: bool) -> None:
    argv = ["df", "-h", *tail]
    if admitted:
        assert allowlist.admit(argv)[1:] == argv[1:]
    else:
        _denied(allowlist, argv)


def test_double_star_still_requires_the_fixed_prefix(allowlist: ShellAllowlist) -> None:
    _denied(allowlist, ["df"])
    _denied(allowlist, ["df", "-i", "/"])


@pytest.mark.parametrize(
    "binary",
    ["./kubectl", "../bin/kubectl", "/tmp/kubectl", "bin/kubectl", "kubectl/", "/kubectl"],
)
def test_path_lookalikes_of_a_bare_name_rule_are_denied(
    allowlist: ShellAllowlist, binary: str
) -> None:
    _denied(allowlist, [binary, "get", "pods"])


def test_resolved_path_is_not_accepted_for_a_bare_name_rule(
    allowlist: ShellAllowlist, bindir: Path
) -> None:
    # A bare-name rule is matched by the bare name only; the allowlist decides where it lives.
    _denied(allowlist, [str(bindir / "kubectl"), "get", "pods"])


def test_absolute_rule_requires_exactly_that_path(bindir: Path) -> None:
    kubectl = str(bindir / "kubectl")
    allowlist = ShellAllowlist.from_data({"rules": [{"argv": [kubectl, "version"]}]})
    assert allowlist.admit([kubectl, "version"]) == [kubectl, "version"]
    _denied(allowlist, ["kubectl", "version"])
    _denied(allowlist, [str(bindir) + "/./kubectl", "version"])
    _denied(allowlist, [str(bindir) + "//kubectl", "version"])


def test_binary_is_looked_up_only_in_the_allowlist_path(tmp_path: Path, bindir: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    allowlist = ShellAllowlist.from_data(
        {"rules": [{"argv": ["kubectl"]}, {"argv": ["notexec"]}], "path": [str(other)]}
    )
    message = _denied(allowlist, ["kubectl"])
    assert "not an executable in the allowlist path" in message
    # The first directory holding an executable file wins; a non-executable file is skipped.
    (other / "notexec").write_text("#!/bin/sh\n")
    allowlist = ShellAllowlist.from_data(
        {"rules": [{"argv": ["notexec"]}], "path": [str(other), str(bindir)]}
    )
    _denied(allowlist, ["notexec"])
    allowlist = ShellAllowlist.from_data(
        {"rules": [{"argv": ["kubectl"]}], "path": [str(other), str(bindir)]}
    )
    assert allowlist.admit(["kubectl"]) == [str(bindir / "kubectl")]


def test_nul_bytes_and_empty_argv_are_denied(allowlist: ShellAllowlist) -> None:
    assert "empty argv" in _denied(allowlist, [])
    assert "NUL" in _denied(allowlist, ["kubectl", "get", "pods\0"])
    assert "NUL" in _denied(allowlist, ["kubectl\0", "get", "pods"])


def test_missing_file_denies_everything_and_says_the_file_is_missing(tmp_path: Path) -> None:
    allowlist = ShellAllowlist.load(tmp_path / "nope.json")
    assert allowlist.rules == ()
    for argv in (["ls"], ["/bin/ls"]):
        denied = _denied(allowlist, argv)
        assert f"there is no allowlist file at {tmp_path / 'nope.json'}, so no" in denied


def test_default_path_when_the_file_names_none() -> None:
    allowlist = ShellAllowlist.from_data({"rules": [{"argv": ["sh"]}]})
    assert allowlist.path == (
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    )


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("{not json", "invalid JSON at line 1"),
        ("[]", "invalid allowlist"),
        ('{"rules": []', "invalid JSON"),
        ('{"rules": [], "extra": 1}', "extra"),
        ('{"rules": [{"argv": ["ls"], "shell": true}]}', "rules.0.shell"),
        ('{"rules": [{"argv": []}]}', "rules.0.argv"),
        ('{"rules": [{"argv": ["ls", "**", "x"]}]}', "last token"),
        ('{"rules": [{"argv": ["*", "x"]}]}', "must be a literal"),
        ('{"rules": [{"argv": ["re:ls"]}]}', "must be a literal"),
        ('{"rules": [{"argv": ["./ls"]}]}', "bare name or an absolute path"),
        ('{"rules": [{"argv": ["/usr/bin/../bin/ls"]}]}', "normalised"),
        ('{"rules": [{"argv": ["ls", "re:("]}]}', "bad regex"),
        ('{"rules": [{"argv": ["ls", 1]}]}', "rules.0.argv.1"),
        ('{"rules": [], "path": ["bin"]}', "absolute"),
        ("{}", "rules"),
    ],
)
def test_malformed_file_error_names_the_file(tmp_path: Path, content: str, reason: str) -> None:
    path = tmp_path / "ops.shell.allowlist.json"
    path.write_text(content)
    with pytest.raises(AllowlistError) as info:
        ShellAllowlist.load(path)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert message.startswith(f"{path}: ")
    assert reason in message
    assert "\n" not in message


def test_unreadable_file_is_an_error_not_an_empty_allowlist(tmp_path: Path) -> None:
    path = tmp_path / "ops.shell.allowlist.json"
    path.mkdir()
    with pytest.raises(AllowlistError, match="cannot read"):
        ShellAllowlist.load(path)


def test_regex_escape_spells_a_literal_star(bindir: Path) -> None:
    allowlist = ShellAllowlist.from_data(
        {"rules": [{"argv": ["echo", "re:\\*"]}], "path": [str(bindir)]}
    )
    assert allowlist.admit(["echo", "*"])[1:] == ["*"]
    _denied(allowlist, ["echo", "x"])
