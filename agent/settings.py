"""Settings: environment variables with the `LOOM_OPS_` prefix, a `.env` file, then CLI flags."""

from __future__ import annotations

import getpass
import re
from pathlib import Path
from typing import Annotated

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from agent.chain import AuditKey, Keyring
from agent.failpoints import Failpoints
from agent.records import IDENTITY_PATTERN, Delay


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
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ValueError(f"cannot read {path}: {reason}") from None
    return lines[0].strip() if lines else ""


def setting_name(model: type[BaseSettings], field: str) -> str:
    """The environment variable a settings field is read from (what an error should name):
    its alias's first choice, else the model's prefix and the field's name."""
    info = model.model_fields.get(field)
    alias = info.validation_alias if info is not None else None
    if isinstance(alias, AliasChoices) and isinstance(alias.choices[0], str):
        return alias.choices[0]
    if isinstance(alias, str):
        return alias
    return f"{model.model_config.get('env_prefix', '')}{field}".upper()


class Settings(BaseSettings):
    """Every knob of loom-ops; `.env.example` documents each one."""

    model_config = SettingsConfigDict(
        env_prefix="LOOM_OPS_",
        env_file=".env",
        extra="ignore",
        validate_default=True,
        populate_by_name=True,
    )

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
    approvers: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Who may decide anywhere; non-empty, it narrows every other list (empty: "
        "the people file and the runbooks say).",
    )
    telegram_approvers: Annotated[list[str], NoDecode] = Field(
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
    escalate_to: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        validate_default=True,  # checked against escalate_after even when left out
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
    redact_patterns: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Extra regexes whose matches are redacted."
    )
    lease_ttl: float = Field(30.0, gt=0, description="Seconds a run's lease lasts without beat.")
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
    public_hosts: Annotated[list[str], NoDecode] = Field(
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
    telegram_chats: Annotated[list[str], NoDecode] = Field(
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
        # A comma-separated env value is friendlier than JSON for a list of names.
        if isinstance(value, str) and not value.lstrip().startswith("["):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

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
