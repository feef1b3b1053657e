"""Measures event-loop lag: how late a scheduled wakeup actually runs.

If anything blocks the loop (CPU work, a blocking call), every wakeup after it
is late by that much. The service exports it as a histogram; tests read ``max_s``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class LoopLagMonitor:
    def __init__(
        self, interval_s: float = 0.05, observe: Callable[[float], None] | None = None
    ) -> None:
        self._interval_s = interval_s
        self._observe = observe
        self._task: asyncio.Task[None] | None = None
        self.max_s = 0.0
        self.samples = 0

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="loop-lag-monitor")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def reset(self) -> None:
        self.max_s = 0.0
        self.samples = 0

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            expected = loop.time() + self._interval_s
            await asyncio.sleep(self._interval_s)
            lag = max(0.0, loop.time() - expected)
            self.max_s = max(self.max_s, lag)
            self.samples += 1
            if self._observe is not None:
                self._observe(lag)
