"""run_command with real processes: exit codes, capped output, clean env, and containment.

Containment is tested with real drivers, real guards and real strays: setsid grandchildren,
double-forked daemons that empty their environment, commands that ignore SIGALRM and re-exec
themselves without the marker, drivers SIGKILLed or frozen with SIGSTOP, frozen guards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import SpawnRefused
from agent.run.host import read_stat
from agent.tools import attempt_guard, shell
from agent.tools.shell import (
    ATTEMPT_ENV,
    SAFE_ENV_BASE,
    CommandResult,
    kill_attempt,
    new_attempt_marker,
    run_command,
    scrubbed_environment,
)
from tests.cli_helpers import REPO

PY = sys.executable
ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}

# A command that leaves a stray behind: a forked process that calls setsid, closes its output
# and execs a sleeper that writes `stray.acted` after DELAY s. The command itself writes
# `command.acted` after DELAY s, unless HOW ends in "exit": then it exits 0 once the stray runs.
# With HOW "daemon..." the stray's parent exits at once (orphaning it) and the stray execs with
# an empty environment, so no marker is left on it: only the subtree it is in still holds it.
STRAY = r"""
import os, sys, time
where, delay, how = sys.argv[1], sys.argv[2], sys.argv[3]
daemon = how.startswith("daemon")
ACT = (
    "import sys, time; time.sleep(float(sys.argv[2])); "
    "open(sys.argv[1], 'w').write('acted'); time.sleep(30)"
)

def publish(name):
    path = os.path.join(where, name)
    with open(path + ".tmp", "w") as handle:
        handle.write(str(os.getpid()))
    os.rename(path + ".tmp", path)

publish("command.pid")
if os.fork() == 0:
    if daemon and os.fork() != 0:
        os._exit(0)
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    publish("stray.pid")
    env = {} if daemon else dict(os.environ)
    acted = os.path.join(where, "stray.acted")
    os.execve(sys.executable, [sys.executable, "-c", ACT, acted, delay], env)
while not os.path.exists(os.path.join(where, "stray.pid")):
    time.sleep(0.01)
if how.endswith("exit"):
    sys.exit(0)
time.sleep(float(delay))
open(os.path.join(where, "command.acted"), "w").write("acted")
time.sleep(30)
"""

# A driver process: runs one command through run_command as the job (JSON in argv[1]) says.
# With "spawn_in" it sets its spawn gate that many seconds ahead (as a kernel does from its
# lease), says so, and waits for a line on stdin, so a test can freeze it before the spawn.
DRIVER = r"""
import asyncio, json, sys, time
from agent.tools.shell import SpawnRefused, run_command

async def main():
    job = json.loads(sys.argv[1])
    spawn_before = None
    if job["spawn_in"] is not None:
        spawn_before = time.time() + job["spawn_in"]
        print("gate", spawn_before, flush=True)
        sys.stdin.readline()
    try:
        result = await run_command(
            job["argv"], timeout=job["timeout"], env=job["env"], marker=job["marker"],
            spawn_before=spawn_before,
        )
    except SpawnRefused as exc:
        print("refused:", exc, flush=True)
        sys.exit(3)
    print(json.dumps({"exit_code": result.exit_code, "timed_out": result.timed_out}))

asyncio.run(main())
"""

# A command that publishes its pid and sleeps.
SLEEPER = (
    "import os, sys, time; open(sys.argv[1] + '.tmp', 'w').write(str(os.getpid())); "
    "os.rename(sys.argv[1] + '.tmp', sys.argv[1]); time.sleep(30)"
)


# A command that defeats every per-process containment: it ignores SIGALRM, cancels any alarm,
# re-execs itself with an empty environment (so no marker is left on it), then publishes its pid
# as `command.pid` and writes `command.acted` after DELAY s. Run from a file: argv[1] is WHERE.
REEXEC = r"""
import os, signal, sys, time
signal.signal(signal.SIGALRM, signal.SIG_IGN)
signal.alarm(0)
if "LOOM_OPS_ATTEMPT" in os.environ:
    os.execve(sys.executable, [sys.executable, *sys.argv], {})
