"""Keep freed memory inside the process (glibc malloc) so large short-lived tensors do not page-fault afresh.

PyTorch allocates CPU tensors with ``malloc``. glibc hands large freed blocks back to the kernel
(blocks above ``M_MMAP_THRESHOLD`` at once, the top of the heap once it exceeds
``M_TRIM_THRESHOLD``), so the next batch's tensors of the same sizes fault their pages in again.
The per-sample gradient engine makes several such temporaries per layer; on this project's 2-core
VM the faults made it 1.6x a batched forward+backward instead of 1.3x at 16 px
(``bench/per_sample_grads.py``, bench/README.md). PyTorch's CPU performance guide recommends
jemalloc or tcmalloc for the same reason; this is the glibc-only equivalent, with nothing to install.

The ``geomprobe`` command calls :func:`retain_freed_memory` once at start-up
(``GEOMPROBE_MALLOC=default`` in the environment leaves glibc's defaults alone). Library users may
call it themselves; it changes process-wide allocator settings, so the library never does.
"""

from __future__ import annotations

import ctypes
import os

# mallopt parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def retain_freed_memory(trim_threshold: int = 1 << 30, mmap_threshold: int = 32 << 20) -> bool:
    """Tell glibc to keep freed heap memory and to serve mid-sized blocks from the heap.

    Keeps up to ``trim_threshold`` bytes of freed heap and serves blocks below ``mmap_threshold``
    bytes (glibc's maximum is 32 MiB on 64-bit) from the heap.

    Returns True when glibc accepted both settings, False where the C library has no ``mallopt``
    (macOS, Windows), where it refuses them (musl, 32-bit builds) or ``GEOMPROBE_MALLOC=default``
    is set. Under an ``LD_PRELOAD``-ed jemalloc/tcmalloc glibc still accepts them, to no effect. Freed memory stays reserved for reuse
    by this process (its resident size stays at its peak instead of shrinking between batches).
    """
    if os.environ.get("GEOMPROBE_MALLOC", "").lower() == "default":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library already loaded into this process
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok_trim = mallopt(_M_TRIM_THRESHOLD, int(min(trim_threshold, 2**31 - 1)))
    ok_mmap = mallopt(_M_MMAP_THRESHOLD, int(min(mmap_threshold, 32 << 20)))
    return bool(ok_trim and ok_mmap)
