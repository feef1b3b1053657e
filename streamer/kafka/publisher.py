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

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, MessageSizeTooLargeError
from aiokafka.structs import RecordMetadata

from streamer.config import Settings
from streamer.kafka.clients import connection_options
from streamer.metrics import Metrics
from streamer.schemas import Headers

log = logging.getLogger(__name__)

BACKOFF_S = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class PublisherClosed(RuntimeError):
    """The service is stopping; the send was abandoned (its input stays uncommitted)."""


class Publisher:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._producer: AIOKafkaProducer | None = None
        self._closing = asyncio.Event()

    async def start(self) -> None:
        self._producer = AIOKafkaProducer(
            acks="all",
            enable_idempotence=True,
            linger_ms=2,
            # Dead letters carry the original payload, which may be large.
            max_request_size=max(1024 * 1024, self._settings.max_payload_bytes + 65536),
            **connection_options(self._settings),
        )
        await self._producer.start()
        log.info("producer started")

    async def send(
        self, topic: str, value: bytes | None, key: bytes | None, headers: Headers
    ) -> RecordMetadata:
        """Send and wait for the ack, retrying until acked or the publisher closes.

        ``MessageSizeTooLargeError`` is raised at once: retrying cannot fix it.
        """
        attempt = 0
        while True:
            if self._closing.is_set() or self._producer is None:
                raise PublisherClosed(f"not sent to {topic}: the publisher is closing")
            try:
                return await self._producer.send_and_wait(topic, value, key=key, headers=headers)
            except MessageSizeTooLargeError:
                raise
            except KafkaError as exc:
                self._metrics.produce_errors.labels(topic).inc()
                delay = BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]
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
