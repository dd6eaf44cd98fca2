"""The Telegram gateway: a python-telegram-bot Application with long polling, beside the runs.

`serve_bot` starts everything one bot process runs: the Application (polling, handlers), the
outbox sender, the approval-expiry sweeper, and the recovery of runs a dead process left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from telegram import Update
from telegram.ext import Application

from agent.failpoints import Failpoints
from agent.maintenance import Maintenance, background, stop_all
from agent.service import RunService
from bot.handlers import COMMANDS, ChatOps
from bot.outbox import OutboxSender
from bot.ratelimit import ChatRateLimiter
from bot.settings import TelegramSettings

log = logging.getLogger(__name__)

# Update types the handlers use; Telegram drops the others before they reach us.
ALLOWED_UPDATES = [Update.MESSAGE, Update.CALLBACK_QUERY]


class ConfigError(ValueError):
    """A setting the bot cannot start with; `str()` is one line for a human."""


def check_config(telegram: TelegramSettings) -> None:
    """Raise ConfigError for a configuration that would serve nobody or let anybody decide."""
    if not telegram.allowed_chat_ids:
        raise ConfigError("TELEGRAM_ALLOWED_CHAT_IDS is not set: name the chats the bot serves")
    if not telegram.approver_ids:
        raise ConfigError(
            "TELEGRAM_APPROVER_IDS is not set: name the Telegram user ids who may decide"
        )


def build_application(token: str, telegram: TelegramSettings) -> Application:  # type: ignore[type-arg]
    """The Application: Bot API base URL from the settings, Telegram's flood limits respected
    (a `RetryAfter` is waited out and retried), updates handled concurrently."""
    base_url = telegram.api_base_url
    file_url = base_url[: -len("/bot")] + "/file/bot" if base_url.endswith("/bot") else base_url
    return (
        Application.builder()
        .token(token)
        .base_url(base_url)
        .base_file_url(file_url)
        .rate_limiter(ChatRateLimiter(telegram.overall_rate, telegram.group_rate, max_retries=3))
        .concurrent_updates(True)
        .build()
    )


async def serve_bot(
    service: RunService,
    token: str,
    telegram: TelegramSettings,
    stop: asyncio.Event,
    ready: asyncio.Event | None = None,
    maintain: bool = True,
) -> None:
    """Run the bot until `stop` is set: poll, handle, deliver the outbox.

    `maintain` also runs the expiry sweeper and run recovery (off when another front end in
    the process runs them). Raises telegram.error.TelegramError when the Bot API refuses the
    token or cannot be reached at start."""
    check_config(telegram)
    application = build_application(token, telegram)
    ChatOps(service, telegram).register(application)
    failpoints = Failpoints(service.settings.failpoint)
    sender = OutboxSender(
        service.store,
        application.bot,
        telegram.progress_interval,
        failpoints,
        allowed_chat_ids=telegram.allowed_chat_ids,
    )
    async with application:  # getMe: a bad token or an unreachable API fails here
        await application.bot.set_my_commands(COMMANDS)
        await application.start()
        assert application.updater is not None
        # Taps made while the bot was down are still decisions: never drop pending updates.
        await application.updater.start_polling(
            timeout=telegram.poll_timeout,
            allowed_updates=ALLOWED_UPDATES,
            drop_pending_updates=False,
            bootstrap_retries=3,  # then fail loudly: a supervisor restarts us
        )
        outbox = background(sender.run, "outbox")
        log.info("bot @%s serving chats %s", application.bot.username, telegram.allowed_chat_ids)
        try:
            async with contextlib.AsyncExitStack() as stack:
                if maintain:
                    await stack.enter_async_context(Maintenance(service))
                if ready is not None:
                    ready.set()
                await stop.wait()
        finally:
            await stop_all([outbox])
            await application.updater.stop()
            await application.stop()
