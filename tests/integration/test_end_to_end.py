"""200 images and a handful of invalid payloads through the real service and a real broker."""

from __future__ import annotations

import io
import json
import os

import pytest
import torch
import torchvision
from PIL import Image
from torchvision.models import ResNet18_Weights

from streamer import corpus
from streamer.schemas import DLQ_HEADERS, DLQ_REASON, DLQ_SOURCE_OFFSET, DLQ_STAGE
from tests.integration.helpers import (
    committed_and_end,
    produce,
    read_exactly,
    running_service,
    service_settings,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

SEED = 0


def reference_top5(payloads: list[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision computed directly: its own transforms and a ResNet18 with the same weights."""
    torch.manual_seed(SEED)
    model = torchvision.models.resnet18(weights=None).eval()
    transform = ResNet18_Weights.IMAGENET1K_V1.transforms()
    batch = torch.stack([transform(Image.open(io.BytesIO(p)).convert("RGB")) for p in payloads])
    scores, indices = [], []
    with torch.inference_mode():
        for chunk in batch.split(50):
            s, i = torch.softmax(model(chunk), dim=1).topk(5, dim=1)
            scores.append(s)
            indices.append(i)
    return torch.cat(scores), torch.cat(indices)


def invalid_payloads() -> dict[str, tuple[bytes, str]]:
    jpeg = corpus.encode(corpus.synthetic(7, (300, 200)), "JPEG")
    gif = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(gif, "GIF")
    return {
        "bad-random": (os.urandom(2048), "not-an-image"),
        "bad-text": (b"hello, I am not an image", "not-an-image"),
        "bad-empty": (b"", "empty"),
        "bad-truncated": (jpeg[: len(jpeg) // 2], "truncated"),
        "bad-gif": (gif.getvalue(), "unsupported-format"),
        "bad-too-large": (os.urandom(900 * 1024), "payload-too-large"),
    }


# Two CPU inference workers (the default on two or more cores) with small batches, so
# that batches run side by side: each worker answers some, with the same answers.
@pytest.mark.parametrize(
    "layout",
    [{}, {"cpu_inference_workers": 2, "inference_threads": 1, "max_batch_size": 2}],
    ids=["one-worker", "two-cpu-workers"],
)
async def test_every_image_gets_one_correct_prediction_and_every_bad_one_a_dead_letter(
    kafka_bootstrap: str,
    kafka_options: dict[str, str],
    unique_name: str,
    new_topics,
    samples: list[corpus.Sample],
    layout: dict[str, int],
) -> None:
    settings = service_settings(
        kafka_bootstrap, unique_name, max_payload_bytes=640 * 1024, **layout
    )
    await new_topics("in", "out", "dlq", partitions=3)
    bad = invalid_payloads()
    messages = [(s.name.encode(), s.data, [("ce_id", s.name.encode())]) for s in samples]
    messages += [
        (name.encode(), data, [("ce_id", name.encode())]) for name, (data, _) in bad.items()
    ]

    async with running_service(settings) as service:
        await produce(kafka_options, settings.input_topic, messages)
        outputs = await read_exactly(kafka_options, settings.output_topic, len(samples))
        dead = await read_exactly(kafka_options, settings.dlq_topic, len(bad))

        async def all_committed() -> bool:
            committed, end = await committed_and_end(
                kafka_options, settings.group_id, settings.input_topic
            )
            return all(committed.get(p) == e for p, e in end.items())

        await wait_for(all_committed, 30, "committed offsets to reach the end of every partition")
        assert service.loop_lag.max_s < 1.0
        workers = service.engine.inference.workers
        assert len(workers) == settings.cpu_inference_workers
        assert all(w is not None and w.served for w in workers)

    # Exactly one prediction per valid image, none for invalid payloads.
    predictions = [json.loads(r.value) for r in outputs]
    by_id = {p["id"]: p for p in predictions}
    assert len(by_id) == len(predictions) == len(samples)
    assert set(by_id) == {s.name for s in samples}
    # Nothing else arrives later: the topics hold exactly what we read.
    _, out_end = await committed_and_end(kafka_options, settings.group_id, settings.output_topic)
    _, dlq_end = await committed_and_end(kafka_options, settings.group_id, settings.dlq_topic)
    assert sum(out_end.values()) == len(samples)
    assert sum(dlq_end.values()) == len(bad)

    # Top-5 indices match torchvision computed directly; scores agree within 1e-4.
    ref_scores, ref_indices = reference_top5([s.data for s in samples])
    for i, sample in enumerate(samples):
        got = by_id[sample.name]
        assert [t["index"] for t in got["top_k"]] == ref_indices[i].tolist(), sample.name
        assert torch.allclose(
            torch.tensor([t["score"] for t in got["top_k"]]), ref_scores[i], atol=1e-4, rtol=0
        ), sample.name
        assert (
            got["top_k"][0]["label"]
            == ResNet18_Weights.IMAGENET1K_V1.meta["categories"][got["top_k"][0]["index"]]
        )
        assert got["model"]["weights"] == "random:0"
        assert got["source"]["topic"] == settings.input_topic

    # Keys are carried through; every output names its source record.
    for record in outputs:
        assert record.key == json.loads(record.value)["id"].encode()

    # Exactly one dead letter per invalid payload, original bytes and error headers.
    assert sorted(r.key.decode() for r in dead) == sorted(bad)
    for record in dead:
        name = record.key.decode()
        headers = dict(record.headers)
        assert set(DLQ_HEADERS) <= set(headers), name
        assert (record.value or b"") == bad[name][0]
        assert headers[DLQ_REASON].decode() == bad[name][1], name
        assert headers["ce_id"] == name.encode()  # original headers are kept
        assert headers[DLQ_STAGE] in (b"decode", b"intake")
        assert int(headers[DLQ_SOURCE_OFFSET]) >= 0
