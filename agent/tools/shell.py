"""Running one admitted command: no shell, capped output, a clean env, and an attempt guard.

Invariant: nothing a command starts outlives its timeout, its driver, or a cancellation.
- Each command runs under its own guard process (agent/attempt_guard.py, a fresh interpreter
  that starts in about 15 ms): a child subreaper, so every orphan of the command (double fork,
  setsid, emptied environment) stays in the guard's subtree; it enforces the deadline by its
  own clock, so a frozen driver changes nothing, and it sweeps (freezes, kills, reaps) the whole
  subtree at the deadline, once the command exited and its output is read, when the driver
  dies (a liveness pipe whose write end only the driver holds reads EOF) and on cancellation.
- The command is exec'd directly (never through a shell) as the leader of a new session, with
  only the environment given plus `LOOM_OPS_ATTEMPT=<marker>`. The guard carries the marker
  too, so `kill_attempt(marker)` finds the guard and everything below it, env-less or not, from
  any process of the same host and PID namespace: a `loom-ops cancel`, or the next driver of
  the run when this one died or froze.
- The spawn gate (`spawn_before`) is checked here before the guard starts and by the guard
  right before exec, so a driver frozen in between (and past its lease) starts nothing.
- Should the guard itself fail or freeze, the driver sweeps the attempt by its marker.
stdout and stderr are read concurrently as they arrive: the first `output_cap` bytes of each are
kept, the rest is drained and only counted, so memory stays bounded whatever the command prints.
Where prctl or /proc is missing, this degrades (with a warning) to the group kill and the guard.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import errno
import functools
import logging
import os
import re
import secrets
import signal
import sys
import time
from asyncio.subprocess import Process
from collections.abc import Callable, Collection, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from agent.errors import SpawnRefused
from agent.records import record
from agent.tools import attempt_guard

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_OUTPUT_CAP = 64 * 1024
SAFE_ENV_BASE: tuple[str, ...] = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "USER")
ATTEMPT_ENV = "LOOM_OPS_ATTEMPT"

# After the attempt ended, how long we wait for the pipes to close and the guard to be reaped.
_KILL_GRACE = 0.5
# How long a sweep waits for the killed to be gone (see attempt_guard.DEATH_WAIT).
_DEATH_WAIT = attempt_guard.DEATH_WAIT
_DEATH_POLL = attempt_guard.DEATH_POLL
# How long past the deadline (or a cancellation) we wait for the guard's last word, its own
# sweep included, before we sweep the attempt ourselves.
_GUARD_GRACE = _DEATH_WAIT + 2.0
# Past a deadline, how long we still look for what the guard may have written (see _until).
_LAST_LOOK = 0.2
_GUARD_SCRIPT = os.path.abspath(attempt_guard.__file__)
_MARKER = re.compile(r"[!-~]{1,200}")  # printable ASCII, no spaces: fits in env and in logs
# Sweeps get threads of their own: a default executor busy with other work must not delay a kill.
_SWEEPERS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="loom-ops-sweep")


@record
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


@record
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
    """Run argv (argv[0] an executable path) without a shell, under its guard, and say what
    happened.

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
    environment = _environment_block({**env, ATTEMPT_ENV: marker})
    started = time.monotonic()
    # The timeout counts from before the spawn; the guard kills at this very instant.
    deadline = started + timeout

    _refuse_if_closed(spawn_before, argv)
    run = await _GuardedRun.start(argv, environment, cwd, marker, deadline, spawn_before)
    if isinstance(run, OSError):
        return _spawn_failure(argv, run, started, marker)
    try:
        await run.connect(output_cap)
        return await run.outcome(started, spawn_before)
    except BaseException:
        # Cancelled (or failed) mid-run: nothing of the command may outlive us.
        await run.abort()
        raise
    finally:
        run.close()


def kill_attempt(marker: str, *, wait: float = _DEATH_WAIT) -> AttemptKill:
    """Stop, then SIGKILL, every process carrying `LOOM_OPS_ATTEMPT=<marker>` and its descendants.

    That is the attempt's guard and all of its subtree, whatever the command did to its own
    environment. Blocks up to `wait` s until they are gone (from async code, call it via
    asyncio.to_thread); reaps those that are our children; never matches the calling process.
    """
    return _sweep_blocking(_checked_marker(marker), None, wait, reap_except=None)


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


# --- the guard, seen from the driver -----------------------------------------------------------


@record
class _Start:
    """The guard's first word: the command runs (pid), or the gate refused it, or exec failed;
    all None/False when the guard ended without starting it (out of time, or told to stop)."""

    pid: int | None = None
    refused: bool = False
    failure: OSError | None = None


