"""(d) The naive baseline: the thing ``streamer`` replaces. Deliberately naive; do not copy.

This is the classic "async model serving" example: one asyncio process whose
``async def infer(image)`` awaits nothing useful. For every record it decodes
the JPEG and runs a batch-1 ResNet18 forward pass inline, on the event loop, so
the loop is blocked for the whole decode and forward pass; no batching, no
worker processes, no shared memory, offsets auto-committed by the consumer.

Its shortcomings are the point: one image at a time wastes the batch
efficiency of the model, decode and inference never overlap, and Kafka
heartbeats, fetches and acks wait behind every forward pass. It reads the same
input topic as the service (its own consumer group) and writes the same JSON
shape to its own output topic, so both are timed the same way.

Run: ``python -m streamer.bench.naive --input-topic T --output-topic O --group-id G``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
from typing import Any

import torch
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from PIL import Image
from torchvision import transforms

from streamer.vision.models import IMAGENET_MEAN, IMAGENET_STD, WeightsSpec, build_model

TRANSFORM = transforms.Compose(
    [
        transforms.Resize(256),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ]
)


class NaiveClassifier:
    def __init__(self, weights: str) -> None:
        self.model, self.weights = build_model(WeightsSpec.parse(weights))
        self.model.eval()

    async def infer(self, image: bytes) -> dict[str, Any]:
        # "async", but nothing here awaits: decode and forward block the event loop.
        pixels = TRANSFORM(Image.open(io.BytesIO(image)).convert("RGB")).unsqueeze(0)
        with torch.inference_mode():
            scores, indices = torch.softmax(self.model(pixels), dim=1).topk(5, dim=1)
        return {"indices": indices[0].tolist(), "scores": scores[0].tolist()}


async def serve(args: argparse.Namespace) -> None:
    classifier = NaiveClassifier(args.weights)
    consumer = AIOKafkaConsumer(
        args.input_topic,
        bootstrap_servers=args.bootstrap_servers,
        group_id=args.group_id,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=8 * 1024 * 1024,
    )
    producer = AIOKafkaProducer(bootstrap_servers=args.bootstrap_servers, acks="all")
    await consumer.start()
    await producer.start()
    try:
        async for record in consumer:
            result = await classifier.infer(record.value or b"")
            body = {
                "id": f"{record.topic}/{record.partition}/{record.offset}",
                "source": {
                    "topic": record.topic,
                    "partition": record.partition,
                    "offset": record.offset,
                    "timestamp": record.timestamp,
                },
                "top_k": [
                    {"index": i, "score": s}
                    for i, s in zip(result["indices"], result["scores"], strict=True)
                ],
                "batch_size": 1,
            }
            await producer.send_and_wait(
                args.output_topic, json.dumps(body).encode(), key=record.key
            )
    finally:
        await consumer.stop()
        await producer.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap-servers", default="127.0.0.1:9092")
    parser.add_argument("--input-topic", required=True)
    parser.add_argument("--output-topic", required=True)
    parser.add_argument("--group-id", required=True)
    parser.add_argument("--weights", default="random:0")
    asyncio.run(serve(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
