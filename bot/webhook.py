"""The webhook receiver: Telegram POSTs each update to our URL; any number of instances behind
a load balancer can take them.

Only requests carrying the secret token given to `setWebhook` (the
`X-Telegram-Bot-Api-Secret-Token` header) are taken; anything else is refused with 403 before
its body is read. An accepted update is stored in the inbox, and handled from there, as polled
ones are: Telegram gets its 200 only after that commit (a 503 while the store does not answer,
a 500 for anything else, so Telegram delivers the update again). Nothing else (pruning the
inbox, say) happens on a request's way to its 200.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from telegram import Bot, Update

from agent.errors import ErrorKind, kind_of
from bot.inbox import Inbox
from bot.settings import Webhook

log = logging.getLogger(__name__)

SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
# Telegram's updates are small; a message with a long text and entities stays well under this.
MAX_UPDATE_BYTES = 1024 * 1024


def webhook_app(
    inbox: Inbox,
    bot: Bot,
    webhook: Webhook,
    healthy: Callable[[], Awaitable[object]],
) -> Starlette:
    """The receiver: POST `webhook.path` stores an update in the inbox, then answers 200;
    GET /healthz answers while the store does (for the load balancer)."""
    secret = webhook.secret.encode()

    async def receive(request: Request) -> Response:
        given = request.headers.get(SECRET_HEADER, "").encode()
        if not hmac.compare_digest(given, secret):
            log.warning("refused a webhook request from %s: wrong secret token", request.client)
            return JSONResponse({"error": "wrong or missing secret token"}, status_code=403)
        body = await request.body()
        if len(body) > MAX_UPDATE_BYTES:
            return JSONResponse({"error": "update too large"}, status_code=413)
        try:
            data = json.loads(body)
            update = Update.de_json(data, bot) if isinstance(data, dict) else None
        except (ValueError, TypeError, KeyError):
            update = None
        if update is None:
            return JSONResponse({"error": "not a Telegram update"}, status_code=400)
        try:
            await inbox.take([update])
        except Exception as exc:  # not stored: Telegram must send it again
            if kind_of(exc) != ErrorKind.UNAVAILABLE:  # a bug, not the store: keep its traceback
                log.exception("could not take update %s", update.update_id)
                return JSONResponse({"error": "could not take the update"}, status_code=500)
            log.warning("could not store update %s: %s", update.update_id, exc)
            return JSONResponse({"error": f"store unavailable: {exc}"}, status_code=503)
        return JSONResponse({"ok": True})

    async def healthz(request: Request) -> Response:
        try:
            await healthy()
        except Exception as exc:  # the probe says why, in one line
            return JSONResponse({"error": f"store unreachable: {exc}"}, status_code=503)
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[
            Route(webhook.path, receive, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET", "HEAD"]),
        ]
    )
