"""Lease owners: which process instance drives a run, and whether it is provably dead.

Invariant: an owner id names one process instance, never two: hostname, pid and a random token,
then where that pid means something (boot id, PID-namespace inode) and when the process started.
`owner_is_dead` answers True only with proof: the owner ran in our host, boot and PID namespace,
and its pid is gone, a zombie, or now a later process (another start time). Everything else,
another host, boot or namespace, an owner in the old `host:pid:token` form, an unreadable /proc,
is not proof, and the run waits for the owner's lease to expire instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
from collections.abc import Awaitable, Callable

from agent.records import record
from agent.run.host import HostIdentity, read_stat, this_host

log = logging.getLogger(__name__)

# host:pid:token@boot.pidns.start, e.g. `vm:1234:ab12cd34@0d7e66c253f7.4026531836.81234`; an
# unknown part is "-". Parsed from the right, so a hostname holding ':' or '@' still parses.
_OWNER = re.compile(
    r"(?P<host>.+):(?P<pid>\d+):(?P<token>[0-9a-f]+)"
    r"@(?P<boot>[0-9a-f]+|-)\.(?P<pid_ns>\d+|-)\.(?P<start>\d+|-)"
)
# Boot ids are random (122 bits); 48 of them keep owners short and still never collide in
# practice, and a collision alone proves nothing (the namespace, pid and start time must match).
_BOOT_TAG_LEN = 12


@record
class OwnerId:
    """A parsed owner id; boot, pid_ns and start_time are None where the owner could not tell."""

    host: str
    pid: int
    token: str
    boot: str | None
    pid_ns: int | None
    start_time: int | None


def new_owner_id() -> str:
    """An owner id naming this process instance (and a fresh token: unique per store user)."""
    here = this_host()
    me = read_stat("self")
    boot = _boot_tag(here)
    parts = (
        boot if boot is not None else "-",
        str(here.pid_ns) if here.pid_ns is not None else "-",
        str(me.start_time) if me is not None else "-",
    )
    return f"{here.hostname}:{os.getpid()}:{secrets.token_hex(4)}@{'.'.join(parts)}"


def parse_owner(owner: str) -> OwnerId | None:
    """The parts of an owner id made by new_owner_id, or None for any other form."""
    match = _OWNER.fullmatch(owner)
    if match is None:
        return None
    boot, pid_ns, start = match["boot"], match["pid_ns"], match["start"]
    return OwnerId(
        host=match["host"],
        pid=int(match["pid"]),
        token=match["token"],
        boot=None if boot == "-" else boot,
        pid_ns=None if pid_ns == "-" else int(pid_ns),
        start_time=None if start == "-" else int(start),
    )


def owner_is_dead(owner: str) -> bool:
    """True only when `owner` provably no longer runs: same host, boot and PID namespace as us,
    and its pid is gone, a zombie, or reused by a later process.

    Any other owner (elsewhere, old-format, unreadable) is not declared dead: its lease expires.
    """
    parsed = parse_owner(owner)
    if parsed is None or parsed.start_time is None:
        return False
    here = this_host()
    if here.pid_ns is None or parsed.boot is None:
        return False  # either side cannot say where its pids live
    if (parsed.host, parsed.boot, parsed.pid_ns) != (here.hostname, _boot_tag(here), here.pid_ns):
        return False
    try:
        # kill(0) sees every pid of our namespace, even where /proc hides other users' (hidepid).
        os.kill(parsed.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # it exists, owned by someone else; its stat still tells us which process it is
    stat = read_stat(parsed.pid)
    if stat is None:
        return False  # exists (kill said so) but unreadable: no proof
    return stat.exited or stat.start_time != parsed.start_time


def _boot_tag(host: HostIdentity) -> str | None:
    if host.boot_id is None:
        return None
    return host.boot_id.replace("-", "").lower()[:_BOOT_TAG_LEN] or None


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
