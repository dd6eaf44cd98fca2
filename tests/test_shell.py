"""run_command with real processes: exit codes, capped streaming output, group kill, clean env."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from agent.shell import CommandResult, run_command, scrubbed_environment

PY = sys.executable
ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}


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


async def test_a_process_that_left_the_group_cannot_hold_the_call_open(tmp_path: Path) -> None:
    # setsid puts the sleeper in a new session, out of reach of killpg, still holding stdout.
    pidfile = tmp_path / "pidfile"
    argv = ["/bin/sh", "-c", f"setsid sleep 30 & echo $! > {pidfile}; wait"]
    started = time.monotonic()
    try:
        result = await run_command(argv, timeout=1, env=ENV)
        assert time.monotonic() - started < 3
        assert result.timed_out
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
    assert set(seen) <= {"PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "USER", "KUBECONFIG"}


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
