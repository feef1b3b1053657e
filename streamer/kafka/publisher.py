"""The producer side: predictions and dead letters, acked by every in-sync replica.

The producer is idempotent with ``acks=all``, so a retried send never writes a
duplicate. ``send`` returns only once the broker has acked; failures are retried
with capped exponential backoff for as long as the service runs, because an
unacked output must never let its input offset be committed. During shutdown the
retries stop and the error propagates: the record stays uncommitted and is
processed again after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    InvalidProducerIdMapping,
    KafkaError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    RecordTooLargeError,
    UnknownProducerId,
)
from aiokafka.structs import RecordMetadata

from streamer.config import Settings
from streamer.errors import DeliveryAbandoned
from streamer.kafka.clients import connection_options
from streamer.metrics import Metrics
from streamer.schemas import Headers

log = logging.getLogger(__name__)

# Bytes buffered per output partition before a send waits for the batch to go out.
# aiokafka's 16 KB held ~16 predictions with their CloudEvent headers, so under
# load most sends waited for a batch to drain (8% of the event loop's time, each
# with its own asyncio.wait). A cap, not an allocation: the buffers grow with what
# they hold, which max_in_flight bounds.
PRODUCER_BATCH_BYTES = 256 * 1024

BACKOFF_S = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


def backoff_s(attempt: int) -> float:
    """Seconds to wait before retry number ``attempt`` (0-based): capped exponential."""
    return BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]


class PublisherClosed(DeliveryAbandoned):
    """The service is stopping; the send was abandoned (its input stays uncommitted)."""


# A topic (or the client's max_request_size) refused the record for its size: sending
# it again cannot help; ``streamer.kafka.records.smaller`` makes it smaller.
TOO_LARGE = (MessageSizeTooLargeError, RecordTooLargeError)

# The idempotent producer's sequence state is broken: only a new producer (new
# producer id) can send again. Retrying with the same one would fail forever.
STUCK_PRODUCER_ERRORS = (OutOfOrderSequenceNumber, UnknownProducerId, InvalidProducerIdMapping)


class Publisher:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        producer_factory: Callable[[], AIOKafkaProducer] | None = None,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._new_producer = producer_factory or self._default_producer
        self._producer: AIOKafkaProducer | None = None
        self._closing = asyncio.Event()
        self._recreating = asyncio.Lock()

    def _default_producer(self) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            acks="all",
            enable_idempotence=True,
            linger_ms=2,
            max_batch_size=PRODUCER_BATCH_BYTES,
            # Dead letters carry the original payload, which may be large.
            max_request_size=self._settings.max_message_bytes,
            **connection_options(self._settings),
        )

    async def start(self) -> None:
        self._producer = self._new_producer()
        await self._producer.start()
        log.info("producer started")

    async def _recreate(self, broken: AIOKafkaProducer) -> None:
        """Replace a stuck producer once, however many sends saw it fail."""
        stuck = broken  # (an identity test below would narrow `broken` for the type checker)
        async with self._recreating:
            if self._producer is not broken or self._closing.is_set():
                return  # another send already replaced it, or we are stopping
            log.warning("recreating the idempotent producer after a sequence error")
            self._metrics.producer_recreations.inc()
            replacement = self._new_producer()
            await replacement.start()
            self._producer = replacement
        try:
            await stuck.stop()
        except KafkaError as exc:
            log.warning("stopping the broken producer failed error=%r", exc)

    async def send(
        self, topic: str, value: bytes | None, key: bytes | None, headers: Headers
    ) -> RecordMetadata:
        """Send and wait for the ack, retrying until acked or the publisher closes.

        ``TOO_LARGE`` errors are raised at once: retrying cannot fix them.
        """
        attempt = 0
        while True:
            if self._closing.is_set() or self._producer is None:
                raise PublisherClosed(f"not sent to {topic}: the publisher is closing")
            producer = self._producer
            try:
                return await producer.send_and_wait(topic, value, key=key, headers=headers)
            except TOO_LARGE:
                raise
            except STUCK_PRODUCER_ERRORS as exc:
                self._metrics.produce_errors.labels(topic).inc()
                log.warning("send failed topic=%s error=%r", topic, exc)
                await self._recreate(producer)
            except KafkaError as exc:
                self._metrics.produce_errors.labels(topic).inc()
                delay = backoff_s(attempt)
                attempt += 1
                log.warning(
                    "send failed topic=%s attempt=%d retry_in_s=%.1f error=%r",
                    topic,
                    attempt,
                    delay,
                    exc,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), delay)

    def close_for_sends(self) -> None:
        """Stop retrying: pending and future sends fail with ``PublisherClosed``."""
        self._closing.set()

    async def stop(self) -> None:
        """Flush what is buffered and close; safe to call twice."""
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()
            log.info("producer stopped")
