"""The orphan sweep keys on owner locks, not PIDs: containers reuse PIDs (PID 1 every
time) and a Kubernetes memory emptyDir outlives the container that wrote it."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from streamer.workers.shm import SHM_DIR, SlotPool, sweep_orphans

pytestmark = pytest.mark.timeout(120)

# A child creates a pool whose name carries ``pid`` (what another container's PID
# namespace, or an earlier incarnation of this container, would write), then either
# dies with its whole process group (resource tracker included) or waits for stdin.
CHILD = """
import os, signal, sys
real_getpid, os.getpid = os.getpid, lambda: {pid}
from streamer.workers.shm import SlotPool
pool = SlotPool(2, 1024)
os.getpid = real_getpid
pool.open()
print(pool.prefix, flush=True)
if {die}:
    os.killpg(0, signal.SIGKILL)
sys.stdin.readline()
pool.close()
"""


def names(prefix: str) -> list[str]:
    return sorted(p.name for p in SHM_DIR.glob(f"{prefix}*"))


def remove(prefix: str) -> None:
    for path in SHM_DIR.glob(f"{prefix}*"):
        path.unlink(missing_ok=True)


def dead_pid() -> int:
    probe = subprocess.Popen([sys.executable, "-c", ""])
    probe.wait()
    return probe.pid


def orphan_named_with(pid: int) -> str:
    """The prefix of a pool whose owner was SIGKILLed; its name carries ``pid``."""
    prefix = subprocess.run(
        [sys.executable, "-c", CHILD.format(pid=pid, die=True)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,
    ).stdout.strip()
    assert prefix.startswith(f"streamer-{pid}-")
    assert len(names(prefix)) >= 2
    return prefix


@contextmanager
def live_pool_in_child(pid: int) -> Iterator[str]:
    with subprocess.Popen(
        [sys.executable, "-c", CHILD.format(pid=pid, die=False)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        assert child.stdin is not None and child.stdout is not None
        prefix = child.stdout.readline().strip()
        try:
            yield prefix
        finally:
            child.stdin.close()
            child.wait(timeout=60)
            remove(prefix)


@pytest.mark.parametrize("pid", ["ours", 1], ids=["our-pid", "pid-1"])
def test_an_orphan_named_with_a_live_pid_is_swept(pid: object) -> None:
    # PID reuse: the dead owner's PID number belongs to a live process now (us, or
    # PID 1 of this namespace), which the PID rule took for the owner forever.
    prefix = orphan_named_with(os.getpid() if pid == "ours" else 1)
    try:
        removed = sweep_orphans()
        assert {f"{prefix}-payload", f"{prefix}-pixels"} <= set(removed)
        assert names(prefix) == []
    finally:
        remove(prefix)


def test_a_live_pool_with_the_same_pid_keeps_its_segments_while_an_orphan_goes() -> None:
    with SlotPool(slots=1, payload_bytes=1024) as live:
        orphan = orphan_named_with(int(live.prefix.split("-")[1]))
        try:
            sweep_orphans()
            assert names(orphan) == []
            assert f"{live.prefix}-payload" in names(live.prefix)
            assert f"{live.prefix}-pixels" in names(live.prefix)
            live.write_payload(live.acquire(), b"still mapped")
        finally:
            remove(orphan)


def test_a_live_pool_in_another_pid_namespace_is_never_swept() -> None:
    # Another container sharing /dev/shm: its PID means nothing here (no such process).
    with live_pool_in_child(dead_pid()) as prefix:
        before = names(prefix)
        assert {f"{prefix}-payload", f"{prefix}-pixels"} <= set(before)
        assert not set(sweep_orphans()) & set(before)
        assert names(prefix) == before


def test_a_segment_whose_owner_file_is_gone_is_swept() -> None:
    # A live owner's file outlives its segments, so a segment without one is an orphan.
    prefix = f"streamer-{os.getpid()}-{'ab' * 8}"
    (SHM_DIR / f"{prefix}-payload").write_bytes(b"x")
    try:
        assert f"{prefix}-payload" in sweep_orphans()
        assert names(prefix) == []
    finally:
        remove(prefix)


def test_names_without_an_instance_id_keep_the_pid_rule() -> None:
    gone, alive = f"streamer-{dead_pid()}-abcdef", f"streamer-{os.getpid()}-abcdef"
    for prefix in (gone, alive):
        (SHM_DIR / f"{prefix}-payload").write_bytes(b"x")
    try:
        removed = sweep_orphans()
        assert f"{gone}-payload" in removed
        assert names(alive) == [f"{alive}-payload"]
    finally:
        remove(gone)
        remove(alive)


def test_an_owner_file_swept_before_it_is_locked_is_claimed_anew(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A sweep can lock and unlink a fresh owner file before its creator locks it.
    real_flock = fcntl.flock
    swept: list[str] = []

    def sweep_first(fd: int, operation: int) -> None:
        if not swept:
            swept.append(os.readlink(f"/proc/self/fd/{fd}"))
            os.unlink(swept[0])
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", sweep_first)
    with SlotPool(slots=1, payload_bytes=1024) as pool:
        assert swept and not swept[0].startswith(str(SHM_DIR / pool.prefix))
        assert f"{pool.prefix}.owner" in names(pool.prefix)
        assert not set(sweep_orphans()) & set(names(pool.prefix))
