"""Settings of the Telegram gateway: `TELEGRAM_*` variables (and `.env`), checked before any
network call. The bot token itself lives in the shared settings so every front end redacts it."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from agent.errors import LoomOpsError
from agent.people import People
from agent.records import record
from agent.settings import AliasChoices, EnvSettings, Field, SecretStr, field_validator

TELEGRAM_BOT_API = "https://api.telegram.org/bot"
# What @BotFather hands out: the bot's numeric id, a colon, then the secret part.
TOKEN_PATTERN = re.compile(r"^[0-9]{1,20}:[A-Za-z0-9_-]{20,}$")


def _alias(name: str) -> AliasChoices:
    return AliasChoices(name, f"LOOM_OPS_{name}")


class TelegramSettings(EnvSettings):
    """Which chats the bot serves, who may decide approvals, and how it talks to the Bot API."""

    allowed_chat_ids: list[int] = Field(
        default_factory=list,
        validation_alias=_alias("TELEGRAM_ALLOWED_CHAT_IDS"),
        description="Comma-separated chat ids the bot serves; every other chat is refused.",
    )
    approver_ids: list[int] = Field(
        default_factory=list,
        validation_alias=_alias("TELEGRAM_APPROVER_IDS"),
        description="Comma-separated Telegram user ids who may decide approvals.",
    )
    api_base_url: str = Field(
        TELEGRAM_BOT_API,
        validation_alias=_alias("TELEGRAM_API_BASE_URL"),
        description="Bot API base URL; the token and method are appended to it.",
    )
    group_rate: float = Field(
        20.0,
        ge=0,
        validation_alias=_alias("TELEGRAM_GROUP_RATE"),
        description="Messages per minute per group chat (Telegram's flood limit; 0: no limit).",
    )
    overall_rate: float = Field(
        30.0,
        ge=0,
        validation_alias=_alias("TELEGRAM_OVERALL_RATE"),
        description="Messages per second over all chats (Telegram's flood limit; 0: no limit).",
    )
    progress_interval: float = Field(
        2.0,
        ge=0,
        validation_alias=_alias("TELEGRAM_PROGRESS_INTERVAL"),
        description="Seconds between two edits of one run's progress message.",
    )
    run_rate: int = Field(
        5,
        ge=0,
        validation_alias=_alias("TELEGRAM_RUN_RATE"),
        description="/run messages one Telegram user may send per TELEGRAM_RUN_RATE_WINDOW "
        "(then one short refusal, and silence until the window frees a slot; 0: no limit).",
    )
    run_rate_window: float = Field(
        300.0,
        gt=0,
        le=7 * 86400,
        validation_alias=_alias("TELEGRAM_RUN_RATE_WINDOW"),
        description="Seconds (at most a week) over which TELEGRAM_RUN_RATE counts a user's "
        "/run messages.",
    )
    poll_timeout: int = Field(
        30,
        ge=1,
        le=50,
        validation_alias=_alias("TELEGRAM_POLL_TIMEOUT"),
        description="Seconds one getUpdates long poll waits for an update.",
    )

    webhook_url: str | None = Field(
        None,
        validation_alias=_alias("TELEGRAM_WEBHOOK_URL"),
        description="Public https URL Telegram POSTs updates to (webhook mode; unset: polling).",
    )
    webhook_listen: str = Field(
        "127.0.0.1:8443",
        validation_alias=_alias("TELEGRAM_WEBHOOK_LISTEN"),
        description="HOST:PORT the webhook receiver binds (behind the TLS-terminating proxy).",
    )
    webhook_secret: SecretStr | None = Field(
        None,
        validation_alias=_alias("TELEGRAM_WEBHOOK_SECRET"),
        description="Secret token Telegram sends with each update (1-256 of A-Z a-z 0-9 _ -).",
    )

    @field_validator("webhook_secret", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("allowed_chat_ids", "approver_ids", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            items = [item.strip() for item in value.split(",") if item.strip()]
            for item in items:
                if not re.fullmatch(r"-?[0-9]{1,20}", item):
                    raise ValueError(f"{item!r} is not a numeric Telegram id")
            return [int(item) for item in items]
        return value

    @field_validator("api_base_url", "webhook_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        return None if value is None else check_http_url(value)

    @field_validator("api_base_url")
    @classmethod
    def _ends_with_bot(cls, value: str) -> str:
        # The token is appended to it: without `/bot` it would run into the host or port
        # (and into an error message with it).
        if not value.endswith("/bot"):
            raise ValueError(
                f"{value!r} must end with /bot, e.g. http://127.0.0.1:8081/bot "
                "(the token and method are appended to it)"
            )
        return value

    @field_validator("webhook_listen")
    @classmethod
    def _host_and_port(cls, value: str) -> str:
        parse_host_port(value)
        return value


def check_http_url(value: str) -> str:
    """`value` if it is an http(s) URL, else ValueError saying so."""
    if not re.match(r"^https?://[^\s/]+", value):
        raise ValueError(f"{value!r} is not an http(s) URL")
    return value


def parse_host_port(value: str) -> tuple[str, int]:
    """`HOST:PORT` (`[::1]:8443` too) as (host, port), or ValueError saying what to write."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r}: write HOST:PORT, e.g. 0.0.0.0:8443")
    return host.strip("[]"), int(port)


WEBHOOK_SECRET_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,256}$")


def check_token(token: str | None) -> str:
    """The bot token, or ValueError with one line saying what is wrong with it."""
    if not token:
        raise ValueError("TELEGRAM_BOT_TOKEN is not set (get one from @BotFather)")
    if not TOKEN_PATTERN.match(token):
        raise ValueError("TELEGRAM_BOT_TOKEN is malformed: expected <bot id>:<secret>")
    return token


class ConfigError(LoomOpsError, ValueError):
    """A setting the bot cannot start with; `str()` is one line for a human."""


def check_config(telegram: TelegramSettings, people: People) -> None:
    """Raise ConfigError for a configuration that would serve nobody or let nobody decide:
    deciders come from TELEGRAM_APPROVER_IDS or from the people file's Telegram ids."""
    if not telegram.allowed_chat_ids:
        raise ConfigError("TELEGRAM_ALLOWED_CHAT_IDS is not set: name the chats the bot serves")
    if not telegram.approver_ids and not people.on("telegram"):
        raise ConfigError(
            "nobody may decide in chat: set TELEGRAM_APPROVER_IDS, or give people in the "
            "people file their Telegram user id"
        )


@record
class Webhook:
    """Where Telegram sends updates, where we listen for them, and the shared secret."""

    url: str
    host: str
    port: int
    secret: str

    @property
    def path(self) -> str:
        """The URL's path, which the receiver serves (behind a proxy that keeps it)."""
        return urlsplit(self.url).path or "/"
