"""The Telegram gateway: a python-telegram-bot Application beside the runs.

`serve_bot` starts everything one bot instance runs: the Application (its handlers, fed from
the inbox: updates by long polling while it leads, or by webhook), the outbox sender, the
approval-expiry sweeper, and the recovery of runs a dead process left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from telegram import Update
from telegram.error import TelegramError
from telegram.ext import Application, ApplicationHandlerStop, TypeHandler

from agent.failpoints import Failpoints
from agent.http_server import HttpServer
from agent.service.maintenance import Maintenance, background, stop_all
from agent.service.runs import RunService
from bot.handlers import COMMANDS, ChatOps
from bot.inbox import ALLOWED_UPDATES, Inbox
from bot.outbox import OutboxSender
from bot.ratelimit import ChatRateLimiter
from bot.settings import ConfigError, TelegramSettings, Webhook, check_config
from bot.store import ChatStore
from bot.webhook import webhook_app

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def _opened(application: Application) -> AsyncIterator[None]:
    """The application initialized for the block and shut down after it.

    Initializing calls getMe: a bad token or an unreachable API fails here. An answer
    python-telegram-bot cannot read (a proxy's error page, a URL that answers something else)
    fails as a TelegramError too, so every start-up failure reaches the operator as one line."""
    async with contextlib.AsyncExitStack() as stack:
        try:
            await stack.enter_async_context(application)
        except TelegramError:
            raise
        except Exception as exc:
            raise TelegramError(
                f"unexpected answer to getMe ({type(exc).__name__}: {exc})"
            ) from exc
        yield


def build_application(token: str, telegram: TelegramSettings) -> Application:  # type: ignore[type-arg]
    """The Application: Bot API base URL from the settings, Telegram's flood limits respected
    (a `RetryAfter` is waited out and retried), updates handled concurrently. It has no
    Updater: updates reach it from the inbox, stored before Telegram hears they arrived."""
    base_url = telegram.api_base_url
    file_url = base_url[: -len("/bot")] + "/file/bot" if base_url.endswith("/bot") else base_url
    return (
        Application.builder()
        .token(token)
        .base_url(base_url)
        .base_file_url(file_url)
        .rate_limiter(ChatRateLimiter(telegram.overall_rate, telegram.group_rate, max_retries=3))
        .concurrent_updates(True)
        .updater(None)
        .build()
    )


async def serve_bot(
    service: RunService,
    token: str,
    telegram: TelegramSettings,
    stop: asyncio.Event,
    ready: asyncio.Event | None = None,
    maintain: bool = True,
    webhook: Webhook | None = None,
) -> None:
    """Run the bot until `stop` is set: take updates, handle them, deliver the outbox.

    Updates come by long polling (only while this instance leads: one poller among the
    instances sharing a PostgreSQL store) or, with `webhook`, by Telegram's POSTs to every
    instance; either way each is stored in the inbox before Telegram is told it arrived.
    `maintain` also runs the expiry sweeper and run recovery (off when another front end in
    the process runs them). Raises telegram.error.TelegramError when the Bot API refuses
    the token or cannot be reached at start."""
    check_config(telegram, service.people())
    application = build_application(token, telegram)
    chat = ChatStore(service.database)
    # First of all (its own group: within one, only the first matching handler runs).
    application.add_handler(TypeHandler(Update, _ignore_without_sender), group=-3)
    ChatOps(service, chat, telegram).register(application)
    inbox = Inbox(
        application, chat, service.new_owner_id(), service.settings.lease_ttl, service.owner_gone
    )
    failpoints = Failpoints(service.settings.failpoint)
    sender = OutboxSender(
        service,
        chat,
        application.bot,
        telegram.progress_interval,
        failpoints,
        allowed_chat_ids=telegram.allowed_chat_ids,
        lease_ttl=service.settings.lease_ttl,
    )
    async with _opened(application):
        try:
            await application.bot.set_my_commands(COMMANDS)
        except TelegramError as exc:  # only the chat's command menu: every command still works
            log.warning("could not set the bot's command menu (setMyCommands): %s", exc)
        await application.start()
        # Every instance sweeps: a poller's standby too takes what a dead poller left.
        tasks = [background(sender.run, "outbox"), background(inbox.sweep, "inbox")]
        try:
            async with contextlib.AsyncExitStack() as stack:
                if webhook is None:
                    tasks.append(
                        background(
                            lambda: _poll_while_leading(application, chat, inbox, telegram),
                            "polling",
                        )
                    )
                else:
                    await _take_webhook(application, chat, inbox, webhook, stack)
                log.info(
                    "bot @%s serving chats %s", application.bot.username, telegram.allowed_chat_ids
                )
                if maintain:
                    await stack.enter_async_context(Maintenance(service, "telegram"))
                if ready is not None:
                    ready.set()
                await stop.wait()
        finally:
            await stop_all(tasks)
            await inbox.close()
            await application.stop()


async def _poll_while_leading(
    application: Application,  # type: ignore[type-arg]
    chat: ChatStore,
    inbox: Inbox,
    telegram: TelegramSettings,
) -> None:
    """Poll while this instance leads (the updates the last poller left pending first);
    stand by (and take over within seconds) otherwise."""
    leadership = chat.leadership(f"telegram-poller/{application.bot.id}")
    try:
        while True:
            await leadership.acquire()
            log.info("leading: polling Telegram for updates")
            polling = asyncio.create_task(inbox.poll(telegram.poll_timeout), name="polling")
            lost = asyncio.create_task(leadership.lost(), name="leadership")
            try:
                done, _ = await asyncio.wait([polling, lost], return_when=asyncio.FIRST_COMPLETED)
                if polling in done:
                    polling.result()  # polling ends only by raising (e.g. a revoked token)
            finally:
                for task in (polling, lost):
                    task.cancel()
                await asyncio.gather(polling, lost, return_exceptions=True)
    finally:
        await leadership.release()


async def _take_webhook(
    application: Application,  # type: ignore[type-arg]
    chat: ChatStore,
    inbox: Inbox,
    webhook: Webhook,
    stack: contextlib.AsyncExitStack,
) -> None:
    """Listen for Telegram's POSTs, then point Telegram at us (every instance says the same)."""
    app = webhook_app(inbox, application.bot, webhook, chat.schema_version)
    try:
        server = await stack.enter_async_context(HttpServer(app, webhook.host, webhook.port))
    except (OSError, OverflowError) as exc:
        raise ConfigError(
            f"cannot listen on {webhook.host}:{webhook.port}: "
            f"{getattr(exc, 'strerror', None) or exc}"
        ) from None
    await application.bot.set_webhook(
        webhook.url,
        secret_token=webhook.secret,
        allowed_updates=ALLOWED_UPDATES,
        drop_pending_updates=False,
    )
    log.info("taking updates by webhook at %s (listening on %s)", webhook.url, server.url)


async def _ignore_without_sender(update: Update, context: Any) -> None:
    """A handler run before all others: an update with no sender (a channel post, a message
    an anonymous channel sent) has nobody to authorize or answer: one log line, no handler."""
    if update.effective_user is None:
        kind = next((key for key in update.to_dict() if key != "update_id"), "unknown")
        log.info("ignored update %s (%s): it has no sender", update.update_id, kind)
        raise ApplicationHandlerStop
