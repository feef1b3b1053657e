"""The host-path profile (which part each sampled stack is charged to, py-spy itself) and
the benchmark's topic clean-up guard."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streamer.bench.host_profile import (
    EVENT_LOOP,
    KAFKA_CLIENT,
    OWN_CODE,
    RECORD_READING,
    Sampler,
    part_of,
    split,
)
from streamer.tools.admin import delete_topics_with_prefix

pytestmark = pytest.mark.timeout(60)

SERVICE = (
    "_run_module_as_main (<frozen runpy>:198);_run_code (<frozen runpy>:88);"
    "<module> (streamer/__main__.py:5);main (streamer/cli.py:70);_run (streamer/cli.py:165);"
    "run (asyncio/runners.py:190);BaseEventLoop.run_forever (asyncio/base_events.py:607);"
    "BaseEventLoop._run_once (asyncio/base_events.py:1922);Handle._run (asyncio/events.py:80)"
)
BARE = (
    "_run_module_as_main (<frozen runpy>:198);<module> (streamer/bench/bare.py:95);"
    "main (streamer/bench/bare.py:91);run (asyncio/runners.py:190);"
    "BaseEventLoop._run_once (asyncio/base_events.py:1922);Handle._run (asyncio/events.py:80)"
)
FETCH = (
    ";Service._intake_loop (streamer/app.py:223);Intake.records (streamer/kafka/intake.py:97)"
    ";AIOKafkaConsumer.getmany (aiokafka/consumer/consumer.py:1197)"
)


@pytest.mark.parametrize(
    ("stack", "part"),
    [
        (SERVICE + FETCH, KAFKA_CLIENT),
        (SERVICE + FETCH + ";TolerantBatch._chunks (streamer/kafka/wire.py:120)", RECORD_READING),
        (
            SERVICE + ";_SelectorSocketTransport._read_ready (asyncio/selector_events.py:1002)"
            ";StreamReader.feed_data (asyncio/streams.py:512)",
            KAFKA_CLIENT,
        ),
        (
            SERVICE + ";Service._handle (streamer/app.py:248)"
            ";RecordProcessor.process (streamer/pipeline/processor.py:91)"
            ";uuid5 (streamer/kafka/records.py:165)",
            OWN_CODE,
        ),
        (
            SERVICE + ";Service._handle (streamer/app.py:250)"
            ";AtLeastOnce.deliver (streamer/kafka/delivery.py:80)"
            ";AIOKafkaProducer.send (aiokafka/producer/producer.py:470)",
            KAFKA_CLIENT,
        ),
        (SERVICE.rsplit(";", 1)[0] + ";EpollSelector.select (selectors.py:468)", EVENT_LOOP),
        # The loop's own event processing is in the transports' file, but is not a transport.
        (
            SERVICE.rsplit(";", 1)[0]
            + ";BaseSelectorEventLoop._process_events (asyncio/selector_events.py:785)",
            EVENT_LOOP,
        ),
        (SERVICE + ";Task.__step (asyncio/tasks.py:267)", EVENT_LOOP),
        (BARE + ";serve (streamer/bench/bare.py:69);dumps (json/__init__.py:231)", OWN_CODE),
        (BARE + ";Task.__step (asyncio/tasks.py:267)", EVENT_LOOP),
    ],
)
def test_each_stack_is_charged_to_its_part(stack: str, part: str) -> None:
    assert part_of(stack) == part


def test_split_gives_shares_and_milliseconds_of_samples_in_the_loop() -> None:
    raw = "\n".join(
        [
            f"{SERVICE + FETCH} 6",
            f"{SERVICE};Service._handle (streamer/app.py:248) 3",
            f"{SERVICE};Task.__step (asyncio/tasks.py:267) 1",
            # Before the loop ran (imports): left out, and counted as such.
            "<module> (streamer/__main__.py:5);_find_and_load (<frozen importlib>:1) 5",
            "",
        ]
    )
    result = split(raw, cpu_ms_per_record=0.2)
    assert result["samples"] == 10 and result["samples_outside_the_loop"] == 5
    assert result["share"] == {
        KAFKA_CLIENT: 0.6,
        RECORD_READING: 0.0,
        OWN_CODE: 0.3,
        EVENT_LOOP: 0.1,
    }
    assert result["ms_per_record"][KAFKA_CLIENT] == pytest.approx(0.12)
    assert sum(result["ms_per_record"].values()) == pytest.approx(0.2)
    assert split(raw, None)["ms_per_record"] == {}
    # The own code's 3 samples, by function (the entry frames of cli.py are not listed).
    assert result["own_code_by_function"] == {"streamer.app.Service._handle": 0.3}


BUSY_LOOP = """
import asyncio, sys, time
async def main():
    print("ready", flush=True)
    sys.stdin.readline()  # sampling has started
    until = time.monotonic() + 1.0
    while time.monotonic() < until:
        sum(range(10_000))
        await asyncio.sleep(0)
asyncio.run(main())
"""


def test_the_sampler_records_a_process_until_it_exits(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", BUSY_LOOP]
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as child:
        try:
            assert child.stdout is not None and child.stdin is not None
            assert child.stdout.readline() == "ready\n"
            sampler = Sampler(child.pid, tmp_path / "busy.txt")
            deadline = time.monotonic() + 20
            while not _sampling(tmp_path / "busy.log"):
                assert time.monotonic() < deadline, "py-spy did not start sampling"
                time.sleep(0.05)
            child.stdin.write("go\n")
            child.stdin.flush()
            assert child.wait(timeout=20) == 0
            result = split(asyncio.run(sampler.stop()), cpu_ms_per_record=None)
        finally:
            child.kill()
    # The loop is all this process did once sampled: every sample is in it, none Kafka.
    assert result["samples"] >= 50  # about 200 in its busy second
    assert result["share"][EVENT_LOOP] == 1.0


def test_a_sampler_that_is_killed_leaves_nothing_running(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        sampler = Sampler(child.pid, tmp_path / "idle.txt")
        sampler.kill()
        sampler.kill()  # idempotent
        assert sampler._process.poll() is not None
    finally:
        child.kill()
        child.wait()


def _sampling(log: Path) -> bool:
    return log.exists() and "Sampling process" in log.read_text()


async def test_deleting_topics_by_an_empty_prefix_is_refused_before_any_connection() -> None:
    # A wrong address: had it tried to connect, the error would be another one.
    with pytest.raises(ValueError, match="every topic"):
        await delete_topics_with_prefix({"bootstrap_servers": "127.0.0.1:1"}, "")
