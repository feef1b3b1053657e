"""Session fixtures: a real Kafka broker, fresh topics per test, the sample corpus.

The broker is picked in this order:
1. ``STREAMER_TEST_BOOTSTRAP_SERVERS`` names an external broker;
2. a Docker engine answers: a testcontainers Kafka container (apache/kafka, KRaft);
3. otherwise the local KRaft broker from ``deploy/kafka/kafkactl`` (started if it is
   not already running, and stopped at the end if this session started it).
"""

from __future__ import annotations

import os
import socket
import subprocess
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from streamer import corpus
from streamer.tools.admin import create_topics

ROOT = Path(__file__).resolve().parent.parent
KAFKACTL = ROOT / "deploy" / "kafka" / "kafkactl"
KAFKA_IMAGE = "apache/kafka:4.1.1"


def _docker_answers() -> bool:
    """True when a Docker engine answers ``GET /_ping`` on its socket (or DOCKER_HOST is set)."""
    if os.environ.get("DOCKER_HOST"):
        return True
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            sock.connect("/var/run/docker.sock")
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            reply = sock.recv(64)
        return reply.startswith(b"HTTP/1.") and b" 200 " in reply
    except OSError:
        return False


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    external = os.environ.get("STREAMER_TEST_BOOTSTRAP_SERVERS")
    if external:
        yield external
        return
    if _docker_answers():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer(KAFKA_IMAGE).with_kraft() as container:
            yield container.get_bootstrap_server()
        return
    port = os.environ.get("KAFKA_PORT", "9092")
    already = subprocess.run([str(KAFKACTL), "status"], check=False).returncode == 0
    if not already:
        subprocess.run([str(KAFKACTL), "up"], check=True, timeout=300)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        if not already:
            subprocess.run([str(KAFKACTL), "down"], check=False, timeout=60)


TopicFactory = Callable[..., Awaitable[list[str]]]


@pytest.fixture
def kafka_options(kafka_bootstrap: str) -> dict[str, str]:
    return {"bootstrap_servers": kafka_bootstrap}


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> str:
    """A fresh prefix for this test's topics and group."""
    return f"t-{request.node.name[:40]}-{uuid.uuid4().hex[:8]}".replace("[", "-").replace("]", "")


@pytest.fixture
def new_topics(kafka_options: dict[str, str], unique_name: str) -> TopicFactory:
    async def make(*suffixes: str, partitions: int = 3) -> list[str]:
        names = [f"{unique_name}-{s}" for s in suffixes]
        await create_topics(kafka_options, names, partitions)
        return names

    return make


@pytest.fixture(scope="session")
def samples() -> list[corpus.Sample]:
    """The fixed test corpus: real photos and synthetic images in JPEG, PNG and WebP."""
    return list(corpus.generate(200, seed=1))
