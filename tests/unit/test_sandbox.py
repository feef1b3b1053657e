"""The worker sandbox: what a confined worker reaches, what it does not, and what it refuses.

The kernel tests start real workers through the plumbing every worker kind uses
(pool -> spawn -> child_main -> serve, which confines) and send them probes: read a
file, write one, open a socket, connect. The seccomp filter is also run, instruction
by instruction, against generated system calls, and the refusal of secret files
against generated paths, so that the rules hold beyond the cases listed here.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import functools
import importlib
import json
import os
import platform
import queue
import shutil
import socket
import struct
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamer.config import Settings
from streamer.errors import ConfigError
from streamer.metrics import Metrics
from streamer.vision.decode import DecodeLimits
from streamer.workers import decode_worker, sandbox
from streamer.workers.child import serve
from streamer.workers.environment import environment_without_credentials
from streamer.workers.pool import WorkerPool
from streamer.workers.shm import SlotPool

pytestmark = pytest.mark.timeout(120)

ARCH = sandbox.ARCHES.get(platform.machine())
linux_only = pytest.mark.skipif(
    sys.platform != "linux" or ARCH is None, reason="the sandbox is Linux on x86_64/aarch64"
)
PR_GET_DUMPABLE = 3

# ------------------------------------------------------------------ the probe worker


class _Sibling:
    """A thread started before the worker is confined; runs the jobs it is sent."""

    def __init__(self) -> None:
        self.jobs: queue.Queue[Callable[[], str]] = queue.Queue()
        self.results: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            self.results.put(self.jobs.get()())

    def run(self, job: Callable[[], str]) -> str:
        self.jobs.put(job)
        return self.results.get(timeout=30)


def _outcome(action: Callable[[], Any]) -> str:
    try:
        action()
    except OSError as exc:
        return type(exc).__name__
    return "ok"


def _write(path: str) -> None:
    with open(path, "wb") as file:
        file.write(b"x")
    os.unlink(path)


def _read(path: str) -> None:
    with open(path, "rb") as file:
        file.read(1)


PROBES: dict[str, Callable[[Any], Any]] = {
    "read": _read,
    "write": _write,
    "socket": lambda family: socket.socket(family, socket.SOCK_DGRAM).close(),
    "connect": lambda port: socket.create_connection(("127.0.0.1", port), timeout=5).close(),
    "import": importlib.import_module,
    "environ": lambda _: _read(f"/proc/{os.getppid()}/environ"),
}


def _probe(sibling: _Sibling | None, body: tuple[str, Any, bool]) -> Any:
    name, arg, in_sibling = body
    if name == "report":
        return dataclasses.asdict(sandbox.confine())  # what serve applied, again
    job = functools.partial(_outcome, functools.partial(PROBES[name], arg))
    return sibling.run(job) if in_sibling and sibling else job()


def probe_worker(requests: Connection, replies: Connection, with_sibling: bool) -> None:
    sibling = _Sibling() if with_sibling else None
    serve(requests, replies, functools.partial(_probe, sibling), ready_info=os.getpid())


@pytest.fixture
async def start_worker() -> AsyncIterator[Callable[..., Any]]:
    pools: list[WorkerPool] = []

    async def start(sandbox: bool = True, with_sibling: bool = False) -> Callable[..., Any]:
        pool = WorkerPool(
            "probe", 1, probe_worker, lambda i: (with_sibling,), Metrics(), 60, sandbox=sandbox
        )
        pools.append(pool)
        await pool.start()

        async def probe(name: str, arg: Any = None, in_sibling: bool = False) -> Any:
            return await asyncio.wait_for(pool.submit((name, arg, in_sibling)), 30)

        return probe

    yield start
    for pool in pools:
        await pool.stop()


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A file under no path the sandbox opens (pytest's tmp_path is on no sys.path)."""
    assert not any(tmp_path.is_relative_to(p) for p in sandbox.readable_paths())
    path = tmp_path / "secret"
    path.write_text("hunter2")
    return path


# ------------------------------------------------------------------ a confined worker


@linux_only
async def test_a_confined_worker_reads_the_python_installation_and_no_file_outside_it(
    start_worker, outside: Path
) -> None:
    probe = await start_worker()
    assert await probe("read", str(outside)) == "PermissionError"
    assert await probe("read", json.__file__) == "ok"  # the standard library
    assert await probe("import", "xml.dom.minidom") == "ok"  # imported only now
    assert await probe("read", "/proc/self/status") == "ok"
    assert await probe("write", str(outside.parent / "new")) == "PermissionError"