@record
class _Ended:
    """The guard's last word: how the attempt ended and what its sweep found."""

    how: str  # exit | timeout | gone | signal | error (see attempt_guard)
    killed: int  # processes of the attempt still alive when the guard swept
    all_gone: bool
    scanned: bool
    status: int | None  # the command's wait status, when the guard reaped it


class _GuardChannel(asyncio.Protocol):
    """Reads the guard's status lines; each kind of news resolves its future (None at an EOF
    that came first: the guard died without saying)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, marker: str) -> None:
        self.marker = marker
        self.started: asyncio.Future[_Start | None] = loop.create_future()
        self.exited: asyncio.Future[int] = loop.create_future()  # the command's wait status
        self.ended: asyncio.Future[_Ended | None] = loop.create_future()
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        *lines, self.buffer = (self.buffer + data).split(b"\n")
        for line in lines:
            self._heard(line.decode(errors="replace").split())

    def connection_lost(self, exc: Exception | None) -> None:
        _settle(self.started, None)
        _settle(self.ended, None)

    def _heard(self, words: list[str]) -> None:
        match words:
            case ["spawned", pid, subreaper]:
                if subreaper != "1":
                    _warn_no_subreaper()
                _settle(self.started, _Start(pid=int(pid)))
            case ["refused"]:
                _settle(self.started, _Start(refused=True))
            case ["failed", number, name]:
                _settle(self.started, _Start(failure=_exec_error(int(number), name)))
            case ["exited", status]:
                _settle(self.exited, int(status))
            case ["ended", how, killed, gone, scanned, status]:
                _settle(self.started, _Start())
                ended = _Ended(how, int(killed), gone == "1", scanned == "1", _optional_int(status))
                _settle(self.ended, ended)
            case ["error", *text]:
                log.warning("attempt %s: its guard failed: %s", self.marker, " ".join(text))
            case _:
                log.warning("attempt %s: its guard said %r", self.marker, " ".join(words))


class _GuardedRun:
    """One command under its guard, seen from the driver: the guard process, the pipes to it
    and from the command, and what the guard said."""

    def __init__(
        self, argv: list[str], marker: str, deadline: float, guard: Process, live: int
    ) -> None:
        loop = asyncio.get_running_loop()
        self.argv = argv
        self.marker = marker
        self.deadline = deadline
        self.guard = guard
        self.guard_exit = asyncio.ensure_future(guard.wait())
        self.live: int | None = live  # the liveness pipe's write end: only we hold it
        self.pipes: list[int] = []  # read ends not yet handed to a transport
        self.transports: list[asyncio.BaseTransport] = []
        self.channel = _GuardChannel(loop, marker)
        self.out = self.err = _CappedSink(0, loop.create_future())  # until connect()
        self.settled = False  # the attempt is over: nothing left to abort

    @classmethod
    async def start(
        cls,
        argv: list[str],
        environment: bytes,
        cwd: Path | None,
        marker: str,
        deadline: float,
        spawn_before: float | None,
    ) -> _GuardedRun | OSError:
        """Start the guard (which starts the command); the OSError if the guard cannot start."""
        # The command's environment goes through memory, not the guard's own environment: the
        # guard runs with the marker only, so no LD_* variable of the command's affects it.
        env_fd = os.memfd_create("loom-ops-attempt-env")
        try:
            _write_all(env_fd, environment)
            os.lseek(env_fd, 0, os.SEEK_SET)
        except BaseException:
            os.close(env_fd)
            raise
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        live_r, live_w = os.pipe()
        status_r, status_w = os.pipe()
        ours = [out_r, err_r, status_r, live_w]
        theirs = (live_r, status_w, out_w, err_w, env_fd)
        try:
            gate = "-" if spawn_before is None else repr(spawn_before)
            guard = await asyncio.create_subprocess_exec(
                *(sys.executable, "-S", "-I", _GUARD_SCRIPT, *map(str, theirs), str(os.getpid())),
                *(repr(deadline), gate, "--", *argv),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                env={ATTEMPT_ENV: marker},
                cwd=cwd,
                start_new_session=True,  # no terminal signal reaches it: it answers the driver
                pass_fds=theirs,
            )
        except OSError as exc:
            _close_all(ours)
            return exc
        except BaseException:
            _close_all(ours)
            raise
        finally:
            # The guard has its own copies; ours must go or EOF never arrives.
            _close_all(theirs)
        run = cls(argv, marker, deadline, guard, live_w)
        run.pipes = [out_r, err_r, status_r]
        return run

    async def connect(self, output_cap: int) -> None:
        """Start reading the command's stdout and stderr and the guard's status lines."""
        loop = asyncio.get_running_loop()
        self.out = _CappedSink(output_cap, loop.create_future())
        self.err = _CappedSink(output_cap, loop.create_future())
        out_r, err_r, status_r = self.pipes
        for fd, protocol in ((out_r, self.out), (err_r, self.err), (status_r, self.channel)):
            pipe = os.fdopen(fd, "rb", buffering=0)
            self.pipes.remove(fd)
            try:
                transport, _ = await loop.connect_read_pipe(lambda p=protocol: p, pipe)
            except BaseException:
                pipe.close()
                raise
            self.transports.append(transport)

    async def outcome(self, started: float, spawn_before: float | None) -> CommandResult:
        """Wait for the attempt to end and say what the command did (SpawnRefused when the
        guard found the gate closed)."""
        channel = self.channel
        late = self.deadline + _GUARD_GRACE
        await _until(channel.started.done, [channel.started], late)
        start = channel.started.result() if channel.started.done() else None
        if start is not None and start.refused:
            await self._settle()
            closed_at = spawn_before if spawn_before is not None else time.time()
            raise SpawnRefused(_refusal(closed_at, self.argv))
        if start is not None and start.failure is not None:
            await self._settle()
            return _spawn_failure(self.argv, start.failure, started, self.marker)

        # Over when the guard says so (at the deadline, say), or when the command exited and
        # all of its output is read: then the guard sweeps what it left behind.
        outputs = [self.out.closed, self.err.closed]

        def over() -> bool:
            return channel.ended.done() or all(f.done() for f in (channel.exited, *outputs))

        await _until(over, [channel.ended, channel.exited, *outputs], late)
        if over() and not channel.ended.done():
            self._tell(attempt_guard.DONE)
            await _until(channel.ended.done, [channel.ended], time.monotonic() + _GUARD_GRACE)
        ended = channel.ended.result() if channel.ended.done() else None
        pid = start.pid if start is not None else None
        if ended is None:
            # The guard died, froze or never answered: what it would have swept, we sweep.
            await asyncio.wait([self.guard_exit], timeout=_LAST_LOOK)
            log.warning(
                "attempt %s: its guard ended without a last word (%s); swept it from here",
                self.marker,
                _how_it_ended(self.guard.returncode),
            )
            killed = (await _sweep(self.marker, pid, self.guard.pid)).found
            if start is None:
                await self._settle()
                raise RuntimeError(f"the guard of {self.argv[0]} failed before starting it")
            timed_out = time.monotonic() >= self.deadline and not channel.exited.done()
        else:
            killed, timed_out = ended.killed, ended.how == "timeout"
            if not ended.scanned:
                _warn_no_proc()
            if not ended.all_gone:
                log.warning("attempt %s: killed processes still alive after its sweep", self.marker)
        await self._settle()
        pending = [future for future in outputs if not future.done()]
        if pending:  # every writer is dead by now: the rest of the output is only in the pipes
            await asyncio.wait(pending, timeout=_KILL_GRACE)
        status = ended.status if ended is not None else None
        if status is None and channel.exited.done():
            status = channel.exited.result()
        return CommandResult(
            argv=self.argv,
            exit_code=None if timed_out else _exit_code(status),
            stdout=self.out.text(),
            stderr=self.err.text(),
            stdout_bytes=self.out.total,
            stderr_bytes=self.err.total,
            truncated=self.out.truncated or self.err.truncated,
            timed_out=timed_out,
            duration_ms=_elapsed_ms(started),
            pid=pid,
            marker=self.marker,
            processes_killed=killed,
        )

    async def abort(self) -> None:
        """End the attempt now: closing the liveness pipe makes the guard sweep; wait for it
        (bounded), and sweep from here if it does not answer."""
        if self.settled:
            return
        self.settled = True
        self._close_live()
        ended = self.channel.ended
        await _until(ended.done, [ended], time.monotonic() + _GUARD_GRACE)
        if not ended.done() or ended.result() is None:
            started = self.channel.started
            start = started.result() if started.done() else None
            await _sweep(self.marker, start.pid if start else None, self.guard.pid)
        await asyncio.wait([self.guard_exit], timeout=_KILL_GRACE)

    def close(self) -> None:
        """Release the pipes; the guard has exited (or is reaped by asyncio when it does)."""
        self._close_live()
        for transport in self.transports:
            transport.close()
        _close_all(self.pipes)
        self.pipes = []
        if not self.guard_exit.done():
            self.guard_exit.cancel()

    async def _settle(self) -> None:
        """The attempt is over: let the guard go and wait (bounded) for it to exit."""
        self.settled = True
        self._close_live()
        await asyncio.wait([self.guard_exit], timeout=_KILL_GRACE)

    def _tell(self, word: bytes) -> None:
        if self.live is not None:
            with contextlib.suppress(OSError):  # the guard is gone; its status pipe says so too
                os.write(self.live, word)

    def _close_live(self) -> None:
        if self.live is not None:
            os.close(self.live)
            self.live = None


async def _until(
    done: Callable[[], bool], futures: Collection[asyncio.Future[Any]], deadline: float
) -> bool:
    """Wait until done() (looked at whenever one of `futures` resolves) or until
    time.monotonic() passes `deadline`; returns done(). Never cancels the futures."""
    last_look: float | None = None
    while not done():
        pending = [future for future in futures if not future.done()]
        if not pending:
            break
        left = deadline - time.monotonic()
        if left <= 0:
            # A driver thawed after the deadline has not yet read what the guard wrote while it
            # was frozen: give the loop a short last look before concluding it never came.
            if last_look is None:
                last_look = time.monotonic() + _LAST_LOOK
            left = last_look - time.monotonic()
            if left <= 0:
                break
        await asyncio.wait(pending, timeout=left, return_when=asyncio.FIRST_COMPLETED)
    return done()


def _settle(future: asyncio.Future[T], value: T) -> None:
    if not future.done():
        future.set_result(value)


def _exec_error(number: int, name: str) -> OSError:
    """The OSError the guard's child met at exec (number 0: not an OSError; `name` says what)."""
    detail = None if name == "-" else os.fsdecode(bytes.fromhex(name))
    if number:
        return OSError(number, os.strerror(number), detail)
    return OSError(0, detail or "the command could not be started")


