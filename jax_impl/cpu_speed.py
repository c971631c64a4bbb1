"""What makes JAX fast on a CPU, applied only where it computes there: XLA's YNNPACK fusions in
the compiled programs, single-device calls on the calling thread, and malloc keeping freed
memory (common/malloc.py). None changes what is computed; the measurements are rows of
benchmarks/README.md, named at each function."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from functools import cache

import jax

from common.malloc import keep_freed_memory

# XLA's CPU backend hands convolutions, matmuls, reductions and elementwise ops to YNNPACK when
# asked; its own CPU convolutions were the whole gap to PyTorch (row "**YNNPACK**").
YNNPACK = {"xla_cpu_experimental_ynn_fusion_type":
           "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_ELTWISE"}


def compiler_options() -> dict[str, str]:
    """YNNPACK for float32 on CPU where this jaxlib knows the (experimental) option; nothing on
    other backends. Not under jax_enable_x64 (the float64 parity check): YNNPACK's float64
    fallback is far slower than XLA's own code (benchmarks/README.md, "In float64")."""
    if jax.default_backend() != "cpu" or jax.config.jax_enable_x64:
        return {}
    return YNNPACK if _ynnpack_supported() else {}


@cache
def _ynnpack_supported() -> bool:
    try:
        jax.jit(lambda x: x + 1, compiler_options=YNNPACK).lower(1.0).compile()
    except Exception:  # renamed or gone in another jaxlib: the default CPU path still works
        return False
    return True


def cpu_will_compute() -> bool:
    """Whether JAX will compute on the CPU, decided before JAX starts (the calling-thread setting
    must be made before): JAX_PLATFORMS when it is set, else whether no accelerator plugin is
    installed. A CUDA plugin on a machine without a GPU reads as "not the CPU": the settings are
    then left out, which costs speed, never correctness."""
    platforms = jax.config.jax_platforms
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not importlib.metadata.entry_points(group="jax_plugins") and importlib.util.find_spec("jax_plugins") is None


def tune_cpu_process() -> bool:
    """The process settings of CPU runs, where JAX will compute on the CPU (`cpu_will_compute`):
    single-device calls on the calling thread, and malloc keeping freed memory, without which
    the first does not pay. Call it before JAX starts. Returns whether it applied."""
    if not cpu_will_compute():
        return False
    run_on_calling_thread()
    keep_freed_memory()
    return True


def run_on_calling_thread() -> None:
    """Runs single-device CPU computations on the thread that calls them, not on a JAX worker
    thread. Call it before JAX starts (the first use of a device); computations over several
    devices stay asynchronous.

    Nothing overlaps that could be lost: the training loop waits for each call's losses anyway.
    What changes is which malloc heap XLA's scratch buffer comes from: a worker thread's heap
    is too small to keep it, so it is mapped and page-faulted in afresh every call; the main
    thread's heap keeps it between calls, with `common.malloc.keep_freed_memory` (row
    "**single-device calls on the calling thread**")."""
    jax.config.update("jax_cpu_enable_async_dispatch", False)


def runs_on_calling_thread() -> bool:
    """What JAX was told, read back (for config.json and the benchmark)."""
    return jax.default_backend() == "cpu" and not jax.config.read("jax_cpu_enable_async_dispatch")
