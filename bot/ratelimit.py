"""ChatRateLimiter: Telegram's flood limits, where a RetryAfter pauses only its own chat.

python-telegram-bot's AIORateLimiter pauses *every* request when one RetryAfter arrives, so a
group that hit its flood limit would hold up every approver's button in every other chat. This
limiter keeps the same limits (aiolimiter, as AIORateLimiter does: messages per second overall,
per minute per group) and waits a RetryAfter out for the chat it came for only.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dtm
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from aiolimiter import AsyncLimiter
from telegram.error import RetryAfter
from telegram.ext import BaseRateLimiter

log = logging.getLogger(__name__)

JSONResult = bool | dict[str, Any] | list[dict[str, Any]]
# Limiters of groups not heard from in a while are dropped beyond this many.
MAX_GROUP_LIMITERS = 512


class ChatRateLimiter(BaseRateLimiter[int]):
    """Overall and per-group rate limits; a RetryAfter pauses its chat, then is retried."""

    def __init__(
        self, overall_max_rate: float, group_max_rate: float, max_retries: int = 3
    ) -> None:
        self._overall = AsyncLimiter(overall_max_rate, 1) if overall_max_rate else None
        self._group_max_rate = group_max_rate
        self._groups: dict[int | str, AsyncLimiter] = {}
        self._paused_until: dict[object, float] = {}
        self._max_retries = max_retries

    async def initialize(self) -> None:
        """Nothing to set up."""

    async def shutdown(self) -> None:
        """Nothing to tear down."""

    async def process_request(
        self,
        callback: Callable[..., Coroutine[Any, Any, JSONResult]],
        args: Any,
        kwargs: dict[str, Any],
        endpoint: str,
        data: dict[str, Any],
        rate_limit_args: int | None,
    ) -> JSONResult:
        """Send one request within the limits; wait out a RetryAfter for its chat and retry."""
        chat_id = data.get("chat_id")
        retries = self._max_retries if rate_limit_args is None else rate_limit_args
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            pause = self._paused_until.get(chat_id, 0.0) - loop.time()
            if pause > 0:
                await asyncio.sleep(pause)
            try:
                async with contextlib.AsyncExitStack() as limits:
                    for limiter in self._limiters(chat_id):
                        await limits.enter_async_context(limiter)
                    return await callback(*args, **kwargs)
            except RetryAfter as exc:
                if attempt >= retries:
                    raise
                attempt += 1
                delay = _seconds(exc.retry_after)
                self._paused_until[chat_id] = max(
                    self._paused_until.get(chat_id, 0.0), loop.time() + delay
                )
                log.warning(
                    "flood limit on %s for chat %s: waiting %.1f s (retry %d of %d)",
                    endpoint,
                    chat_id,
                    delay,
                    attempt,
                    retries,
                )

    def _limiters(self, chat_id: object) -> list[AsyncLimiter]:
        limiters = []
        if chat_id is not None and self._overall is not None:
            limiters.append(self._overall)
        group = _group_key(chat_id)
        if group is not None and self._group_max_rate:
            limiter = self._groups.get(group)
            if limiter is None:
                if len(self._groups) >= MAX_GROUP_LIMITERS:
                    self._groups = {k: v for k, v in self._groups.items() if not v.has_capacity()}
                limiter = self._groups[group] = AsyncLimiter(self._group_max_rate, 60)
            limiters.append(limiter)
        return limiters


def _group_key(chat_id: object) -> int | str | None:
    """Groups and channels have negative ids (or an @username); private chats do not count."""
    if isinstance(chat_id, str):
        with contextlib.suppress(ValueError):
            chat_id = int(chat_id)
    if isinstance(chat_id, int):
        return chat_id if chat_id < 0 else None
    return chat_id if isinstance(chat_id, str) else None


def _seconds(value: int | float | dtm.timedelta) -> float:
    return value.total_seconds() if isinstance(value, dtm.timedelta) else float(value)
