"""The restart policy of a worker pool: the roles of its processes and the backoff
between starts.

A pool keeps, for each worker index, a ``MAIN`` worker (it takes requests) and,
optionally, a ``STANDBY`` twin (started, idle, takes over when the main one dies).
Each (index, role) has one ``Backoff`` for the pool's whole life.

Invariants:

- A ``Backoff`` outlives the processes started for its (index, role): a failure
  is a start that failed, or a worker that died before it proved healthy, and
  consecutive failures grow the delay before the next start up to the last
  entry of the schedule. Nothing but a healthy worker resets it, so a worker
  that dies at every start, or just after, is started ever more slowly instead
  of in a tight loop.
- A worker has proved healthy once it answered a request, or stayed up for
  ``HEALTHY_AFTER_S`` (the only proof a standby, which takes no requests, can give).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Protocol

HEALTHY_AFTER_S = 10.0


class Role(enum.Enum):
    MAIN = "main"
    STANDBY = "standby"


class Proving(Protocol):
    """What a ``Backoff`` needs of a worker (``WorkerProcess`` is one)."""

    def proved_healthy(self, after_s: float) -> bool: ...


class Backoff:
    """Consecutive failures of one (index, role) and the delay they imply."""

    def __init__(self, schedule_s: Sequence[float], healthy_after_s: float = HEALTHY_AFTER_S):
        if not schedule_s:
            raise ValueError("a backoff schedule needs at least one delay")
        self._schedule = tuple(schedule_s)
        self._healthy_after_s = healthy_after_s
        self._failures = 0
        self._latest: Proving | None = None  # the last worker started, until it proves healthy

    @property
    def failures(self) -> int:
        """Failed starts, and deaths before proving healthy, since the last healthy worker."""
        self._refresh()
        return self._failures

    @property
    def delay_s(self) -> float:
        """How long to wait before the next start."""
        return self._schedule[min(self.failures, len(self._schedule) - 1)]

    def started(self, worker: Proving) -> None:
        """A start succeeded; the count resets once ``worker`` proves healthy."""
        self._latest = worker

    def start_failed(self) -> None:
        self._refresh()
        self._failures += 1

    def exited(self, worker: Proving) -> None:
        """A worker of this (index, role) died: healthy resets the count, else one more failure."""
        self._refresh()
        if worker.proved_healthy(self._healthy_after_s):
            self._failures = 0
        else:
            self._failures += 1
        if worker is self._latest:
            self._latest = None

    def _refresh(self) -> None:
        if self._latest is not None and self._latest.proved_healthy(self._healthy_after_s):
            self._failures = 0
            self._latest = None
