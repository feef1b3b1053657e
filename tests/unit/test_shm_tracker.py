"""A normal start and stop leaves nothing behind and no resource-tracker complaints.

On Python < 3.13 every ``SharedMemory(name)`` registers the segment with the
resource tracker. An attacher with a tracker of its own (any process not started
by the owner's ``multiprocessing``) then reported "leaked shared_memory objects"
when it exited, and unlinked the owner's live segments. Attachers now map the
segments without it; only the owner registers, and the owner unlinks.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from streamer.workers.shm import SHM_DIR

pytestmark = pytest.mark.timeout(120)

SCRIPT = """
import asyncio, io, subprocess, sys
from PIL import Image
from streamer.metrics import Metrics
from streamer.pipeline.decode_chunks import DecodeChunks
from streamer.workers import decode_worker
from streamer.vision.decode import DecodeLimits
from streamer.workers.pool import WorkerPool
from streamer.workers.shm import SlotPool


async def main() -> None:
    with SlotPool(slots=2, payload_bytes=64 * 1024) as slots:
        print(slots.prefix, flush=True)
        layout = slots.layout
        pool = WorkerPool(
            "decode", 2, decode_worker.main, lambda i: (layout, DecodeLimits()), Metrics(), 60
        )
        await pool.start()
        try:
            image = io.BytesIO()
            Image.new("RGB", (32, 32), (1, 2, 3)).save(image, "PNG")
            slot = slots.acquire()
            n = slots.write_payload(slot, image.getvalue())
            await DecodeChunks(pool).submit((slot, n, False))
            assert list(slots.view.pixels[slot][:, 0, 0]) == [1, 2, 3]
            attach = (
                "import sys; from streamer.workers.shm import SlotLayout, SlotView; "
                f"view = SlotView.attach(SlotLayout(*{tuple(vars(layout).values())!r})); "
                "view.pixels[1] = 9; view.close()"
            )
            subprocess.run([sys.executable, "-c", attach], check=True, timeout=60)
            assert slots.view.pixels[1].min() == 9
        finally:
            await pool.stop()


if __name__ == "__main__":
    asyncio.run(main())
"""


def test_start_and_stop_with_attached_workers_leaks_nothing(tmp_path: Path) -> None:
    script = tmp_path / "pool_with_workers.py"
    script.write_text(SCRIPT)
    done = subprocess.run(
        [sys.executable, "-W", "always", str(script)],
        check=False,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stderr
    prefix = done.stdout.strip()
    assert prefix.startswith("streamer-")
    assert "leaked shared_memory" not in done.stderr
    assert "resource_tracker" not in done.stderr
    assert "FileNotFoundError" not in done.stderr  # nobody unlinked the owner's segments
    assert list(SHM_DIR.glob(f"{prefix}*")) == []
