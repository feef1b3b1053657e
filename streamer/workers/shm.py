"""Shared-memory slots: where payload bytes and pixels live between processes.

The main process owns two segments, created at start and unlinked at stop:

* payloads: ``slots x max_payload_bytes`` bytes, slot ``i`` holds record ``i``'s
  encoded image;
* pixels:   ``slots x 3 x 224 x 224`` uint8, slot ``i`` holds its decoded pixels.

Workers attach by name and read or write slot ``i``; IPC messages carry only slot
indices and lengths, so no pixel or payload byte is ever pickled. Memory is
bounded by configuration, whatever the input rate: ``slots x (max_payload_bytes +
150,528)`` bytes, of which only pages actually written are resident. ``open()``
refuses (``ConfigError``) when ``/dev/shm`` has less free space than that: a
write past the end of a full tmpfs is a SIGBUS, not an exception.

Ownership and the sweep of leftovers. PIDs say nothing about ownership in
containers (every instance is PID 1, and a Kubernetes memory emptyDir outlives
the container), so names carry a random instance id, ``streamer-<pid>-<id16>``
(the PID is only for people and the benchmark), and liveness is a lock:

1. ``open()`` creates ``<prefix>.owner`` next to the segments and holds an
   exclusive ``flock`` on it, then creates the segments;
2. ``close()`` unlinks the segments, then the owner file, then drops the lock;
3. the lock dies with its process (any kill, any PID namespace), so the sweep
   removes a prefix's segments when it can take the owner lock itself, or when
   the owner file is gone while a segment remains (by 1 and 2 a live owner's
   file outlives its segments).

Names from before instance ids (``streamer-<pid>-<hex6>``, no owner file) are
swept by the old rule, when no process has their PID.

Exactly one process unlinks each segment: the owner (or, for a dead owner, the
sweep). Workers map the segments without ``SharedMemory``, which on Python < 3.13
registers every attachment with the resource tracker (hence "leaked
shared_memory objects" warnings and unlinks by the wrong process).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import os
import re
import secrets
from dataclasses import dataclass
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np

from streamer.config import PIXELS_PER_SLOT
from streamer.errors import ConfigError

log = logging.getLogger(__name__)

PIXEL_SHAPE = (3, 224, 224)
NAME_PREFIX = "streamer-"
SHM_DIR = Path("/dev/shm")
OWNER_SUFFIX = ".owner"
SEGMENT_KINDS = ("payload", "pixels")
_INSTANCE = re.compile(rf"{NAME_PREFIX}\d+-[0-9a-f]{{16}}")
_OLD_STYLE = re.compile(rf"{NAME_PREFIX}(\d+)-[0-9a-f]+")
_CLAIM_ATTEMPTS = 5


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


class _Mapping:
    """A worker's mapping of a segment: like ``SharedMemory(name)``, minus the resource
    tracker, so only the owner ever registers (and unlinks) the segment."""

    def __init__(self, name: str) -> None:
        fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_CLOEXEC)
        try:
            self._mmap = mmap.mmap(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        self.buf = memoryview(self._mmap)

    def close(self) -> None:
        self.buf.release()
        self._mmap.close()


class SlotView:
    """A process's window on the slot segments (the owner's and every worker's)."""

    def __init__(
        self,
        layout: SlotLayout,
        payload: shared_memory.SharedMemory | _Mapping,
        pixels: shared_memory.SharedMemory | _Mapping,
    ) -> None:
        self.layout = layout
        self._payload_shm = payload
        self._pixel_shm = pixels
        self.payloads = np.ndarray((layout.slots, layout.payload_bytes), np.uint8, payload.buf)
        self.pixels = np.ndarray((layout.slots, *PIXEL_SHAPE), np.uint8, pixels.buf)

    @classmethod
    def attach(cls, layout: SlotLayout) -> SlotView:
        payload = _Mapping(layout.payload_name)
        try:
            pixels = _Mapping(layout.pixel_name)
        except BaseException:
            payload.close()
            raise
        return cls(layout, payload, pixels)

    def payload(self, slot: int, length: int) -> memoryview:
        return self.payloads[slot, :length].data

    def close(self) -> None:
        # Drop the numpy views first: closing fails while they export the buffer.
        del self.payloads, self.pixels
        self._payload_shm.close()
        self._pixel_shm.close()


