"""The accelerator run's own stages (``make bench-gpu``; no Kafka on that machine).

- **Device check, per JPEG library** (``device_check``): each library that can decode
  on the device (``vision.device_decode.LIBRARIES``) is checked against the CPU path;
  one that fails, or is not installed, is reported and never measured. When none
  passes, the run stops before any figure is taken.
- **Engine, per library** (``engine``): the engine stage once for each library that
  passed; the fastest is the run's engine figure, and the report says which it was.
  A wrong decoder is never measured, so it can never be the one chosen.
- **One more batch in flight** (``engine_in_flight``): the engine with the fastest
  library at one more batch in flight per device than configured, then at the
  configured number again, so that drift within the run shows beside the difference.
  It shows whether the device waits for the event loop to send the next batch (H200
  runs in docs/BENCHMARKS.md: the inference worker was busy 65-71% of the engine runs).
- **Host path without Kafka** (``engine_null``): the engine with the null model and
  null decode on this machine's CPU: how many records a second one instance's event
  loop, shared memory and pipes carry when neither decode nor the model costs
  anything. The Kafka half of the host path is measured by the ``host`` stage on a
  machine with a broker (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import logging
from typing import Any

from streamer.bench import device_check
from streamer.bench.engine import run_engine
from streamer.config import Settings
from streamer.errors import ConfigError
from streamer.vision.device_decode import JpegBatchDecoder
from streamer.vision.devices import check_jpeg_library

log = logging.getLogger(__name__)

NULL_ENGINE_STAGE = "engine_null"
IN_FLIGHT_STAGE = "engine_in_flight"


def check_libraries(
    libraries: tuple[str, ...], corpus: list[bytes], device: str, weights: str
) -> tuple[dict[str, Any], list[str]]:
    """Each library's device check (its figures, or why it was left out) and those that passed.

    Raises ``DeviceDecodeMismatch`` when none passed: no figure may then be taken."""
    results: dict[str, Any] = {}
    passed: list[str] = []
    for library in libraries:
        try:
            check_jpeg_library(library)
        except ConfigError as exc:
            results[library] = {"passed": False, "not_installed": str(exc)}
            continue
        log.info("bench device check: %s on %s against the CPU path", library, device)
        try:
            decoder = JpegBatchDecoder(device, library).decode
            figures = device_check.check(corpus, device, weights, decoder=decoder)
        except Exception as exc:  # a mismatch, or a library that fails on this device
            log.error("bench device check: %s failed: %s", library, exc)
            results[library] = {"passed": False, "error": f"{type(exc).__name__}: {exc}"}
            continue
        results[library] = {"passed": True, **figures}
        passed.append(library)
    if not passed:
        raise device_check.DeviceDecodeMismatch(
            f"no device JPEG library passed the device check: {results}"
        )
    return results, passed


async def engine_by_library(
    settings: Settings, corpus: list[bytes], records: int, libraries: list[str]
) -> dict[str, Any]:
    """The engine stage with each library; the fastest as the figure, all of them beside it."""
    runs: dict[str, dict[str, Any]] = {}
    for library in libraries:
        log.info("bench (b) engine with %s decoding JPEGs on the device", library)
        runs[library] = await run_engine(
            settings.model_copy(update={"device_jpeg_library": library}), corpus, records
        )
    fastest = max(runs, key=lambda library: runs[library]["images_per_s"])
    return {**runs[fastest], "jpeg_library": fastest, "by_jpeg_library": runs}


async def one_more_batch_in_flight(
    settings: Settings, corpus: list[bytes], records: int, library: str
) -> dict[str, Any]:
    """The engine with ``library`` at one more batch in flight per device, then at the
    configured number again (module docstring)."""
    configured = settings.batches_in_flight_per_device
    runs = []
    for in_flight in (configured + 1, configured):
        log.info("bench engine with %s, %d batches in flight per device", library, in_flight)
        update = {"device_jpeg_library": library, "batches_in_flight_per_device": in_flight}
        run = await run_engine(settings.model_copy(update=update), corpus, records)
        runs.append({"batches_in_flight_per_device": in_flight, **run})
    return {"jpeg_library": library, "runs": runs}


def null_engine_settings(settings: Settings) -> Settings:
    """The engine as the host stage runs the service: nothing decoded, nothing computed."""
    return settings.model_copy(
        update={
            "weights": "null",
            "null_decode": True,
            "device": "cpu",
            "jpeg_decode": "cpu",
            "precision": "fp32",
            # As in the host stage: the null model computes nothing, and its batch-time
            # table would choose small batches a GPU would not.
            "inference_threads": 1,
            "cpu_inference_workers": 1,
            "batch_size_from_table": False,
        }
    )
