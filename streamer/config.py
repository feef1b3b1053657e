"""Service settings: one frozen pydantic model, read from flags and STREAMER_* variables.

Units are part of the field names (``max_batch_delay_ms``, ``max_payload_bytes``).
Every field can be set as an environment variable with the ``STREAMER_`` prefix,
e.g. ``STREAMER_MAX_BATCH_SIZE=64``; command-line flags win over the environment.
"""

from __future__ import annotations

import os
import socket
from typing import Annotated, Literal

from pydantic import Field, PrivateAttr, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PIXELS_PER_SLOT = 3 * 224 * 224


def default_decode_workers() -> int:
    """Decode workers: the cores left after one for inference, at least one."""
    return max(1, (os.cpu_count() or 2) - 1)


def default_cpu_inference_workers() -> int:
    """Two CPU inference workers, each on half the cores (one on a single core).

    On 2 cores two one-thread workers ran end to end 15-17% faster than one
    two-thread worker (docs/BENCHMARKS.md): a two-thread forward pass
    waits at every barrier for whichever thread decode or Kafka preempted, and
    one-thread passes scale better. More workers are not measured yet.
    """
    return min(2, os.cpu_count() or 1)


def read_secret_file(setting: str, path: str) -> SecretStr:
    """The content of a secret file, without its trailing newline.

    Errors name the setting, the path and the reason, never the content.
    """
    try:
        with open(path, encoding="utf-8") as file:
            secret = file.read().rstrip("\r\n")
    except OSError as exc:
        raise ValueError(
            f"{setting}: cannot read {path!r} ({exc.strerror or type(exc).__name__})"
        ) from None
    except UnicodeDecodeError:
        raise ValueError(f"{setting}: {path!r} is not UTF-8 text") from None
    if not secret:
        raise ValueError(f"{setting}: {path!r} is empty")
    return SecretStr(secret)