class SlotPool:
    """The owner side: creates the segments, hands out free slots, unlinks at the end.

    ``shm_path`` is where free space is measured before creating anything.
    """

    def __init__(self, slots: int, payload_bytes: int, shm_path: str | Path = SHM_DIR) -> None:
        self.prefix = _new_prefix()
        self._slots = slots
        self._payload_bytes = payload_bytes
        self._shm_path = Path(shm_path)
        self._free: list[int] = []
        self._view: SlotView | None = None
        self._segments: list[shared_memory.SharedMemory] = []
        self._owner_fd: int | None = None
        self._claimed = False  # a reopened pool is a new instance, with a new id

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
        if self._view is not None:
            return
        self._check_free_space(self._slots * (self._payload_bytes + PIXELS_PER_SLOT))
        if self._claimed:
            self.prefix = _new_prefix()
        self._owner_fd, self.prefix = _claim_owner(self.prefix)
        self._claimed = True
        layout = SlotLayout(
            f"{self.prefix}-payload", f"{self.prefix}-pixels", self._slots, self._payload_bytes
        )
        try:
            for name, size in (
                (layout.payload_name, layout.slots * layout.payload_bytes),
                (layout.pixel_name, layout.slots * PIXELS_PER_SLOT),
            ):
                self._segments.append(shared_memory.SharedMemory(name, create=True, size=size))
            self._view = SlotView(layout, *self._segments)
        except BaseException:
            self._unlink_all()
            raise
        self._free = list(range(self._slots - 1, -1, -1))
        log.info(
            "slot pool open prefix=%s slots=%d reserved_bytes=%d",
            self.prefix,
            self._slots,
            layout.total_bytes,
        )

    def _check_free_space(self, needed: int) -> None:
        try:
            st = os.statvfs(self._shm_path)
        except FileNotFoundError:  # no /dev/shm (not Linux): nothing to measure
            return
        free = st.f_bavail * st.f_frsize
        if needed > free:
            raise ConfigError(
                f"{self._shm_path} has {free} bytes ({free / 2**20:.0f} MiB) free but the slot "
                f"pool needs {needed} bytes ({needed / 2**20:.0f} MiB) = max_in_flight "
                f"{self._slots} x (max_payload_bytes {self._payload_bytes} + {PIXELS_PER_SLOT}); "
                "lower STREAMER_MAX_IN_FLIGHT or STREAMER_MAX_PAYLOAD_BYTES, or give the "
                "container more shared memory (docker run --shm-size, or the sizeLimit of "
                "the /dev/shm emptyDir in Kubernetes)"
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
        """Close and unlink both segments, then give up ownership; safe to call twice."""
        if self._view is None:
            return
        view, self._view = self._view, None
        view.close()
        self._unlink_all()
        log.info("slot pool closed prefix=%s", self.prefix)

    def _unlink_all(self) -> None:
        # Segments first, the owner file last: a sweep must never find a segment of a
        # live pool without its owner file (see the module docstring).
        segments, self._segments = self._segments, []
        for segment in segments:
            segment.close()
            with contextlib.suppress(FileNotFoundError):
                segment.unlink()  # also unregisters it from the resource tracker
        if self._owner_fd is not None:
            _remove(_owner_name(self.prefix))
            os.close(self._owner_fd)
            self._owner_fd = None

    def __enter__(self) -> SlotPool:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sweep_orphans() -> list[str]:
    """Unlink the segments (and owner files) of streamer instances that are gone."""
    if not SHM_DIR.is_dir():
        return []
    names = [n for n in os.listdir(SHM_DIR) if n.startswith(NAME_PREFIX)]
    owned = {n.removesuffix(OWNER_SUFFIX) for n in names if n.endswith(OWNER_SUFFIX)}
    segments: dict[str, set[str]] = {}
    for name in names:
        prefix, _, kind = name.rpartition("-")
        if kind in SEGMENT_KINDS:
            segments.setdefault(prefix, set()).add(name)
    removed: list[str] = []
    for prefix in sorted(owned):
        removed += _sweep_if_owner_gone(prefix)
    for prefix in sorted(segments.keys() - owned):
        if _INSTANCE.fullmatch(prefix):
            # Checked after the listing saw the segment: a live owner's file outlives it.
            if (SHM_DIR / _owner_name(prefix)).exists():
                continue
        elif (old := _OLD_STYLE.fullmatch(prefix)) is None or _pid_alive(int(old[1])):
            continue
        removed += [n for n in sorted(segments[prefix]) if _remove(n)]
    if removed:
        log.warning("swept %d shared-memory files of dead instances: %s", len(removed), removed)
    return removed


def _sweep_if_owner_gone(prefix: str) -> list[str]:
    try:
        fd = os.open(SHM_DIR / _owner_name(prefix), os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, PermissionError):
        return []
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return []  # its owner is alive, whatever its PID
        names = [f"{prefix}-{kind}" for kind in SEGMENT_KINDS] + [_owner_name(prefix)]
        return [n for n in names if _remove(n)]  # the owner file last, still locked
    finally:
        os.close(fd)


def _claim_owner(prefix: str) -> tuple[int, str]:
    """Create ``<prefix>.owner`` and lock it; the descriptor is held until ``close()``.

    A sweep may lock and unlink the file between our create and our lock; then
    the locked file is no longer the one at the path, and we start again.
    """
    for _ in range(_CLAIM_ATTEMPTS):
        path = SHM_DIR / _owner_name(prefix)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held, named = os.fstat(fd), os.stat(path)
            if (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino):
                return fd, prefix
        except (BlockingIOError, FileNotFoundError):
            pass
        os.close(fd)
        prefix = _new_prefix()
    raise RuntimeError(f"could not claim an owner file in {SHM_DIR}")


def _new_prefix() -> str:
    return f"{NAME_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"


def _owner_name(prefix: str) -> str:
    return f"{prefix}{OWNER_SUFFIX}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(name: str) -> bool:
    """Unlink ``name`` in ``SHM_DIR`` (what ``shm_unlink`` does on Linux); True if it was there."""
    try:
        os.unlink(SHM_DIR / name)
    except FileNotFoundError:
        return False
    except PermissionError:  # another user's instance: not ours to sweep
        log.warning("cannot remove shared-memory file name=%s: permission denied", name)
        return False
    return True
