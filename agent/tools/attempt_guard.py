"""The attempt guard: one small process per live command, between the driver and the command.

Invariant: no process the command starts outlives its guard, and the guard ends the attempt
(freezes, kills and reaps everything below it) at the command's deadline, when its driver goes
away, when it is asked to stop, or once the command exited and the driver has read all of its
output; whatever the command does to its environment, session or signal dispositions.
- It becomes a child subreaper before it starts anything, so every orphaned descendant (double
  fork, setsid, emptied environment) is reparented to the guard, never to init: the guard's
  subtree is the attempt, and a /proc walk from the guard finds all of it.
- It measures the deadline itself (CLOCK_MONOTONIC, shared with the driver), so a frozen driver
  changes nothing. The driver's liveness is a pipe whose write end only the driver holds: EOF
  means it died or cancelled. SIGTERM (also the guard's parent-death signal), SIGHUP and SIGINT
  end the attempt too. Its own session keeps terminal signals away.
- A sweep stops every process of the subtree with SIGSTOP until a /proc scan finds nothing new
  (so none can fork away meanwhile), SIGKILLs them all and reaps them, orphans included.
- The spawn gate is checked in the command's child right before exec; the command gets its own
  session, the environment it was given (read from a memfd: the guard itself runs with only the
  attempt marker, so neither the command's LD_* variables nor Python's locale coercion reach
  across), stdin /dev/null and the driver's output pipes, which the guard never writes to.
- The guard carries the marker (`LOOM_OPS_ATTEMPT`), so `kill_attempt` finds it, and through it
  its whole subtree, even when the guard itself is frozen.
Out of reach: a process that changes its user (sudo, a setuid program: it may refuse our
signals), anything started by another daemon (systemd-run, at, ssh), and the orphans of a
command that SIGKILLs its own guard (the command itself dies by its parent-death signal).

Started by `agent.tools.shell` as `python -S -I attempt_guard.py LIVE STATUS OUT ERR ENV DRIVER
DEADLINE SPAWN_BEFORE -- ARGV...` (file descriptors, the driver's pid, a time.monotonic()
deadline and a time.time() gate or "-"). It imports nothing from `agent` and no slow standard
module (`_signal`, not `signal`, which imports enum), so it starts in about 15 ms.
`agent.tools.shell` imports its sweep, so one algorithm freezes and kills in both places.
It tells the driver, one line each: `spawned PID SUBREAPER`, `exited STATUS`, then
`ended HOW KILLED ALL_GONE SCANNED STATUS|-` (HOW: exit, timeout, gone, signal, error),
or only `refused` / `failed ERRNO HEXNAME|-`; `error TEXT` reports a fault of its own.
The driver writes DONE once it has all the output.
"""

from __future__ import annotations

# Only fast imports: `_signal`, not `signal` (enum would double the start-up), and plain
# try/except instead of contextlib.suppress (another 6 ms), hence the SIM105 exemptions below.
import _signal
import os
import select
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

PROC = "/proc"
# Scan rounds before killing what is frozen even though more keep appearing (a fork storm).
FREEZE_ROUNDS = 20
# How long a sweep waits for the killed to be gone; SIGKILL is final, but a process in an
# uninterruptible sleep (a hung NFS read) dies only when that sleep ends.
DEATH_WAIT = 5.0
DEATH_POLL = 0.01
# Driver to guard: the command exited and its output is all read, so end the attempt now.
DONE = b"d"
# Exit status of a command whose guard died before the command could ask to die with it.
ORPHANED_EXIT = 125

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_STOP_SIGNALS = frozenset((_signal.SIGTERM, _signal.SIGHUP, _signal.SIGINT))
# Dispositions the guard changes (Python ignores SIGPIPE and SIGXFSZ; it catches the others):
# the command gets the defaults back, as subprocess's restore_signals would give it.
_RESET = (_signal.SIGPIPE, _signal.SIGXFSZ, _signal.SIGCHLD, *_STOP_SIGNALS)


# --- sweeping: shared with agent.tools.shell ----------------------------------------------


