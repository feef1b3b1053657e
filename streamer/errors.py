"""The service's error tree.

``StreamerError`` is the root. ``retriable`` says whether trying the same thing
again may succeed (a worker died, a broker was briefly away). ``RecordError``
and its children are about one record: they become dead letters and never stop
the stream. Anything else that escapes a component makes the service useless
and stops it loudly.
"""

from __future__ import annotations


class StreamerError(Exception):
    """Root of every error the service raises on purpose."""

    retriable = False


class ConfigError(StreamerError):
    """The configuration cannot work (bad weights path, no CUDA device, ...)."""


class ModelLoadError(StreamerError):
    """The model or its weights could not be loaded."""


class DeliveryAbandoned(StreamerError):
    """A record's output was not made durable: the service is stopping, or the
    partition moved to another instance. Its offset stays uncommitted, so the
    record is processed again by whoever owns the partition next."""


class RecordError(StreamerError):
    """A problem with one input record; it goes to the dead-letter topic.

    ``reason`` is a short fixed code (safe as a metric label and easy to filter
    on when replaying); ``stage`` names the pipeline stage that failed.
    """

    stage = "intake"
    reason = "invalid-record"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class PayloadTooLarge(RecordError):
    reason = "payload-too-large"


class UndecodableRecord(RecordError):
    """Kafka could not give us the record as the protocol defines it: a header name
    that is not UTF-8, or a batch that fails its checksum or cannot be parsed."""

    reason = "undecodable-record"


class InvalidMetadata(RecordError):
    """The key or a header we copy into outputs is above its documented limit."""

    reason = "invalid-metadata"


class OutputTooLarge(RecordError):
    """The prediction was larger than the output topic accepts."""

    stage = "publish"
    reason = "output-too-large"


class DecodeError(RecordError):
    """The payload is not an image we accept (see ``reason`` for why)."""

    stage = "decode"
    reason = "decode-failed"


class OutputRejected(StreamerError):
    """Even the smallest dead letter of a record was too large for the dead-letter
    topic: its ``max.message.bytes`` is misconfigured, and nothing can be written."""


class WorkerCrashed(StreamerError):
    """A worker process died while it held this work; the work may be retried."""

    retriable = True

    def __init__(self, kind: str, exitcode: int | None) -> None:
        super().__init__(f"{kind} worker died (exit code {exitcode})")
        self.kind = kind
        self.exitcode = exitcode


class InferenceFailed(StreamerError):
    """The inference worker raised while running a batch (every record in it fails)."""

    retriable = True


class RetriesExhausted(RecordError):
    """A record kept failing with retriable errors; it is dead-lettered."""

    stage = "inference"
    reason = "retries-exhausted"


# Every ``reason`` a dead letter can carry (README "Message contract"); exported as
# zero-valued series from the start so that rate() sees the first dead letter.
DEAD_LETTER_REASONS = (
    "empty",
    "not-an-image",
    "unsupported-format",
    "truncated",
    "corrupt",
    "too-many-pixels",
    "extreme-aspect-ratio",
    "invalid-dimensions",
    "payload-too-large",
    "undecodable-record",
    "invalid-metadata",
    "output-too-large",
    "decode-failed",
    "worker-crashed",
    "inference-failed",
)
