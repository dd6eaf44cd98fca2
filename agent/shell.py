"""Running one admitted command: no shell, capped output, a clean env, and containment.

Invariant: nothing a command starts outlives the call that ran it, its timeout, or its driver.
- It is exec'd directly (never through a shell) as the leader of a new session, so one killpg
  reaches everything that stays in its process group.
- Every process of the attempt inherits `LOOM_OPS_ATTEMPT=<marker>`, setsid or not, so
  `kill_attempt(marker)` finds them in /proc from any process of the same host and PID namespace:
  the driver itself, or the next driver of the run after this one died.
- Set in the child before exec, and kept by the kernel across exec: SIGKILL when the driver dies
  (PR_SET_PDEATHSIG); the command becomes a subreaper, so its orphaned descendants stay in its
  subtree instead of going to init; an alarm kills it at its timeout plus a grace even when the
  driver is frozen and cannot.
- The spawn gate (`spawn_before`) is checked in the parent before the spawn and again in the
  child right before exec, so a driver frozen in between (and past its lease) starts nothing.
At the timeout, at a cancellation and after a normal exit, the attempt is swept: the processes
carrying the marker, the members of the group and everything descending from either or from the
command are stopped (SIGSTOP, so none can fork away while we look), then killed with SIGKILL.
stdout and stderr are read concurrently as they arrive: the first `output_cap` bytes of each are
kept, the rest is drained and only counted, so memory stays bounded whatever the command prints.
Where prctl or /proc is missing, this degrades (with a warning) to the group kill and the alarm.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import ctypes
import errno
import functools
import logging
import math
import os
import re
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from agent.host import ProcStat, read_stat

log = logging.getLogger(__name__)

DEFAULT_OUTPUT_CAP = 64 * 1024
SAFE_ENV_BASE: tuple[str, ...] = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "USER")
ATTEMPT_ENV = "LOOM_OPS_ATTEMPT"

# After SIGKILL, how long we wait for the pipes to close and the child to be reaped.
_KILL_GRACE = 0.5
# The alarm fires this many seconds after the rounded-up timeout: it only matters when the
# driver, which kills at the timeout itself, is frozen or too slow to.
_ALARM_GRACE = 2
_ALARM_MAX = 2**31 - 1
# How long a sweep waits for the killed to be gone; SIGKILL is final, but a process in an
# uninterruptible sleep (a hung NFS read) dies only when that sleep ends.
_DEATH_WAIT = 5.0
_DEATH_POLL = 0.01
# Scan rounds before killing what is frozen even though more keep appearing (a fork storm).
_FREEZE_ROUNDS = 20
# Exit status of a child whose driver died before it could ask to die with it.
_ORPHANED_EXIT = 125
_MARKER = re.compile(r"[!-~]{1,200}")  # printable ASCII, no spaces: fits in env and in logs
_PROC = Path("/proc")
# Sweeps get threads of their own: a default executor busy with other work must not delay a kill.
_SWEEPERS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="loom-ops-sweep")

_PR_SET_PDEATHSIG = 1
_PR_GET_PDEATHSIG = 2
_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37


class SpawnRefused(Exception):
    """The spawn gate had closed (its `spawn_before` instant passed): nothing was started."""


@dataclass(frozen=True)
class CommandResult:
    """What a command did: exit code (None if it timed out), kept output and byte counts."""

    argv: list[str]
    exit_code: int | None
    stdout: str
    stderr: str
    stdout_bytes: int
    stderr_bytes: int
    truncated: bool
    timed_out: bool
    duration_ms: float
    pid: int | None = None  # the command's pid; None when it could not be started
    marker: str | None = None  # LOOM_OPS_ATTEMPT of every process of this attempt
    processes_killed: int = 0  # of the attempt, at the timeout or left behind after it ended


@dataclass(frozen=True)
class AttemptKill:
    """What a sweep of one attempt did: the pids it found alive and killed, and when."""

    pids: tuple[int, ...]
    killed_at: float | None  # time.time() of the SIGKILLs; None when nothing was found
    all_gone: bool  # every one of them was gone (or a zombie) before the wait ran out
    scanned: bool  # False when /proc could not be listed: then nothing is proven

    @property
    def found(self) -> int:
        """How many processes of the attempt were alive."""
        return len(self.pids)


class _CappedSink(asyncio.Protocol):
    """Reads one pipe: keeps the first `cap` bytes, counts everything, resolves `closed` at EOF."""

    def __init__(self, cap: int, closed: asyncio.Future[None]) -> None:
        self.cap = cap
        self.head = bytearray()
        self.total = 0
        self.closed = closed

    def data_received(self, data: bytes) -> None:
        self.total += len(data)
        room = self.cap - len(self.head)
        if room > 0:
            self.head += data[:room]

    def eof_received(self) -> bool:
        return False  # let the transport close itself; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    @property
    def truncated(self) -> bool:
        return self.total > len(self.head)

    def text(self) -> str:
        # Not final when cut: a multi-byte character split by the cap is dropped, not mangled.
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text = decoder.decode(bytes(self.head), final=not self.truncated)
        if self.truncated:
            text += f"\n[… truncated: {self.total - len(self.head)} more bytes]"
        return text


def new_attempt_marker() -> str:
    """A fresh random attempt marker (run_command makes one when given none)."""
    return f"attempt-{secrets.token_hex(8)}"


async def run_command(
    argv: list[str],
    *,
    timeout: float,
    env: dict[str, str],
    output_cap: int = DEFAULT_OUTPUT_CAP,
    cwd: Path | None = None,
    marker: str | None = None,
    spawn_before: float | None = None,
) -> CommandResult:
    """Run argv (argv[0] an executable path) without a shell and return what happened.

    Non-zero exits, timeouts and binaries that cannot be executed are results, not exceptions;
    a closed spawn gate (time.time() >= spawn_before) raises SpawnRefused and starts nothing.
    """
    if not argv:
        raise ValueError("run_command needs a non-empty argv")
    if timeout <= 0:
        raise ValueError("timeout must be positive")
    if output_cap < 0:
        raise ValueError("output_cap must not be negative")
    marker = _checked_marker(marker if marker is not None else new_attempt_marker())
    argv = list(argv)
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    child_env = {**env, ATTEMPT_ENV: marker}
    preexec = _child_setup(os.getpid(), timeout, spawn_before)

    _refuse_if_closed(spawn_before, argv)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out_w,
            stderr=err_w,
            env=child_env,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=preexec,
        )
    except OSError as exc:
        os.close(out_r)
        os.close(err_r)
        return _spawn_failure(argv, exc, started, marker)
    except subprocess.SubprocessError as exc:
        # Our preexec raises only at a closed gate; subprocess reaped that child and reports
        # any preexec exception as this generic error.
        os.close(out_r)
        os.close(err_r)
        if spawn_before is None:
            raise
        raise SpawnRefused(_refusal(spawn_before, argv)) from exc
    except BaseException:
        os.close(out_r)
        os.close(err_r)
        raise
    finally:
        # The child has its own copies; ours must go or EOF never arrives.
        os.close(out_w)
        os.close(err_w)

    # start_new_session made the child a session and group leader: its pgid is its pid. The
    # command is identified by pid and start time, so a reused pid is never taken for it.
    pgid = proc.pid
    root = _identify(proc.pid)
    out_sink = _CappedSink(output_cap, loop.create_future())
    err_sink = _CappedSink(output_cap, loop.create_future())
    transports: list[asyncio.BaseTransport] = []
    unowned_fds = [out_r, err_r]  # read ends not yet handed to a file object
    wait_task = asyncio.ensure_future(proc.wait())
    timed_out = False
    killed = 0
    try:
        for fd, sink in ((out_r, out_sink), (err_r, err_sink)):
            pipe = os.fdopen(fd, "rb", buffering=0)
            unowned_fds.remove(fd)
            try:
                transport, _ = await loop.connect_read_pipe(lambda s=sink: s, pipe)
            except BaseException:
                pipe.close()
                raise
            transports.append(transport)
        # The timeout counts from before the spawn. asyncio.wait never cancels what it waits
        # for, so after the kill we can wait on the same futures again.
        remaining = max(0.0, timeout - (time.monotonic() - started))
        _, pending = await asyncio.wait(
            {wait_task, out_sink.closed, err_sink.closed}, timeout=remaining
        )
        if pending:
            timed_out = True
            killed += (await _sweep(marker, root, pgid)).found
            await asyncio.wait(pending, timeout=_KILL_GRACE)
    except BaseException:
        # Cancelled (or failed) mid-run: nothing of the command may outlive us. The sweep
        # finishes even if we are cancelled again; then the leader is reaped (bounded) while
        # the loop still runs.
        await _sweep(marker, root, pgid)
        await asyncio.wait({wait_task}, timeout=_KILL_GRACE)
        raise
    finally:
        for transport in transports:
            transport.close()
        if not wait_task.done():
            wait_task.cancel()
        for fd in unowned_fds:
            os.close(fd)

    # Ended on its own or killed: either way, what it left behind (a daemonized grandchild with
    # its output closed) must not outlive the step.
    killed += (await _sweep(marker, root, pgid)).found
    if proc.returncode == -signal.SIGALRM and time.monotonic() - started >= timeout:
        timed_out = True  # our self-destruct alarm fired before this (busy) loop could kill it
    return CommandResult(
        argv=argv,
        exit_code=None if timed_out else proc.returncode,
        stdout=out_sink.text(),
        stderr=err_sink.text(),
        stdout_bytes=out_sink.total,
        stderr_bytes=err_sink.total,
        truncated=out_sink.truncated or err_sink.truncated,
        timed_out=timed_out,
        duration_ms=_elapsed_ms(started),
        pid=proc.pid,
        marker=marker,
        processes_killed=killed,
    )


def kill_attempt(marker: str, *, wait: float = _DEATH_WAIT) -> AttemptKill:
    """Stop, then SIGKILL, every process carrying `LOOM_OPS_ATTEMPT=<marker>` and its descendants.

    Blocks up to `wait` s until they are gone (from async code, call it via asyncio.to_thread);
    reaps those that are our children; never matches the calling process.
    """
    return _sweep_blocking(_checked_marker(marker), None, None, wait, reap_except=None)


def scrubbed_environment(source: Mapping[str, str], passthrough: Iterable[str]) -> dict[str, str]:
    """A child environment: the safe base variables plus those named in passthrough, nothing else.

    Only names present in source are copied; nothing is invented.
    """
    names = list(SAFE_ENV_BASE)
    for name in passthrough:
        if not name or "=" in name or "\0" in name:
            raise ValueError(f"invalid environment variable name: {name!r}")
        names.append(name)
    return {name: source[name] for name in names if name in source}


# --- the child, between fork and exec ----------------------------------------------------------


@functools.cache
def _libc_prctl() -> Callable[..., int] | None:
    """libc's prctl once it has answered here; None (after one warning) where it does not."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl: Callable[..., int] = libc.prctl
        probe = ctypes.c_int()
        for option in (_PR_GET_PDEATHSIG, _PR_GET_CHILD_SUBREAPER):
            if prctl(ctypes.c_int(option), ctypes.byref(probe), *_zeros(3)) != 0:
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError) as exc:
        log.warning(
            "prctl is unavailable (%s): commands will not die with their driver, and orphans "
            "of theirs go to init; only the timeout alarm and the attempt sweeps contain them",
            exc,
        )
        return None
    return prctl


