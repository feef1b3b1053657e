from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from streamer.workers.shm import (
    OWNER_SUFFIX,
    SHM_DIR,
    SlotPool,
    SlotPoolExhausted,
    SlotView,
    sweep_orphans,
)


def files(prefix: str) -> list[str]:
    """Everything the instance ``prefix`` has in /dev/shm: segments and owner file."""
    return sorted(p.name for p in SHM_DIR.glob(f"{prefix}*"))


def segments(prefix: str) -> list[str]:
    return [name for name in files(prefix) if not name.endswith(OWNER_SUFFIX)]


def test_slots_are_exhausted_then_reused() -> None:
    with SlotPool(slots=3, payload_bytes=1024) as pool:
        taken = [pool.acquire() for _ in range(3)]
        assert sorted(taken) == [0, 1, 2]
        with pytest.raises(SlotPoolExhausted):
            pool.acquire()
        pool.release(taken[1])
        assert pool.acquire() == taken[1]
        assert pool.free == 0


def test_a_worker_view_sees_payloads_and_the_owner_sees_pixels() -> None:
    with SlotPool(slots=2, payload_bytes=1024) as pool:
        slot = pool.acquire()
        n = pool.write_payload(slot, b"\x01\x02\x03")
        worker = SlotView.attach(pool.layout)  # what a worker process does
        try:
            assert bytes(worker.payload(slot, n)) == b"\x01\x02\x03"
            worker.pixels[slot] = 7
        finally:
            worker.close()
        assert np.all(pool.view.pixels[slot] == 7)
        with pytest.raises(ValueError):
            pool.write_payload(slot, b"x" * 1025)


def test_close_unlinks_every_segment_and_is_idempotent() -> None:
    pool = SlotPool(slots=2, payload_bytes=1024)
    pool.open()
    assert len(segments(pool.prefix)) == 2
    assert f"{pool.prefix}{OWNER_SUFFIX}" in files(pool.prefix)
    assert pool.layout.total_bytes == 2 * (1024 + 3 * 224 * 224)
    pool.close()
    pool.close()
    assert files(pool.prefix) == []


def test_segments_of_a_dead_instance_are_swept() -> None:
    # A child creates a pool, then its whole process group (resource tracker included)
    # is SIGKILLed, as when a container is killed: nobody unlinks the segments.
    code = (
        "import os, signal; from streamer.workers.shm import SlotPool; "
        "p = SlotPool(2, 1024); p.open(); print(p.prefix, flush=True); "
        "os.killpg(0, signal.SIGKILL)"
    )
    prefix = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,
    ).stdout.strip()
    assert prefix.startswith("streamer-")
    assert len(segments(prefix)) == 2
    removed = sweep_orphans()
    assert {f"{prefix}-payload", f"{prefix}-pixels"} <= set(removed)
    assert files(prefix) == []


def test_sweep_leaves_live_instances_alone() -> None:
    with SlotPool(slots=1, payload_bytes=1024) as pool:
        sweep_orphans()
        assert len(segments(pool.prefix)) == 2
