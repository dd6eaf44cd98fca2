"""Failpoints: a test hook that kills this process with SIGKILL at a named point of the kernel
or the chat outbox.

`LOOM_OPS_FAILPOINT=after_intent:3` kills the process the third time the kernel passes
`after_intent`. The crash tests use it to stop a real process at every step boundary.
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
        "after_tool",
        "after_outcome",
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
        self._seen: Counter[str] = Counter()
        if spec:
            point, _, count = spec.partition(":")
            if point not in POINTS or not count.isdigit() or int(count) < 1:
                raise ValueError(f"bad failpoint {spec!r}: want <point>:<n>, point in {POINTS}")
            self._point, self._at = point, int(count)

    def reached(self, point: str) -> None:
        """Note a pass through `point`; SIGKILL ourselves if this is the configured one."""
        if self._point is None:
            return
        self._seen[point] += 1
        if point == self._point and self._seen[point] == self._at:
            os.kill(os.getpid(), signal.SIGKILL)
