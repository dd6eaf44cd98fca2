"""The long-running front ends — `loom-ops serve` (HTTP API), `loom-ops telegram` (the bot),
or both in one process — composed over one RunService, one store and one maintenance loop."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import sys
from typing import TYPE_CHECKING

from pydantic import ValidationError

from agent.errors import ErrorKind, ServingRefused
from agent.people import load_people
from agent.records import record
from agent.service.maintenance import Maintenance
from agent.service.runs import RunService
from agent.settings import Settings, setting_name

if TYPE_CHECKING:
    from bot.settings import TelegramSettings, Webhook

log = logging.getLogger(__name__)


@record
class HttpEndpoint:
    """Where the HTTP API listens."""

    host: str
    port: int


@record
class WebhookOptions:
    """Webhook flags from the command line (None: take the TELEGRAM_WEBHOOK_* setting)."""

    url: str | None = None
    listen: tuple[str, int] | None = None


@record
class TelegramConfig:
    """The bot's checked settings."""

    token: str
    settings: TelegramSettings
    webhook: Webhook | None = None


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_http(settings: Settings, endpoint: HttpEndpoint) -> None:
    """Refuse to expose the API beyond this machine without a bearer token."""
    if not is_loopback(endpoint.host) and settings.bearer_token() is None:
        raise ServingRefused(
            f"refusing to listen on {endpoint.host} without LOOM_OPS_API_TOKEN: anyone who "
            "can reach it could start runs and decide approvals"
        )


def check_telegram(settings: Settings, options: WebhookOptions | None = None) -> TelegramConfig:
    """Every TELEGRAM_* setting (and webhook flag), checked before any network call."""
    # Imported here, and without python-telegram-bot: a bad setting is refused at once.
    from bot.settings import ConfigError, TelegramSettings, check_config, check_token

    refusal = settings.alert_chat_refusal()
    if refusal is not None:  # its alert cards would wait in the outbox for ever
        raise ServingRefused(refusal)
    try:
        secret = settings.telegram_bot_token  # first: what a new bot is set up with first
        token = check_token(secret.get_secret_value() if secret else None)
        telegram = TelegramSettings()
        check_config(telegram, load_people(settings))
        webhook = _check_webhook(telegram, options or WebhookOptions())
    except ValidationError as exc:
        first = exc.errors()[0]
        name = setting_name(TelegramSettings, str(first["loc"][0])) if first["loc"] else "?"
        raise ServingRefused(f"bad setting {name}: {first['msg']}") from None
    except (ConfigError, ValueError) as exc:  # a bad people file too (a ValueError)
        raise ServingRefused(str(exc)) from None
    return TelegramConfig(token, telegram, webhook)


def _check_webhook(telegram: TelegramSettings, options: WebhookOptions) -> Webhook | None:
    from bot.settings import WEBHOOK_SECRET_PATTERN, Webhook, check_http_url, parse_host_port

    url = check_http_url(options.url) if options.url else telegram.webhook_url
    if not url:
        if options.listen is not None:
            raise ValueError("--listen needs --webhook-url (or TELEGRAM_WEBHOOK_URL)")
        return None
    secret = telegram.webhook_secret.get_secret_value() if telegram.webhook_secret else None
    if not secret:
        raise ValueError(
            "webhook mode needs TELEGRAM_WEBHOOK_SECRET: without it anyone who finds the URL "
            "could post fake updates"
        )
    if not WEBHOOK_SECRET_PATTERN.match(secret):
        raise ValueError("TELEGRAM_WEBHOOK_SECRET must be 1-256 characters of A-Z a-z 0-9 _ -")
    host, port = options.listen or parse_host_port(telegram.webhook_listen)
    return Webhook(url=url, host=host, port=port, secret=secret)


def _stop_on_signals(stop: asyncio.Event | None) -> tuple[asyncio.Event, asyncio.Event]:
    """(stop, hurry): the first SIGINT/SIGTERM sets `stop` (the steps in flight end first),
    a second one `hurry` (they are cut short). A `stop` given is the caller's own."""
    hurry = asyncio.Event()
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            (hurry if stop.is_set() else stop).set()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal)
    return stop, hurry


async def serve_worker(
    settings: Settings, concurrency: int, stop: asyncio.Event | None = None
) -> int:
    """`loom-ops worker` until SIGINT/SIGTERM (or `stop`); returns the exit code."""
    from agent.frontends.worker import run_worker

    _service_logging()
    stop, hurry = _stop_on_signals(stop)
    return await run_worker(settings, concurrency, stop, hurry=hurry)


async def serve(
    settings: Settings,
    http: HttpEndpoint | None,
    telegram: TelegramConfig | None,
    stop: asyncio.Event | None = None,
    executes_runs: bool = True,
) -> int:
    """Serve until SIGINT/SIGTERM (or `stop`); returns the exit code. Without
    `executes_runs` the front ends only record; `loom-ops worker` processes drive runs."""
    _service_logging()
    stop, hurry = _stop_on_signals(stop)
    code = 0
    service = await RunService.open(settings, executes_runs=executes_runs)
    try:
        service.prepare()
        async with contextlib.AsyncExitStack() as stack:
            kind = "+".join(k for k, on in (("serve", http), ("telegram", telegram)) if on)
            await stack.enter_async_context(
                Maintenance(service, kind or "serve", watch_journal=http is not None)
            )
            if http is not None:
                from agent.frontends.http_api import create_app
                from agent.http_server import HttpServer

                app = create_app(service, http.host)
                try:
                    server = await stack.enter_async_context(
                        HttpServer(app, http.host, http.port, before_stop=app.state.shutdown.set)
                    )
                except (OSError, OverflowError) as exc:
                    raise ServingRefused(
                        f"cannot listen on {http.host}:{http.port}: "
                        f"{getattr(exc, 'strerror', None) or exc}"
                    ) from None
                print(f"loom-ops: serving {server.url}", file=sys.stderr, flush=True)
            if telegram is None:
                await stop.wait()
            else:
                code = await _serve_bot(service, telegram, stop)
            await service.drain(settings.drain_seconds, hurry)  # the steps in flight end first
    finally:
        await service.close()
    return code


async def _serve_bot(service: RunService, telegram: TelegramConfig, stop: asyncio.Event) -> int:
    from telegram.error import InvalidToken, TelegramError

    from bot.gateway import serve_bot
    from bot.settings import ConfigError

    try:
        await serve_bot(
            service,
            telegram.token,
            telegram.settings,
            stop,
            maintain=False,
            webhook=telegram.webhook,
        )
    except ConfigError as exc:  # e.g. the webhook's port is taken
        raise ServingRefused(str(exc)) from None
    except InvalidToken:
        raise ServingRefused(
            "the Bot API refused TELEGRAM_BOT_TOKEN (revoked or mistyped?)"
        ) from None
    except TelegramError as exc:  # getMe failed: unreachable, or an answer that is no Bot API's
        url = telegram.settings.api_base_url
        raise ServingRefused(
            f"the Bot API at {url} failed at start-up: {exc}", kind=ErrorKind.UNAVAILABLE
        ) from None
    return 0


def _service_logging() -> None:
    """A long-running service: timestamps, INFO, and tracebacks for the operator's logs."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in root.handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Bot API request
