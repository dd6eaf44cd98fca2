"""Where a process runs and which process a pid names: host, boot, PID namespace, start time.

Invariant: a pid names one process only within one kernel boot and one PID namespace, and only
for that process's lifetime. So a pid recorded elsewhere may be looked up here only when the
hostname, the boot id and the PID-namespace inode all match ours (`HostIdentity.same_pid_space`),
and a live process with that pid is the same one only if its start time matches too (a reused
pid starts later). Anything unreadable is None, and None never matches: an identity we cannot
establish proves nothing.
"""

from __future__ import annotations

import os
import socket
from typing import Literal

from agent.records import record

_PROC = "/proc"
_BOOT_ID = "/proc/sys/kernel/random/boot_id"


@record
class HostIdentity:
    """One kernel boot and PID namespace: hostname, boot id, PID-namespace inode (None: unknown)."""

    hostname: str
    boot_id: str | None
    pid_ns: int | None

    def same_pid_space(self, other: HostIdentity) -> bool:
        """True when pids recorded under `other` name processes here: all three known and equal."""
        return (
            self.boot_id is not None
            and self.pid_ns is not None
            and (self.hostname, self.boot_id, self.pid_ns)
            == (other.hostname, other.boot_id, other.pid_ns)
        )


@record
class ProcStat:
    """The fields of /proc/<pid>/stat we use: state letter, parent, group, start time in ticks."""

    state: str
    ppid: int
    pgrp: int
    start_time: int
    exit_code: int | None  # waitpid-style status of a zombie; None when the kernel omits it

    @property
    def exited(self) -> bool:
        """True for a zombie or a dying process: it can no longer act, it only awaits reaping."""
        return self.state in ("Z", "X", "x")


def this_host() -> HostIdentity:
    """The identity of the kernel and PID namespace this process runs in, read afresh."""
    return HostIdentity(hostname=socket.gethostname(), boot_id=_boot_id(), pid_ns=_pid_ns())


def read_stat(pid: int | Literal["self"]) -> ProcStat | None:
    """The stat fields of `pid` (in /proc's namespace), or None if it is gone or unreadable."""
    try:
        with open(f"{_PROC}/{pid}/stat", "rb") as handle:
            raw = handle.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself hold spaces and ')'.
    fields = raw.rpartition(b")")[2].split()
    try:
        return ProcStat(
            state=fields[0].decode(),
            ppid=int(fields[1]),
            pgrp=int(fields[2]),
            start_time=int(fields[19]),  # field 22: starttime, clock ticks after boot
            exit_code=int(fields[49]) if len(fields) > 49 else None,  # field 52
        )
    except (IndexError, ValueError):
        return None


def _boot_id() -> str | None:
    try:
        with open(_BOOT_ID) as handle:
            boot_id = handle.read().strip()
    except OSError:
        return None
    return boot_id or None


def _pid_ns() -> int | None:
    try:
        inode = os.stat(f"{_PROC}/self/ns/pid").st_ino
        # /proc may be mounted for another PID namespace than ours (unshare --pid without
        # --mount-proc): then its pids are not ours and nothing may be looked up by pid there.
        own = os.readlink(f"{_PROC}/self")
    except OSError:
        return None
    return inode if own == str(os.getpid()) else None
