"""Lease owners: who drives a run, and whether that process is still alive."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable

_HOST = socket.gethostname()
log = logging.getLogger(__name__)


def new_owner_id() -> str:
    """An owner id naming this host and process, unique per store user."""
    return f"{_HOST}:{os.getpid()}:{secrets.token_hex(4)}"


def owner_is_dead(owner: str) -> bool:
    """True when `owner` names a process on this host that no longer exists.

    Owners on other hosts are never declared dead here; their leases expire instead.
    """
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != _HOST or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


class LeaseKeeper:
    """Renews a run's lease in the background while the run is driven."""

    def __init__(
        self,
        renew: Callable[[], Awaitable[bool]],
        ttl: float,
        on_lost: Callable[[], object] = lambda: None,
    ) -> None:
        self._renew = renew
        self._interval = max(ttl / 3, 0.05)
        self._on_lost = on_lost
        self._task: asyncio.Task[None] | None = None
        self.lost = False

    async def __aenter__(self) -> LeaseKeeper:
        self._task = asyncio.create_task(self._beat())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _beat(self) -> None:
        while not self.lost:
            await asyncio.sleep(self._interval)
            try:
                renewed = await self._renew()
            except Exception:  # a busy or briefly unreachable store: try again next beat
                log.warning("lease renewal failed; retrying", exc_info=True)
                continue
            if not renewed:
                # Cancelled or taken over: stop the work in flight (a command's whole process
                # group is killed) rather than let it run on unowned.
                self.lost = True
                self._on_lost()
