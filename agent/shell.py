"""Running one admitted command: no shell, a group-wide timeout, capped output, a clean env.

The command is exec'd directly (never through a shell) as the leader of a new session, so it and
everything it spawns share one process group that a timeout or a cancellation kills at once with
SIGKILL. stdout and stderr are read concurrently as they arrive: the first `output_cap` bytes of
each are kept, the rest is drained and only counted, so the child never blocks on a full pipe and
memory stays bounded whatever the command prints.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import errno
import os
import signal
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_OUTPUT_CAP = 64 * 1024
SAFE_ENV_BASE: tuple[str, ...] = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "USER")

# After SIGKILL, how long we wait for the pipes to close and the child to be reaped. Only a
# process that left the group (setsid) can keep a pipe open past that; we stop reading from it.
_KILL_GRACE = 0.5


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


async def run_command(
    argv: list[str],
    *,
    timeout: float,
    env: dict[str, str],
    output_cap: int = DEFAULT_OUTPUT_CAP,
    cwd: Path | None = None,
) -> CommandResult:
    """Run argv (argv[0] an executable path) without a shell and return what happened.

    Non-zero exits, timeouts and binaries that cannot be executed are results, not exceptions.
    """
    if not argv:
        raise ValueError("run_command needs a non-empty argv")
    if timeout <= 0:
        raise ValueError("timeout must be positive")
    if output_cap < 0:
        raise ValueError("output_cap must not be negative")
    argv = list(argv)
    loop = asyncio.get_running_loop()
    started = time.monotonic()

    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out_w,
            stderr=err_w,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    except OSError as exc:
        os.close(out_r)
        os.close(err_r)
        return _spawn_failure(argv, exc, started)
    except BaseException:
        os.close(out_r)
        os.close(err_r)
        raise
    finally:
        # The child has its own copies; ours must go or EOF never arrives.
        os.close(out_w)
        os.close(err_w)

    # start_new_session made the child a session and group leader: its pgid is its pid. Kept
    # here because os.getpgid() no longer works once the leader is reaped.
    pgid = proc.pid
    out_sink = _CappedSink(output_cap, loop.create_future())
    err_sink = _CappedSink(output_cap, loop.create_future())
    transports: list[asyncio.BaseTransport] = []
    unowned_fds = [out_r, err_r]  # read ends not yet handed to a file object
    wait_task = asyncio.ensure_future(proc.wait())
    timed_out = False
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
            _kill_group(pgid)
            await asyncio.wait(pending, timeout=_KILL_GRACE)
    except BaseException:
        # Cancelled (or failed) mid-run: nothing of the command may outlive us. Reap the leader
        # (bounded) before re-raising, so its transport is closed while the loop still runs.
        _kill_group(pgid)
        await asyncio.wait({wait_task}, timeout=_KILL_GRACE)
        raise
    finally:
        for transport in transports:
            transport.close()
        if not wait_task.done():
            wait_task.cancel()
        for fd in unowned_fds:
            os.close(fd)

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
    )


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


def _kill_group(pgid: int) -> None:
    # ESRCH: the whole group is already gone. EPERM: a member changed uid (setuid binary); we
    # cannot do more about it than the kernel lets us.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _spawn_failure(argv: list[str], exc: OSError, started: float) -> CommandResult:
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
    )


def _elapsed_ms(started: float) -> float:
    return (time.monotonic() - started) * 1000.0
