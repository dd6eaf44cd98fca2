"""The long-running front ends — `loom-ops serve` (HTTP API), `loom-ops telegram` (the bot),
or both in one process — composed over one RunService, one store and one maintenance loop."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import ValidationError

from agent.maintenance import Maintenance
from agent.service import RunService
from agent.settings import Settings

if TYPE_CHECKING:
    from bot.settings import TelegramSettings

log = logging.getLogger(__name__)


class ServingRefused(ValueError):
    """A configuration the process will not start with; `str()` is one line for a human."""


@dataclass(frozen=True)
class HttpEndpoint:
    """Where the HTTP API listens."""

    host: str
    port: int


@dataclass(frozen=True)
class TelegramConfig:
    """The bot's checked settings."""

    token: str
    settings: TelegramSettings


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


def check_telegram(settings: Settings) -> TelegramConfig:
    """Every TELEGRAM_* setting, checked before any network call."""
    # Imported here: python-telegram-bot is not needed by the other commands.
    from bot.gateway import ConfigError, check_config
    from bot.settings import TelegramSettings, check_token

    try:
        telegram = TelegramSettings()
        check_config(telegram)
        secret = settings.telegram_bot_token
        token = check_token(secret.get_secret_value() if secret else None)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ServingRefused(f"bad setting {first['loc'][0]}: {first['msg']}") from None
    except (ConfigError, ValueError) as exc:
        raise ServingRefused(str(exc)) from None
    return TelegramConfig(token, telegram)


async def serve(
    settings: Settings,
    http: HttpEndpoint | None,
    telegram: TelegramConfig | None,
    stop: asyncio.Event | None = None,
) -> int:
    """Serve until SIGINT/SIGTERM (or `stop`); returns the exit code."""
    _service_logging()
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
    service = await RunService.open(settings)
    try:
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(Maintenance(service, watch_journal=http is not None))
            if http is not None:
                from agent.http_api import create_app
                from agent.http_server import HttpServer

                app = create_app(service)
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
                return await _serve_bot(service, telegram, stop)
    finally:
        await service.close()
    return 0


async def _serve_bot(service: RunService, telegram: TelegramConfig, stop: asyncio.Event) -> int:
    from telegram.error import InvalidToken, TelegramError

    from bot.gateway import serve_bot

    try:
        await serve_bot(service, telegram.token, telegram.settings, stop, maintain=False)
    except InvalidToken:
        raise ServingRefused(
            "the Bot API refused TELEGRAM_BOT_TOKEN (revoked or mistyped?)"
        ) from None
    except TelegramError as exc:
        url = telegram.settings.api_base_url
        print(f"loom-ops: cannot reach the Bot API at {url}: {exc}", file=sys.stderr)
        return 1
    return 0


def _service_logging() -> None:
    """A long-running service: timestamps, INFO, and tracebacks for the operator's logs."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in root.handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Bot API request