class Stat:
    """The fields of /proc/<pid>/stat a sweep uses: state letter, parent, group, start time."""

    __slots__ = ("pgrp", "ppid", "start_time", "state")

    def __init__(self, state: str, ppid: int, pgrp: int, start_time: int) -> None:
        self.state = state
        self.ppid = ppid
        self.pgrp = pgrp
        self.start_time = start_time

    @property
    def exited(self) -> bool:
        """True for a zombie or a dying process: it can no longer act, it only awaits reaping."""
        return self.state in ("Z", "X", "x")


def read_stat(pid: int) -> Stat | None:
    """The stat fields of `pid`, or None if it is gone or unreadable."""
    try:
        with open(f"{PROC}/{pid}/stat", "rb") as handle:
            raw = handle.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself hold spaces and ')'.
    fields = raw.rpartition(b")")[2].split()
    try:
        return Stat(fields[0].decode(), int(fields[1]), int(fields[2]), int(fields[19]))
    except (IndexError, ValueError):
        return None


class Target:
    """One process of an attempt, pinned by a pidfd where the kernel has them."""

    __slots__ = ("pid", "pidfd", "start_time")

    def __init__(self, pid: int, start_time: int, pidfd: int | None) -> None:
        self.pid = pid
        self.start_time = start_time
        self.pidfd = pidfd

    def send(self, sig: int) -> None:
        """Signal it; quietly nothing when it is gone or changed uid (a setuid program)."""
        try:
            if self.pidfd is not None:
                _signal.pidfd_send_signal(self.pidfd, sig)
            else:
                os.kill(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def freeze_and_kill(
    is_root: Callable[[int, Stat], bool], pgid: int | None, me: int
) -> tuple[list[Target], float | None, bool]:
    """Stop every root (as `is_root` says) and every descendant of one until a scan finds no new
    one, then SIGKILL them all; never `me`. Returns the targets (pidfds open: `release` them),
    when they were killed, and whether /proc could be scanned (if not, only `pgid` is killed)."""
    taken: dict[int, Target] = {}
    scanned = True
    for _ in range(FREEZE_ROUNDS):
        found = _scan(is_root, taken, me)
        if found is None:
            scanned = False
            break
        if not found:
            break
        for pid, stat in found:
            target = _pin(pid, stat)
            if target is not None:
                target.send(_signal.SIGSTOP)
                taken[pid] = target
    killed_at = time.time() if taken else None
    for target in taken.values():
        target.send(_signal.SIGKILL)
    if pgid is not None:
        # Also without /proc: the group is the one set the kernel finds for us.
        try:  # noqa: SIM105
            os.killpg(pgid, _signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return list(taken.values()), killed_at, scanned


def all_gone(targets: list[Target], reap_except: int | None, reap: bool = True) -> bool:
    """True when every target is gone or a zombie; with `reap`, reaps those zombies that are
    our children (but `reap_except`, whose status someone else collects)."""
    me = os.getpid()
    alive = False
    for target in targets:
        stat = read_stat(target.pid)
        if stat is None or stat.start_time != target.start_time:
            continue
        if not stat.exited:
            alive = True
        elif reap and stat.ppid == me and target.pid != reap_except:
            try:  # noqa: SIM105
                os.waitpid(target.pid, os.WNOHANG)
            except ChildProcessError:
                pass
    return not alive


def release(targets: list[Target]) -> None:
    """Close the targets' pidfds."""
    for target in targets:
        if target.pidfd is not None:
            os.close(target.pidfd)


def _scan(
    is_root: Callable[[int, Stat], bool], taken: dict[int, Target], me: int
) -> list[tuple[int, Stat]] | None:
    """The live processes of the attempt not yet taken; None when /proc cannot be listed."""
    try:
        names = os.listdir(PROC)
    except OSError:
        return None
    stats: dict[int, Stat] = {}
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
        if (known is not None and known.start_time == stat.start_time) or is_root(pid, stat):
            members.add(pid)
    # Whatever descends from the attempt is the attempt's, even with a scrubbed environment.
    children: dict[int, list[int]] = {}
    for pid, stat in stats.items():
        children.setdefault(stat.ppid, []).append(pid)
    stack = list(members)
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in members:
                members.add(child)
                stack.append(child)
    return [(pid, stats[pid]) for pid in sorted(members) if pid not in taken]


def _pin(pid: int, stat: Stat) -> Target | None:
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
    return Target(pid, stat.start_time, pidfd)


# --- the guard process --------------------------------------------------------------------------


def _load_prctl() -> Callable[[int, int], int] | None:
    """prctl(option, value) from libc, or None where there is none (the guard then degrades)."""
    try:
        import ctypes  # only here: agent.tools.shell imports this module and needs no ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.prctl
    except (ImportError, OSError, AttributeError):
        return None
    zero = ctypes.c_ulong(0)

    def prctl(option: int, value: int) -> int:
        return int(function(ctypes.c_int(option), ctypes.c_ulong(value), zero, zero, zero))

    return prctl


class _Guard:
    """The state of one guard: the pipes to the driver, the command, and its wait status."""

    def __init__(self, live: int, status: int, deadline: float) -> None:
        self.me = os.getpid()
        self.live = live
        self.status = status
        self.deadline = deadline
        self.leader: int | None = None
        self.leader_status: int | None = None
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)

    def say(self, *words: object) -> None:
        """One status line to the driver; nothing when the driver is gone."""
        try:  # noqa: SIM105
            os.write(self.status, (" ".join(str(word) for word in words) + "\n").encode())
        except OSError:
            pass

    def listen(self) -> None:
        """Catch SIGCHLD and the stop signals; each one wakes `watch` through a pipe."""
        for sig in (_signal.SIGCHLD, *_STOP_SIGNALS):
            _signal.signal(sig, _ignore)
        _signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)

    def driver_gone(self) -> bool:
        """True when the liveness pipe reads EOF already (the driver died or cancelled)."""
        return bool(select.select([self.live], [], [], 0)[0]) and not os.read(self.live, 1)

    def spawn(
        self,
        argv: list[str],
        env: dict[bytes, bytes],
        out: int,
        err: int,
        spawn_before: float | None,
        prctl: Callable[[int, int], int] | None,
    ) -> str | None:
        """Fork and exec the command; None once it runs, else why not ("refused", "failed ...")."""
        report_r, report_w = os.pipe()  # close-on-exec: EOF without a word means it exec'd
        pid = os.fork()
        if pid == 0:
            os.close(report_r)
            _become_command(argv, env, out, err, spawn_before, prctl, self.me, report_w)
        os.close(report_w)
        self.leader = pid
        report = _read_until_eof(report_r, self.deadline)
        os.close(report_r)
        if not report:
            return None  # exec'd (or still about to, at the deadline: `watch` ends it then)
        os.waitpid(pid, 0)  # it exits right after its report
        self.leader = None
        return report.decode(errors="replace")

    def reap(self) -> bool:
        """Reap every child that exited, orphans included, noting the command's wait status;
        False once no child is left."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return False
            if pid == 0:
                return True
            if pid == self.leader and self.leader_status is None:
                self.leader_status = status
                self.say("exited", status)

    def watch(self) -> str:
        """Wait for the end of the attempt; says how it came: "exit" (the command exited and the
        driver has its output), "timeout", "gone" (the driver) or "signal" (a stop signal)."""
        poller = select.poll()
        poller.register(self.live, select.POLLIN)
        poller.register(self.wake_r, select.POLLIN)
        while True:
            self.reap()
            left = self.deadline - time.monotonic()
            if left <= 0:
                return "timeout"
            for fd, _ in poller.poll(int(left * 1000) + 1):
                if fd == self.live:
                    word = os.read(self.live, 64)
                    if not word:
                        return "gone"
                    if DONE in word and self.leader_status is not None:
                        return "exit"
                else:
                    try:
                        caught = os.read(self.wake_r, 512)
                    except BlockingIOError:
                        caught = b""
                    if _STOP_SIGNALS.intersection(caught):
                        return "signal"

    def sweep(self) -> tuple[int, bool, bool]:
        """Freeze, kill and reap the whole subtree; returns how many were alive, whether all
        are gone, and whether /proc could be scanned."""
        me = self.me
        killed, scanned = 0, True
        give_up = time.monotonic() + DEATH_WAIT
        pause = DEATH_POLL
        while True:
            targets, _, found_all = freeze_and_kill(
                lambda _pid, stat: stat.ppid == me, self.leader, me
            )
            scanned = scanned and found_all
            killed += len(targets)
            try:
                while self.reap():
                    if time.monotonic() >= give_up:
                        return killed, False, scanned
                    if found_all and all_gone(targets, None, reap=False):
                        break  # children remain that the last scan missed: sweep again
                    time.sleep(DEATH_POLL)
                else:
                    return killed, True, scanned
            finally:
                release(targets)
            # Rescans back off: what survives them is likely a setuid process we may not kill.
            time.sleep(pause)
            pause = min(pause * 2, 0.2)


def _ignore(signum: int, frame: object) -> None:
    """A handler that does nothing: the wakeup pipe carries the signal number."""


def _read_until_eof(fd: int, deadline: float) -> bytes:
    """Everything written to `fd` until EOF, or what came before the deadline."""
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return data
        chunk = os.read(fd, 4096)
        if not chunk:
            return data
        data += chunk


def _become_command(
    argv: list[str],
    env: dict[bytes, bytes],
    out: int,
    err: int,
    spawn_before: float | None,
    prctl: Callable[[int, int], int] | None,
    guard: int,
    report: int,
) -> None:
    """In the forked child: set up and exec the command, or report why not. Never returns."""
    try:
        _signal.set_wakeup_fd(-1)  # the guard's pipe: a signal here must not wake the guard
        for sig in _RESET:
            _signal.signal(sig, _signal.SIG_DFL)
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(err, 2)
        if prctl is not None:
            # Armed only now: a guard that died since the fork sent nothing, so look.
            prctl(_PR_SET_PDEATHSIG, _signal.SIGKILL)
            if os.getppid() != guard:
                os._exit(ORPHANED_EXIT)
        # Last, right before exec: nothing starts once the gate has closed.
        if spawn_before is not None and time.time() >= spawn_before:
            os.write(report, b"refused")
            os._exit(ORPHANED_EXIT)
        os.execvpe(argv[0], argv, env)
    except BaseException as exc:
        try:
            os.write(report, _failure(exc).encode())
        finally:
            os._exit(127)


def _failure(exc: BaseException) -> str:
    """The report of a command that could not be started: its errno and the name it concerns."""
    if isinstance(exc, OSError):
        name = exc.filename
        hexname = (name if isinstance(name, bytes) else os.fsencode(name)).hex() if name else "-"
        return f"failed {exc.errno or 0} {hexname}"
    return f"failed 0 {os.fsencode(repr(exc)).hex()}"


def _read_env(fd: int) -> dict[bytes, bytes]:
    """The command's environment, NUL-separated NAME=VALUE entries, from a file at offset 0."""
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    env: dict[bytes, bytes] = {}
    for entry in b"".join(chunks).split(b"\0"):
        if entry:
            name, _, value = entry.partition(b"=")
            env[name] = value
    return env


