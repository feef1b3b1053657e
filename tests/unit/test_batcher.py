from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from streamer.pipeline.batcher import Batcher, BatchInfo


class Recorder:
    def __init__(self, delay_s: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.delay_s = delay_s
        self.running = 0
        self.max_running = 0

    async def __call__(self, items: Sequence[int]) -> list[int]:
        self.batches.append(list(items))
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        await asyncio.sleep(self.delay_s)
        self.running -= 1
        return [i * 10 for i in items]


async def test_full_batch_flushes_without_waiting_for_the_delay() -> None:
    run = Recorder()
    async with Batcher(run, max_batch_size=4, max_batch_delay_ms=60_000) as batcher:
        futures = [batcher.submit(i) for i in range(4)]
        results = await asyncio.wait_for(asyncio.gather(*futures), 2)
    assert results == [0, 10, 20, 30]
    assert run.batches == [[0, 1, 2, 3]]


async def test_partial_batch_flushes_after_the_delay() -> None:
    run = Recorder()
    infos: list[BatchInfo] = []
    async with Batcher(
        run, max_batch_size=8, max_batch_delay_ms=50, on_dispatch=infos.append
    ) as batcher:
        loop = asyncio.get_running_loop()
        started = loop.time()
        results = await asyncio.wait_for(asyncio.gather(batcher.submit(1), batcher.submit(2)), 2)
        waited = loop.time() - started
    assert results == [10, 20]
    assert run.batches == [[1, 2]]
    assert waited >= 0.045
    assert infos[0].size == 2 and infos[0].fill_s >= 0.045


async def test_an_exception_fails_every_item_of_its_batch_and_no_other() -> None:
    async def run(items: Sequence[int]) -> list[int]:
        if 13 in items:
            raise RuntimeError("bad batch")
        return list(items)

    async with Batcher(run, max_batch_size=2, max_batch_delay_ms=10) as batcher:
        bad = [batcher.submit(13), batcher.submit(14)]
        good = [batcher.submit(1), batcher.submit(2)]
        outcomes = await asyncio.wait_for(asyncio.gather(*bad, *good, return_exceptions=True), 2)
    assert [type(o) for o in outcomes[:2]] == [RuntimeError, RuntimeError]
    assert outcomes[2:] == [1, 2]


async def test_wrong_number_of_results_fails_the_batch() -> None:
    async def run(items: Sequence[int]) -> list[int]:
        return list(items)[:-1]

    async with Batcher(run, max_batch_size=3, max_batch_delay_ms=10) as batcher:
        outcomes = await asyncio.wait_for(
            asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True), 2
        )
    assert all(isinstance(o, RuntimeError) and "returned 2 results" in str(o) for o in outcomes)


async def test_batches_grow_while_the_model_is_busy_and_concurrency_is_bounded() -> None:
    run = Recorder(delay_s=0.1)
    async with Batcher(
        run, max_batch_size=16, max_batch_delay_ms=1, max_concurrent_batches=1
    ) as batcher:
        first = batcher.submit(0)
        await asyncio.sleep(0.02)  # the first batch (size 1) is now running
        rest = [batcher.submit(i) for i in range(1, 11)]
        await asyncio.wait_for(asyncio.gather(first, *rest), 5)
    assert run.batches == [[0], list(range(1, 11))]
    assert run.max_running == 1


async def test_submit_requires_a_running_batcher_and_stop_fails_queued_items() -> None:
    batcher: Batcher[int, int] = Batcher(Recorder(), max_batch_size=4, max_batch_delay_ms=60_000)
    with pytest.raises(RuntimeError):
        batcher.submit(1)
    await batcher.start()
    queued = batcher.submit(1)
    await batcher.stop()
    await batcher.stop()  # twice is safe
    assert queued.done() and queued.cancelled() is False
    with pytest.raises(asyncio.CancelledError):
        queued.result()


class TakesWhatIsQueued:
    """A policy whose batch is whatever is queued when it is asked, without waiting."""

    def arrived(self, now: float) -> None:
        pass

    def size_limit(self, queued: int, backlog: int) -> int:
        return max(1, queued)

    def fill_wait_s(self, queued: int, backlog: int) -> float:
        return 0.0


async def test_the_size_is_decided_again_when_a_slot_frees_counting_records_queued_since() -> None:
    release, started = asyncio.Event(), asyncio.Event()
    batches: list[list[int]] = []

    async def run(items: Sequence[int]) -> list[int]:
        batches.append(list(items))
        started.set()
        if len(batches) == 1:
            await release.wait()  # the only slot stays taken while more records queue
        return list(items)

    async with Batcher(
        run, max_batch_size=8, max_batch_delay_ms=0, policy=TakesWhatIsQueued()
    ) as batcher:
        first = batcher.submit(0)
        await asyncio.wait_for(started.wait(), 2)
        rest = [batcher.submit(1)]
        for _ in range(20):  # the loop sizes the next batch at 1 and waits for the slot
            await asyncio.sleep(0)
        rest += [batcher.submit(i) for i in range(2, 5)]
        release.set()
        await asyncio.wait_for(asyncio.gather(first, *rest), 2)
    assert batches == [[0], [1, 2, 3, 4]]  # not [1], [2, 3, 4]: sized when it can run
