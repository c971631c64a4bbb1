"""Training starts at once on a cold start.

The fused program (several steps unrolled into one compiled call) is the fastest per step but
the slowest to compile. While XLA compiles it in a background thread, the one-step program,
quick to compile, trains step by step; each call switches to the fused program as soon as it
is ready. The two give bit-identical results (tests/test_warm_start.py), so when the switch
happens changes the speed and nothing else. With a warm persistent compilation cache the fused
program is ready almost at once.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


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
    """train(state, dataset, batch_indices (k, b), shifts (k, b, 2) | None) -> (state, losses (k,)),
    taking numpy batches: the fused program for full chunks of `steps_per_call` once it is
    compiled, the one-step program before that and for the shorter last chunk of an epoch.

    `place(indices, shifts)` puts a numpy batch where the step wants it. `background=False`
    compiles the fused program in the first call instead (several processes must run the same
    program at the same time, so none may switch on its own)."""

    def __init__(self, train: Callable, steps_per_call: int, place: Callable, background: bool = True):
        self.train, self.steps_per_call, self.place, self.background = train, steps_per_call, place, background
        self._fused: Future | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compile-fused") if background else None

    def __call__(self, state: Any, dataset: Any, batch_indices: np.ndarray, shifts: np.ndarray | None) -> tuple[Any, jax.Array]:
        k = len(batch_indices)
        if k == 1:
            return self.train(state, dataset, *self.place(batch_indices, shifts))
        if k == self.steps_per_call and self._fused_ready(state, dataset, batch_indices, shifts):
            return self._fused.result()(state, dataset, *self.place(batch_indices, shifts))
        losses = []
        for i in range(k):
            one = slice(i, i + 1)
            state, loss = self.train(state, dataset, *self.place(batch_indices[one], None if shifts is None else shifts[one]))
            losses.append(loss)
        return state, jnp.concatenate(losses)

    def _fused_ready(self, state: Any, dataset: Any, batch_indices: np.ndarray, shifts: np.ndarray | None) -> bool:
        if self._fused is None:
            args = _abstract((state, dataset, *self.place(batch_indices, shifts)))
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

    def compiled(self, state: Any, dataset: Any, batch_indices: np.ndarray, shifts: np.ndarray | None):
        """The compiled program that runs these batches in one call (for XLA's cost and memory
        analysis): the fused one once started, else the program for this many steps."""
        if len(batch_indices) == self.steps_per_call and self._fused is not None:
            return self._fused.result()
        return self.train.lower(state, dataset, *self.place(batch_indices, shifts)).compile()

    def wait_until_compiled(self) -> None:
        """Blocks until the fused program is compiled (for timing it alone)."""
        if self._fused is not None:
            self._fused.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
