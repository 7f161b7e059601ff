"""Keep freed host memory inside the process, so a training step reuses last step's pages.

glibc's ``malloc`` serves every block above ``M_MMAP_THRESHOLD`` (128 KiB, raised
dynamically up to 32 MiB) with a fresh ``mmap`` and returns it to the kernel on ``free``; it
also trims the heap top above ``M_TRIM_THRESHOLD``. A CPU training step allocates and frees
the same few hundred MB of activations and gradients every step, so each step pays ~40-55k
page faults (the kernel zeroing every page again). Measured on the 2-core CI-class VM, small
Conformer, batch 16 × 4 s: 37-41k faults / 600-637 ms for a non-private step and 55k /
713-746 ms for a per-example DP step, against < 800 faults / 550-585 ms and 636-638 ms with
the settings below (``benchmarks/clipping_overhead.py`` measures it side by side). Peak memory
is unchanged: the process keeps what it already had at its peak instead of giving it back.

``keep_freed_memory()`` is called once per training process (``privasr train`` and the
recipes built on it, federated clients, the benchmarks). ``PRIVASR_MALLOC=system`` leaves
malloc as it is; on a libc without ``mallopt`` (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["keep_freed_memory", "host_allocator"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3      # <malloc.h>
_MMAP_THRESHOLDS = (1 << 30, 32 << 20)   # 1 GiB; glibc builds that cap it accept HEAP_MAX/2
_state = {"applied": None}


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds (once per process); True if they are in force."""
    if _state["applied"] is not None:
        return _state["applied"]
    _state["applied"] = False
    if os.environ.get("PRIVASR_MALLOC", "keep") == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not any(mallopt(_M_MMAP_THRESHOLD, t) == 1 for t in _MMAP_THRESHOLDS):
        return False
    _state["applied"] = mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1) == 1
    return _state["applied"]


def host_allocator() -> str:
    """What benchmarks record: ``keep-freed`` (thresholds raised) or ``system``."""
    return "keep-freed" if _state["applied"] else "system"
