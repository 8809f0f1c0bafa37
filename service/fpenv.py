"""The calling thread's floating-point environment (C `fenv.h`) around ONNX Runtime calls.

`session.set_denormal_as_zero` (see `service.runtime.session_options`) makes ONNX Runtime
flush subnormal floats to zero in its own pool threads *and in the thread that creates the
session*, while the thread that calls `run()` computes its share of the work in whatever
mode it is in. The mode is per thread and inherited by threads started later, so left alone
the flag would leak into whichever thread loads a model (an event loop, a test runner:
Python floats there silently lose subnormals) and miss the thread that runs it (which then
does its share slowly: the align graph took 126 ms instead of 94 on a 2-core Xeon).
ONNX Runtime sets the creating thread's mode only once per process, so it cannot be
recorded from it either. Hence `isolated` gives a thread back its own environment after a
call, and `applied(flushing_subnormals())` sets flush-to-zero and denormals-are-zero (x86-64
MXCSR bits; FZ of the FPCR on AArch64) around each run. Where the C library or the layout
of its `fenv_t` is unknown, these do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")

_ENV_BYTES = 512  # more than any C library's fenv_t (glibc x86-64: 32)
# Where the flush bits live in glibc's fenv_t: (byte offset of a 32-bit field, bits to set).
_FLUSH_BITS = {
    "x86_64": (28, 0x8040),  # MXCSR: FTZ (bit 15) and DAZ (bit 6)
    "aarch64": (0, 1 << 24),  # FPCR: FZ
}


def _load_libm() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("m")
    try:
        libm = ctypes.CDLL(name) if name else ctypes.CDLL(None)
        libm.fegetenv  # noqa: B018 - raises AttributeError where fenv.h is missing
        libm.fesetenv  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libm


_LIBM = _load_libm()


def current() -> bytes | None:
    """The calling thread's floating-point environment (None where it cannot be read)."""
    if _LIBM is None:
        return None
    buffer = ctypes.create_string_buffer(_ENV_BYTES)
    if _LIBM.fegetenv(buffer) != 0:
        return None
    return buffer.raw


def restore(environment: bytes | None) -> None:
    """Make `environment` (from `current`) the calling thread's; None does nothing."""
    if _LIBM is None or environment is None:
        return
    _LIBM.fesetenv(ctypes.create_string_buffer(environment, _ENV_BYTES))


def flushing_subnormals() -> bytes | None:
    """The calling thread's environment with subnormal floats flushed to zero (inputs and
    results), or None where the platform's `fenv_t` layout is not known."""
    environment = current()
    where = _FLUSH_BITS.get(platform.machine())
    if environment is None or where is None or platform.libc_ver()[0] != "glibc":
        return None
    offset, bits = where
    (field,) = struct.unpack_from("I", environment, offset)
    flushed = bytearray(environment)
    struct.pack_into("I", flushed, offset, field | bits)
    return bytes(flushed)


def isolated(call: Callable[[], T]) -> T:
    """Run `call` and give the calling thread back the environment it had before."""
    before = current()
    try:
        return call()
    finally:
        restore(before)


@contextmanager
def applied(environment: bytes | None) -> Iterator[None]:
    """The calling thread runs the block in `environment`, then gets its own back."""
    before = current()
    restore(environment)
    try:
        yield
    finally:
        restore(before)