def _child_setup(parent: int, timeout: float, spawn_before: float | None) -> Callable[[], None]:
    """The preexec_fn. Everything it needs is bound here, in the parent: after a fork the child
    may only call what takes no lock another thread might have held (no imports, no logging)."""
    prctl = _libc_prctl()
    die_with_parent = (ctypes.c_int(_PR_SET_PDEATHSIG), ctypes.c_ulong(signal.SIGKILL), *_zeros(3))
    become_subreaper = (ctypes.c_int(_PR_SET_CHILD_SUBREAPER), ctypes.c_ulong(1), *_zeros(3))
    alarm_after = min(math.ceil(timeout) + _ALARM_GRACE, _ALARM_MAX)
    getppid, now, exit_now = os.getppid, time.time, os._exit
    set_alarm, set_handler = signal.alarm, signal.signal
    sigalrm, default = signal.SIGALRM, signal.SIG_DFL

    def setup() -> None:
        if prctl is not None:
            prctl(*die_with_parent)
            # The death signal is armed only now: a parent that died since the fork sent none.
            # (It fires when the forking *thread* ends: the event loop's, which outlives us.)
            if getppid() != parent:
                exit_now(_ORPHANED_EXIT)
            prctl(*become_subreaper)
        try:
            set_handler(sigalrm, default)  # an ignored SIGALRM would stay ignored across exec
            set_alarm(alarm_after)
        except Exception:
            pass  # nothing may be logged here; the driver's kill and the sweeps remain
        # Last, right before exec: a driver frozen since its own check must not start anything.
        if spawn_before is not None and now() >= spawn_before:
            raise SpawnRefused

    return setup


