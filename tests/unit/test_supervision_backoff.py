"""The restart backoff of one (index, role): it persists across incidents, and only a
healthy worker resets it. No processes."""

from __future__ import annotations

import pytest

from streamer.workers.supervisor import Backoff

pytestmark = pytest.mark.timeout(10)

SCHEDULE = (0.0, 0.5, 1.0, 5.0)


class FakeWorker:
    def __init__(self) -> None:
        self.healthy = False

    def proved_healthy(self, after_s: float) -> bool:
        return self.healthy


def test_failed_starts_grow_the_delay_up_to_the_last_step() -> None:
    backoff = Backoff(SCHEDULE)
    delays = []
    for _ in range(6):
        delays.append(backoff.delay_s)
        backoff.start_failed()
    assert delays == [0.0, 0.5, 1.0, 5.0, 5.0, 5.0]
    assert backoff.failures == 6


def test_a_start_that_works_does_not_reset_until_the_worker_proves_healthy() -> None:
    backoff = Backoff(SCHEDULE)
    backoff.start_failed()
    worker = FakeWorker()
    backoff.started(worker)
    assert backoff.delay_s == 0.5  # a start alone proves nothing
    backoff.exited(worker)  # died before it served: one more failure, not a fresh start
    assert backoff.failures == 2 and backoff.delay_s == 1.0


def test_a_healthy_worker_resets_the_count_whether_it_lives_or_dies() -> None:
    backoff = Backoff(SCHEDULE)
    for _ in range(3):
        backoff.start_failed()
    worker = FakeWorker()
    backoff.started(worker)
    worker.healthy = True  # it answered a request, or stayed up long enough
    assert backoff.failures == 0 and backoff.delay_s == 0.0
    backoff.start_failed()
    backoff.exited(worker)  # a healthy worker's death: restart at once
    assert backoff.failures == 0


def test_an_empty_schedule_is_refused() -> None:
    with pytest.raises(ValueError):
        Backoff(())
