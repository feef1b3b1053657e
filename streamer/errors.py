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
    on when replaying; one of ``DEAD_LETTER_REASONS``); ``stage`` names the
    pipeline stage that failed (one of ``STAGES``); ``attempts`` is how many times
    this instance tried the record (the engine sets it when a retry preceded the error).
    """

    stage = "intake"
    reason = "invalid-metadata"

    def __init__(
        self, message: str, *, reason: str | None = None, stage: str | None = None
    ) -> None:
        # A message may quote what a producer sent; it goes into a log line and a header.
        super().__init__(bounded(message))
        if reason is not None:
            self.reason = reason
        if stage is not None:
            self.stage = stage
        self.attempts = 1


class InternalError(RecordError):
    """Handling the record raised an error nobody expected (a bug, or a library's limit that
    its bytes reached): the record is dead-lettered with the error's class and message, and
    the service goes on. ``streamer_records_dead_lettered_total{reason="internal-error"}``
    and the StreamerInternalErrors alert make it visible."""

    reason = "internal-error"

    @classmethod
    def of(cls, exc: BaseException, stage: str = "intake") -> InternalError:
        return cls(f"{type(exc).__name__}: {exc}", stage=stage)


class PayloadTooLarge(RecordError):
    reason = "payload-too-large"


class UndecodableRecord(RecordError):
    """Kafka could not give us the record as the protocol defines it: a header name
    that is not UTF-8, or a batch that fails its checksum or cannot be parsed."""

    reason = "undecodable-record"


class InvalidMetadata(RecordError):
    """The key or a header we copy into outputs is above its documented limit."""

    reason = "invalid-metadata"


class InvalidCloudEvent(RecordError):
    """A structured-mode CloudEvent (``content-type: application/cloudevents+json``)
    that is not valid JSON, lacks a required attribute, or has no image in
    ``data_base64``."""

    reason = "invalid-cloudevent"


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
    """A worker process died while it held this work; the work may be retried.

    ``hung`` is true for the request whose deadline ran out, so that the watchdog
    killed the worker (the other requests that worker held get ``hung=False``).
    """

    retriable = True

    def __init__(self, kind: str, exitcode: int | None, *, hung: bool = False) -> None:
        what = "hung and was killed" if hung else f"died (exit code {exitcode})"
        super().__init__(f"{kind} worker {what}")
        self.kind = kind
        self.exitcode = exitcode
        self.hung = hung


class WorkerError(StreamerError):
    """A worker raised an error the service did not expect (a bug, a device in a bad
    state). Mapped at the process boundary (``workers.codec``); retriable, because
    another worker, or the same one after it is recycled, may succeed."""

    def __init__(self, kind: str, message: str, *, retriable: bool = True) -> None:
        super().__init__(f"{kind} worker failed: {message}")
        self.kind = kind
        self.retriable = retriable


class InferenceFailed(StreamerError):
    """The inference worker raised while running a batch (every record in it fails)."""

    retriable = True


class WorkerHung(RecordError):
    """The record hung the inference worker twice: at the end of halving its batch (or
    alone) the first time, alone the second time."""

    stage = "inference"
    reason = "worker-hung"


class RetriesExhausted(RecordError):
    """A record kept failing with retriable errors; it is dead-lettered.

    The reason says what the last failure was: ``worker-crashed`` for a worker that
    died, else ``decode-failed`` or ``inference-failed`` by the stage where it happened.
    """

    def __init__(self, cause: StreamerError, *, stage: str, attempts: int) -> None:
        if isinstance(cause, WorkerCrashed):
            reason = "worker-crashed"
        else:
            reason = "decode-failed" if stage == "decode" else "inference-failed"
        super().__init__(f"gave up after {attempts} attempts: {cause}", reason=reason, stage=stage)
        self.attempts = attempts


MAX_MESSAGE_CHARS = 1000


def bounded(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how much was cut."""
    if len(text) <= limit:
        return text
    return f"{text[: limit - 40]}... ({len(text) - limit + 40} characters cut)"


# The stages a dead letter's ``streamer-error-stage`` can name, in pipeline order.
STAGES = ("intake", "decode", "inference", "publish")

# Every ``reason`` a dead letter can carry, with the stages it comes from and what it
# means (published in docs/contract/ by ``python -m streamer.contract``). Exported as
# zero-valued metric series from the start so that rate() sees the first dead letter.
REASON_INFO: dict[str, tuple[tuple[str, ...], str]] = {
    "empty": (("decode",), "the value is empty"),
    "not-an-image": (("decode",), "the bytes are no image format we know"),
    "unsupported-format": (("decode",), "an image format outside `allowed_formats`"),
    "truncated": (("decode",), "the image data ends early"),
    "corrupt": (("decode",), "the image has the right signature but cannot be decoded"),
    "too-many-pixels": (
        ("decode",),
        "width x height above `max_image_pixels`, or decoding it would cost more than the"
        " decode budget: over 256 MiB of buffers (e.g. a large RGBA PNG or WebP, or a large"
        " progressive JPEG, whose coefficients libjpeg keeps at full size), or a JPEG of"
        " more than 100 scans",
    ),
    "extreme-aspect-ratio": (("decode",), "one side far longer than the other"),
    "invalid-dimensions": (("decode",), "a zero or negative width or height"),
    "payload-too-large": (
        ("intake", "decode"),
        "the image (after base64 decoding, for structured input) is above `max_payload_bytes`",
    ),
    "undecodable-record": (
        ("intake",),
        "Kafka could not return the record as the protocol defines it (header name not "
        "UTF-8, bad checksum)",
    ),
    "invalid-metadata": (
        ("intake",),
        "the key, `ce_id`, `traceparent` or a structured event's id is above its limit",
    ),
    "invalid-cloudevent": (
        ("intake",),
        "a structured-mode CloudEvent that is not valid JSON, lacks a required attribute "
        "or carries no image in `data_base64`",
    ),
    "output-too-large": (("publish",), "the prediction is larger than the output topic accepts"),
    "decode-failed": (
        ("decode",),
        "the decoder failed in an unexpected way, or the decode worker raised an unexpected"
        " error on every attempt (at once when it cannot be retried)",
    ),
    "worker-crashed": (
        ("decode", "inference"),
        "a worker died on the record on every one of `max_record_attempts` attempts",
    ),
    "worker-hung": (
        ("inference",),
        "the record hung the inference worker twice; the second time it was alone in its batch",
    ),
    "inference-failed": (
        ("inference",),
        "the inference worker raised an error on the record, alone in its batch, on every"
        " attempt (at once when it cannot be retried)",
    ),
    "internal-error": (
        ("intake", "decode", "inference", "publish"),
        "handling the record raised an error the service did not expect (a bug or a"
        " library's limit); the message names the error class. Replay once it is fixed",
    ),
}
DEAD_LETTER_REASONS = tuple(REASON_INFO)