class Settings(BaseSettings):
    """The service's configuration; see the module docstring for where values come from."""

    # hide_input_in_errors: a model-level error would otherwise print every input,
    # the plain-text password included.
    model_config = SettingsConfigDict(
        env_prefix="STREAMER_", frozen=True, extra="forbid", hide_input_in_errors=True
    )

    # Set once by the validator from sasl_password_file; never dumped or shown.
    _password_from_file: SecretStr | None = PrivateAttr(None)

    # Kafka
    bootstrap_servers: str = Field(
        "127.0.0.1:9092", description="Kafka bootstrap servers, comma-separated host:port pairs"
    )
    input_topic: str = Field("images", description="topic the images are read from")
    output_topic: str = Field("predictions", description="topic the predictions are written to")
    dlq_topic: str = Field(
        "images.dlq", description="dead-letter topic for records that cannot be classified"
    )
    group_id: str = Field("streamer", description="Kafka consumer group id")
    # Static membership (KIP-345): a member with an instance id sends no LeaveGroup
    # when it stops, so a restart within session_timeout_ms keeps its partitions and
    # the rest of the group does not rebalance.
    group_instance_id: str | None = Field(
        None,
        description="static group membership id, unique per instance; auto: the host name"
        " (the pod name in Kubernetes); unset: dynamic membership",
    )
    session_timeout_ms: int = Field(
        10_000,
        ge=1000,
        description="milliseconds without a heartbeat before the group drops a member; with"
        " static membership, how long a restart may take without a rebalance",
    )
    client_id: str = Field("streamer", description="Kafka client id (shows in broker logs)")
    auto_offset_reset: Literal["earliest", "latest"] = Field(
        "earliest", description="where a group without committed offsets starts reading"
    )
    commit_interval_ms: int = Field(
        1000, gt=0, description="milliseconds between offset commits (at-least-once)"
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="protocol used to talk to the brokers"
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="SASL mechanism; needs a SASL_* security protocol"
    )
    sasl_username: str | None = Field(None, description="SASL user name")
    sasl_password: SecretStr | None = Field(
        None,
        description="SASL password, from STREAMER_SASL_PASSWORD only (the flag is refused: "
        "command lines show in ps)",
    )
    # Read once, at validation (see sasl_secret); a trailing newline is dropped.
    sasl_password_file: str | None = Field(
        None,
        description="path of a file holding the SASL password (e.g. a mounted Kubernetes"
        " secret); excludes sasl_password",
    )
    ssl_cafile: str | None = Field(None, description="path of the CA bundle (PEM) for SSL")
    ssl_certfile: str | None = Field(None, description="path of the client certificate (PEM)")
    ssl_keyfile: str | None = Field(None, description="path of the client private key (PEM)")

    # Model
    weights: str = Field(
        "imagenet",
        description="imagenet | random[:SEED] | PATH of a ResNet18 state_dict | null (no"
        " model: fixed scores, for measuring the host path)",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="inference device; auto picks CUDA when available"
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="floating-point precision of the forward pass"
    )
    top_k: int = Field(5, ge=1, le=1000, description="classes per prediction (count)")
    # Outputs are CloudEvents (Kafka binding, binary mode); this is their ce_source.
    event_source: str | None = Field(
        None, description='ce_source of the output CloudEvents; unset: "streamer/<group_id>"'
    )
    # Not part of the stable output contract.
    include_timings: bool = Field(
        False,
        description="add the batch size and per-stage timings (seconds) to every prediction,"
        " for benchmarks and debugging",
    )
    null_decode: bool = Field(
        False,
        description="benchmarks only: decode workers answer at once without reading the image"
        " or writing pixels; with --weights null the service measures its host path (Kafka,"
        " event loop, shared memory, pipes, batching) alone",
    )
    inference_threads: int | None = Field(
        None,
        ge=1,
        description="torch CPU threads of each inference worker; unset: the cores shared"
        " out among the CPU inference workers (all of them for one, and for a GPU worker)",
    )
    cpu_inference_workers: int = Field(
        default_factory=default_cpu_inference_workers,
        ge=1,
        description="inference worker processes when inference runs on the CPU, each with"
        " its own model and threads; default: 2 (1 on a single core); ignored on CUDA (one"
        " worker per GPU)",
    )
    jpeg_decode: Literal["auto", "cpu", "device"] = Field(
        "auto",
        description="where JPEGs are decoded; auto: on the inference device when it is CUDA",
    )
    device_jpeg_library: Literal["torchvision", "nvimgcodec"] = Field(
        "torchvision",
        description="what decodes JPEGs on the device: torchvision (nvjpeg) or nvimgcodec"
        " (nvImageCodec, optional: pip install nvidia-nvimgcodec-cu13 nvidia-nvjpeg)",
    )

    # Throughput and memory bounds
    max_in_flight: int = Field(
        128, ge=1, description="records between fetch and ack at most (count); bounds memory"
    )
    max_batch_size: int = Field(32, ge=1, description="records per inference batch at most")
    batch_size_from_table: bool = Field(
        True,
        description="time batches of 1, 2, 4 and so on up to max_batch_size as the model"
        " loads; batch at most the size with the best images/s (the smallest within 5% of"
        " it); off, or with latency_target_ms: max_batch_size",
    )
    batches_in_flight_per_device: int = Field(
        2,
        ge=1,
        description="inference batches sent to each device before the first returns: 2"
        " keeps one queued behind the one running; more can help a fast GPU whose host path"
        " sends batches unevenly, at the cost of latency",
    )
    max_batch_delay_ms: float = Field(
        10.0, ge=0, description="milliseconds a batch waits to fill before it runs anyway"
    )
    latency_target_ms: float | None = Field(
        None,
        gt=0,
        description="p99 end-to-end latency target: batch size and fill wait are chosen from"
        " measured batch times and the backlog (draining with the most efficient batch under"
        " lag), corrected from the observed p99; unset: max_batch_size and max_batch_delay_ms",
    )
    decode_workers: int = Field(
        default_factory=default_decode_workers,
        ge=1,
        description="decode worker processes; default: CPU cores minus one, at least one",
    )
    max_payload_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="largest image record accepted, in bytes"
    )
    max_batch_decompressed_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1024 * 1024,
        description="largest record batch inflated from a compressed one, in bytes; a bigger"
        " one is dead-lettered record by record as undecodable-record (a decompression bomb)",
    )
    # resizing alone needs 256x256
    max_image_pixels: int = Field(
        40_000_000, ge=262_144, description="largest decoded image accepted, in pixels"
    )
    # NoDecode: the environment gives "JPEG,PNG", not JSON.
    allowed_formats: Annotated[tuple[str, ...], NoDecode] = Field(
        ("JPEG", "PNG", "WEBP"),
        description="image formats accepted, comma-separated; others are dead-lettered",
    )

    # Reliability
    # at-least-once: outputs acked, then offsets committed (a crash may duplicate).
    # exactly-once: outputs and offsets committed together in Kafka transactions.
    delivery: Literal["at-least-once", "exactly-once"] = Field(
        "at-least-once",
        description="at-least-once: outputs acked, then offsets committed (a crash may"
        " duplicate); exactly-once: both in one Kafka transaction",
    )
    transactional_id_prefix: str | None = Field(
        None, description="prefix of the transactional ids (exactly-once); unset: the group id"
    )
    transaction_timeout_ms: int = Field(
        60_000, ge=1000, description="Kafka transaction timeout, in milliseconds"
    )
    max_record_attempts: int = Field(
        3, ge=1, description="attempts per record before a retriable failure is dead-lettered"
    )
    drain_timeout_s: float = Field(
        30.0,
        ge=0,
        description="seconds in-flight records get to finish on shutdown or when a partition"
        " is revoked; 0: none (what is left stays uncommitted and is processed again)",
    )
    # A partition with records pending and no commit for this long is stalled:
    # /readyz answers 503 and streamer_partitions_stalled counts it.
    stall_timeout_s: float = Field(
        120.0,
        gt=0,
        description="seconds without a commit, records pending, before a partition counts as"
        " stalled (/readyz answers 503)",
    )
    worker_start_timeout_s: float = Field(
        120.0, gt=0, description="seconds a worker process gets to report ready"
    )
    # A worker that leaves a request (or an idle ping) unanswered this long is
    # killed as hung; its batch is retried like after a crash.
    worker_timeout_s: float = Field(
        60.0,
        gt=0,
        description="seconds without an answer before a worker is killed as hung"
        " (its batch is retried)",
    )
    worker_sandbox: bool = Field(
        True,
        description="confine the worker processes, which parse hostile bytes: no network, no"
        " file outside the Python installation and /dev, and the main process unreadable by"
        " them (Landlock and seccomp on Linux; off only to debug a worker)",
    )
    inference_standby: bool = Field(
        True,
        description="keep a warm spare for each inference worker that takes over at once"
        " when it dies",
    )

    # Operations
    metrics_host: str = Field("127.0.0.1", description="address of /metrics, /healthz and /readyz")
    metrics_port: int = Field(
        9108,
        ge=0,
        le=65535,
        description="TCP port of /metrics, /healthz and /readyz; 0 picks a free port",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="lowest level logged"
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="text: one readable line per record; json: one JSON object per line"
    )

    @field_validator("allowed_formats", mode="before")
    @classmethod
    def _split_formats(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, list | tuple):
            return tuple(str(v).strip().upper() for v in value if str(v).strip())
        return value

    @field_validator("group_instance_id")
    @classmethod
    def _resolve_instance_id(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        if value == "auto":
            value = socket.gethostname()
        if not value:
            raise ValueError("must not be empty (unset it for dynamic membership)")
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.max_batch_size > self.max_in_flight:
            raise ValueError("max_batch_size cannot exceed max_in_flight")
        if len({self.input_topic, self.output_topic, self.dlq_topic}) != 3:
            raise ValueError("input, output and dead-letter topics must differ")
        if self.sasl_mechanism and not self.security_protocol.startswith("SASL"):
            raise ValueError("sasl_mechanism needs security_protocol SASL_PLAINTEXT or SASL_SSL")
        if self.sasl_password_file is not None:
            if self.sasl_password is not None:
                raise ValueError("set sasl_password or sasl_password_file, not both")
            self._password_from_file = read_secret_file(
                "sasl_password_file", self.sasl_password_file
            )
        return self

    @property
    def sasl_secret(self) -> SecretStr | None:
        """The SASL password: ``sasl_password``, or the content of ``sasl_password_file``."""
        return self.sasl_password if self.sasl_password is not None else self._password_from_file

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
