"""Workers are an untrusted zone: they hold no credential, can read none and open no connection.

Linux only, best effort. The owner (the main process, which holds the credentials)
makes itself non-dumpable before its first worker starts (``protect_owner``, from
``spawn``): a process of its uid without CAP_SYS_PTRACE can then read neither its
``/proc/<pid>/environ`` nor its memory (so: no core dumps of it, and py-spy or gdb on
it need CAP_SYS_PTRACE). A worker confines itself once it has loaded what it needs and
before its first request (``confine``, from ``child.serve``):

1. ``PR_SET_NO_NEW_PRIVS`` (Landlock and seccomp need it);
2. Landlock: read only under ``readable_paths()`` (the Python installation and
   ``sys.path``, the system libraries, /proc, /sys, /dev), write only under /dev
   (shared memory, GPU device files), no TCP bind or connect, no abstract unix
   socket or signal out of the worker: each right the kernel's ABI knows;
3. seccomp: ``socket()`` of any family but AF_UNIX and io_uring (which opens
   sockets without ``socket()``) fail with EPERM; a foreign architecture's call
   (int 0x80 on x86_64) kills the process, an x32 call fails.

Invariants:

- ``confine`` never raises for what the kernel lacks: it logs one warning naming
  what is missing and applies the rest. It runs once per process, for good.
- The seccomp filter reaches every thread (TSYNC). Landlock reaches every thread
  from ABI 8 (``LANDLOCK_RESTRICT_SELF_TSYNC``); below it, the calling thread and
  those it starts, and the warning counts the threads started before.
- A secret file under a readable path would defeat the sandbox:
  ``check_secret_files`` refuses such settings before a worker starts.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
import stat
import sys
import sysconfig
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from streamer.errors import ConfigError

if TYPE_CHECKING:
    from streamer.config import Settings

log = logging.getLogger(__name__)

PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 4, 38
AF_UNIX, EPERM = 1, 1

# Settings naming a secret file, which no worker may be able to read.
SECRET_FILE_SETTINGS = ("sasl_password_file", "ssl_keyfile")
SYSTEM_READ_PATHS = ("/usr", "/lib", "/lib64", "/etc/ld.so.cache", "/proc", "/sys")
WRITE_PATHS = ("/dev",)  # /dev/shm holds the slots; CUDA opens /dev/nvidia* read-write


@dataclass(frozen=True)
class Arch:
    """What the seccomp filter needs to know of one architecture."""

    audit: int  # AUDIT_ARCH_*, the ``arch`` field of seccomp_data
    seccomp: int  # the seccomp(2) system call
    socket: int
    x32: bool  # x86_64 also takes x32 calls (nr | 0x40000000) under its own audit arch


# Landlock's and io_uring's calls have the generic numbers on both.
ARCHES = {
    "x86_64": Arch(audit=0xC000003E, seccomp=317, socket=41, x32=True),
    "aarch64": Arch(audit=0xC00000B7, seccomp=277, socket=198, x32=False),
}
IO_URING_CALLS = (425, 426, 427)  # io_uring_setup, io_uring_enter, io_uring_register
X32_SYSCALL_BIT = 0x40000000
_LANDLOCK_CREATE_RULESET, _LANDLOCK_ADD_RULE, _LANDLOCK_RESTRICT_SELF = 444, 445, 446

# Landlock access rights (uapi/linux/landlock.h).
FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR, FS_REMOVE_FILE = 1 << 1, 1 << 2, 1 << 3, 1 << 5
FS_MAKE_REG, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 8, 1 << 14, 1 << 15
FS_FILE_RIGHTS = 1 | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV  # 1: execute
READ_RIGHTS = FS_READ_FILE | FS_READ_DIR
WRITE_RIGHTS = (
    READ_RIGHTS | FS_WRITE_FILE | FS_TRUNCATE | FS_IOCTL_DEV | FS_MAKE_REG | FS_REMOVE_FILE
)
NET_TCP = 0b11  # bind, connect (ABI 4)
SCOPES = 0b11  # abstract unix sockets, signals (ABI 6)
RESTRICT_SELF_TSYNC = 1 << 3  # every thread of the process (ABI 8)


def fs_rights(abi: int) -> int:
    """The filesystem rights Landlock ABI ``abi`` knows: 13 bits, then refer (2),
    truncate (3), ioctl on devices (5)."""
    bits = 13 if abi <= 1 else 14 if abi == 2 else 15 if abi <= 4 else 16
    return (1 << bits) - 1


def _real(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.realpath(path))


def readable_paths() -> tuple[Path, ...]:
    """Every path a confined worker can read under: real paths that exist, never ``/``."""
    import streamer

    candidates: list[str | os.PathLike[str]] = [sys.prefix, sys.base_prefix, sys.exec_prefix]
    candidates += [sys.base_exec_prefix, *sysconfig.get_paths().values()]
    candidates += [*sys.path, Path(streamer.__file__).parent]  # '' is the working directory
    candidates += [*SYSTEM_READ_PATHS, *WRITE_PATHS]
    found: dict[Path, None] = {}
    for candidate in candidates:
        path = _real(candidate)
        # "/" on sys.path (a service started from the root directory) would open everything.
        if path != Path("/") and path.exists():
            found[path] = None
    return tuple(found)


def check_secret_files(files: Mapping[str, str | None], readable: Iterable[Path]) -> None:
    """Raise ``ConfigError`` when a secret file (setting name -> path) lies under a
    readable path: a confined worker could still read it."""
    roots = [_real(root) for root in readable]
    for setting, path in files.items():
        if path is None:
            continue
        real = _real(path)
        for root in roots:
            if real.is_relative_to(root):
                raise ConfigError(
                    f"{setting} {path} lies under {root}, which the worker sandbox lets the"
                    " workers read: move it out of the Python installation, sys.path, /usr,"
                    " /lib, /proc, /sys and /dev (e.g. to /run/secrets), or set"
                    " worker_sandbox=false"
                )


def check_settings(settings: Settings) -> None:
    """``check_secret_files`` for the service's settings, when its workers are confined."""
    if settings.worker_sandbox and sys.platform == "linux":
        files = {name: getattr(settings, name) for name in SECRET_FILE_SETTINGS}
        check_secret_files(files, readable_paths())


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def _call(name: str, *args: Any) -> int:
    """A libc function with machine-word arguments; -errno on failure."""
    values = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    result = int(getattr(_libc(), name)(*values))
    return -ctypes.get_errno() if result == -1 else result


