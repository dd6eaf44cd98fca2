"""Failpoints: a test hook that kills (SIGKILL) or freezes (SIGSTOP) this process at a named
point of the kernel or the chat outbox.

`LOOM_OPS_FAILPOINT=after_intent:3` kills the process the third time the kernel passes
`after_intent`; `after_intent:3:stop` stops it there instead, until someone sends SIGCONT. The
crash tests use it to stop a real process at every step boundary, and to freeze a driver
between committing an intent and starting its side effect.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

POINTS = frozenset(
    {
        "after_claim",
        "before_intent",
        "after_intent",
        "before_effect",  # a live command, MCP call or check about to start
        "after_tool",
        "after_outcome",  # the commit that holds a call's outcome (and the next intent)
        "after_wait",
        # The chat outbox: a message about to go to the Bot API; then taken by the Bot API,
        # its delivery not yet recorded.
        "before_send_approval_request",
        "after_send_approval_request",
        "before_send_run_finished",
        "after_send_run_finished",
    }
)


class Failpoints:
    """Counts passes through named points and kills the process at the configured one."""

    def __init__(self, spec: str | None) -> None:
        self._point: str | None = None
        self._at = 0
        self._signal = signal.SIGKILL
        self._seen: Counter[str] = Counter()
        if spec:
            point, _, rest = spec.partition(":")
            count, _, action = rest.partition(":")
            if (
                point not in POINTS
                or not count.isdigit()
                or int(count) < 1
                or action not in ("", "kill", "stop")
            ):
                raise ValueError(
                    f"bad failpoint {spec!r}: want <point>:<n>[:kill|:stop], point in {POINTS}"
                )
            self._point, self._at = point, int(count)
            self._signal = signal.SIGSTOP if action == "stop" else signal.SIGKILL

    def reached(self, point: str) -> None:
        """Note a pass through `point`; SIGKILL (or SIGSTOP) ourselves at the configured one."""
        if self._point is None:
            return
        self._seen[point] += 1
        if point == self._point and self._seen[point] == self._at:
            os.kill(os.getpid(), self._signal)
