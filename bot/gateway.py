"""The Telegram gateway: a python-telegram-bot Application beside the runs.

`serve_bot` starts everything one bot instance runs: the Application (handlers; updates by long
polling while it leads, or by webhook), the outbox sender, the approval-expiry sweeper, and the
recovery of runs a dead process left.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from telegram import Update
from telegram.error import TelegramError
from telegram.ext import Application, ApplicationHandlerStop, TypeHandler

from agent.errors import LoomOpsError
from agent.failpoints import Failpoints
from agent.http_server import HttpServer
from agent.service.maintenance import Maintenance, background, stop_all
from agent.service.runs import RunService
from bot.handlers import COMMANDS, ChatOps
from bot.outbox import OutboxSender
from bot.ratelimit import ChatRateLimiter
from bot.settings import TelegramSettings
from bot.store import ChatStore
from bot.webhook import Webhook, webhook_app

log = logging.getLogger(__name__)

# Update types the handlers use; Telegram drops the others before they reach us.
ALLOWED_UPDATES = [Update.MESSAGE, Update.CALLBACK_QUERY]


class ConfigError(LoomOpsError, ValueError):
    """A setting the bot cannot start with; `str()` is one line for a human."""


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
    webhook: Webhook | None = None,
) -> None:
    """Run the bot until `stop` is set: take updates, handle them, deliver the outbox.

    Updates come by long polling (only while this instance leads: one poller among the
    instances sharing a PostgreSQL store) or, with `webhook`, by Telegram's POSTs to every
    instance. `maintain` also runs the expiry sweeper and run recovery (off when another front
    end in the process runs them). Raises telegram.error.TelegramError when the Bot API refuses
    the token or cannot be reached at start."""
    check_config(telegram)
    application = build_application(token, telegram)
    chat = ChatStore(service.database)
    # First of all (its own group: within one, only the first matching handler runs).
    application.add_handler(TypeHandler(Update, _ignore_without_sender), group=-3)
    application.add_handler(TypeHandler(Update, _first_time_only(chat)), group=-1)
    ChatOps(service, chat, telegram).register(application)
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
        tasks = [background(sender.run, "outbox")]
        try:
            async with contextlib.AsyncExitStack() as stack:
                if webhook is None:
                    tasks.append(
                        background(
                            lambda: _poll_while_leading(application, chat, telegram), "polling"
                        )
                    )
                else:
                    await _take_webhook(application, chat, webhook, stack)
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
            await application.stop()


async def _poll_while_leading(
    application: Application,  # type: ignore[type-arg]
    chat: ChatStore,
    telegram: TelegramSettings,
) -> None:
    """Poll while this instance leads; stand by (and take over within seconds) otherwise."""
    updater = application.updater
    assert updater is not None
    leadership = chat.leadership(f"telegram-poller/{application.bot.id}")
    try:
        while True:
            await leadership.acquire()
            log.info("leading: polling Telegram for updates")
            # Taps made while the bot was down are still decisions: never drop pending updates.
            await updater.start_polling(
                timeout=telegram.poll_timeout,
                allowed_updates=ALLOWED_UPDATES,
                drop_pending_updates=False,
                bootstrap_retries=3,
            )
            try:
                await leadership.lost()
            finally:
                if updater.running:
                    await updater.stop()
    finally:
        await leadership.release()


async def _take_webhook(
    application: Application,  # type: ignore[type-arg]
    chat: ChatStore,
    webhook: Webhook,
    stack: contextlib.AsyncExitStack,
) -> None:
    """Listen for Telegram's POSTs, then point Telegram at us (every instance says the same)."""
    app = webhook_app(application, webhook, chat.schema_version)
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


def _first_time_only(chat: ChatStore) -> Callable[[Update, Any], Awaitable[None]]:
    """A handler run before all others: a message seen before (by any instance) goes no
    further, so a failover or Telegram's redelivery never starts a run twice. Taps are let
    through: a decision is recorded once whatever happens, and a tap must be answered fast."""

    async def check(update: Update, context: Any) -> None:
        if update.callback_query is not None:
            return
        taken = context.bot.id, update.update_id, update_digest(update)
        if not await chat.first_sight_of_update(*taken):
            log.info("update %s was taken already; skipping it", update.update_id)
            raise ApplicationHandlerStop

    return check


def update_digest(update: Update) -> str:
    """A digest of an update's content without its id: a redelivery has the same one, while
    an id reused by a Bot API that restarted its numbering comes with other content (another
    message, another date)."""
    content = update.to_dict()
    content.pop("update_id", None)
    encoded = json.dumps(content, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(encoded.encode("utf-8")).hexdigest()[:32]
