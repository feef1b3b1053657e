"""The bare aiokafka loop: what Kafka I/O alone costs, the yardstick of the host path.

Consume records, produce a small JSON prediction-shaped answer for each with the
same producer settings as the service (idempotent, ``acks=all``), and commit the
offsets of each fetched batch once its answers are acked. No decoding, no model,
no permits, no metrics: the least any Kafka-to-Kafka service must do per record.

It stops after ``--records`` answers and prints one JSON line with the CPU time
this process used from its first record to its last ack (``resource.getrusage``),
so the benchmark can set it against the service's main process, and the whole
machine's busy CPU over the same window (the broker's included).

Run: ``python -m streamer.bench.bare --input-topic T --output-topic O --group-id G --records N``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from streamer.bench.service import MachineCpu


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def serve(args: argparse.Namespace) -> dict[str, float]:
    consumer = AIOKafkaConsumer(
        args.input_topic,
        bootstrap_servers=args.bootstrap_servers,
        group_id=args.group_id,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_partition_fetch_bytes=8 * 1024 * 1024,
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=args.bootstrap_servers, acks="all", enable_idempotence=True
    )
    await consumer.start()
    await producer.start()
    done = 0
    cpu_at_first = wall_at_first = 0.0
    machine_at_first = MachineCpu.now()
    try:
        while done < args.records:
            batches = await consumer.getmany(timeout_ms=1000, max_records=500)
            if not batches:
                continue
            if not done:
                cpu_at_first, wall_at_first = cpu_s(), time.monotonic()
                machine_at_first = MachineCpu.now()
            sends = []
            for records in batches.values():
                for r in records:
                    body = {
                        "id": f"{r.topic}/{r.partition}/{r.offset}",
                        "source": {
                            "topic": r.topic,
                            "partition": r.partition,
                            "offset": r.offset,
                            "timestamp": r.timestamp,
                        },
                        "top_k": [{"index": 0, "label": "tench", "score": 1.0}],
                        "batch_size": 1,
                    }
                    sends.append(
                        await producer.send(args.output_topic, json.dumps(body).encode(), key=r.key)
                    )
            await asyncio.gather(*sends)
            await consumer.commit()
            done += len(sends)
        return {
            "records": float(done),
            "cpu_s": cpu_s() - cpu_at_first,
            "wall_s": time.monotonic() - wall_at_first,
            "machine_cpu_s": MachineCpu.now().busy_s - machine_at_first.busy_s,
        }
    finally:
        await consumer.stop()
        await producer.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap-servers", default="127.0.0.1:9092")
    parser.add_argument("--input-topic", required=True)
    parser.add_argument("--output-topic", required=True)
    parser.add_argument("--group-id", required=True)
    parser.add_argument("--records", type=int, required=True)
    print(json.dumps(asyncio.run(serve(parser.parse_args(argv)))), flush=True)


if __name__ == "__main__":
    main()
