"""What a worker process inherits: the environment, without the service's credentials.

Decode workers parse hostile bytes; if one is ever made to run code, it must find
no password in its memory or in ``/proc/<pid>/environ``.

Workers also get ``WORKER_DEFAULTS`` where the operator set nothing: one OpenBLAS
thread (numpy starts a pool of them at import, and no worker runs numpy's BLAS).
Below Landlock ABI 8 the sandbox confines only the thread that serves and those it
starts (``workers.sandbox``), so a worker should start no other thread before then.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

# Settings that are credentials, or lead to one; workers read none of them (their
# only STREAMER_* variable is the log format, see logs).
CREDENTIAL_VARIABLES = frozenset(
    {
        "STREAMER_SASL_PASSWORD",
        "STREAMER_SASL_PASSWORD_FILE",
        "STREAMER_SASL_USERNAME",
        "STREAMER_SSL_KEYFILE",
    }
)
# Set for the workers unless already set.
WORKER_DEFAULTS = {"OPENBLAS_NUM_THREADS": "1"}
# Any other STREAMER_* variable whose name says it holds a secret, present or future.
_CREDENTIAL_MARKERS = ("PASSWORD", "PASSWD", "SECRET", "TOKEN", "CREDENTIAL")


def is_credential_variable(name: str) -> bool:
    """Whether the environment variable ``name`` holds a credential of the service."""
    upper = name.upper()  # pydantic-settings matches STREAMER_* names in any case
    if not upper.startswith("STREAMER_"):
        return False
    return upper in CREDENTIAL_VARIABLES or any(marker in upper for marker in _CREDENTIAL_MARKERS)


@contextlib.contextmanager
def environment_without_credentials() -> Iterator[None]:
    """``os.environ`` without the credential variables and with ``WORKER_DEFAULTS``
    inside the block, restored after it.

    A spawned process gets a copy of ``os.environ`` as it is when the process is
    started, and multiprocessing takes no environment argument; so the variables
    are changed around the (synchronous) start only. Nothing reads them after
    the settings are built, so no other thread misses them in that window.
    """
    names = [name for name in os.environ if is_credential_variable(name)]
    removed = {name: os.environ.pop(name) for name in names}
    added = [name for name in WORKER_DEFAULTS if name not in os.environ]
    os.environ.update({name: WORKER_DEFAULTS[name] for name in added})
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)
        os.environ.update(removed)


def start_resource_tracker() -> None:
    """Start multiprocessing's resource tracker now, with no credentials in its environment.

    Otherwise the first shared-memory segment starts it, with a copy of the full
    environment, and it lives as long as the service.
    """
    from multiprocessing import resource_tracker

    with environment_without_credentials():
        resource_tracker.ensure_running()
