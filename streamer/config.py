"""Service settings: one frozen pydantic model, read from flags and STREAMER_* variables.

Units are part of the field names (``max_batch_delay_ms``, ``max_payload_bytes``).
Every field can be set as an environment variable with the ``STREAMER_`` prefix,
e.g. ``STREAMER_MAX_BATCH_SIZE=64``; command-line flags win over the environment.
"""

from __future__ import annotations

import os
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PIXELS_PER_SLOT = 3 * 224 * 224


def default_decode_workers() -> int:
    """Decode workers: the cores left after one for inference, at least one."""
    return max(1, (os.cpu_count() or 2) - 1)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STREAMER_", frozen=True, extra="forbid")

    # Kafka
    bootstrap_servers: str = "127.0.0.1:9092"
    input_topic: str = "images"
    output_topic: str = "predictions"
    dlq_topic: str = "images.dlq"
    group_id: str = "streamer"
    client_id: str = "streamer"
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    commit_interval_ms: int = Field(1000, gt=0)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None

    # Model
    weights: str = "imagenet"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    top_k: int = Field(5, ge=1, le=1000)
    inference_threads: int | None = Field(None, ge=1)
    # Where JPEGs are decoded: "auto" = on the inference device when it is CUDA.
    jpeg_decode: Literal["auto", "cpu", "device"] = "auto"

    # Throughput and memory bounds
    max_in_flight: int = Field(128, ge=1)
    max_batch_size: int = Field(32, ge=1)
    max_batch_delay_ms: float = Field(10.0, ge=0)
    decode_workers: int = Field(default_factory=default_decode_workers, ge=1)
    max_payload_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(40_000_000, ge=262_144)  # resizing alone needs 256x256
    # NoDecode: the environment gives "JPEG,PNG", not JSON.
    allowed_formats: Annotated[tuple[str, ...], NoDecode] = ("JPEG", "PNG", "WEBP")

    # Reliability
    # at-least-once: outputs acked, then offsets committed (a crash may duplicate).
    # exactly-once: outputs and offsets committed together in Kafka transactions.
    delivery: Literal["at-least-once", "exactly-once"] = "at-least-once"
    transactional_id_prefix: str | None = None  # default: the group id
    transaction_timeout_ms: int = Field(60_000, ge=1000)
    max_record_attempts: int = Field(3, ge=1)
    drain_timeout_s: float = Field(30.0, ge=0)
    # A partition with records pending and no commit for this long is stalled:
    # /readyz answers 503 and streamer_partitions_stalled counts it.
    stall_timeout_s: float = Field(120.0, gt=0)
    worker_start_timeout_s: float = Field(120.0, gt=0)
    # A worker that leaves a request (or an idle ping) unanswered this long is
    # killed as hung; its batch is retried like after a crash.
    worker_timeout_s: float = Field(60.0, gt=0)
    # A warm spare inference worker per device takes over at once when one dies.
    inference_standby: bool = True

    # Operations
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(9108, ge=0, le=65535)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("allowed_formats", mode="before")
    @classmethod
    def _split_formats(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, list | tuple):
            return tuple(str(v).strip().upper() for v in value if str(v).strip())
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.max_batch_size > self.max_in_flight:
            raise ValueError("max_batch_size cannot exceed max_in_flight")
        if len({self.input_topic, self.output_topic, self.dlq_topic}) != 3:
            raise ValueError("input, output and dead-letter topics must differ")
        if self.sasl_mechanism and not self.security_protocol.startswith("SASL"):
            raise ValueError("sasl_mechanism needs security_protocol SASL_PLAINTEXT or SASL_SSL")
        return self

    def transactional_id(self, topic: str, partition: int) -> str:
        """One transactional id per input partition: a new owner fences the old one."""
        return f"{self.transactional_id_prefix or self.group_id}-{topic}-{partition}"

    @property
    def max_message_bytes(self) -> int:
        """The largest record the service reads or writes: a payload at its limit plus
        headers (a dead letter carries both). Producers, fetches and topics use it."""
        return max(1024 * 1024, self.max_payload_bytes + 65536)

    @property
    def shared_memory_bytes(self) -> int:
        """Upper bound of the shared memory the slot pool reserves (see README)."""
        return self.max_in_flight * (self.max_payload_bytes + PIXELS_PER_SLOT)
