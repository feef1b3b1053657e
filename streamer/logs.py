"""Logging setup shared by the main process and the spawned workers.

Two formats, chosen by the ``log_format`` setting:

- text: one readable line per record, ``TIME LEVEL PROCESS LOGGER MESSAGE``.
- json: one JSON object per line, for log collectors. Keys: ``time`` (ISO 8601,
  UTC, milliseconds), ``level``, ``logger``, ``process`` (the process name, e.g.
  ``streamer-decode-0``), ``message`` (the same ``key=value`` text as in the text
  format) and, when the record carries one, ``exception`` (the formatted traceback).

Workers are spawned, so they inherit no logging setup from their owner. They call
``configure`` with the level the owner passes them and no format, which makes them
read ``STREAMER_LOG_FORMAT`` from the environment they inherited; the ``run``
command exports its format there before it starts any worker.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Literal, get_args

LogFormat = Literal["text", "json"]
FORMAT_ENV = "STREAMER_LOG_FORMAT"
FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in values are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, str] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName or "",
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{seconds}.{int(record.msecs):03d}Z"


def formatter(fmt: LogFormat) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else logging.Formatter(FORMAT)


def configure(level: str | int, fmt: LogFormat | None = None) -> None:
    """Send every log record to stderr, at ``level`` and above, in format ``fmt``.

    ``fmt=None`` takes ``STREAMER_LOG_FORMAT`` from the environment (text when it
    is unset or not a known format): that is how spawned workers follow their owner.
    """
    if fmt is None:
        inherited = os.environ.get(FORMAT_ENV, "text").strip().lower()
        fmt = "json" if inherited == "json" else "text"
    if fmt not in get_args(LogFormat):
        raise ValueError(f"unknown log format {fmt!r}; choose text or json")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(fmt))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # aiokafka logs every retried request at INFO/ERROR; keep its noise at WARNING.
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, logging.getLogger().level))
