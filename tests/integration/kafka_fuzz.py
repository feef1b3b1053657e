"""A fuzzer of real Kafka records: seeded hostile records sent by clients other than aiokafka,
and the tally of what the service answered.

``generate(seed, count, photos)`` makes the records. Values: photos (JPEG, PNG, WebP),
truncated photos, structured CloudEvents (valid, or nested thousands deep, with huge
strings, wrong types, bad base64, huge numbers), noise, empty and null (a tombstone when
the key is null too). Keys: null or any bytes, some above the 4096-byte limit. Headers:
any names, among them the service's own (``streamer-*``) and their escaped forms,
CloudEvents attributes, ``content-type`` variants and names that are not UTF-8; values
null or any bytes, some above the copy limits.

``send`` produces them in order, one partition after the other's record, with each of the
five codecs in turn: librdkafka (confluent-kafka), which sends what aiokafka's producer
refuses (a record without key and value), and kcat for header names that are not UTF-8
(the Python client takes names as text). So the offset of every record is known.

``tally`` reads every answer (predictions and dead letters, read_committed) and counts,
per input offset: lost, duplicated, and plain photos that got no prediction. A plain photo
is a photo whose record the service must predict: no structured content type, key and
``ce_id``/``traceparent`` within their limits, header names UTF-8.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from streamer.kafka.records import MAX_ID_BYTES, MAX_KEY_BYTES, MAX_TRACEPARENT_BYTES
from streamer.schemas import DLQ_HEADERS, DLQ_REASON, DLQ_SOURCE_OFFSET, DLQ_SOURCE_PARTITION
from tests.integration.helpers import read_all

CODECS = ("none", "gzip", "snappy", "lz4", "zstd")
STRUCTURED = b"application/cloudevents+json"
# Below the broker's default max.message.bytes (1 MB) with room for headers.
MAX_VALUE_BYTES = 900_000

Header = tuple[bytes, bytes | None]


@dataclass(frozen=True)
class FuzzRecord:
    key: bytes | None
    value: bytes | None
    headers: tuple[Header, ...]
    kind: str  # what the value is, for the report
    codec: str
    partition: int

    @property
    def names_utf8(self) -> bool:
        try:
            for name, _ in self.headers:
                name.decode("utf-8")
        except UnicodeDecodeError:
            return False
        return True

    def first(self, name: bytes) -> bytes | None:
        return next((v for n, v in self.headers if n == name), None)

    @property
    def plain_photo(self) -> bool:
        """Whether the service must predict it (module docstring)."""
        content_type = (self.first(b"content-type") or b"").decode("utf-8", "replace")
        structured = (
            content_type.split(";", 1)[0].strip().lower().startswith("application/cloudevents")
        )
        return (
            self.kind == "photo"
            and not structured
            and self.names_utf8
            and len(self.key or b"") <= MAX_KEY_BYTES
            and len(self.first(b"ce_id") or b"") <= MAX_ID_BYTES
            and len(self.first(b"traceparent") or b"") <= MAX_TRACEPARENT_BYTES
        )


# ------------------------------------------------------------------ generation

_OWN = [*DLQ_HEADERS, "streamer-value-dropped-bytes", "streamer-replayed-from", "streamer-x"]
_ATTRIBUTES = ["ce_id", "ce_specversion", "ce_source", "ce_type", "ce_time", "traceparent"]


def _nested(rng: random.Random) -> bytes:
    depth = rng.choice([50, 999, 1000, 5000, 100_000])
    return b"[" * depth + b"]" * depth


def _json_noise(rng: random.Random) -> Any:
    return rng.choice(
        [None, True, 1, -1.5, 10**30, "", "x" * rng.randint(1, 300), [1, [2]], {"a": {}}]
    )


def _structured(rng: random.Random, photo: bytes) -> tuple[bytes, str]:
    event: dict[str, Any] = {"specversion": "1.0", "id": f"e{rng.randrange(10**6)}"}
    event.update(source="fuzz", type="fuzz.image", data_base64=base64.b64encode(photo).decode())
    how = rng.choice(["valid", "nested", "huge-string", "wrong-type", "bad-base64", "missing"])
    if how == "valid":
        return json.dumps(event).encode(), "structured-valid"
    if how == "nested":
        body = json.dumps(event).encode()
        where = rng.choice([b'"id": ', b'"specversion": ', b'"data_base64": ', b'"extra": '])
        return body[:-1] + b", " + where + _nested(rng) + b"}", "structured-nested"
    if how == "huge-string":
        event[rng.choice(["specversion", "id", "source", "x"])] = "s" * rng.randint(
            10**4, 6 * 10**5
        )
    elif how == "wrong-type":
        event[rng.choice(["specversion", "id", "source", "type", "data_base64"])] = _json_noise(rng)
    elif how == "bad-base64":
        event["data_base64"] = rng.choice(["!!!", "QUJD=", "A" * 5, event["data_base64"][:-3]])
    else:
        del event[rng.choice(["specversion", "id", "source", "type", "data_base64"])]
    body = json.dumps(event).encode()
    if len(body) > MAX_VALUE_BYTES and "data_base64" in event:  # a smaller image in it
        event["data_base64"] = event["data_base64"][:4000]
        body = json.dumps(event).encode()
    if rng.random() < 0.1:
        body = b'{"specversion": ' + b"9" * rng.randint(4000, 6000) + b"}"
    return body, f"structured-{how}"


def _value(rng: random.Random, photos: list[bytes]) -> tuple[bytes | None, str, bool]:
    """The value, its kind, and whether it wants the structured content type."""
    photo = rng.choice(photos)
    roll = rng.random()
    if roll < 0.40:
        return photo, "photo", False
    if roll < 0.50:
        return photo[: rng.randrange(1, len(photo))], "truncated", False
    if roll < 0.70:
        body, kind = _structured(rng, photo)
        return body, kind, True
    if roll < 0.82:
        return rng.randbytes(rng.randint(1, 5000)), "noise", False
    if roll < 0.90:
        return b"", "empty", False
    return None, "null", False


def _header(rng: random.Random, kcat: bool) -> Header:
    roll = rng.random()
    if roll < 0.25:
        name = rng.choice(_OWN)
        name = rng.choice(["", "input-", "input-input-"]) + name
    elif roll < 0.50:
        name = rng.choice([*_ATTRIBUTES, "content-type"])
    elif roll < 0.85:
        name = "".join(chr(rng.randint(32, 0x2FF)) for _ in range(rng.randint(0, 12)))
    else:
        name = ""
    raw = name.encode("utf-8")
    if kcat:  # argv: no NUL, no '=' in the name; any other byte, not UTF-8 on purpose
        raw = bytes(rng.choice(range(0x80, 0x100)) for _ in range(rng.randint(1, 6))) + raw
        raw = raw.replace(b"=", b"-")
    if rng.random() < 0.1:
        return raw, None
    size = rng.choice([0, 5, 60, 255, 256, 257, 2000])
    value = rng.randbytes(size)
    if kcat:
        value = value.replace(b"\x00", b"0")
    return raw, value


def generate(seed: int, count: int, photos: list[bytes], partitions: int = 2) -> list[FuzzRecord]:
    rng = random.Random(seed)
    photos = [p for p in photos if len(p) < MAX_VALUE_BYTES // 2]
    records = []
    for index in range(count):
        codec = CODECS[(index // 20) % len(CODECS)]  # runs of 20: batches of each codec
        kcat = rng.random() < 0.03
        value, kind, structured = _value(rng, photos)
        headers = [_header(rng, kcat) for _ in range(rng.choice([0, 0, 1, 2, 3, 5]))]
        if structured or rng.random() < 0.1:
            content_type = rng.choice(
                [STRUCTURED, STRUCTURED + b"; charset=utf-8", b"application/cloudevents-batch+json",
                 b"image/jpeg", b"APPLICATION/CLOUDEVENTS+JSON"]
            )  # fmt: skip
            headers.insert(rng.randrange(len(headers) + 1), (b"content-type", content_type))
        roll = rng.random()
        if roll < 0.3:
            key = None
        elif roll < 0.95:
            key = rng.randbytes(rng.randint(0, 64))
        else:
            key = rng.randbytes(rng.choice([MAX_KEY_BYTES, MAX_KEY_BYTES + 1, 6000]))
        if kcat:
            key = key.replace(b"\x00", b"0") or None if key else None
            value = value if value else b"x"  # kcat sends an empty file as empty: fine, not null
        records.append(FuzzRecord(key, value, tuple(headers), kind, codec, index % partitions))
    return records


# ------------------------------------------------------------------ sending


def send(bootstrap: str, topic: str, records: list[FuzzRecord]) -> None:
    """Produce ``records`` in order; each partition's offsets are its records' positions."""
    from confluent_kafka import Producer

    producers: dict[str, Any] = {}
    expected = Counter[int]()
    pending: list[FuzzRecord] = []

    def flush() -> None:
        if not pending:
            return
        codec = pending[0].codec
        producer = producers.get(codec)
        if producer is None:
            producer = producers[codec] = Producer(
                {
                    "bootstrap.servers": bootstrap,
                    "compression.type": codec,
                    "linger.ms": 20,
                    "max.in.flight.requests.per.connection": 1,
                    "message.max.bytes": 1_000_000,
                }
            )
        failures: list[str] = []
        for record in pending:
            offset = expected[record.partition]
            expected[record.partition] += 1

            def report(err: Any, msg: Any, offset: int = offset) -> None:
                if err is not None:
                    failures.append(str(err))
                elif msg.offset() != offset:
                    failures.append(f"offset {msg.offset()} where {offset} was expected")

            producer.produce(
                topic,
                value=record.value,
                key=record.key,
                partition=record.partition,
                headers=[(n.decode("utf-8"), v) for n, v in record.headers],
                on_delivery=report,
            )
        assert producer.flush(60) == 0, "librdkafka did not deliver every record"
        assert not failures, failures[:3]
        pending.clear()

    for record in records:
        if not record.names_utf8:
            flush()
            _kcat(bootstrap, topic, record)
            expected[record.partition] += 1
            continue
        if pending and pending[0].codec != record.codec:
            flush()
        pending.append(record)
    flush()


def _kcat(bootstrap: str, topic: str, record: FuzzRecord) -> None:
    with tempfile.NamedTemporaryFile(prefix="fuzz-value-") as file:
        file.write(record.value or b"")
        file.flush()
        argv = [b"kcat", b"-P", b"-b", bootstrap.encode(), b"-t", topic.encode()]
        argv += [b"-p", str(record.partition).encode(), b"-z", record.codec.encode()]
        if record.key is not None:
            argv += [b"-k", record.key]
        for name, value in record.headers:
            argv += [b"-H", name + b"=" + (value or b"")]
        subprocess.run([*argv, file.name.encode()], check=True, timeout=60, capture_output=True)


# ------------------------------------------------------------------ answers


@dataclass
class Tally:
    records: int = 0
    answers: int = 0
    lost: int = 0
    duplicated: int = 0
    plain_photos: int = 0
    plain_photos_not_predicted: int = 0
    foreign_answers: int = 0  # answers for offsets that were never sent
    reasons: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    codecs: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            **{k: v for k, v in self.__dict__.items() if not isinstance(v, Counter)},
            "reasons": dict(self.reasons),
            "kinds": dict(self.kinds),
            "codecs": dict(self.codecs),
        }


def _first(headers: Any, name: str) -> bytes | None:
    return next((v for n, v in headers or () if n == name), None)


async def tally(options: dict[str, Any], output: str, dlq: str, records: list[FuzzRecord]) -> Tally:
    """Every committed answer in ``output`` and ``dlq``, held against ``records``."""
    sent: dict[tuple[int, int], FuzzRecord] = {}
    positions = Counter[int]()
    for record in records:
        sent[(record.partition, positions[record.partition])] = record
        positions[record.partition] += 1
    answers: dict[tuple[int, int], list[str | None]] = {}
    for prediction in await read_all(options, output):
        source = json.loads(prediction.value)["source"]
        answers.setdefault((source["partition"], source["offset"]), []).append(None)
    for letter in await read_all(options, dlq):
        where = (
            int(_first(letter.headers, DLQ_SOURCE_PARTITION) or b"-1"),
            int(_first(letter.headers, DLQ_SOURCE_OFFSET) or b"-1"),
        )
        reason = (_first(letter.headers, DLQ_REASON) or b"?").decode()
        answers.setdefault(where, []).append(reason)
    result = Tally(records=len(records))
    for where, got in answers.items():
        result.answers += len(got)
        result.duplicated += len(got) - 1
        result.reasons.update(r or "predicted" for r in got)
        if where not in sent:
            result.foreign_answers += len(got)
    for where, record in sent.items():
        result.kinds[record.kind] += 1
        result.codecs[record.codec] += 1
        if where not in answers:
            result.lost += 1
        if record.plain_photo:
            result.plain_photos += 1
            if None not in answers.get(where, []):
                result.plain_photos_not_predicted += 1
    return result


async def send_async(bootstrap: str, topic: str, records: list[FuzzRecord]) -> None:
    await asyncio.to_thread(send, bootstrap, topic, records)


def seeds_and_count() -> tuple[list[int], int]:
    """The seeds and records per seed: ``STREAMER_FUZZ_KAFKA_SEEDS`` (comma-separated) and
    ``STREAMER_FUZZ_KAFKA_RECORDS``; by default one seed of 240 (the form ``make test``
    runs), new seeds each run when ``STREAMER_FUZZ_KAFKA_SEEDS=random:N``."""
    raw = os.environ.get("STREAMER_FUZZ_KAFKA_SEEDS", "1")
    if raw.startswith("random:"):
        seeds = [random.SystemRandom().randrange(2**31) for _ in range(int(raw[7:]))]
    else:
        seeds = [int(s) for s in raw.split(",") if s.strip()]
    return seeds, int(os.environ.get("STREAMER_FUZZ_KAFKA_RECORDS", "240"))
