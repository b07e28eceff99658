"""Keep freed memory inside the process (glibc): the CPU's real speed for the UNet.

By default glibc serves every allocation above its mmap threshold (128 KiB, rising to at most 32 MiB) with a fresh
``mmap`` and unmaps it on free, and trims the heap's top when more than 128 KiB is free. An eager UNet forward
allocates and frees activations of tens of MB many times, so every forward re-faults every page of them: measured on
the shipped model (15 × 1 × 192 × 224 batch, 2 CPU cores, glibc 2.36, torch 2.13 CPU) 6.4–6.7 s per forward with
≈ 0.95 M minor page faults and half the CPU time in the kernel, against 2.0–2.7 s and 0 faults with the setting
below, with identical outputs. ``mallopt(M_MMAP_THRESHOLD)`` alone cannot help: glibc caps it at 32 MiB, below
the largest activations; so large blocks come from the heap (``M_MMAP_MAX`` 0) and the heap is never trimmed
(``M_TRIM_THRESHOLD`` huge): the process keeps its peak memory (measured: +20–40 % resident set size) and reuses it.

``keep_freed_memory()`` is called by every entry point that runs the network (``sacdiff``'s ``main``, hence
``python -m SACDiffLib`` and the Slicer module's child process). A no-op where it does not apply (macOS, Windows,
musl: no glibc ``mallopt``) and where ``SACDIFF_KEEP_FREED_MEMORY=0`` is set (an escape hatch, and the benchmark's
"off" run). Measured on Linux/glibc only; other systems' allocators were not measured here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import sys
from typing import Callable

# glibc's malloc.h parameter numbers.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

ENV_SWITCH = "SACDIFF_KEEP_FREED_MEMORY"

_state = {"active": False}


def _glibc():
    """The C library when it is glibc (it exports ``gnu_get_libc_version``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    return libc


def keep_freed_memory() -> bool:
    """Tell glibc to serve large blocks from the heap and keep freed memory; True when the setting is in force.
    Idempotent."""
    if _state["active"]:
        return True
    if os.environ.get(ENV_SWITCH, "1").strip() == "0":
        return False
    libc = _glibc()
    if libc is None:
        return False
    # mallopt returns 1 on success; a large threshold (1 GiB) as int fits every glibc's int parameter.
    ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1
    _state["active"] = bool(ok)
    return _state["active"]


def is_active() -> bool:
    """Whether ``keep_freed_memory`` put the setting in force in this process."""
    return _state["active"]


def minor_faults(fn: Callable[[], object]) -> int:
    """Minor page faults of this process while ``fn()`` runs (``resource.getrusage``)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def refault_probe(megabytes: int = 64) -> int:
    """Page faults of the second of two allocate-fill-free rounds of a ``megabytes`` buffer: ≈ 0 when freed memory
    is kept, ≈ megabytes × 256 (4 KiB pages) when glibc unmapped it. Reads the setting back from its effect."""
    size = megabytes << 20

    def round_trip():
        buf = ctypes.create_string_buffer(size)  # calloc-like: malloc + memset touches every page
        del buf

    round_trip()
    return minor_faults(round_trip)