@linux_only
async def test_a_confined_worker_writes_shared_memory(start_worker) -> None:
    probe = await start_worker()
    assert await probe("write", f"/dev/shm/streamer-test-{uuid.uuid4().hex}") == "ok"


@linux_only
async def test_a_confined_worker_opens_unix_sockets_only_and_connects_nowhere(
    start_worker,
) -> None:
    probe = await start_worker()
    with socket.create_server(("127.0.0.1", 0)) as listener:  # a broker, say
        assert await probe("connect", listener.getsockname()[1]) == "PermissionError"
    assert await probe("socket", socket.AF_UNIX) == "ok"
    # Every family the kernel numbers, whatever it would have answered unconfined.
    for family in range(64):
        if family != socket.AF_UNIX:
            assert await probe("socket", family) == "PermissionError", family


@linux_only
async def test_a_thread_started_before_the_sandbox_opens_no_socket_either(
    start_worker, outside: Path
) -> None:
    probe = await start_worker(with_sibling=True)
    assert await probe("socket", socket.AF_INET, in_sibling=True) == "PermissionError"
    report = await probe("report")
    assert report["seccomp"] is True
    # Landlock reaches it only from ABI 8; below, the report says so (and it is logged).
    read = await probe("read", str(outside), in_sibling=True)
    if report["threads_outside_landlock"]:
        assert report["landlock_abi"] < 8 and read == "ok"
    else:
        assert read == "PermissionError"


@linux_only
async def test_a_worker_whose_owner_turned_the_sandbox_off_is_not_confined(
    start_worker, outside: Path
) -> None:
    probe = await start_worker(sandbox=False)
    assert await probe("read", str(outside)) == "ok"
    assert await probe("socket", socket.AF_INET) == "ok"


@linux_only
async def test_spawning_a_worker_makes_the_owner_non_dumpable(start_worker) -> None:
    await start_worker()
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 0


@linux_only
async def test_a_decode_worker_serves_from_one_thread_so_landlock_confines_all_of_it() -> None:
    """No numpy BLAS pool: below Landlock ABI 8 a thread started before the sandbox
    would keep reading every file."""
    with SlotPool(slots=1, payload_bytes=64 * 1024) as slots:
        pool = WorkerPool(
            "decode", 1, decode_worker.main, lambda i: (slots.layout, DecodeLimits()), Metrics(), 60
        )
        await pool.start()
        try:
            pid = pool.workers[0].pid
            assert os.listdir(f"/proc/{pid}/task") == [str(pid)]
        finally:
            await pool.stop()


def test_workers_get_one_openblas_thread_unless_the_operator_chose(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    with environment_without_credentials():
        assert os.environ["OPENBLAS_NUM_THREADS"] == "1"
    assert "OPENBLAS_NUM_THREADS" not in os.environ  # the owner's own is untouched
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "4")
    with environment_without_credentials():
        assert os.environ["OPENBLAS_NUM_THREADS"] == "4"
    assert os.environ["OPENBLAS_NUM_THREADS"] == "4"


OWNER = """
import os, subprocess, sys
from streamer.workers import sandbox
if sys.argv[1] == "protected":
    sandbox.protect_owner()
reader = subprocess.run(["cat", f"/proc/{os.getpid()}/environ"], capture_output=True)
print(reader.returncode)
"""


