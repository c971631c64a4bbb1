"""The speed code of JAX training, off the reading path: each piece is applied in one line where
it is used, changes no result, and has its measured reason in a row of benchmarks/README.md,
named at each function.

- On a CPU: XLA's YNNPACK fusions in the compiled programs, single-device calls on the calling
  thread, and malloc keeping freed memory (common/malloc.py).
- Everywhere: k training steps in one compiled call (unrolled on a CPU, a `lax.scan` elsewhere),
  and a warm start: while that program compiles, the one-step program trains.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from concurrent.futures import Future, ThreadPoolExecutor
from functools import cache, partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

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


# --- several steps in one compiled call -----------------------------------------------------

LOOPS = ("unroll", "scan")


def default_loop() -> str:
    """How one compiled call runs its k steps on this backend. Unrolled on the CPU, where XLA's
    convolutions slow down inside loop bodies (benchmarks/README.md, row "`lax.scan` over
    steps"); elsewhere a `lax.scan`, which compiles one step whatever k, so a whole epoch fits
    in one call."""
    return "unroll" if jax.default_backend() == "cpu" else "scan"


def mark_diverged(params, losses: jax.Array) -> jax.Array:
    """Sets the last loss to NaN if any parameter is not finite, so the training loop stops.

    YNNPACK's max and relu can turn NaN into a number, so a diverged step may still show a finite
    loss. A NaN or inf gradient does reach the parameters through Adam (inf / inf is NaN) and
    stays there, so one look at the parameters per call finds it. Checking every step's
    gradients instead cost a visible share of the step; this costs nothing measurable
    (benchmarks/README.md, row "guard against NaN")."""
    finite = jnp.all(jnp.array([jnp.isfinite(p).all() for p in jax.tree.leaves(params)]))
    return losses.at[-1].set(jnp.where(finite, losses[-1], jnp.nan))


def compile_steps(step: Callable, replicated: Any, loop: str | None = None) -> Callable:
    """steps(state, dataset, batch_indices (k, b), augmentation (k, b, ...) | None) -> (state,
    losses (k,)): `step(state, dataset, indices, augmentation)` k times in one jitted call, its
    steps unrolled or in a `lax.scan` (`loop`; None: `default_loop()`), compiled once per k.
    `state` is donated, so XLA updates parameters and Adam moments in place; the new state and
    the losses come back `replicated` (on every device)."""
    loop = loop or default_loop()
    if loop not in LOOPS:
        raise ValueError(f"loop must be one of {LOOPS}, got {loop!r}")

    @partial(jax.jit, donate_argnums=0, compiler_options=compiler_options(), out_shardings=replicated)
    def steps(state, dataset, batch_indices: jax.Array, augmentation: jax.Array | None):
        if loop == "scan":
            state, losses = jax.lax.scan(lambda s, xs: step(s, dataset, *xs), state, (batch_indices, augmentation))
        else:
            losses = []
            for k in range(batch_indices.shape[0]):
                state, loss = step(state, dataset, batch_indices[k], None if augmentation is None else augmentation[k])
                losses.append(loss)
            losses = jnp.stack(losses)
        return state, mark_diverged(state["params"], losses)

    return steps


# --- the warm start ----------------------------------------------------------------------------
#
# The fused program (several steps unrolled into one compiled call) is the fastest per step but
# the slowest to compile. While XLA compiles it in a background thread, the one-step program,
# quick to compile, trains step by step; each call switches to the fused program as soon as it
# is ready. The two give bit-identical results (tests/test_speed.py), so when the switch happens
# changes the speed and nothing else. With a warm persistent compilation cache the fused program
# is ready almost at once.


class CompileClock:
    """Seconds JAX has spent tracing, lowering and compiling, in any thread (the background
    compile included): what a warm persistent compilation cache saves."""

    def __init__(self) -> None:
        self.total = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._record)

    def _record(self, event: str, duration: float, **metadata) -> None:
        if event.startswith("/jax/core/compile/"):
            self.total += duration


COMPILE_CLOCK = CompileClock()


def _abstract(tree: Any) -> Any:
    """Shapes, dtypes and shardings only: the state is donated to the next step, so the
    background compile must not hold on to its buffers."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class FusedWhenReady:
    """train(state, dataset, batch_indices (k, b), augmentation (k, b, ...) | None) -> (state, losses (k,)),
    taking numpy batches: the fused program for full chunks of `steps_per_call` once it is
    compiled, the one-step program before that and for the shorter last chunk of an epoch.

    `place(indices, augmentation)` puts a numpy batch where the step wants it. `background=False`
    compiles the fused program in the first call instead (several processes must run the same
    program at the same time, so none may switch on its own)."""

    def __init__(self, train: Callable, steps_per_call: int, place: Callable, background: bool = True):
        self.train, self.steps_per_call, self.place, self.background = train, steps_per_call, place, background
        self._fused: Future | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compile-fused") if background else None

    def __call__(self, state: Any, dataset: Any, batch_indices: np.ndarray,
                 augmentation: np.ndarray | None) -> tuple[Any, jax.Array]:
        k = len(batch_indices)
        if k == 1:
            return self.train(state, dataset, *self.place(batch_indices, augmentation))
        if k == self.steps_per_call and self._fused_ready(state, dataset, batch_indices, augmentation):
            return self._fused.result()(state, dataset, *self.place(batch_indices, augmentation))
        losses = []
        for i in range(k):
            one = slice(i, i + 1)
            chunk = None if augmentation is None else augmentation[one]
            state, loss = self.train(state, dataset, *self.place(batch_indices[one], chunk))
            losses.append(loss)
        return state, jnp.concatenate(losses)

    def _fused_ready(self, state: Any, dataset: Any, batch_indices: np.ndarray, augmentation: np.ndarray | None) -> bool:
        if self._fused is None:
            args = _abstract((state, dataset, *self.place(batch_indices, augmentation)))
            # JAX keeps x64 and the matmul precision per thread: the compile thread takes the caller's.
            x64, precision = jax.config.jax_enable_x64, jax.config.jax_default_matmul_precision

            def compile_fused():
                with jax.enable_x64(x64), jax.default_matmul_precision(precision):
                    return self.train.lower(*args).compile()

            if self.background:
                self._fused = self._pool.submit(compile_fused)
            else:
                self._fused = Future()
                self._fused.set_result(compile_fused())
        return self._fused.done()

    def compiled(self, state: Any, dataset: Any, batch_indices: np.ndarray, augmentation: np.ndarray | None):
        """The compiled program that runs these batches in one call (for XLA's cost and memory
        analysis): the fused one once started, else the program for this many steps."""
        if len(batch_indices) == self.steps_per_call and self._fused is not None:
            return self._fused.result()
        return self.train.lower(state, dataset, *self.place(batch_indices, augmentation)).compile()

    def wait_until_compiled(self) -> None:
        """Blocks until the fused program is compiled (for timing it alone)."""
        if self._fused is not None:
            self._fused.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def fused_steps(step: Callable, replicated: Any, steps_per_call: int, place: Callable, loop: str | None = None,
                background: bool = True) -> FusedWhenReady:
    """`step` run `steps_per_call` at a time in one compiled call (`compile_steps`), training at
    once on a cold start (`FusedWhenReady`): the one line a trainer applies."""
    return FusedWhenReady(compile_steps(step, replicated, loop), steps_per_call, place, background)

