"""The /run rate in chat: at most `limit` /run messages per Telegram user per `window`
seconds, counted in the store (ChatStore.judge_run_rate) so a restart or a second bot
instance does not reset it.

A person over the rate gets one short refusal per window and silence after it: a flood of
/run messages must not become a flood of the bot's own replies, which share the group's
20-messages-a-minute budget with approval cards.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

from agent.records import record


class RateVerdict(enum.Enum):
    """What to do with one /run message."""

    ADMIT = "admit"  # under the rate: handle it (and count it)
    REFUSE = "refuse"  # over the rate: answer with one short refusal
    IGNORE = "ignore"  # over the rate, refused already in this window: log only


@record
class RateDecision:
    """A verdict, and when the oldest counted /run leaves the window (over the rate only)."""

    verdict: RateVerdict
    free_at: float | None = None


def rate_decision(
    admitted_at: Sequence[float], refusal_answered: bool, limit: int, window: float, now: float
) -> RateDecision:
    """Decide one /run from when the person's latest /run messages were admitted and whether
    a refusal was answered since the last of them; `limit` 0 is no rate."""
    recent = sorted(at for at in admitted_at if at > now - window)
    if limit == 0 or len(recent) < limit:
        return RateDecision(RateVerdict.ADMIT)
    free_at = recent[-limit] + window
    return RateDecision(RateVerdict.IGNORE if refusal_answered else RateVerdict.REFUSE, free_at)


def rate_rule(limit: int, window: float) -> str:
    """The rate in words, e.g. "5 per 5 min" or "20 per 24 h"."""
    hours, rest = divmod(window, 3600)
    if hours and not rest:
        return f"{limit} per {hours:g} h"
    minutes, seconds = divmod(window, 60)
    span = f"{minutes:g} min" if not seconds else f"{window:g} s"
    return f"{limit} per {span}"