def _zeros(count: int) -> tuple[ctypes.c_ulong, ...]:
    return tuple(ctypes.c_ulong(0) for _ in range(count))


def _refuse_if_closed(spawn_before: float | None, argv: list[str]) -> None:
    if spawn_before is not None and time.time() >= spawn_before:
        raise SpawnRefused(_refusal(spawn_before, argv))


def _refusal(spawn_before: float, argv: list[str]) -> str:
    late = time.time() - spawn_before
    return f"not starting {argv[0]}: its spawn gate closed {late:.3f} s ago"


def _checked_marker(marker: str) -> str:
    if not _MARKER.fullmatch(marker):
        raise ValueError(f"invalid attempt marker {marker!r}: 1-200 printable ASCII, no spaces")
    return marker


# --- sweeping an attempt -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    """One process of an attempt, pinned by a pidfd where the kernel has them."""

    pid: int
    start_time: int
    pidfd: int | None

    def send(self, sig: int) -> None:
        # ESRCH: gone already. EPERM: it changed uid (a setuid binary); nothing more we can do.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, sig)
            else:
                os.kill(self.pid, sig)


async def _sweep(marker: str, root: tuple[int, int] | None, pgid: int) -> AttemptKill:
    """Sweep the attempt on a sweeper thread: a /proc scan of a busy host takes milliseconds.

    Shielded, so a second cancellation neither un-queues the kill nor stops it half way.
    """
    # The command (pid == pgid) is not reaped there: asyncio's child watcher owns its status.
    job = functools.partial(_sweep_blocking, marker, root, pgid, _DEATH_WAIT, pgid)
    return await asyncio.shield(asyncio.get_running_loop().run_in_executor(_SWEEPERS, job))