@linux_only
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv")
@pytest.mark.parametrize(("owner", "readable"), [("protected", False), ("plain", True)])
def test_a_process_of_the_owners_uid_without_capabilities_reads_a_protected_owner_in_vain(
    owner: str, readable: bool
) -> None:
    """As the Helm chart runs the service: no capabilities (so no CAP_SYS_PTRACE)."""
    without_caps = ["setpriv", "--inh-caps=-all", "--bounding-set=-all"]
    done = subprocess.run(
        [*without_caps, sys.executable, "-c", OWNER, owner],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert (done.stdout.strip() == "0") is readable, done.stdout


# ------------------------------------------------------------------ the refusal


def test_a_secret_file_the_workers_could_read_stops_the_service(tmp_path: Path) -> None:
    under_dev = Path(f"/dev/shm/streamer-test-{uuid.uuid4().hex}")  # /dev is readable
    under_dev.write_text("hunter2")
    try:
        settings = Settings(sasl_password_file=str(under_dev))
        with pytest.raises(ConfigError, match=r"sasl_password_file .* lies under /dev") as error:
            sandbox.check_settings(settings)
        assert "\n" not in str(error.value) and "hunter2" not in str(error.value)
        sandbox.check_settings(Settings(sasl_password_file=str(under_dev), worker_sandbox=False))
    finally:
        under_dev.unlink()
    key = Path(sys.prefix) / "client.key"  # path only: the key file is not read at start
    with pytest.raises(ConfigError, match="ssl_keyfile"):
        sandbox.check_settings(Settings(ssl_keyfile=str(key)))
    elsewhere = tmp_path / "password"
    elsewhere.write_text("hunter2")
    sandbox.check_settings(Settings(sasl_password_file=str(elsewhere), ssl_keyfile=str(elsewhere)))


BASE = Path("/nonexistent-streamer-sandbox")  # no symlink to resolve under it
names = st.lists(st.sampled_from(["a", "ab", "b", "..", "."]), min_size=0, max_size=4)


@given(secret=names, roots=st.lists(names, min_size=1, max_size=4))
def test_a_secret_is_refused_exactly_when_it_lies_under_a_readable_path(
    secret: list[str], roots: list[list[str]]
) -> None:
    def parts(path: list[str]) -> tuple[str, ...]:
        return Path(os.path.normpath(BASE.joinpath(*path))).parts

    under = any(parts(secret)[: len(parts(r))] == parts(r) for r in roots)
    readable = [BASE.joinpath(*r) for r in roots]
    path = str(BASE.joinpath(*secret))
    try:
        sandbox.check_secret_files({"sasl_password_file": path}, readable)
    except ConfigError:
        assert under
    else:
        assert not under


# ------------------------------------------------------------------ the filter


def run_filter(program: list[tuple[int, int, int, int]], data: bytes) -> int:
    """A classic BPF interpreter for the instructions the filter uses."""
    pc, acc = 0, 0
    while True:
        code, jt, jf, k = program[pc]
        if code == 0x20:  # ld [k]
            (acc,) = struct.unpack_from("<I" if sys.byteorder == "little" else ">I", data, k)
            pc += 1
        elif code in (0x15, 0x35):  # jeq, jge
            taken = acc == k if code == 0x15 else acc >= k
            pc += 1 + (jt if taken else jf)
        else:
            assert code == 0x06
            return k


def expected(arch: sandbox.Arch, audit: int, nr: int, family: int) -> int:
    if audit != arch.audit:
        return sandbox.RET_KILL_PROCESS
    deny = sandbox.RET_ERRNO | sandbox.EPERM
    if (arch.x32 and nr >= sandbox.X32_SYSCALL_BIT) or nr in sandbox.IO_URING_CALLS:
        return deny
    if nr == arch.socket:
        return sandbox.RET_ALLOW if family & 0xFFFFFFFF == sandbox.AF_UNIX else deny
    return sandbox.RET_ALLOW


@settings(max_examples=500)
@given(
    machine=st.sampled_from(sorted(sandbox.ARCHES)),
    foreign=st.booleans() | st.integers(0, 2**32 - 1),
    nr=st.sampled_from([41, 198, 425, 426, 427, 0x40000000 + 41]) | st.integers(0, 2**32 - 1),
    family=st.sampled_from([1, 2, 10, 16, 2**32 + 1]) | st.integers(0, 2**64 - 1),
)
def test_the_filter_allows_every_call_but_foreign_x32_io_uring_and_non_unix_sockets(
    machine: str, foreign: bool | int, nr: int, family: int
) -> None:
    arch = sandbox.ARCHES[machine]
    audit = arch.audit if foreign is False else (0x40000003 if foreign is True else foreign)
    program = sandbox.seccomp_program(arch)
    # struct seccomp_data: int nr, u32 arch, u64 instruction_pointer, u64 args[6]
    data = struct.pack("=iIQ6Q", nr - (nr >= 2**31) * 2**32, audit, 0, family, 0, 0, 0, 0, 0)
    assert run_filter(program, data) == expected(arch, audit, nr, family)
    # Every jump lands inside the program, which ends in a return.
    jumps = [(pc, jt, jf) for pc, (code, jt, jf, _) in enumerate(program) if code != 0x06]
    assert all(pc + 1 + max(jt, jf) < len(program) for pc, jt, jf in jumps)
    assert program[-1][0] == 0x06


def test_the_filesystem_rights_grow_with_the_landlock_abi() -> None:
    rights = [sandbox.fs_rights(abi) for abi in range(1, 9)]
    assert rights[0] == 0x1FFF  # execute .. make_sym
    assert rights == sorted(rights) and rights[-1] == 0xFFFF  # + refer, truncate, ioctl_dev
    assert sandbox.fs_rights(2) & ~sandbox.fs_rights(1) == 1 << 13
