"""A minimal HTTP client for tests, safe to call from a test that shares its loop with the service.

urllib blocks, so every request runs in a thread (``asyncio.to_thread``): the metrics
server under test lives on the test's own event loop and must keep running while
the test waits for its answer.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Response:
    status: int
    content_type: str
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()

    def json(self) -> Any:
        return json.loads(self.body)


def _request(url: str, method: str, data: bytes | None, timeout_s: float) -> Response:
    request = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as reply:
            return Response(reply.status, reply.headers.get("Content-Type", ""), reply.read())
    except urllib.error.HTTPError as error:  # 4xx and 5xx: still an answer
        with error:
            return Response(error.code, error.headers.get("Content-Type", ""), error.read())


async def request(
    url: str, method: str = "GET", data: bytes | None = None, timeout_s: float = 10.0
) -> Response:
    """One HTTP request, answered with any status; connection errors raise ``OSError``."""
    return await asyncio.to_thread(_request, url, method, data, timeout_s)
