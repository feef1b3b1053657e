"""What a record becomes (``streamer.pipeline.processor``), with a stand-in engine."""

from __future__ import annotations

import base64
import json
import time

import jsonschema
import pytest
from aiokafka import ConsumerRecord

from streamer.config import Settings
from streamer.contract import CONTRACT_DIR
from streamer.errors import DecodeError, RecordError
from streamer.metrics import Metrics
from streamer.pipeline.engine import Classified
from streamer.pipeline.processor import ProcessorConfig, RecordProcessor
from streamer.schemas import DLQ_ATTEMPTS, DLQ_CONSUMER_GROUP, DLQ_REASON, DLQ_STAGE, ModelInfo

pytestmark = pytest.mark.timeout(10)

IMAGE = b"\x89PNG\r\n\x1a\n pretend"
PREDICTION_SCHEMA = json.loads((CONTRACT_DIR / "prediction.schema.json").read_text())


class FakeEngine:
    """Classifies anything as class 1, or raises the error it was given."""

    model_info = ModelInfo(name="resnet18", weights="random:0", device="cpu", precision="fp32")

    def __init__(self, error: RecordError | None = None) -> None:
        self.error = error
        self.payloads: list[bytes] = []
        self.latencies: list[float] = []
        self.fetched_after: list[float] = []

    def observe_latency(self, seconds: float, fetched_after_s: float = 0.0) -> None:
        self.latencies.append(seconds)
        self.fetched_after.append(fetched_after_s)

    async def classify(self, payload: bytes) -> Classified:
        self.payloads.append(payload)
        if self.error is not None:
            raise self.error
        return Classified([1, 0], [0.9, 0.1], 4, 0.002, 0.003, 0.05, 0.06)


def processor(engine: FakeEngine, **settings: object) -> RecordProcessor:
    config = ProcessorConfig.from_settings(Settings(group_id="grp", **settings))  # type: ignore[arg-type]
    return RecordProcessor(config, engine, Metrics(), ["zero", "one"])  # type: ignore[arg-type]


def record(value: bytes, headers: list[tuple[str, bytes]], age_s: float = 0.0) -> ConsumerRecord:
    written_ms = int((time.time() - age_s) * 1000)
    return ConsumerRecord("in", 0, 3, written_ms, 0, b"key", value, None, 0, 0, tuple(headers))


async def test_by_default_a_prediction_has_the_stable_contract_only() -> None:
    outcome = await processor(FakeEngine()).process(
        record(IMAGE, [("ce_id", b"img-1")]), time.perf_counter(), 0.0
    )
    body = json.loads(outcome.value or b"")
    assert body["schema_version"] == 1 and body["id"] == "img-1"
    assert "batch_size" not in body and "timings" not in body
    assert [t["label"] for t in body["top_k"]] == ["one", "zero"]
    jsonschema.validate(body, PREDICTION_SCHEMA)
    headers = dict(outcome.headers)
    assert headers["ce_source"] == b"streamer/grp" and headers["ce_subject"] == b"img-1"


async def test_include_timings_adds_batch_size_and_timings() -> None:
    outcome = await processor(FakeEngine(), include_timings=True).process(
        record(IMAGE, []), time.perf_counter(), 0.001
    )
    body = json.loads(outcome.value or b"")
    assert body["batch_size"] == 4 and body["timings"]["inference_ms"] == pytest.approx(50)
    jsonschema.validate(body, PREDICTION_SCHEMA)


async def test_event_source_names_the_outputs_source() -> None:
    outcome = await processor(FakeEngine(), event_source="urn:classifier:eu-1").process(
        record(IMAGE, []), time.perf_counter(), 0.0
    )
    assert dict(outcome.headers)["ce_source"] == b"urn:classifier:eu-1"


async def test_a_structured_event_is_classified_from_its_data_and_answered_by_its_id() -> None:
    engine = FakeEngine()
    body = {
        "specversion": "1.0",
        "id": "evt-9",
        "source": "/cam",
        "type": "com.example.image",
        "data_base64": base64.b64encode(IMAGE).decode(),
    }
    source = record(json.dumps(body).encode(), [("content-type", b"application/cloudevents+json")])
    outcome = await processor(engine).process(source, time.perf_counter(), 0.0)
    assert engine.payloads == [IMAGE]
    assert outcome.dead_letter_reason is None
    assert json.loads(outcome.value or b"")["id"] == "evt-9"
    assert dict(outcome.headers)["ce_subject"] == b"evt-9"


async def test_a_malformed_structured_event_is_a_dead_letter_that_never_reaches_the_engine() -> (
    None
):
    engine = FakeEngine()
    source = record(b'{"specversion": "1.0"}', [("content-type", b"application/cloudevents+json")])
    outcome = await processor(engine).process(source, time.perf_counter(), 0.0)
    headers = dict(outcome.headers)
    assert outcome.dead_letter_reason == "invalid-cloudevent" and engine.payloads == []
    assert headers[DLQ_STAGE] == b"intake" and headers[DLQ_CONSUMER_GROUP] == b"grp"
    assert outcome.value == source.value, "the dead letter keeps the input for replay"


async def test_an_event_id_that_is_not_valid_unicode_is_a_dead_letter_not_a_crash() -> None:
    """JSON may escape a lone surrogate (\\ud800); no JSON output can hold it, and
    writing the prediction raised, which stopped the service."""
    engine = FakeEngine()
    value = (
        b'{"specversion": "1.0", "id": "evt-\\ud800", "source": "/cam", "type": "t",'
        b' "data_base64": "' + base64.b64encode(IMAGE) + b'"}'
    )
    source = record(value, [("content-type", b"application/cloudevents+json")])
    outcome = await processor(engine).process(source, time.perf_counter(), 0.0)
    assert outcome.dead_letter_reason == "invalid-cloudevent" and engine.payloads == []
    assert outcome.value == source.value


async def test_a_dead_letter_reports_the_attempts_the_engine_made() -> None:
    error = DecodeError("bad", reason="corrupt")
    error.attempts = 3
    outcome = await processor(FakeEngine(error)).process(
        record(IMAGE, []), time.perf_counter(), 0.0
    )
    headers = dict(outcome.headers)
    assert headers[DLQ_REASON] == b"corrupt" and headers[DLQ_ATTEMPTS] == b"3"


async def test_a_delivered_prediction_reports_its_end_to_end_latency_to_the_engine() -> None:
    engine = FakeEngine()
    p = processor(engine)
    source = record(IMAGE, [])
    fetched_at = time.perf_counter()
    outcome = await p.process(source, fetched_at, 0.0)
    p.delivered(source, outcome, 0.001, fetched_at)
    assert len(engine.latencies) == 1 and 0 <= engine.latencies[0] < 5
    assert 0 <= engine.fetched_after[0] <= engine.latencies[0]


async def test_a_record_fetched_long_after_it_was_written_reports_its_time_in_kafka() -> None:
    engine = FakeEngine()
    p = processor(engine)
    source = record(IMAGE, [], age_s=40.0)
    fetched_at = time.perf_counter()
    outcome = await p.process(source, fetched_at, 0.0)
    p.delivered(source, outcome, 0.001, fetched_at)
    assert engine.latencies[0] == pytest.approx(40.0, abs=2.0)
    assert engine.fetched_after[0] == pytest.approx(40.0, abs=2.0)  # all of it in Kafka