_owner_protected = False


def protect_owner() -> None:
    """Make this process non-dumpable (once): its environment and memory are then closed
    to every process of its uid that lacks CAP_SYS_PTRACE, its workers included."""
    global _owner_protected
    if _owner_protected or sys.platform != "linux":
        return
    error = _call("prctl", PR_SET_DUMPABLE, 0, 0, 0, 0)
    if error < 0:
        log.warning("cannot make the main process non-dumpable error=%s", os.strerror(-error))
    _owner_protected = True


@dataclass(frozen=True)
class Confinement:
    """What ``confine`` applied; ``missing`` is what its warning named."""

    landlock_abi: int  # 0: no Landlock
    seccomp: bool
    threads_outside_landlock: int  # started before it, below ABI 8
    missing: tuple[str, ...]


_confined: Confinement | None = None


def confine() -> Confinement:
    """Confine this process for good (see the module docstring); idempotent, never raises
    for what the kernel lacks."""
    global _confined
    if _confined is not None:
        return _confined
    missing: list[str] = []
    arch = ARCHES.get(platform.machine()) if sys.platform == "linux" else None
    if arch is None:
        missing.append(f"everything: no sandbox for {sys.platform} {platform.machine()}")
        _confined = Confinement(0, False, 0, tuple(missing))
    else:
        sys.dont_write_bytecode = True  # denied anyway; not trying keeps audit logs quiet
        error = _call("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        if error < 0:
            missing.append(f"no_new_privs ({os.strerror(-error)})")
        abi, outside = _landlock(missing) if error == 0 else (0, 0)
        filtered = _seccomp(arch, missing) if error == 0 else False
        _confined = Confinement(abi, filtered, outside, tuple(missing))
    if missing:
        log.warning("worker sandbox incomplete pid=%d missing=%s", os.getpid(), "; ".join(missing))
    else:
        log.debug("worker confined pid=%d landlock_abi=%d", os.getpid(), _confined.landlock_abi)
    return _confined


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _landlock(missing: list[str]) -> tuple[int, int]:
    """Restrict files, TCP and scopes; (the ABI, threads outside the domain)."""
    abi = _call("syscall", _LANDLOCK_CREATE_RULESET, 0, 0, 1)  # 1: ..._VERSION
    if abi <= 0:
        missing.append(f"Landlock ({os.strerror(-abi) if abi else 'no ABI'})")
        return 0, 0
    handled = fs_rights(abi)
    attr = _RulesetAttr(handled, NET_TCP if abi >= 4 else 0, SCOPES if abi >= 6 else 0)
    size = 8 if abi < 4 else 16 if abi < 6 else 24  # a kernel refuses fields it does not know
    ruleset = _call("syscall", _LANDLOCK_CREATE_RULESET, ctypes.byref(attr), size, 0)
    if ruleset < 0:
        missing.append(f"Landlock ruleset ({os.strerror(-ruleset)})")
        return 0, 0
    try:
        rules = [(p, READ_RIGHTS) for p in readable_paths()]
        rules += [(_real(p), WRITE_RIGHTS) for p in WRITE_PATHS]
        for path, rights in rules:
            _allow(ruleset, path, rights & handled, missing)
        synced = abi >= 8
        flags = RESTRICT_SELF_TSYNC if synced else 0
        error = _call("syscall", _LANDLOCK_RESTRICT_SELF, ruleset, flags)
    finally:
        os.close(ruleset)
    if error < 0:
        missing.append(f"Landlock restrict_self ({os.strerror(-error)})")
        return 0, 0
    outside = 0 if synced else len(os.listdir("/proc/self/task")) - 1
    if outside:
        missing.append(
            f"Landlock for the {outside} thread(s) started before the sandbox (ABI {abi};"
            " ABI 8 confines every thread; seccomp covers them all)"
        )
    return abi, outside


def _allow(ruleset: int, path: Path, rights: int, missing: list[str]) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return  # gone since it was listed: nothing to allow
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            rights &= FS_FILE_RIGHTS  # a file takes no directory rights
        rule = _PathBeneath(rights, fd)
        error = _call("syscall", _LANDLOCK_ADD_RULE, ruleset, 1, ctypes.byref(rule), 0)
        if error < 0:
            missing.append(f"Landlock rule for {path} ({os.strerror(-error)})")
    finally:
        os.close(fd)


# Classic BPF (linux/filter.h, linux/seccomp.h).
_LD, _JEQ, _JGE, _RET = 0x20, 0x15, 0x35, 0x06  # ld [k] (word, abs); jeq/jge #k; ret #k
RET_KILL_PROCESS, RET_ERRNO, RET_ALLOW = 0x80000000, 0x00050000, 0x7FFF0000
_ARG0_LOW = 16 if sys.byteorder == "little" else 20  # offsetof(seccomp_data, args[0]) low word


def seccomp_program(arch: Arch) -> list[tuple[int, int, int, int]]:
    """The filter as (code, jt, jf, k): a foreign architecture is killed, x32 calls,
    io_uring and ``socket()`` of a family other than AF_UNIX fail with EPERM."""
    body: list[tuple[int, int | str, int | str, int]] = [
        (_LD, 0, 0, 4),  # arch
        (_JEQ, 0, "kill", arch.audit),
        (_LD, 0, 0, 0),  # nr
    ]
    if arch.x32:
        body.append((_JGE, "deny", 0, X32_SYSCALL_BIT))
    body.append((_JEQ, "family", 0, arch.socket))
    body += [(_JEQ, "deny", 0, nr) for nr in IO_URING_CALLS]
    body.append((_RET, 0, 0, RET_ALLOW))
    labels = {"family": len(body)}
    body += [(_LD, 0, 0, _ARG0_LOW), (_JEQ, 0, "deny", AF_UNIX), (_RET, 0, 0, RET_ALLOW)]
    labels["deny"] = len(body)
    body.append((_RET, 0, 0, RET_ERRNO | EPERM))
    labels["kill"] = len(body)
    body.append((_RET, 0, 0, RET_KILL_PROCESS))

    def offset(pc: int, target: int | str) -> int:
        return target if isinstance(target, int) else labels[target] - pc - 1

    return [(c, offset(pc, jt), offset(pc, jf), k) for pc, (c, jt, jf, k) in enumerate(body)]


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def _seccomp(arch: Arch, missing: list[str]) -> bool:
    """Install the filter on every thread (seccomp(2) with TSYNC, not prctl, which
    reaches only the calling thread)."""
    program = seccomp_program(arch)
    instructions = (_SockFilter * len(program))(*(_SockFilter(*i) for i in program))
    fprog = _SockFprog(len(program), instructions)
    result = _call("syscall", arch.seccomp, 1, 1, ctypes.byref(fprog))  # SET_MODE_FILTER, TSYNC
    if result != 0:
        why = os.strerror(-result) if result < 0 else f"thread {result} has another filter"
        missing.append(f"seccomp ({why})")
        return False
    return True