def _sweep_blocking(
    marker: str,
    root: tuple[int, int] | None,
    pgid: int | None,
    wait: float,
    reap_except: int | None,
) -> AttemptKill:
    """Freeze and kill the attempt, then wait (bounded) until every process of it is gone."""
    targets, killed_at, scanned = _freeze_and_kill(marker, root, pgid)
    try:
        deadline = time.monotonic() + wait
        while not _all_gone(targets, reap_except) and time.monotonic() < deadline:
            time.sleep(_DEATH_POLL)
        gone = _all_gone(targets, reap_except)
    finally:
        _close(targets)
    if not gone:
        log.warning("attempt %s: killed processes still alive after %.1f s", marker, wait)
    return AttemptKill(
        pids=tuple(target.pid for target in targets),
        killed_at=killed_at,
        all_gone=gone,
        scanned=scanned,
    )


def _freeze_and_kill(
    marker: str, root: tuple[int, int] | None, pgid: int | None
) -> tuple[list[_Target], float | None, bool]:
    """Stop every process of the attempt until a scan finds no new one, then SIGKILL them all.

    Returns the targets (their pidfds still open), when they were killed, and whether /proc
    could be scanned at all.
    """
    entry = f"{ATTEMPT_ENV}={marker}".encode()
    taken: dict[int, _Target] = {}
    scanned = True
    for _ in range(_FREEZE_ROUNDS):
        found = _scan(entry, root, pgid, taken)
        if found is None:
            scanned = False
            break
        if not found:
            break
        for pid, stat in found:
            target = _pin(pid, stat)
            if target is not None:
                target.send(signal.SIGSTOP)
                taken[pid] = target
    killed_at = time.time() if taken else None
    for target in taken.values():
        target.send(signal.SIGKILL)
    if pgid is not None:
        # Also without /proc: the group is the one set the kernel finds for us.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    return list(taken.values()), killed_at, scanned


