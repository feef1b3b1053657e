"""Shared-memory slots: where payload bytes and pixels live between processes.

The main process owns two segments, created at start and unlinked at stop:

* payloads: ``slots x max_payload_bytes`` bytes, slot ``i`` holds record ``i``'s
  encoded image;
* pixels:   ``slots x 3 x 224 x 224`` uint8, slot ``i`` holds its decoded pixels.

Workers attach by name and read or write slot ``i``; IPC messages carry only slot
indices and lengths, so no pixel or payload byte is ever pickled. Memory is
bounded by configuration, whatever the input rate: ``slots x (max_payload_bytes +
150,528)`` bytes, of which only pages actually written are resident.

Segment names carry a per-instance prefix (``streamer-<pid>-<random>``) so that
leftovers of a killed instance can be found and swept.
"""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np

from streamer.config import PIXELS_PER_SLOT

log = logging.getLogger(__name__)

PIXEL_SHAPE = (3, 224, 224)
NAME_PREFIX = "streamer-"
SHM_DIR = Path("/dev/shm")


class SlotPoolExhausted(RuntimeError):
    """Every slot is taken; callers hold an in-flight permit per slot, so this is a bug."""


@dataclass(frozen=True)
class SlotLayout:
    """What a worker needs to attach: picklable, a few bytes."""

    payload_name: str
    pixel_name: str
    slots: int
    payload_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.slots * (self.payload_bytes + PIXELS_PER_SLOT)


class SlotView:
    """A process's window on the slot segments (the owner's and every worker's)."""

    def __init__(
        self,
        layout: SlotLayout,
        payload: shared_memory.SharedMemory,
        pixels: shared_memory.SharedMemory,
    ) -> None:
        self.layout = layout
        self._payload_shm = payload
        self._pixel_shm = pixels
        self.payloads = np.ndarray((layout.slots, layout.payload_bytes), np.uint8, payload.buf)
        self.pixels = np.ndarray((layout.slots, *PIXEL_SHAPE), np.uint8, pixels.buf)

    @classmethod
    def attach(cls, layout: SlotLayout) -> SlotView:
        return cls(layout, _attach(layout.payload_name), _attach(layout.pixel_name))

    def payload(self, slot: int, length: int) -> memoryview:
        return self.payloads[slot, :length].data

    def close(self) -> None:
        # Drop the numpy views first: SharedMemory.close() fails while they export the buffer.
        del self.payloads, self.pixels
        self._payload_shm.close()
        self._pixel_shm.close()


class SlotPool:
    """The owner side: creates the segments, hands out free slots, unlinks at the end."""

    def __init__(self, slots: int, payload_bytes: int, prefix: str | None = None) -> None:
        self.prefix = prefix or f"{NAME_PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
        self._slots = slots
        self._payload_bytes = payload_bytes
        self._free: list[int] = []
        self._view: SlotView | None = None

    @property
    def layout(self) -> SlotLayout:
        return self.view.layout

    @property
    def view(self) -> SlotView:
        if self._view is None:
            raise RuntimeError("SlotPool is not open")
        return self._view

    @property
    def free(self) -> int:
        return len(self._free)

    def open(self) -> None:
        layout = SlotLayout(
            f"{self.prefix}-payload", f"{self.prefix}-pixels", self._slots, self._payload_bytes
        )
        payload = shared_memory.SharedMemory(
            layout.payload_name, create=True, size=layout.slots * layout.payload_bytes
        )
        try:
            pixels = shared_memory.SharedMemory(
                layout.pixel_name, create=True, size=layout.slots * PIXELS_PER_SLOT
            )
        except BaseException:
            payload.close()
            payload.unlink()
            raise
        self._view = SlotView(layout, payload, pixels)
        self._free = list(range(self._slots - 1, -1, -1))
        log.info(
            "slot pool open prefix=%s slots=%d reserved_bytes=%d",
            self.prefix,
            self._slots,
            layout.total_bytes,
        )

    def acquire(self) -> int:
        if not self._free:
            raise SlotPoolExhausted(f"all {self._slots} slots are in use")
        return self._free.pop()

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def write_payload(self, slot: int, data: bytes) -> int:
        n = len(data)
        if n > self._payload_bytes:
            raise ValueError(f"{n} bytes do not fit a {self._payload_bytes}-byte slot")
        self.view.payloads[slot, :n] = np.frombuffer(data, np.uint8)
        return n

    def close(self) -> None:
        """Close and unlink both segments; safe to call twice."""
        if self._view is None:
            return
        layout, view, self._view = self._view.layout, self._view, None
        view.close()
        for name in (layout.payload_name, layout.pixel_name):
            _unlink(name)
        log.info("slot pool closed prefix=%s", self.prefix)

    def __enter__(self) -> SlotPool:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sweep_orphans() -> list[str]:
    """Unlink segments left by streamer instances whose process no longer exists."""
    removed: list[str] = []
    if not SHM_DIR.is_dir():
        return removed
    for path in SHM_DIR.glob(f"{NAME_PREFIX}*"):
        try:
            pid = int(path.name[len(NAME_PREFIX) :].split("-", 1)[0])
        except ValueError:
            continue
        if _pid_alive(pid):
            continue
        _unlink(path.name)
        removed.append(path.name)
    if removed:
        log.warning("swept %d shared-memory segments of dead instances: %s", len(removed), removed)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _attach(name: str) -> shared_memory.SharedMemory:
    # track=False (3.13+) is not available on 3.11; the resource tracker shared by the
    # whole process tree registers names in a set, so attaching adds nothing new and the
    # owner's unlink unregisters it.
    return shared_memory.SharedMemory(name)


def _unlink(name: str) -> None:
    try:
        segment = shared_memory.SharedMemory(name)
    except FileNotFoundError:
        return
    segment.close()
    segment.unlink()