def _how_it_ended(returncode: int | None) -> str:
    if returncode is None:
        return "it does not answer"
    if returncode < 0:
        # SIGKILL: kill_attempt (a cancel, a takeover), the OOM killer, or its own command.
        return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


def _exit_code(status: int | None) -> int:
    # No status: the guard died before it could reap the command, which its parent-death
    # signal (SIGKILL) then ended.
    return -signal.SIGKILL if status is None else os.waitstatus_to_exitcode(status)


def _optional_int(word: str) -> int | None:
    return None if word == "-" else int(word)


def _environment_block(env: Mapping[str, str]) -> bytes:
    """env as NUL-separated NAME=VALUE entries, refused as subprocess would refuse it."""
    entries = []
    for name, value in env.items():
        name_bytes, value_bytes = os.fsencode(name), os.fsencode(value)
        if not name_bytes or b"=" in name_bytes:
            raise ValueError(f"illegal environment variable name: {name!r}")
        if b"\0" in name_bytes or b"\0" in value_bytes:
            raise ValueError(f"embedded null byte in environment variable {name!r}")
        entries.append(name_bytes + b"=" + value_bytes)
    return b"\0".join(entries)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        os.close(fd)


@functools.cache
def _warn_no_subreaper() -> None:
    log.warning(
        "prctl is unavailable: orphans of a command go to init, out of its guard's reach; "
        "only the group kill and the marker sweeps contain them"
    )


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