def main(args: list[str]) -> int:
    """Guard one command as `args` say (see the module docstring); 0 once the attempt is over."""
    live, status, out, err, env_fd, driver = (int(word) for word in args[:6])
    deadline = float(args[6])
    spawn_before = None if args[7] == "-" else float(args[7])
    argv = args[9:]
    if args[8] != "--" or not argv:
        return 2
    prctl = _load_prctl()
    # First of all: from here on no orphan of the attempt can reach init while we live.
    subreaper = prctl is not None and prctl(_PR_SET_CHILD_SUBREAPER, 1) == 0
    for fd in (live, status, out, err, env_fd):
        os.set_inheritable(fd, False)
    env = _read_env(env_fd)
    guard = _Guard(live, status, deadline)
    guard.listen()
    if prctl is not None:
        # A second line behind the liveness pipe; armed only now, so look at the parent after.
        prctl(_PR_SET_PDEATHSIG, _signal.SIGTERM)
    if os.getppid() != driver or guard.driver_gone():
        guard.say("ended gone 0 1 1 -")
        return 0
    if time.monotonic() >= deadline:
        guard.say("ended timeout 0 1 1 -")  # out of time before it started: start nothing
        return 0
    failure = guard.spawn(argv, env, out, err, spawn_before, prctl)
    os.close(out)
    os.close(err)
    if failure is not None:
        guard.say(failure)
        return 0
    guard.say("spawned", guard.leader, int(subreaper))
    try:
        how = guard.watch()
    except BaseException as exc:  # a fault of ours must not leave the command unguarded
        guard.say("error", repr(exc).replace("\n", " "))
        how = "error"
    killed, gone, scanned = guard.sweep()
    leader_status = "-" if guard.leader_status is None else guard.leader_status
    guard.say("ended", how, killed, int(gone), int(scanned), leader_status)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
