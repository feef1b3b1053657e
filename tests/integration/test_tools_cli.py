"""The command-line tools against a real broker, run as a new user runs them.

Each test starts ``python -m streamer`` as a child process and checks what it
prints: one-line errors for a missing topic or a record the topic refuses,
consume's key and headers, ``--from-end``, ``--group``, and replay's refusal of
an unknown reason before it moves any offset.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from streamer.tools.admin import create_topics
from tests.integration.helpers import produce

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


async def streamer(*argv: str, timeout_s: float = 60, env: dict[str, str] | None = None) -> Run:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-W",
        "always::ResourceWarning",
        "-m",
        "streamer",
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout_s)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(
            f"streamer {' '.join(argv)} still running after {timeout_s} s"
        ) from None
    assert process.returncode is not None
    return Run(process.returncode, out.decode(), err.decode())


def one_line_error(run: Run, command: str) -> str:
    assert run.returncode != 0, run.stdout
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert "Traceback" not in run.stderr and "Unclosed" not in run.stderr
    assert lines[0].startswith(f"streamer {command}: ")
    return lines[0]


async def topic_names(options: dict[str, str]) -> set[str]:
    admin = AIOKafkaAdminClient(**options)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


def keys(run: Run) -> list[str]:
    assert run.returncode == 0, run.stderr
    return [json.loads(line)["key"] for line in run.stdout.splitlines()]


async def test_producing_to_a_missing_topic_names_it_and_creates_nothing(
    kafka_bootstrap: str, kafka_options: dict[str, str], unique_name: str, tmp_path: Path
) -> None:
    (tmp_path / "cat.jpg").write_bytes(b"\xff\xd8 cat")
    topic = f"{unique_name}-typo"
    run = await streamer(
        "produce", str(tmp_path), "--topic", topic, "--bootstrap-servers", kafka_bootstrap
    )
    line = one_line_error(run, "produce")
    assert f"topic {topic!r} does not exist" in line and "streamer create-topics" in line
    assert topic not in await topic_names(kafka_options)  # the broker auto-creates topics


async def test_consuming_an_unknown_topic_fails_at_once(
    kafka_bootstrap: str, kafka_options: dict[str, str], unique_name: str
) -> None:
    topic = f"{unique_name}-typo"
    run = await streamer(
        "consume", "--topic", topic, "--follow", "--bootstrap-servers", kafka_bootstrap
    )
    line = one_line_error(run, "consume")
    assert f"topic {topic!r} does not exist" in line and "streamer create-topics" in line
    assert topic not in await topic_names(kafka_options)


async def test_a_record_the_topic_refuses_is_named_with_its_size(
    kafka_bootstrap: str, kafka_options: dict[str, str], unique_name: str, tmp_path: Path
) -> None:
    topic = f"{unique_name}-small"
    await create_topics(kafka_options, [topic], 1, max_message_bytes=4096)
    (tmp_path / "big.jpg").write_bytes(os.urandom(20_000))
    run = await streamer(
        "produce", str(tmp_path), "--topic", topic, "--bootstrap-servers", kafka_bootstrap
    )
    line = one_line_error(run, "produce")
    assert f"big.jpg (20000 bytes) is larger than topic {topic!r} accepts" in line
    assert "max.message.bytes" in line and "--max-payload-bytes" in line


async def test_consume_prints_the_file_name_key_and_the_headers(
    kafka_bootstrap: str, new_topics, tmp_path: Path
) -> None:
    [topic] = await new_topics("in", partitions=1)
    (tmp_path / "cat.jpg").write_bytes(b"\xff\xd8 cat")
    produced = await streamer(
        "produce", str(tmp_path), "--topic", topic, "--bootstrap-servers", kafka_bootstrap
    )
    assert produced.returncode == 0, produced.stderr
    assert "\r" not in produced.stderr  # no progress bar when stderr is not a terminal

    as_json = await streamer(
        "consume", "--topic", topic, "--format", "json", "--bootstrap-servers", kafka_bootstrap
    )
    [document] = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert document["key"] == "cat.jpg"
    assert document["headers"]["content-type"] == "image/jpeg"
    assert set(document["headers"]) == {"content-type", "ce_id", "traceparent"}

    table = await streamer("consume", "--topic", topic, "--bootstrap-servers", kafka_bootstrap)
    assert table.returncode == 0, table.stderr
    [_, row] = table.stdout.splitlines()
    assert row.split()[:2] == [f"{topic}/0/0", "cat.jpg"]


async def test_from_end_prints_only_records_produced_after_the_start(
    kafka_bootstrap: str, kafka_options: dict[str, str], new_topics
) -> None:
    [topic] = await new_topics("in", partitions=1)
    await produce(kafka_options, topic, [(b"old", b"{}", [])])
    reader = asyncio.create_task(
        streamer(
            "consume",
            "--topic",
            topic,
            "--from-end",
            "-n",
            "1",
            "--format",
            "json",
            "--bootstrap-servers",
            kafka_bootstrap,
        )
    )
    # The reader's start is not observable from here: keep producing new records
    # until it has printed one. Read from the beginning, it would print "old".
    sent = 0
    while not reader.done():
        assert sent < 300, "consume --from-end printed nothing"
        await produce(kafka_options, topic, [(f"new-{sent}".encode(), b"{}", [])])
        sent += 1
        await asyncio.wait({reader}, timeout=0.2)
    [key] = keys(reader.result())
    assert key.startswith("new-")


async def test_a_group_continues_where_its_previous_run_stopped(
    kafka_bootstrap: str, kafka_options: dict[str, str], new_topics, unique_name: str
) -> None:
    [topic] = await new_topics("in", partitions=1)
    await produce(kafka_options, topic, [(f"k{i}".encode(), b"{}", []) for i in range(3)])
    group = ["--group", f"{unique_name}-readers", "--format", "json"]
    connection = ["--topic", topic, "--bootstrap-servers", kafka_bootstrap]
    assert keys(await streamer("consume", *connection, *group, "-n", "2")) == ["k0", "k1"]
    assert keys(await streamer("consume", *connection, *group)) == ["k2"]
    again = await streamer("consume", *connection, *group)
    assert keys(again) == [] and "no records" in again.stderr
    # Without the group every run starts at the beginning.
    assert keys(await streamer("consume", *connection, "--format", "json")) == ["k0", "k1", "k2"]


async def test_an_unknown_replay_reason_leaves_the_replay_group_untouched(
    kafka_bootstrap: str, kafka_options: dict[str, str], new_topics, unique_name: str
) -> None:
    inputs, outputs, dlq = await new_topics("in", "out", "dlq", partitions=1)
    letter = [("streamer-error-reason", b"unsupported-format")]
    await produce(kafka_options, dlq, [(b"anim.gif", b"GIF89a", letter)])
    group = f"{unique_name}.replay"
    env = {
        "STREAMER_INPUT_TOPIC": inputs,
        "STREAMER_OUTPUT_TOPIC": outputs,
        "STREAMER_DLQ_TOPIC": dlq,
    }
    argv = ["replay", "--replay-group", group, "--bootstrap-servers", kafka_bootstrap]
    refused = await streamer(*argv, "--reason", "unsupported-fromat", env=env)
    line = one_line_error(refused, "replay")
    assert "unknown --reason 'unsupported-fromat'" in line and "unsupported-format" in line

    admin = AIOKafkaAdminClient(**kafka_options)
    await admin.start()
    try:
        assert await admin.list_consumer_group_offsets(group) == {}
    finally:
        await admin.close()
    # The dead letter is still there for the corrected command.
    fixed = await streamer(*argv, "--reason", "unsupported-format", env=env)
    assert fixed.returncode == 0, fixed.stderr
    assert fixed.stdout.startswith(f"read 1 dead letters from {dlq}, replayed 1")
