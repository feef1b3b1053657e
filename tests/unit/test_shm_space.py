"""A pool that does not fit in /dev/shm is refused at start, not met with SIGBUS later."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from streamer.config import PIXELS_PER_SLOT
from streamer.errors import ConfigError
from streamer.workers.shm import SHM_DIR, SlotPool


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@pytest.mark.parametrize("where", ["dev-shm", "injected"])
def test_a_pool_larger_than_the_free_shared_memory_is_a_config_error(
    where: str, tmp_path: Path
) -> None:
    path = SHM_DIR if where == "dev-shm" else tmp_path
    payload_bytes = free_bytes(path) // 2  # two slots: more than is free
    options = {} if where == "dev-shm" else {"shm_path": path}  # the default is /dev/shm
    pool = SlotPool(slots=2, payload_bytes=payload_bytes, **options)
    try:
        with pytest.raises(ConfigError) as info:
            pool.open()
    finally:
        pool.close()
    message = str(info.value)
    assert "\n" not in message
    assert str(2 * (payload_bytes + PIXELS_PER_SLOT)) in message
    assert str(path) in message
    for remedy in ("MAX_IN_FLIGHT", "MAX_PAYLOAD_BYTES", "--shm-size", "sizeLimit"):
        assert remedy in message
    assert list(SHM_DIR.glob(f"{pool.prefix}*")) == []


def test_a_pool_that_fits_opens() -> None:
    with SlotPool(slots=2, payload_bytes=1024) as pool:
        assert pool.free == 2