# --- sweeping an attempt by its marker ---------------------------------------------------------


async def _sweep(marker: str, pgid: int | None, reap_except: int) -> AttemptKill:
    """Sweep the attempt on a sweeper thread: a /proc scan of a busy host takes milliseconds.

    Shielded, so a second cancellation neither un-queues the kill nor stops it half way.
    """
    # The guard (reap_except) is not reaped there: asyncio's child watcher owns its status.
    job = functools.partial(_sweep_blocking, marker, pgid, _DEATH_WAIT, reap_except)
    return await asyncio.shield(asyncio.get_running_loop().run_in_executor(_SWEEPERS, job))


def _sweep_blocking(
    marker: str, pgid: int | None, wait: float, reap_except: int | None
) -> AttemptKill:
    """Freeze and kill the attempt, then wait (bounded) until every process of it is gone."""
    entry = f"{ATTEMPT_ENV}={marker}".encode()
    targets, killed_at, scanned = attempt_guard.freeze_and_kill(
        lambda pid, _stat: _carries(pid, entry), pgid, os.getpid()
    )
    if not scanned:
        _warn_no_proc()
    try:
        deadline = time.monotonic() + wait
        while not attempt_guard.all_gone(targets, reap_except) and time.monotonic() < deadline:
            time.sleep(_DEATH_POLL)
        gone = attempt_guard.all_gone(targets, reap_except)
    finally:
        attempt_guard.release(targets)
    if not gone:
        log.warning("attempt %s: killed processes still alive after %.1f s", marker, wait)
    return AttemptKill(
        pids=tuple(target.pid for target in targets),
        killed_at=killed_at,
        all_gone=gone,
        scanned=scanned,
    )


def _carries(pid: int, entry: bytes) -> bool:
    try:
        with open(f"{attempt_guard.PROC}/{pid}/environ", "rb") as handle:
            environ = handle.read()
    except OSError:
        return False  # vanished, or another user's (unreadable unless we are root)
    return entry in environ.split(b"\0")


@functools.cache
def _warn_no_proc() -> None:
    log.warning("cannot list /proc: attempts are contained by their group and guard only")


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