where, delay = sys.argv[1], float(sys.argv[2])
path = os.path.join(where, "command.pid")
with open(path + ".tmp", "w") as handle:
    handle.write(str(os.getpid()))
os.rename(path + ".tmp", path)
time.sleep(delay)
open(os.path.join(where, "command.acted"), "w").write("acted")
time.sleep(30)
"""


def _alive(pid: int) -> bool:
    """True if pid exists and is not a zombie (a zombie is dead, only not yet reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    # The state follows the parenthesised command name, which may itself contain spaces.
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def _wait_dead(pid: int, within: float = 2.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        await asyncio.sleep(0.05)
    return not _alive(pid)


async def _read_pid(pidfile: Path, within: float = 2.0) -> int:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        text = pidfile.read_text().strip() if pidfile.exists() else ""
        if text:
            return int(text)
        await asyncio.sleep(0.02)
    raise AssertionError(f"{pidfile} was never written")


def _stray_argv(where: Path, delay: float, how: str) -> list[str]:
    return [PY, "-c", STRAY, str(where), str(delay), how]


def _reexec_argv(where: Path, delay: float) -> list[str]:
    script = where / "reexec.py"
    script.write_text(REEXEC)
    return [PY, str(script), str(where), str(delay)]


def _environ(pid: int) -> bytes:
    return Path(f"/proc/{pid}/environ").read_bytes()


def _state(pid: int) -> str | None:
    stat = read_stat(pid)
    return None if stat is None else stat.state


def _acted(where: Path) -> list[str]:
    return sorted(path.name for path in where.glob("*.acted"))


async def _past(moment: float) -> None:
    """Sleep until time.monotonic() has passed `moment`."""
    await asyncio.sleep(max(0.0, moment - time.monotonic()))


def _driver(job: dict[str, object]) -> subprocess.Popen[str]:
    """Start a driver process for `job` (see DRIVER), with defaults for what the job leaves out."""
    full = {"timeout": 60, "env": ENV, "marker": new_attempt_marker(), "spawn_in": None}
    full.update(job)
    return subprocess.Popen(
        [PY, "-c", DRIVER, json.dumps(full)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


def _stop(driver: subprocess.Popen[str]) -> None:
    driver.kill()
    driver.wait(timeout=10)
    for stream in (driver.stdin, driver.stdout):
        if stream is not None:
            stream.close()


def _no_zombie_children() -> bool:
    """True when no child of this process has exited without being reaped."""
    try:
        return os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
    except ChildProcessError:
        return True  # no children at all


@pytest.fixture
def where(tmp_path: Path) -> Iterator[Path]:
    """A directory for one stray scenario; a process it recorded that still runs is killed after.

    Only processes whose command line names the directory: a pid reused since is left alone.
    """
    yield tmp_path
    for pidfile in tmp_path.glob("*.pid"):
        pid = int(pidfile.read_text())
        with contextlib.suppress(OSError):
            if str(tmp_path).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)


async def test_exit_code_and_stdout() -> None:
    result = await run_command(["/bin/echo", "hello", "world"], timeout=5, env=ENV)
    assert isinstance(result, CommandResult)
    assert result.exit_code == 0
    assert result.stdout == "hello world\n"
    assert result.stderr == ""
    assert result.stdout_bytes == len("hello world\n")
    assert not result.truncated
    assert not result.timed_out
    assert result.argv == ["/bin/echo", "hello", "world"]
    assert result.duration_ms > 0


async def test_non_zero_exit_is_a_result_with_stderr() -> None:
    code = "import sys; sys.stderr.write('boom'); sys.exit(3)"
    result = await run_command([PY, "-c", code], timeout=10, env=ENV)
    assert result.exit_code == 3
    assert result.stderr == "boom"
    assert result.stderr_bytes == 4
    assert not result.timed_out


async def test_no_shell_interprets_the_args(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    result = await run_command(
        ["/bin/echo", f"a; touch {marker}", "$(id)", "`id`"], timeout=5, env=ENV
    )
    assert result.stdout == f"a; touch {marker} $(id) `id`\n"
    assert not marker.exists()


async def test_stdin_is_devnull() -> None:
    code = "import sys; print(repr(sys.stdin.read()))"
    result = await run_command([PY, "-c", code], timeout=10, env=ENV)
    assert result.stdout == "''\n"


async def test_huge_output_is_capped_counted_and_drained() -> None:
    cap = 64 * 1024
    code = "import sys; sys.stdout.write('x' * 5_000_000); sys.stderr.write('e' * 3_000_000)"
    result = await run_command([PY, "-c", code], timeout=30, env=ENV, output_cap=cap)
    assert result.exit_code == 0
    assert result.stdout_bytes == 5_000_000
    assert result.stderr_bytes == 3_000_000
    assert result.truncated
    marker = f"\n[… truncated: {5_000_000 - cap} more bytes]"
    assert result.stdout == "x" * cap + marker
    assert len(result.stdout) <= cap + len(marker)
    assert result.stderr.startswith("e" * cap)
    assert result.stderr.endswith(f"[… truncated: {3_000_000 - cap} more bytes]")


async def test_output_at_exactly_the_cap_is_not_truncated() -> None:
    code = "import sys; sys.stdout.write('y' * 100)"
    result = await run_command([PY, "-c", code], timeout=10, env=ENV, output_cap=100)
    assert result.stdout == "y" * 100
    assert not result.truncated


async def test_undecodable_bytes_are_replaced_and_a_split_character_is_dropped() -> None:
    code = "import sys; sys.stdout.buffer.write(b'ok\\xff' + 'é'.encode() * 10)"
    result = await run_command([PY, "-c", code], timeout=10, env=ENV, output_cap=4)
    # 'ok', an invalid byte, then the first byte of 'é' cut by the cap.
    assert result.stdout.startswith("ok\ufffd\n[… truncated:")
    assert result.stdout_bytes == 3 + 20


async def test_timeout_kills_the_grandchildren_holding_the_pipes(tmp_path: Path) -> None:
    pidfile = tmp_path / "pidfile"
    argv = ["/bin/sh", "-c", f"sleep 30 & echo $! > {pidfile}; sleep 30"]
    started = time.monotonic()
    result = await run_command(argv, timeout=1, env=ENV)
    elapsed = time.monotonic() - started
    assert elapsed < 3, f"a 1 s timeout took {elapsed:.1f} s"
    assert result.timed_out
    assert result.exit_code is None
    grandchild = await _read_pid(pidfile)
    assert await _wait_dead(grandchild), f"grandchild {grandchild} survived the timeout"


async def test_timeout_with_a_background_grandchild_after_the_child_exits(
    tmp_path: Path,
) -> None:
    # The shell exits at once, but its background child keeps stdout open until killed.
    pidfile = tmp_path / "pidfile"
    argv = ["/bin/sh", "-c", f"sleep 30 & echo $! > {pidfile}; echo started"]
    started = time.monotonic()
    result = await run_command(argv, timeout=1, env=ENV)
    assert time.monotonic() - started < 3
    assert result.timed_out
    assert result.exit_code is None
    assert result.stdout == "started\n"
    assert await _wait_dead(await _read_pid(pidfile))


async def test_a_process_that_left_the_group_neither_holds_the_call_open_nor_survives(
    tmp_path: Path,
) -> None:
    # setsid puts the sleeper in a new session, out of reach of killpg, still holding stdout.
    pidfile = tmp_path / "pidfile"
    argv = ["/bin/sh", "-c", f"setsid sleep 30 & echo $! > {pidfile}; wait"]
    started = time.monotonic()
    try:
        result = await run_command(argv, timeout=1, env=ENV)
        assert time.monotonic() - started < 3
        assert result.timed_out
        assert not _alive(await _read_pid(pidfile)), "the setsid sleeper survived the timeout"
    finally:
        with contextlib.suppress(ProcessLookupError, ValueError, AssertionError):
            os.kill(await _read_pid(pidfile), signal.SIGKILL)


async def test_cancellation_kills_the_group_before_re_raising(tmp_path: Path) -> None:
    pidfile = tmp_path / "pidfile"
    argv = ["/bin/sh", "-c", f"sleep 30 & echo $! > {pidfile}; sleep 30"]
    task = asyncio.create_task(run_command(argv, timeout=60, env=ENV))
    grandchild = await _read_pid(pidfile)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await _wait_dead(grandchild), f"grandchild {grandchild} survived the cancellation"


async def test_env_is_scrubbed_and_passthrough_is_kept() -> None:
    source = {
        **os.environ,
        "LOOM_TEST_SECRET": "hunter2",
        "TELEGRAM_BOT_TOKEN": "123:abc",
        "AWS_SECRET_ACCESS_KEY": "xyz",
        "KUBECONFIG": "/etc/kube/config",
    }
    env = scrubbed_environment(source, ["KUBECONFIG", "NOT_IN_SOURCE"])
    result = await run_command(["/usr/bin/env"], timeout=5, env=env)
    seen = dict(line.split("=", 1) for line in result.stdout.splitlines())
    assert seen["KUBECONFIG"] == "/etc/kube/config"
    assert "hunter2" not in result.stdout
    assert "LOOM_TEST_SECRET" not in seen
    assert "TELEGRAM_BOT_TOKEN" not in seen
    assert "AWS_SECRET_ACCESS_KEY" not in seen
    assert "NOT_IN_SOURCE" not in seen
    assert seen[ATTEMPT_ENV] == result.marker
    assert set(seen) <= {*SAFE_ENV_BASE, "KUBECONFIG", ATTEMPT_ENV}


def test_scrubbed_environment_keeps_only_the_safe_base() -> None:
    source = {"PATH": "/bin", "HOME": "/root", "OPENAI_API_KEY": "sk-x", "TZ": "UTC"}
    assert scrubbed_environment(source, []) == {"PATH": "/bin", "HOME": "/root", "TZ": "UTC"}
    with pytest.raises(ValueError):
        scrubbed_environment(source, ["A=B"])


async def test_secret_in_the_parents_environment_does_not_reach_the_child(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LOOM_OPS_TEST_TOKEN", "s3cret")
    env = scrubbed_environment(os.environ, [])
    result = await run_command(["/usr/bin/env"], timeout=5, env=env)
    assert "s3cret" not in result.stdout
    assert "LOOM_OPS_TEST_TOKEN" not in result.stdout


async def test_missing_binary_is_exit_127(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-binary")
    result = await run_command([missing, "x"], timeout=5, env=ENV)
    assert result.exit_code == 127
    assert missing in result.stderr
    assert not result.timed_out


async def test_non_executable_file_is_exit_126(tmp_path: Path) -> None:
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    result = await run_command([str(script)], timeout=5, env=ENV)
    # Even root is refused exec of a file with no execute bit at all.
    assert result.exit_code == 126
    assert "Permission denied" in result.stderr


async def test_cwd_is_used(tmp_path: Path) -> None:
    result = await run_command(["/bin/pwd"], timeout=5, env=ENV, cwd=tmp_path)
    assert result.stdout.strip() == str(tmp_path.resolve())


async def test_no_fds_leak_across_many_runs() -> None:
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        await run_command(["/bin/true"], timeout=5, env=ENV)
    await run_command(["/nonexistent"], timeout=5, env=ENV)
    assert len(os.listdir("/proc/self/fd")) <= before + 2


async def test_a_setsid_grandchild_dies_at_the_step_timeout(where: Path) -> None:
    result = await run_command(_stray_argv(where, 1.5, "wait"), timeout=1, env=ENV)
    returned = time.monotonic()
    assert result.timed_out
    stray = await _read_pid(where / "stray.pid")
    assert not _alive(stray), "the setsid grandchild survived the timeout"
    assert result.processes_killed >= 2  # the command and its stray
    await _past(returned + 1.5 + 0.5)  # the stray started before the timeout: it is due by now
    assert _acted(where) == []


async def test_a_setsid_grandchild_left_by_a_command_that_exits_0_is_killed(where: Path) -> None:
    result = await run_command(_stray_argv(where, 0.5, "exit"), timeout=30, env=ENV)
    returned = time.monotonic()
    assert result.exit_code == 0
    assert not result.timed_out
    assert result.processes_killed == 1
    assert not _alive(await _read_pid(where / "stray.pid")), "the stray outlived its step"
    await _past(returned + 0.5 + 0.5)
    assert _acted(where) == []


async def test_an_orphan_with_a_scrubbed_environment_stays_in_reach_and_dies_at_the_timeout(
    where: Path,
) -> None:
    # Its parent exits at once and it carries no marker: only the guard being a subreaper keeps
    # it in the guard's subtree instead of init's.
    task = asyncio.create_task(run_command(_stray_argv(where, 1.5, "daemon"), timeout=1, env=ENV))
    command = await _read_pid(where / "command.pid")
    stray = await _read_pid(where / "stray.pid")
    command_stat = read_stat(command)
    assert command_stat is not None
    guard = command_stat.ppid
    assert guard not in (1, os.getpid())
    deadline = time.monotonic() + 2
    while (stat := read_stat(stray)) is not None and stat.ppid != guard:
        assert time.monotonic() < deadline, f"orphan {stray} went to {stat.ppid}, not {guard}"
        await asyncio.sleep(0.01)
    assert _environ(stray) == b""  # no marker: only the subtree holds it
    result = await task
    returned = time.monotonic()
    assert result.timed_out
    assert not _alive(stray), "the orphan with a scrubbed environment survived the timeout"
    await _past(returned + 1.5 + 0.5)
    assert _acted(where) == []


async def test_an_env_less_daemon_left_by_a_command_that_exits_0_does_not_act_late(
    where: Path,
) -> None:
    # Double fork, setsid, empty environment, then the command exits 0 at once: the daemon is
    # reparented to the guard, which kills it once the command's output is all read.
    result = await run_command(_stray_argv(where, 1.5, "daemon-exit"), timeout=1, env=ENV)
    returned = time.monotonic()
    assert result.exit_code == 0
    assert not result.timed_out
    assert result.processes_killed == 1
    assert not _alive(await _read_pid(where / "stray.pid")), "the daemon outlived its step"
    assert kill_attempt(result.marker or "").found == 0
    await _past(returned + 1.5 + 0.5)  # when it would have acted, past the 1 s timeout too
    assert _acted(where) == []
    assert _no_zombie_children()


async def test_a_background_job_that_ends_before_the_timeout_keeps_its_output() -> None:
    # The attempt ends when the command exited and its output is closed, not at the exit alone.
    argv = ["/bin/sh", "-c", "(sleep 0.3; echo late) & echo early"]
    result = await run_command(argv, timeout=10, env=ENV)
    assert result.exit_code == 0
    assert result.stdout == "early\nlate\n"
    assert not result.timed_out


async def test_cancelling_run_command_kills_the_setsid_grandchild(where: Path) -> None:
    task = asyncio.create_task(run_command(_stray_argv(where, 1.0, "wait"), timeout=60, env=ENV))
    command = await _read_pid(where / "command.pid")
    stray = await _read_pid(where / "stray.pid")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    cancelled = time.monotonic()
    assert not _alive(command)
    assert not _alive(stray), "the setsid grandchild survived the cancellation"
    await _past(cancelled + 1.0 + 0.5)
    assert _acted(where) == []


async def test_cancelling_run_command_kills_an_env_less_daemon_and_reaps_the_guard(
    where: Path,
) -> None:
    task = asyncio.create_task(run_command(_stray_argv(where, 1.0, "daemon"), timeout=60, env=ENV))
    command = await _read_pid(where / "command.pid")
    stray = await _read_pid(where / "stray.pid")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    cancelled = time.monotonic()
    assert not _alive(command)
    assert not _alive(stray), "the env-less daemon survived the cancellation"
    assert _no_zombie_children()  # the guard was waited for, not left behind
    await _past(cancelled + 1.0 + 0.5)
    assert _acted(where) == []


@pytest.mark.parametrize("how", ["wait", "daemon"])
async def test_a_sigkilled_driver_s_guard_kills_its_setsid_strays_without_a_resume(
    where: Path, how: str
) -> None:
    # "wait": the stray keeps the marker; "daemon": it double-forked and emptied its environment.
    # Neither the death signal nor the alarm reaches a setsid grandchild: the guard does.
    marker = new_attempt_marker()
    driver = _driver({"argv": _stray_argv(where, 1.5, how), "marker": marker})
    try:
        command = await _read_pid(where / "command.pid", within=10)
        stray = await _read_pid(where / "stray.pid", within=10)
        command_stat = read_stat(command)
        assert command_stat is not None
        guard = command_stat.ppid
        driver.kill()
        await asyncio.to_thread(driver.wait, 10)
        killed = time.monotonic()
        assert await _wait_dead(command), "the command outlived its SIGKILLed driver"
        assert await _wait_dead(stray), "the setsid stray outlived its SIGKILLed driver"
        assert await _wait_dead(guard), "the guard outlived its sweep"
        assert kill_attempt(marker).found == 0  # nothing left for the next driver to find
        await _past(killed + 1.5 + 0.5)
        assert _acted(where) == []
    finally:
        _stop(driver)


async def test_kill_attempt_reaches_an_env_less_command_under_its_frozen_guard(
    where: Path,
) -> None:
    # Driver and guard both frozen: only a same-host takeover's kill_attempt can act, and the
    # command re-exec'd itself without the marker. The guard carries it, and its subtree goes.
    marker = new_attempt_marker()
    driver = _driver({"argv": _reexec_argv(where, 2.0), "marker": marker})
    try:
        command = await _read_pid(where / "command.pid", within=10)
        started = time.monotonic()
        command_stat = read_stat(command)
        assert command_stat is not None
        guard = command_stat.ppid
        assert guard != driver.pid, "the command is not under a guard"
        assert f"{ATTEMPT_ENV}={marker}".encode() in _environ(guard).split(b"\0")
        assert _environ(command) == b""
        driver.send_signal(signal.SIGSTOP)
        os.kill(guard, signal.SIGSTOP)

        report = kill_attempt(marker)

        assert report.scanned
        assert report.all_gone
        assert {guard, command} <= set(report.pids)
        assert not _alive(command)
        await _past(started + 2.0 + 0.5)
        assert _acted(where) == []
    finally:
        _stop(driver)


async def test_a_frozen_driver_s_command_that_ignores_sigalrm_and_re_execs_dies_at_its_timeout(
    where: Path,
) -> None:
    timeout = 2.0
    driver = _driver({"argv": _reexec_argv(where, 4.0), "timeout": timeout})
    try:
        command = await _read_pid(where / "command.pid", within=10)
        seen = time.monotonic()  # the command was spawned a little before
        driver.send_signal(signal.SIGSTOP)  # it can no longer enforce the timeout itself
        assert _environ(command) == b""  # no marker left on it either
        assert await _wait_dead(command, within=timeout + 1.0), "it outlived its timeout"
        assert _state(driver.pid) == "T"  # still frozen: the guard did it, on its own clock
        await _past(seen + 4.0 + 0.5)
        assert _acted(where) == []
        # Thawed long past the deadline, the driver still learns from the guard what happened.
        driver.send_signal(signal.SIGCONT)
        assert driver.stdout is not None
        output = await asyncio.to_thread(driver.stdout.read)
        assert json.loads(output) == {"exit_code": None, "timed_out": True}
    finally:
        _stop(driver)


async def test_a_guard_killed_under_a_live_driver_is_replaced_by_the_driver_s_sweep(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The command dies by its death signal with its guard; its grandchild, which keeps the
    # marker, is found and killed by the driver, and the call returns long before its timeout.
    pidfile = tmp_path / "pidfile"
    argv = ["/bin/sh", "-c", f"sleep 30 & echo $! > {pidfile}; wait"]
    started = time.monotonic()
    task = asyncio.create_task(run_command(argv, timeout=30, env=ENV))
    grandchild = await _read_pid(pidfile)
    shell_stat = read_stat(grandchild)
    assert shell_stat is not None
    command_stat = read_stat(shell_stat.ppid)
    assert command_stat is not None
    guard = command_stat.ppid
    assert guard != os.getpid(), "the command is not under a guard"
    os.kill(guard, signal.SIGKILL)
    with caplog.at_level(logging.WARNING, logger="agent.tools.shell"):
        result = await task
    assert time.monotonic() - started < 10
    assert result.exit_code == -signal.SIGKILL
    assert not result.timed_out
    assert await _wait_dead(grandchild)
    assert "its guard ended without a last word (killed by signal 9)" in caplog.text


async def test_a_driver_frozen_until_after_spawn_before_starts_nothing(where: Path) -> None:
    marker = new_attempt_marker()
    driver = _driver({"argv": _stray_argv(where, 0.1, "wait"), "marker": marker, "spawn_in": 0.3})
    try:
        assert driver.stdin is not None and driver.stdout is not None
        said, gate = (await asyncio.to_thread(driver.stdout.readline)).split()
        assert said == "gate"
        driver.send_signal(signal.SIGSTOP)  # frozen after setting its gate, before the spawn
        driver.stdin.write("go\n")
        driver.stdin.flush()
        await asyncio.sleep(max(0.0, float(gate) - time.time()) + 0.05)
        driver.send_signal(signal.SIGCONT)
        output = await asyncio.to_thread(driver.stdout.read)
        assert await asyncio.to_thread(driver.wait, 10) == 3
        assert output.startswith("refused: not starting")
        assert not (where / "command.pid").exists()
        assert kill_attempt(marker).found == 0
    finally:
        _stop(driver)


async def test_a_gate_closing_after_the_parents_check_refuses_in_the_child(
    where: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Stands for a driver frozen between its own check and the exec: only the child's is left.
    monkeypatch.setattr(shell, "_refuse_if_closed", lambda spawn_before, argv: None)
    marker = new_attempt_marker()
    with pytest.raises(SpawnRefused, match="spawn gate closed"):
        await run_command(
            _stray_argv(where, 0.1, "wait"),
            timeout=5,
            env=ENV,
            marker=marker,
            spawn_before=time.time() - 0.01,
        )
    assert not (where / "command.pid").exists()
    assert kill_attempt(marker).found == 0
    assert _no_zombie_children()


async def test_an_open_spawn_gate_runs_the_command() -> None:
    result = await run_command(
        ["/bin/echo", "ok"], timeout=5, env=ENV, spawn_before=time.time() + 60
    )
    assert result.exit_code == 0
    assert result.stdout == "ok\n"


async def test_the_command_of_a_frozen_driver_is_killed_and_reaped_by_its_guard(
    tmp_path: Path,
) -> None:
    pidfile = tmp_path / "command.pid"
    driver = _driver({"argv": [PY, "-c", SLEEPER, str(pidfile)], "timeout": 2})
    try:
        command = await _read_pid(pidfile, within=10)
        command_stat = read_stat(command)
        assert command_stat is not None
        guard = command_stat.ppid
        driver.send_signal(signal.SIGSTOP)  # it can no longer enforce the timeout itself
        assert await _wait_dead(command, within=2 + 1), "the command outlived its timeout"
        assert await _wait_dead(guard)  # its work done (its sweep included), the guard exited
        assert read_stat(command) is None  # reaped by the guard, not a zombie of the driver
        assert _state(driver.pid) == "T"
    finally:
        _stop(driver)


def test_kill_attempt_kills_and_reaps_only_its_marker_s_processes() -> None:
    sleep = shutil.which("sleep") or "/bin/sleep"
    marker, other = new_attempt_marker(), new_attempt_marker()
    ours = os.posix_spawn(sleep, ["sleep", "30"], {**ENV, ATTEMPT_ENV: marker})
    theirs = os.posix_spawn(sleep, ["sleep", "30"], {**ENV, ATTEMPT_ENV: other})
    try:
        report = kill_attempt(marker)
        assert report.pids == (ours,)
        assert report.all_gone
        assert report.killed_at is not None
        with pytest.raises(ChildProcessError):  # already reaped by kill_attempt
            os.waitpid(ours, os.WNOHANG)
        assert _alive(theirs)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(theirs, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(theirs, 0)


def test_kill_attempt_never_kills_its_caller() -> None:
    marker = new_attempt_marker()
    code = f"from agent.tools.shell import kill_attempt; print(kill_attempt({marker!r}).found)"
    done = subprocess.run(
        [PY, "-c", code],
        env={**os.environ, ATTEMPT_ENV: marker},
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "0\n"


def test_a_marker_must_be_printable_without_spaces() -> None:
    for bad in ("", "has space", "nul\0", "x" * 201):
        with pytest.raises(ValueError, match="invalid attempt marker"):
            kill_attempt(bad)


def test_without_proc_kill_attempt_proves_nothing_and_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(attempt_guard, "PROC", str(tmp_path / "no-proc"))
    shell._warn_no_proc.cache_clear()
    sleep = shutil.which("sleep") or "/bin/sleep"
    marker = new_attempt_marker()
    ours = os.posix_spawn(sleep, ["sleep", "30"], {**ENV, ATTEMPT_ENV: marker})
    try:
        with caplog.at_level(logging.WARNING, logger="agent.tools.shell"):
            report = kill_attempt(marker)
        assert not report.scanned  # so the kernel must not conclude "had ended" from it
        assert report.found == 0
        assert _alive(ours)
        assert "cannot list /proc" in caplog.text
    finally:
        os.kill(ours, signal.SIGKILL)
        os.waitpid(ours, 0)


async def test_the_command_gets_exactly_its_environment_and_the_guard_only_the_marker(
    tmp_path: Path,
) -> None:
    # Odd values pass through byte for byte; none of the command's variables (LD_* included)
    # reaches the guard's interpreter, and none of the guard's (Python's locale coercion sets
    # LC_CTYPE) reaches the command.
    env = {**ENV, "ODD": "a=b c\x01\u00e9", "LD_LIBRARY_PATH": str(tmp_path / "nowhere")}
    pidfile = tmp_path / "guard.pid"
    code = (
        "import os, sys; open(sys.argv[1], 'w').write(str(os.getppid())); "
        "sys.stdout.buffer.write(open('/proc/self/environ', 'rb').read()); "
        "sys.stdout.flush(); import time; time.sleep(0.5)"
    )
    task = asyncio.create_task(run_command([PY, "-c", code, str(pidfile)], timeout=10, env=env))
    guard = await _read_pid(pidfile)
    guard_env = _environ(guard)
    result = await task
    entries = [entry for entry in result.stdout.split("\0") if entry]
    assert dict(entry.split("=", 1) for entry in entries) == {**env, ATTEMPT_ENV: result.marker}
    assert guard_env.split(b"\0") == [f"{ATTEMPT_ENV}={result.marker}".encode(), b""]
