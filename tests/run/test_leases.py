"""Owner ids and owner_is_dead with real processes, real pids and a real PID namespace."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from agent.run.host import HostIdentity, read_stat, this_host
from agent.run.leases import OwnerId, new_owner_id, owner_is_dead, parse_owner
from tests.cli_helpers import REPO

PY = sys.executable
PRINT_OWNER = "from agent.run.leases import new_owner_id; print(new_owner_id(), flush=True)"
PRINT_OWNER_AND_WAIT = PRINT_OWNER + "; import time; time.sleep(30)"
PRINT_PID_NS = "from agent.run.host import this_host; print(this_host().pid_ns)"


def _format(owner: OwnerId) -> str:
    """An owner id in new_owner_id's form, for owners these tests construct."""
    parts = [owner.boot, owner.pid_ns, owner.start_time]
    tail = ".".join("-" if part is None else str(part) for part in parts)
    return f"{owner.host}:{owner.pid}:{owner.token}@{tail}"


def _parsed(owner: str) -> OwnerId:
    parsed = parse_owner(owner)
    assert parsed is not None, f"{owner!r} does not parse"
    return parsed


def _exited_owner() -> str:
    """The owner id of a process of ours that has exited and been reaped."""
    done = subprocess.run(
        [PY, "-c", PRINT_OWNER], capture_output=True, text=True, timeout=30, cwd=REPO, check=True
    )
    return done.stdout.strip()


@pytest.fixture
def live_owner() -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """A live process of ours and the owner id it made; killed afterwards."""
    proc = subprocess.Popen(
        [PY, "-c", PRINT_OWNER_AND_WAIT], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        assert proc.stdout is not None
        yield proc.stdout.readline().strip(), proc
    finally:
        proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_owner_ids_name_this_process_instance_uniquely_and_parse() -> None:
    owners = {new_owner_id() for _ in range(200)}
    assert len(owners) == 200
    here = this_host()
    me = read_stat("self")
    assert here.boot_id is not None and here.pid_ns is not None and me is not None
    for owner in owners:
        parsed = _parsed(owner)
        assert parsed.host == socket.gethostname()
        assert parsed.pid == os.getpid()
        assert parsed.boot == here.boot_id.replace("-", "")[:12]
        assert parsed.pid_ns == os.stat("/proc/self/ns/pid").st_ino
        assert parsed.start_time == me.start_time
        assert _format(parsed) == owner


def test_a_hostname_with_colons_and_at_signs_still_parses() -> None:
    owner = "odd:host@name:4242:ab12cd34@0d7e66c253f7.4026531836.777"
    assert parse_owner(owner) == OwnerId(
        "odd:host@name", 4242, "ab12cd34", "0d7e66c253f7", 4026531836, 777
    )


def test_an_owner_that_exited_here_is_dead() -> None:
    assert owner_is_dead(_exited_owner())


def test_a_live_owner_is_not_dead(live_owner: tuple[str, subprocess.Popen[str]]) -> None:
    owner, _ = live_owner
    assert not owner_is_dead(owner)
    assert not owner_is_dead(new_owner_id())  # ourselves


def test_a_zombie_owner_is_dead(live_owner: tuple[str, subprocess.Popen[str]]) -> None:
    owner, proc = live_owner
    proc.kill()  # not reaped yet: the pid still exists, as a zombie
    deadline = time.monotonic() + 5
    while (stat := read_stat(proc.pid)) is None or not stat.exited:
        assert time.monotonic() < deadline, "the killed process never became a zombie"
        time.sleep(0.01)
    assert owner_is_dead(owner)


def test_a_pid_now_held_by_a_later_process_means_the_owner_is_dead() -> None:
    # Our pid, but an earlier start time: the process that owned it is gone, we reuse its pid.
    me = _parsed(new_owner_id())
    assert me.start_time is not None
    earlier = OwnerId(me.host, me.pid, me.token, me.boot, me.pid_ns, me.start_time - 1)
    assert owner_is_dead(_format(earlier))


def test_an_owner_elsewhere_is_never_declared_dead() -> None:
    dead = _parsed(_exited_owner())
    assert owner_is_dead(_format(dead))  # the control: here, it is provably dead
    assert dead.boot is not None and dead.pid_ns is not None
    elsewhere = [
        OwnerId("otherhost", dead.pid, dead.token, dead.boot, dead.pid_ns, dead.start_time),
        OwnerId(dead.host, dead.pid, dead.token, "ffffffffffff", dead.pid_ns, dead.start_time),
        OwnerId(dead.host, dead.pid, dead.token, dead.boot, dead.pid_ns + 1, dead.start_time),
        OwnerId(dead.host, dead.pid, dead.token, None, dead.pid_ns, dead.start_time),
        OwnerId(dead.host, dead.pid, dead.token, dead.boot, None, dead.start_time),
        OwnerId(dead.host, dead.pid, dead.token, dead.boot, dead.pid_ns, None),
    ]
    for owner in elsewhere:
        assert not owner_is_dead(_format(owner)), owner
    assert not owner_is_dead(f"{dead.host}:{dead.pid}:{dead.token}")  # the old form
    assert not owner_is_dead("garbage")


def test_same_pid_space_needs_every_part_known_and_equal() -> None:
    here = this_host()
    assert here.same_pid_space(here)
    assert not here.same_pid_space(HostIdentity(here.hostname, here.boot_id, None))
    assert not here.same_pid_space(HostIdentity(here.hostname, "another-boot", here.pid_ns))
    assert not HostIdentity(here.hostname, None, here.pid_ns).same_pid_space(here)


def _unshare_pid(*, mount_proc: bool) -> list[str]:
    """The argv prefix running a command as pid 1 of a new PID namespace, or a skip saying why."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare(1) is not installed")
    prefix = [unshare, "--pid", "--fork", *(["--mount-proc"] if mount_proc else [])]
    probe = subprocess.run([*prefix, "true"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"unshare --pid is not permitted here: {probe.stderr.strip()}")
    return prefix


def test_a_live_owner_in_another_pid_namespace_is_not_dead() -> None:
    prefix = _unshare_pid(mount_proc=True)
    proc = subprocess.Popen(
        [*prefix, PY, "-c", PRINT_OWNER_AND_WAIT], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        assert proc.stdout is not None
        owner = proc.stdout.readline().strip()
        parsed = _parsed(owner)
        assert parsed.pid == 1  # unshare --fork made it the namespace's first process
        assert parsed.pid_ns is not None and parsed.pid_ns != this_host().pid_ns
        assert not owner_is_dead(owner)
        # A pid that is free in our namespace says nothing about theirs either.
        free = _parsed(_exited_owner()).pid
        assert not owner_is_dead(_format(OwnerId(**{**vars(parsed), "pid": free})))
    finally:
        proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_a_proc_of_another_namespace_leaves_our_namespace_unknown() -> None:
    # Without --mount-proc, /proc still shows the outer namespace: its pids are not ours.
    prefix = _unshare_pid(mount_proc=False)
    done = subprocess.run(
        [*prefix, PY, "-c", PRINT_PID_NS], capture_output=True, text=True, timeout=30, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "None\n"