def _scan(
    entry: bytes, root: tuple[int, int] | None, pgid: int | None, taken: dict[int, _Target]
) -> list[tuple[int, ProcStat]] | None:
    """The live processes of the attempt not yet taken; None when /proc cannot be listed."""
    try:
        names = os.listdir(_PROC)
    except OSError as exc:
        _warn_no_proc(exc.strerror or str(exc))
        return None
    me = os.getpid()
    stats: dict[int, ProcStat] = {}
    members: set[int] = set()
    for name in names:
        if not name.isdigit() or int(name) == me:
            continue
        pid = int(name)
        stat = read_stat(pid)
        if stat is None or stat.exited:
            continue  # vanished, unreadable, or dead already
        stats[pid] = stat
        known = taken.get(pid)
        if (
            (known is not None and known.start_time == stat.start_time)
            or root == (pid, stat.start_time)
            or (pgid is not None and stat.pgrp == pgid)
            or _carries(pid, entry)
        ):
            members.add(pid)
    # Whatever descends from the attempt is the attempt's, even with a scrubbed environment.
    children: dict[int, list[int]] = {}
    for pid, stat in stats.items():
        children.setdefault(stat.ppid, []).append(pid)
    stack = list(members)
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in members and child != me:
                members.add(child)
                stack.append(child)
    return [(pid, stats[pid]) for pid in sorted(members) if pid not in taken]


def _carries(pid: int, entry: bytes) -> bool:
    try:
        with open(_PROC / str(pid) / "environ", "rb") as handle:
            environ = handle.read()
    except OSError:
        return False  # vanished, or another user's (unreadable unless we are root)
    return entry in environ.split(b"\0")


def _pin(pid: int, stat: ProcStat) -> _Target | None:
    """The process we read as `stat`, held by a pidfd so a reused pid is never signalled."""
    try:
        pidfd: int | None = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    except (OSError, AttributeError):
        pidfd = None  # no pidfds here (old kernel, seccomp): kill by pid, re-checked just below
    again = read_stat(pid)
    if again is None or again.start_time != stat.start_time:
        # The pid now names another process: not ours.
        if pidfd is not None:
            os.close(pidfd)
        return None
    return _Target(pid=pid, start_time=stat.start_time, pidfd=pidfd)


def _all_gone(targets: list[_Target], reap_except: int | None) -> bool:
    """True when every target is gone or a zombie; reaps the zombies that are our children."""
    me = os.getpid()
    alive = False
    for target in targets:
        stat = read_stat(target.pid)
        if stat is None or stat.start_time != target.start_time:
            continue
        if not stat.exited:
            alive = True
        elif stat.ppid == me and target.pid != reap_except:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(target.pid, os.WNOHANG)
    return not alive


def _close(targets: list[_Target]) -> None:
    for target in targets:
        if target.pidfd is not None:
            os.close(target.pidfd)


def _identify(pid: int) -> tuple[int, int] | None:
    stat = read_stat(pid)
    return None if stat is None else (pid, stat.start_time)


@functools.cache
def _warn_no_proc(reason: str) -> None:
    log.warning("cannot list /proc (%s): attempts are contained by group and alarm only", reason)


def _spawn_failure(argv: list[str], exc: OSError, started: float, marker: str) -> CommandResult:
    # Shell conventions: 127 "not found", 126 "found but cannot be executed".
    not_found = exc.errno in (errno.ENOENT, errno.ENOTDIR)
    what = exc.filename if exc.filename is not None else argv[0]
    message = f"cannot execute {what}: {exc.strerror or exc}\n"
    return CommandResult(
        argv=argv,
        exit_code=127 if not_found else 126,
        stdout="",
        stderr=message,
        stdout_bytes=0,
        stderr_bytes=len(message.encode()),
        truncated=False,
        timed_out=False,
        duration_ms=_elapsed_ms(started),
        marker=marker,
    )


def _elapsed_ms(started: float) -> float:
    return (time.monotonic() - started) * 1000.0
