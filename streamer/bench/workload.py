"""What every benchmark stage shares: the run's parameters, the corpus, the service settings."""

from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

from streamer import corpus
from streamer.config import Settings
from streamer.vision.devices import cuda_device_count, resolve_devices, threads_per_worker

CORPUS_SIZES = ((500, 375), (224, 224))
STAGES = ("ceiling", "engine", "host", "naive", "e2e", "latency", "soak")
# Only in the accelerator run (``gpu()``), first: device-decoded JPEGs against the CPU path.
DEVICE_CHECK_STAGE = "device_check"
# Not in the default run (minutes, and meant for the 3-broker cluster): --stages scale.
SCALE_STAGE = "scale"


@dataclass(frozen=True)
class BenchConfig:
    """Everything a run needs; ``full()`` and ``quick()`` are the two presets."""

    bootstrap_servers: str = "127.0.0.1:9092"
    device: str = "cpu"
    jpeg_decode: str = "auto"  # the service's jpeg_decode ("device" runs the GPU path on a CPU)
    precision: str = "fp32"
    max_batch_size: int = 32
    max_batch_delay_ms: float = 10.0
    max_in_flight: int = 128
    batches_in_flight_per_device: int = 2
    decode_workers: int | None = None  # None: the service default (cores - 1)
    inference_threads: int | None = None  # None: the service default (the cores shared out)
    cpu_inference_workers: int | None = None  # None: the service default
    weights: str = "random:0"  # pretrained weights cannot be downloaded offline
    partitions: int = 3
    corpus_size: int = 64  # distinct images, cycled
    corpus_sizes: tuple[tuple[int, int], ...] = CORPUS_SIZES
    ceiling_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    ceiling_min_s: float = 3.0  # per batch size, after one warm-up pass
    ceiling_again_at_end: bool = True  # a second sweep; per batch size the faster counts
    engine_records: int = 400
    # Each is device-checked, then the engine runs with each that passed (bench.gpu).
    device_jpeg_libraries: tuple[str, ...] = ("torchvision",)
    host_records: int = 3000  # the host-path stage (null model): bare loop, then the service
    profile_host: bool = False  # py-spy both host-stage drains (streamer.bench.host_profile)
    host_instances: int = 1  # > 1: n null-model services then drain at once (bench.host)
    service_log_level: str = "WARNING"  # DEBUG shows the latency-target policy's corrections
    e2e_records: int = 600  # a cold start: 600 records from ready
    naive_records: int = 60
    latency_fractions: tuple[float, ...] = (0.5, 0.9)
    # The same phases again on a second service run with this p99 target (None: skip).
    latency_target_ms: float | None = 500.0
    latency_s: float = 60.0
    latency_warmup_s: float = 5.0
    soak_s: float = 600.0
    soak_samples_s: tuple[float, ...] = (120.0, 600.0)
    soak_fraction: float = 0.5
    skip_soak: bool = False
    keep_topics: bool = False  # False: the run deletes its topics at the end (runner.run)
    stages: tuple[str, ...] = STAGES  # latency and soak need e2e (its peak sets their rate)
    # The multi-instance stage (streamer.bench.scale): one group, n instances each.
    scale_instances: tuple[int, ...] = (1, 2, 3)
    scale_partitions: int = 6
    scale_records: int = 900  # the backlog each step drains
    scale_max_in_flight: int = 32
    scale_inference_threads: int = 1  # one core's worth per instance (see docs/SCALING.md)

    def __post_init__(self) -> None:
        if self.host_instances < 1:
            raise ValueError(f"host_instances must be at least 1, not {self.host_instances}")
        if self.host_records < self.host_instances:
            raise ValueError(
                f"host_records ({self.host_records}) must be at least host_instances"
                f" ({self.host_instances}): each service drains its share"
            )

    @classmethod
    def full(cls, **overrides: Any) -> BenchConfig:
        return cls(**overrides)

    @classmethod
    def gpu(cls, **overrides: Any) -> BenchConfig:
        """The accelerator check: ceiling and engine only (no Kafka there), 500x375 JPEGs
        decoded on the device, fp16; sized to finish in a few minutes on an H100."""
        values: dict[str, Any] = {
            "device": "cuda",
            "jpeg_decode": "device",  # on any device: --device cpu makes it a dry run
            "precision": "fp16",
            "max_batch_size": 256,
            "max_batch_delay_ms": 5.0,
            "max_in_flight": 2048,
            "corpus_size": 128,
            "corpus_sizes": ((500, 375),),
            "ceiling_batch_sizes": (32, 64, 128, 256, 512),
            "ceiling_again_at_end": False,
            "engine_records": 60_000,
            "device_jpeg_libraries": ("torchvision", "nvimgcodec"),
            "stages": (
                DEVICE_CHECK_STAGE,
                "device_batch",
                "ceiling",
                "engine",
                "engine_in_flight",
                "engine_null",
            ),
            "skip_soak": True,
        }
        values.update(overrides)
        return cls(**values)

    @classmethod
    def quick(cls, **overrides: Any) -> BenchConfig:
        values: dict[str, Any] = {
            "corpus_size": 16,
            "ceiling_batch_sizes": (1, 8, 32),
            "ceiling_min_s": 1.5,
            "engine_records": 96,
            "host_records": 300,
            "e2e_records": 128,
            "naive_records": 16,
            "latency_s": 15.0,
            "latency_warmup_s": 2.0,
            "soak_s": 30.0,
            "soak_samples_s": (10.0, 30.0),
            "scale_records": 96,
        }
        values.update(overrides)
        return cls(**values)


