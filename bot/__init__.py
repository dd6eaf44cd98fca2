"""The Telegram gateway of loom-ops: the bot (python-telegram-bot), its outbox sender, and a
local Bot API stand-in for tests and the sandbox."""

import os

# Opt in to python-telegram-bot's coming behaviour now (durations as timedelta, e.g.
# RetryAfter.retry_after), instead of a deprecation warning on every flood-control answer.
os.environ.setdefault("PTB_TIMEDELTA", "true")
