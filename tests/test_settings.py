"""Settings: where values come from (arguments, the environment, `.env`), the names they are
read under, and pydantic's rules and words without importing pydantic for plain values."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr as PydanticSecretStr
from pydantic import TypeAdapter, ValidationError

from agent.settings import (
    _KINDS,
    _UNSURE,
    SecretStr,
    Settings,
    _plain_value,
    read_env_file,
    setting_name,
)
from bot.settings import TelegramSettings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_settings_in_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each test sets what it reads, from an empty directory (no developer's `.env`)."""
    for name in [n for n in os.environ if n.startswith(("LOOM_OPS_", "TELEGRAM_"))]:
        monkeypatch.delenv(name)
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_MODEL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def test_arguments_win_over_the_environment_which_wins_over_the_env_file(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    Path(".env").write_text("LOOM_OPS_DB=file.sqlite\nLOOM_OPS_MAX_STEPS=9\nLOOM_OPS_PORT=81\n")
    monkeypatch.setenv("LOOM_OPS_DB", "environment.sqlite")
    monkeypatch.setenv("loom_ops_max_steps", "8")  # names match in any case
    settings = Settings(db="argument.sqlite")
    assert (settings.db, settings.max_steps, settings.port) == ("argument.sqlite", 8, 81)
    assert Settings(_env_file=None).port == 8766  # the file left out


def test_an_alias_is_read_first_choice_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOM_OPS_TELEGRAM_BOT_TOKEN", "2:second")
    assert Settings(_env_file=None).telegram_bot_token == SecretStr("2:second")
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", "1:first")
    assert Settings(_env_file=None).telegram_bot_token == SecretStr("1:first")
    assert setting_name(Settings, "telegram_bot_token") == "TELEGRAM_BOT_TOKEN"
    assert setting_name(Settings, "max_steps") == "LOOM_OPS_MAX_STEPS"
    assert setting_name(TelegramSettings, "run_rate") == "TELEGRAM_RUN_RATE"


def test_the_env_file_reads_as_python_dotenv_does(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME_DIR", "/home/x")
    Path(".env").write_text(
        "# a comment\n"
        "export A=1\n"
        "B = spaced value   # and a comment\n"
        "C='single ${HOME_DIR}'\n"
        'D="two\\nlines"\n'
        "E=${HOME_DIR}/x\n"
        "F=${NOT_SET:-fallback}\n"
        "G=\n"
        "H\n"
        "I=a#b\n"
        "not an entry\n"
        'J="multi\nline"\n'
    )
    assert read_env_file(Path(".env")) == {
        "A": "1",
        "B": "spaced value",
        "C": "single /home/x",
        "D": "two\nlines",
        "E": "/home/x/x",
        "F": "fallback",
        "G": "",
        "H": None,
        "I": "a#b",
        "J": "multi\nline",
    }


def test_list_settings_take_commas_or_a_json_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOM_OPS_REDACT_PATTERNS", '["a{1,3}", "b+"]')
    monkeypatch.setenv("LOOM_OPS_APPROVERS", "cli:a, group:oncall")
    monkeypatch.setenv("TELEGRAM_ALLOWED_CHAT_IDS", "-100, 7")
    settings = Settings(_env_file=None)
    assert settings.redact_patterns == ["a{1,3}", "b+"]
    assert settings.approvers == ["cli:a", "group:oncall"]
    assert settings.telegram_chats == ["-100", "7"]
    assert TelegramSettings(_env_file=None).allowed_chat_ids == [-100, 7]


def test_a_refused_setting_is_pydantics_error_in_pydantics_words(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LOOM_OPS_MAX_STEPS", " 0")  # not a plain form: pydantic judges it
    monkeypatch.setenv("LOOM_OPS_ALLOW_SHELL", "maybe")
    monkeypatch.setenv("LOOM_OPS_APPROVERS", "cli:")
    with pytest.raises(ValidationError) as info:
        Settings(_env_file=None, workspace=42)
    assert [(e["loc"], e["msg"]) for e in info.value.errors()] == [
        (("workspace",), "Input is not a valid path for <class 'pathlib.Path'>"),
        (("max_steps",), "Input should be greater than or equal to 1"),
        (
            ("approvers",),
            "Value error, 'cli:' must be an identity like cli:alice or telegram:12345, or a "
            "group like group:oncall",
        ),
        (("allow_shell",), "Input should be a valid boolean, unable to interpret input"),
    ]


PLAIN = [
    "0", "7", "07", "-1", "1.5", "2.50", "1e3", " 7", "1_000", "+5", "", "yes", "On", "FALSE",
    " true", "t", "x", "ops.sqlite", "\u0661", 0, 7, -3, 2**60, 1.5, float("inf"), True, False,
    None, [], ["a"], [1, 2], ["a", 1], ("a",), Path("p"), b"x", SecretStr("s"),
    PydanticSecretStr("s"),
]  # fmt: skip


@pytest.mark.parametrize("kind", _KINDS)
def test_a_plain_value_is_what_pydantic_makes_of_it(kind: str) -> None:
    python: Any = {"Path": Path, "SecretStr": PydanticSecretStr}.get(kind) or eval(kind)
    adapter = TypeAdapter(python)
    for value in PLAIN:
        ours = _plain_value(kind, value)
        if ours is _UNSURE:  # left to pydantic itself
            continue
        given = PydanticSecretStr(value.get_secret_value()) if type(value) is SecretStr else value
        theirs = adapter.validate_python(given)  # ours stands for pydantic's, as it is taken
        if kind == "SecretStr":
            theirs = SecretStr(theirs.get_secret_value())
        assert (type(ours), ours) == (type(theirs), theirs), (kind, value)


def test_plain_settings_are_read_without_importing_pydantic() -> None:
    code = (
        "import sys; from agent.settings import Settings; from bot.settings import "
        "TelegramSettings; Settings(_env_file=None, max_steps='12', approvers='cli:a'); "
        "TelegramSettings(_env_file=None); print('pydantic' in sys.modules)"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "LOOM_OPS_MOCK_LLM": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout == "False\n", done.stderr


def test_a_copy_takes_its_update_as_given_and_a_secret_never_shows() -> None:
    settings = Settings(_env_file=None, api_token="s3cret", max_steps=3)
    copied = settings.model_copy(update={"max_steps": 0})
    assert (copied.max_steps, settings.max_steps, copied.api_token) == (0, 3, settings.api_token)
    assert "s3cret" not in repr(settings) and "s3cret" not in str(settings.api_token)
    assert Settings.model_fields["db"].default == "ops.sqlite"


# -- as a team writes them, and as an adversary does ---------------------------------------------


def _loom_ops(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`loom-ops ARGS` in the current directory, with only `env` set besides the basics."""
    basics = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(Path.cwd())}
    return subprocess.run(
        [sys.executable, "-m", "agent.frontends.cli", *args],
        env={**basics, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def _one_line_refusal(done: subprocess.CompletedProcess[str]) -> str:
    """The single `loom-ops:` line of a refused command (exit 2, no traceback)."""
    described = f"exit {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}"
    assert done.returncode == 2 and "Traceback" not in done.stderr, described
    [line] = done.stderr.splitlines()
    assert line.startswith("loom-ops: "), described
    return line


def test_a_team_env_file_with_crlf_ends_reads_as_the_readme_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PG_PASSWORD", "Zq7%23pw")
    lines = [
        "# our team",
        'export LOOM_OPS_DB="postgresql://loom:${PG_PASSWORD}@db:5432/ops"  # the store',
        "TELEGRAM_BOT_TOKEN=123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw",
        "TELEGRAM_ALLOWED_CHAT_IDS=-1001234567890, -1009876543210",
        "export TELEGRAM_APPROVER_IDS='100000001,100000002'",
        "LOOM_OPS_API_TOKEN='tok-3f9a#8b7c'",
        "LOOM_OPS_APPROVERS=cli:sam, group:approvers   # who may decide",
        'LOOM_OPS_REDACT_PATTERNS=["acct-[0-9]{6,12}", "sk-[A-Za-z0-9]{20,}"]',
        "LOOM_OPS_PUBLIC_HOSTS=ops.example.com,metrics.internal",
        "LOOM_OPS_ESCALATE_AFTER=",
        "OPENAI_API_KEY=",
    ]
    Path(".env").write_bytes("\r\n".join(lines).encode() + b"\r\n")
    settings, telegram = Settings(), TelegramSettings()
    assert settings.db == "postgresql://loom:Zq7%23pw@db:5432/ops"
    assert settings.telegram_bot_token == SecretStr("123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw")
    assert (telegram.allowed_chat_ids, telegram.approver_ids) == (
        [-1001234567890, -1009876543210],
        [100000001, 100000002],
    )
    assert settings.alert_chat() == -1001234567890
    assert settings.bearer_token() == "tok-3f9a#8b7c"
    assert settings.approvers == ["cli:sam", "group:approvers"]
    assert settings.redact_patterns == ["acct-[0-9]{6,12}", "sk-[A-Za-z0-9]{20,}"]
    assert settings.public_hosts == ["ops.example.com", "metrics.internal"]
    assert (settings.escalate_delay, settings.openai_api_key) == (None, None)


def test_an_env_file_with_a_byte_order_mark_still_sets_its_first_line() -> None:
    """Notepad and PowerShell write a BOM; python-dotenv (what pydantic-settings read `.env`
    with) drops it, so the first setting must not vanish silently."""
    Path(".env").write_bytes(b"\xef\xbb\xbfLOOM_OPS_DB=postgresql://db/ops\r\nLOOM_OPS_PORT=81\r\n")
    assert read_env_file(Path(".env")) == {
        "LOOM_OPS_DB": "postgresql://db/ops",
        "LOOM_OPS_PORT": "81",
    }
    assert (Settings().db, Settings().port) == ("postgresql://db/ops", 81)


def test_an_env_file_that_is_not_utf8_is_one_line_naming_it() -> None:
    Path(".env").write_bytes("LOOM_OPS_MAX_STEPS=5\n".encode("utf-16"))  # PowerShell's `>`
    line = _one_line_refusal(_loom_ops("runs", "--db", "runs.sqlite"))
    assert line.startswith("loom-ops: bad settings: cannot read .env: "), line


def test_the_environment_wins_over_the_env_file_whichever_name_either_uses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    Path(".env").write_text("TELEGRAM_BOT_TOKEN=1:file\nLOOM_OPS_PORT=81\n")
    monkeypatch.setenv("loom_ops_telegram_bot_token", "2:environment")
    monkeypatch.setenv("Loom_Ops_Port", "82")
    settings = Settings()
    assert (settings.telegram_bot_token, settings.port) == (SecretStr("2:environment"), 82)


@pytest.mark.parametrize(
    "name",
    ["LOOM_OPS_TELEGRAM_ALERT_CHAT_ID", "loom_ops_max_steps"],
    ids=["second-alias", "lower-case"],
)
def test_a_bad_setting_names_the_variable_as_the_person_wrote_it(name: str) -> None:
    """An error naming TELEGRAM_ALERT_CHAT_ID to someone who set LOOM_OPS_TELEGRAM_ALERT_CHAT_ID
    sends them looking for a variable they never wrote."""
    line = _one_line_refusal(_loom_ops("runs", "--db", "runs.sqlite", env={name: "abc"}))
    assert line.startswith(f"loom-ops: bad setting {name}: "), line


def test_a_nul_in_an_env_file_value_is_one_line_not_a_traceback() -> None:
    """The environment cannot hold a NUL, so only `.env` brings one; doctor must not crash."""
    Path(".env").write_bytes(b"LOOM_OPS_WORKSPACE=ops\x00x\n")
    done = _loom_ops("doctor", "--mock-llm", "--db", "runs.sqlite")
    assert "Traceback" not in done.stderr, done.stderr


def test_a_database_password_never_shows_in_the_settings_repr() -> None:
    settings = Settings(_env_file=None, db="postgresql://loom:hunter2-pw@db.internal:5432/ops")
    assert "hunter2-pw" not in repr(settings)
    assert settings.db.endswith("@db.internal:5432/ops")  # what the store connects with
