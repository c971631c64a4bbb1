"""A process setting for CPU runs of either framework: glibc's malloc keeps freed memory."""

from __future__ import annotations

import ctypes
import ctypes.util


def keep_freed_memory() -> bool:
    """Tells glibc's malloc to keep freed memory instead of returning it to the OS, so that the
    large buffers every training step needs are reused rather than mapped afresh and page-faulted
    in (zeroed by the kernel) each time. The training scripts and the benchmark apply it where a
    framework computes on the CPU; a GPU's buffers live elsewhere.

    PyTorch eager otherwise page-faults its activations back in every step, and its step time
    depends on the allocator's history; XLA's scratch buffer needs
    `jax_impl.speed.run_on_calling_thread` as well (benchmarks/README.md, the paragraph
    "Both training scripts and the benchmark tell glibc's malloc..." and the calling-thread row).
    The process keeps its peak memory until it exits. Returns whether it applied."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
        return bool(libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl): nothing to tune
        return False
