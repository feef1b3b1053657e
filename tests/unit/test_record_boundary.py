"""A record's failure is the record's: whatever its bytes are, handling it ends in one
sendable outcome (``RecordProcessor.process``, ``Outcome``, the oversize ladder), and
no input header can pass for one of the service's."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from typing import Any

import pytest
from aiokafka import ConsumerRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamer.config import Settings
from streamer.errors import (
    DEAD_LETTER_REASONS,
    MAX_MESSAGE_CHARS,
    DecodeError,
    OutputRejected,
    RecordError,
)
from streamer.kafka.records import Outcome, dead_letter, in_own_namespace, smaller
from streamer.metrics import Metrics
from streamer.pipeline.engine import Classified
from streamer.pipeline.processor import ProcessorConfig, RecordProcessor
from streamer.schemas import (
    DLQ_HEADERS,
    DLQ_HEADERS_DROPPED,
    DLQ_KEY_DROPPED_BYTES,
    DLQ_MESSAGE,
    DLQ_REASON,
    DLQ_VALUE_DROPPED_BYTES,
    ModelInfo,
    escape_input_header,
    header,
    unescape_input_header,
)
from streamer.tools.replay import replay_headers

pytestmark = pytest.mark.timeout(60)

OWN_NAMES = {*DLQ_HEADERS, DLQ_VALUE_DROPPED_BYTES, DLQ_HEADERS_DROPPED, DLQ_KEY_DROPPED_BYTES}
STRUCTURED = ("content-type", b"application/cloudevents+json")


class Engine:
    """Classifies a payload as class 1, or raises what ``fails`` says for it."""

    model_info = ModelInfo(name="resnet18", weights="random:0", device="cpu", precision="fp32")

    def __init__(self, fails: dict[bytes, BaseException] | None = None) -> None:
        self.fails = fails or {}

    def observe_latency(self, seconds: float, fetched_after_s: float = 0.0) -> None:
        pass

    async def classify(self, payload: bytes) -> Classified:
        if payload in self.fails:
            raise self.fails[payload]
        if not payload:  # what a decode worker says of no bytes
            raise DecodeError("the value is empty", reason="empty")
        return Classified([1, 0], [0.9, 0.1], 1, 0.001, 0.001, 0.01, 0.01)


def processor(engine: Engine | None = None) -> RecordProcessor:
    config = ProcessorConfig.from_settings(Settings(group_id="grp"))
    return RecordProcessor(config, engine or Engine(), Metrics(), ["zero", "one"])  # type: ignore[arg-type]


def record(
    value: bytes | None, key: bytes | None = b"k", headers: list[tuple[str, Any]] | None = None
) -> ConsumerRecord:
    return ConsumerRecord("in", 0, 5, 1000, 0, key, value, None, 0, 0, tuple(headers or ()))


def process(rec: ConsumerRecord, engine: Engine | None = None) -> Outcome:
    return asyncio.run(processor(engine).process(rec, 0.0, 0.0))


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize(
    "value",
    [
        nested(1000),
        b'{"specversion": "1.0", "id": ' + nested(1000) + b', "source": "s", "type": "t"}',
        b'{"specversion": ' + b"9" * 5000 + b"}",
    ],
    ids=["array", "id-attribute", "huge-number"],
)
def test_a_structured_event_beyond_the_parsers_limits_is_an_invalid_cloudevent(
    value: bytes,
) -> None:
    outcome = process(record(value, headers=[STRUCTURED]))
    assert outcome.dead_letter_reason == "invalid-cloudevent"


def test_a_producer_chosen_value_in_an_error_message_is_bounded() -> None:
    event = {"specversion": "x" * 5_000_000, "id": "i", "source": "s", "type": "t"}
    outcome = process(record(json.dumps(event).encode(), headers=[STRUCTURED]))
    message = header(outcome.headers, DLQ_MESSAGE) or b""
    assert outcome.dead_letter_reason == "invalid-cloudevent"
    assert 0 < len(message) <= 200


def test_a_record_error_message_is_bounded_for_logs_and_headers() -> None:
    assert len(str(RecordError("x" * 10_000_000))) <= MAX_MESSAGE_CHARS


def test_an_error_nobody_expected_is_the_records_internal_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret_looking = "quoted from the record " * 1000
    engine = Engine({b"boom": KeyError(secret_looking)})
    with caplog.at_level(logging.ERROR):
        outcome = process(record(b"boom"), engine)
    assert outcome.dead_letter_reason == "internal-error"
    assert outcome.value == b"boom" and outcome.key == b"k"
    assert (header(outcome.headers, DLQ_MESSAGE) or b"").startswith(b"KeyError: ")
    # The log line names the record and has the traceback, not the record's words.
    assert "offset=5" in caplog.text and "KeyError" in caplog.text
    assert secret_looking not in caplog.text


def test_cancellation_is_not_a_records_failure() -> None:
    with pytest.raises(asyncio.CancelledError):
        process(record(b"x"), Engine({b"x": asyncio.CancelledError()}))


@pytest.mark.parametrize("key", [None, b"k"])
def test_a_tombstone_is_answered_with_a_sendable_dead_letter(key: bytes | None) -> None:
    outcome = process(record(None, key=key))
    assert outcome.dead_letter_reason == "empty"
    assert outcome.key is not None or outcome.value is not None


def test_no_outcome_can_be_built_that_a_kafka_client_refuses() -> None:
    with pytest.raises(ValueError, match="key or a value"):
        Outcome("dlq", None, None, [])
    with pytest.raises(ValueError, match="UTF-8"):
        Outcome("dlq", b"v", None, [("\udcff", b"")])


def test_input_headers_named_like_the_services_cannot_spoof_a_dead_letter() -> None:
    spoof = [("streamer-error-reason", b"worker-crashed"), ("input-streamer-x", b"1")]
    outcome = process(record(b"", headers=spoof))
    assert header(outcome.headers, DLQ_REASON) == b"empty"  # the first one is the service's
    names = [name for name, _ in outcome.headers]
    assert "input-streamer-error-reason" in names and "input-input-streamer-x" in names
    assert "streamer-error-reason" in names and names.count("streamer-error-reason") == 1


def test_the_ladder_drops_a_huge_input_header_named_like_the_services() -> None:
    huge = [("streamer-big", b"x" * (1 << 20))]
    outcome = process(record(b"v" * 100, key=None, headers=huge))
    assert outcome.dead_letter_reason is None  # a prediction, which the topic refuses:
    outcome = smaller(outcome)  # its dead letter,
    outcome = smaller(outcome)  # without the payload,
    outcome = smaller(outcome)  # without the input's headers, the huge one among them
    assert sum(len(v or b"") for _, v in outcome.headers) < 2000
    assert header(outcome.headers, DLQ_HEADERS_DROPPED) == b"1"
    assert outcome.value == b"" and outcome.key is None


header_names = st.one_of(
    st.text(max_size=30),
    st.sampled_from(sorted(OWN_NAMES)).flatmap(
        lambda n: st.sampled_from([n, "input-" + n, "input-input-" + n])
    ),
    st.sampled_from(["content-type", "ce_id", "traceparent", "input-", "streamer-"]),
)
header_values = st.one_of(st.none(), st.binary(max_size=300))
json_values: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def structured_values(draw: st.DrawFn) -> bytes:
    event = {
        "specversion": draw(st.one_of(st.just("1.0"), json_values)),
        "id": draw(st.one_of(st.text(max_size=300), json_values)),
        "source": draw(st.one_of(st.just("s"), json_values)),
        "type": draw(st.one_of(st.just("t"), json_values)),
    }
    if draw(st.booleans()):
        event["data_base64"] = draw(
            st.one_of(
                st.binary(max_size=30).map(lambda b: base64.b64encode(b).decode()), json_values
            )
        )
    body = json.dumps(event).encode()
    if draw(st.booleans()):
        depth = draw(st.integers(1, 3000))
        body = body[:-1] + b', "x": ' + nested(depth) + b"}"
    return body


records = st.builds(
    record,
    value=st.one_of(st.none(), st.binary(max_size=200), structured_values()),
    key=st.one_of(st.none(), st.binary(max_size=5000)),
    headers=st.lists(st.tuples(header_names, header_values), max_size=6).flatmap(
        lambda hs: st.sampled_from([hs, [STRUCTURED, *hs]])
    ),
)
engine_errors = st.sampled_from(
    [None, KeyError("k"), RecursionError(), ValueError("v" * 5000), RuntimeError(), TypeError()]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rec=records, error=engine_errors)
def test_any_record_gets_one_sendable_outcome_and_only_the_services_own_headers(
    rec: ConsumerRecord, error: BaseException | None
) -> None:
    value = rec.value
    engine = Engine({value or b"": error} if error is not None else {})
    outcome = process(rec, engine)  # never raises
    assert outcome.key is not None or outcome.value is not None
    if outcome.dead_letter_reason is None:
        return
    assert outcome.dead_letter_reason in DEAD_LETTER_REASONS
    own = [name for name, _ in outcome.headers if name.startswith("streamer-")]
    assert set(own) <= OWN_NAMES and len(own) == len(set(own))
    # The ladder keeps every form sendable and ends, whatever the record.
    for _ in range(5):
        try:
            outcome = smaller(outcome)
        except OutputRejected:
            break
        assert outcome.key is not None or outcome.value is not None
    else:
        pytest.fail("the ladder did not end")


@given(st.text(max_size=40))
def test_escaping_an_input_header_name_is_undone_exactly(name: str) -> None:
    escaped = escape_input_header(name)
    assert unescape_input_header(escaped) == name
    assert not escaped.startswith("streamer-")


@given(st.lists(st.tuples(header_names, st.binary(max_size=10)), max_size=6))
def test_replay_gives_back_the_headers_the_producer_wrote(headers: list[tuple[str, bytes]]) -> None:
    rec = record(b"v", headers=headers)
    letter = dead_letter(in_own_namespace(rec), RecordError("bad"), "dlq", "grp")
    dlq_record = ConsumerRecord(
        "dlq", 0, 9, 1, 0, letter.key, letter.value, None, 0, 0, letter.headers
    )
    back = replay_headers(dlq_record)
    assert back[:-1] == [(n, v) for n, v in headers if n != "streamer-replayed-from"]
    assert back[-1] == ("streamer-replayed-from", b"dlq/0/9")