def payloads(
    count: int, seed: int = 0, sizes: tuple[tuple[int, int], ...] = CORPUS_SIZES
) -> list[bytes]:
    """The fixed corpus: real photos (then synthetic fill) as JPEG at 500x375 and 224x224."""
    return [s.data for s in corpus.generate(count, seed=seed, sizes=sizes, formats=("JPEG",))]


def run_prefix() -> str:
    """Fresh topic and group names for every run."""
    return f"bench-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def service_settings(config: BenchConfig, prefix: str, **overrides: Any) -> Settings:
    """The service's settings for a benchmark: defaults except the run's topics and knobs."""
    values: dict[str, Any] = {
        "bootstrap_servers": config.bootstrap_servers,
        "input_topic": f"{prefix}-in",
        "output_topic": f"{prefix}-out",
        "dlq_topic": f"{prefix}-dlq",
        "group_id": prefix,
        "client_id": prefix,
        "weights": config.weights,
        "device": config.device,
        "jpeg_decode": config.jpeg_decode,
        "precision": config.precision,
        "max_batch_size": config.max_batch_size,
        "max_batch_delay_ms": config.max_batch_delay_ms,
        "max_in_flight": config.max_in_flight,
        "batches_in_flight_per_device": config.batches_in_flight_per_device,
        "log_level": config.service_log_level,
        # The benchmark reads each prediction's batch size (kafka_io.read_outputs).
        "include_timings": True,
    }
    if config.decode_workers is not None:
        values["decode_workers"] = config.decode_workers
    if config.inference_threads is not None:
        values["inference_threads"] = config.inference_threads
    if config.cpu_inference_workers is not None:
        values["cpu_inference_workers"] = config.cpu_inference_workers
    values.update(overrides)
    return Settings(**values)


def inference_devices(settings: Settings) -> list[str]:
    """The device of each inference worker the engine starts for these settings."""
    return resolve_devices(settings.device, cuda_device_count(), settings.cpu_inference_workers)


def inference_workers(settings: Settings) -> int:
    """The inference workers the engine starts for these settings."""
    return len(inference_devices(settings))


def inference_threads(settings: Settings) -> int:
    """The thread count each inference worker uses (the engine's rule)."""
    return threads_per_worker(
        settings.inference_threads, inference_devices(settings), os.cpu_count()
    )
