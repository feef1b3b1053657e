"""Logging setup shared by the main process and the spawned workers."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s %(message)s"


def configure(level: str | int) -> None:
    logging.basicConfig(level=level, stream=sys.stderr, format=FORMAT, force=True)
    # aiokafka logs every retried request at INFO/ERROR; keep its noise at WARNING.
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, logging.getLogger().level))
