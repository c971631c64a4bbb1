"""Training with JAX, top to bottom: the loss, one training step, the batch it trains on, and the
trainer that the epoch loop both frameworks share (`common.loop.fit`) drives. Each piece of
speed code (several steps in one compiled call, the warm start, the CPU settings) is applied in
one line from jax_impl/speed.py."""

from __future__ import annotations

import os
import sys
from functools import partial
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from common import data as D
from common.config import Config, steps_per_call
from common.loop import Position, run_training
from common.schedule import lr_knots
from jax_impl import checkpoint, distributed, speed
from jax_impl.model import SumNet

# Everything a step changes: {"params", "opt_state"}, with "batch_stats" (the deep trunk's batch
# norm) and "ema" (--ema: the weight average, params and batch_stats) where the run has them.
State = dict[str, Any]
Batch = tuple[jax.Array, jax.Array, jax.Array]  # normalised images (n, 28, 28, 1), numbers r, digit labels


# --- the loss and one training step ---------------------------------------------------------


def cross_entropy(logits: jax.Array, targets: jax.Array, smoothing: float) -> jax.Array:
    one_hot = jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype)
    return optax.softmax_cross_entropy(logits, optax.smooth_labels(one_hot, smoothing) if smoothing else one_hot)


def loss_fn(model: SumNet, images: jax.Array, numbers: jax.Array, labels: jax.Array,
            smoothing: float = 0.0, sum_weight: float = 1.0) -> jax.Array:
    """Mean over the batch of CE(digit) + sum_weight * CE(sum)."""
    digit_logits, sum_logits = model(images, numbers)
    digit_ce = cross_entropy(digit_logits, labels, smoothing)
    sum_ce = cross_entropy(sum_logits, labels + numbers, smoothing)
    return (digit_ce + sum_weight * sum_ce).mean()


def train_step(state: State, batch: Batch, graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
               cfg: Config) -> tuple[State, jax.Array]:
    """One AdamW step: the batch's loss through the model, its gradient, the update. Batch norm's
    running statistics are not trained: the model updates them as it runs, and they come out
    of the loss beside it. The weight average follows the new weights."""

    def loss_of(params):
        model = as_model(graphdef, params, cfg.precision, state.get("batch_stats"))
        loss = loss_fn(model, *batch, cfg.label_smoothing, cfg.sum_weight)
        return loss, nnx.state(model, nnx.BatchStat) if "batch_stats" in state else None

    (loss, batch_stats), grads = jax.value_and_grad(loss_of, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new = {**state, "params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}
    if batch_stats is not None:
        new["batch_stats"] = batch_stats
    if "ema" in state:
        new["ema"] = average(state["ema"], model_weights(new), cfg.ema)
    return new, loss


def model_weights(state: State) -> dict:
    """What the model is made of: its parameters, and the running statistics where it has them."""
    return {name: state[name] for name in ("params", "batch_stats") if name in state}


def average(ema: dict, weights: dict, decay: float) -> dict:
    """One step of the exponential moving average, of the parameters and of batch norm's running
    statistics alike (timm's ModelEmaV2): statistics that belong to the averaged weights."""
    return jax.tree.map(lambda e, w: decay * e + (1 - decay) * w, ema, weights)


def eval_weights(state: State) -> dict:
    """The weights evaluation and prediction use: the average under --ema, else the trained ones."""
    return state["ema"] if "ema" in state else model_weights(state)


def as_model(graphdef: nnx.GraphDef, params, precision: str = "fp32", batch_stats=None) -> Callable:
    """The model with these parameters (and batch norm's running statistics). Under bf16 it
    computes in bfloat16: parameters and images cast here (the gradient flows back through the
    cast to the float32 parameters), logits cast back to float32, so the softmax, the
    cross-entropy and the mean stay float32 (the deep trunk, whose statistics stay float32, is
    trained in float32 only: common/config.py)."""
    if precision != "bf16":
        return nnx.merge(graphdef, params, *([] if batch_stats is None else [batch_stats]), copy=True)
    bf16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)
    model = nnx.merge(graphdef, bf16)

    def model_f32_logits(images, numbers):
        return tuple(logits.astype(jnp.float32) for logits in model(images.astype(jnp.bfloat16), numbers))

    return model_f32_logits


# --- the batch, made on the device from the training set there -------------------------------


def device_batch(dataset: dict, batch_indices: jax.Array, augmentation: jax.Array | None, max_shift: int) -> Batch:
    """The examples these indices name, each image moved (and warped) as the shared data plan drew
    it (`common.loop.epoch_plan`), normalised."""
    images = dataset["images"][batch_indices]
    if augmentation is not None:
        images = augment(images, augmentation, max_shift)
    return preprocess(images), dataset["numbers"][batch_indices], dataset["labels"][batch_indices]


def step_on_indices(state: State, dataset: dict, batch_indices: jax.Array, augmentation: jax.Array | None, *,
                    cfg: Config, graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    mesh: jax.sharding.Mesh) -> tuple[State, jax.Array]:
    """`train_step` on the batch these indices name. Over several devices each computes its share
    of the batch, and XLA inserts the all-reduce that makes the mean loss and its gradient global
    (jax_impl/distributed.py)."""
    batch = distributed.split_examples(device_batch(dataset, batch_indices, augmentation, cfg.shift), mesh)
    return train_step(state, batch, graphdef, tx, cfg)


def preprocess(images_u8: jax.Array) -> jax.Array:
    """uint8 (n, 28, 28) -> normalised (n, 28, 28, 1), on the device.
    `float` is float32, or float64 under jax.enable_x64 (the float64 parity check)."""
    return ((images_u8.astype(float) / 255.0 - D.MEAN) / D.STD)[..., None]


def augment(images_u8: jax.Array, augmentation: jax.Array, max_shift: int) -> jax.Array:
    """The augmentation `common.loop.epoch_plan` drew: a crop offset (n, 2), or a warp (n, 4 or more)."""
    if augmentation.shape[-1] == 2:
        return translate(images_u8, augmentation, max_shift)
    return warp(images_u8, augmentation, max_shift)


def translate(images_u8: jax.Array, offsets: jax.Array, max_shift: int) -> jax.Array:
    """Moves each image by its offset: zero-pad by max_shift, crop 28x28 at `offsets` (n, 2)."""
    padded = jnp.pad(images_u8, ((0, 0), (max_shift, max_shift), (max_shift, max_shift)))
    return jax.vmap(lambda im, s: jax.lax.dynamic_slice(im, (s[0], s[1]), (28, 28)))(padded, offsets)


def warp(images_u8: jax.Array, params: jax.Array, max_shift: int) -> jax.Array:
    """Moves, rotates and scales each image about its centre: params (n, 4) are the crop offset of
    `translate`, an angle in radians and a scale factor; more columns (--elastic) are displacements
    at control points (`D.epoch_elastic`), bilinear between them, added to where each pixel reads.
    Bilinear sampling, zero outside the image; returns unnormalised float pixels (n, 28, 28)."""
    grid = jnp.arange(28, dtype=float) - 13.5
    rows, cols = jnp.meshgrid(grid, grid, indexing="ij")
    upsample = jnp.asarray(D.elastic_upsampling(), dtype=float)

    def one(image, p):
        # Each output pixel reads the input where the inverse map sends it.
        cos, sin = jnp.cos(p[2]) / p[3], jnp.sin(p[2]) / p[3]
        src_rows = cos * rows - sin * cols + 13.5 + p[0] - max_shift
        src_cols = sin * rows + cos * cols + 13.5 + p[1] - max_shift
        if p.shape[0] > 4:
            field = upsample @ p[4:].reshape(2, D.ELASTIC_GRID, D.ELASTIC_GRID) @ upsample.T
            src_rows, src_cols = src_rows + field[0], src_cols + field[1]
        return jax.scipy.ndimage.map_coordinates(image, [src_rows, src_cols], order=1, mode="constant")

    return jax.vmap(one)(images_u8.astype(float), params.astype(float))


# --- the optimizer, evaluation, the compilation cache ------------------------------------------


def make_schedule(cfg: Config, total_steps: int) -> optax.Schedule:
    xs, ys = lr_knots(cfg, total_steps)
    pieces = [optax.linear_schedule(ys[i], ys[i + 1], xs[i + 1] - xs[i]) for i in range(len(xs) - 1)]
    schedule = optax.join_schedules(pieces, xs[1:-1])
    # Optax divides its int32 step counter in float32, even under jax_enable_x64; a float counter
    # gives the same float32 values and exact float64 ones for the float64 parity check.
    return lambda count: schedule(jnp.asarray(count, float))


def make_optimizer(cfg: Config, total_steps: int) -> optax.GradientTransformation:
    return optax.adamw(make_schedule(cfg, total_steps), b1=cfg.beta1, b2=cfg.beta2, weight_decay=cfg.weight_decay)


MIN_BATCH = 16  # the smallest call `make_predict` compiles for


def make_predict(graphdef: nnx.GraphDef, chunk: int = 1000) -> Callable:
    """Returns predict(weights, images_u8, numbers) -> (digit logits, sum logits) as numpy, for any
    n; `weights` is `eval_weights`' dict and `graphdef` the model's in evaluation mode.
    Calls take a few shapes, so a few compiled programs serve every n: up to `chunk` images are
    padded to a power of two (at least MIN_BATCH), more run `chunk` at a time, the last chunk
    padded (a padded image costs next to nothing). The chunk bounds the activations' memory,
    which is a training run's peak (docs/speed.md, "Memory")."""

    @partial(jax.jit, compiler_options=speed.compiler_options())
    def logits(weights, images_u8, numbers):
        return nnx.merge(graphdef, *weights.values())(preprocess(images_u8), numbers)

    def predict(weights, images_u8: np.ndarray, numbers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(numbers)
        size = call_size(n, chunk)
        pad = max(size, -(-n // size) * size) - n
        images_u8 = np.concatenate([np.asarray(images_u8, np.uint8), np.zeros((pad, 28, 28), np.uint8)])
        numbers = np.concatenate([np.asarray(numbers, np.int32), np.zeros(pad, np.int32)])
        outs = [logits(weights, images_u8[i : i + size], numbers[i : i + size]) for i in range(0, len(numbers), size)]
        digit, summ = (np.concatenate([np.asarray(o[j]) for o in outs])[:n] for j in (0, 1))
        return digit, summ

    return predict


def call_size(n: int, chunk: int) -> int:
    """The batch of each of `make_predict`'s calls for n images."""
    return chunk if n > chunk else min(chunk, max(MIN_BATCH, 1 << max(n - 1, 0).bit_length()))


def init_model(cfg: Config) -> SumNet:
    return SumNet(cfg, nnx.Rngs(cfg.seed))


def enable_compile_cache(enabled: bool = True, folder: Path | None = None) -> str | None:
    """JAX's persistent compilation cache in the user cache folder: a later process start loads
    the compiled train step instead of compiling it again. Off with enabled=False or with
    MNIST_SUM_NO_COMPILE_CACHE=1. `folder`: a cache of the caller's own instead, on whatever
    the environment says (the benchmark's warm starts must not quietly turn cold). Returns the
    folder (None: off)."""
    if folder is None:
        if not enabled or os.environ.get("MNIST_SUM_NO_COMPILE_CACHE"):
            return None
        folder = D.cache_dir() / "jax-compile-cache"
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # predict's small programs too
    return str(folder)


def environment() -> dict:
    import flax

    return {"framework": "jax", "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
            "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
            "device_name": jax.devices()[0].device_kind, "runs_on_calling_thread": speed.runs_on_calling_thread(),
            "compile_cache": jax.config.jax_compilation_cache_dir}  # None: off


class JaxTrainer:
    """The JAX side of `common.loop.Trainer`: state and training set on the device, several steps
    per compiled call."""

    def __init__(self, cfg: Config, train_split: D.Split, total_steps: int, run_dir: Path | None = None,
                 loop: str | None = None):
        """`loop`: how a compiled call runs its steps (`speed.compile_steps`); None: this backend's default."""
        self._compile_mark = speed.COMPILE_CLOCK.total
        self.mesh = distributed.data_mesh(cfg)
        model = init_model(cfg)
        graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
        self.tx = make_optimizer(cfg, total_steps)  # it sees the parameters alone
        state = {"params": params, "opt_state": self.tx.init(params)}
        if jax.tree.leaves(batch_stats):
            state["batch_stats"] = batch_stats
        if cfg.ema:
            state["ema"] = jax.tree.map(jnp.copy, model_weights(state))  # a copy: the state is donated
        # The state and the training set on every device of the mesh.
        self.state = distributed.replicate(state, self.mesh)
        self.dataset = distributed.replicate({"images": train_split.images, "labels": train_split.labels,
                                              "numbers": train_split.numbers}, self.mesh)
        self.steps_per_call = steps_per_call(cfg, on_cpu=jax.default_backend() == "cpu")
        step = partial(step_on_indices, cfg=cfg, graphdef=graphdef, tx=self.tx, mesh=self.mesh)
        self._train = speed.fused_steps(step, distributed.replicated(self.mesh), self.steps_per_call, self.place_batch,
                                        loop, background=jax.process_count() == 1)
        model.eval()  # evaluation: batch norm with its running statistics
        self._predict = make_predict(nnx.graphdef(model))
        self.ckpt = checkpoint.manager(run_dir / "checkpoints") if run_dir else None

    def place_batch(self, batch_indices: np.ndarray,
                    augmentation: np.ndarray | None = None) -> tuple[jax.Array, jax.Array | None]:
        """Indices (k, b) and augmentation (k, b, 2 or 4) as the step takes them: split along b over
        the mesh (each process sends its slice)."""
        placed = None if augmentation is None else distributed.shard(augmentation, self.mesh)
        return distributed.shard(batch_indices, self.mesh), placed

    def train_steps(self, batch_indices: np.ndarray, augmentation: np.ndarray | None = None) -> np.ndarray:
        self.state, losses = self._train(self.state, self.dataset, batch_indices, augmentation)
        return np.asarray(losses)

    def compiled_call(self, batch_indices: np.ndarray, augmentation: np.ndarray | None = None):
        """The compiled program of one call over these batches (XLA's cost and memory analysis)."""
        return self._train.compiled(self.state, self.dataset, batch_indices, augmentation)

    def wait_until_compiled(self) -> None:
        """Blocks until the fused program compiling in the background is ready (for timing)."""
        self._train.wait_until_compiled()

    def synchronize(self) -> None:
        jax.block_until_ready(self.state)

    def call_memory_mb(self, batch_indices: np.ndarray, augmentation: np.ndarray | None = None) -> float | None:
        """XLA's memory analysis of the compiled call: arguments, outputs and scratch, the donated
        state counted once."""
        try:
            m = self.compiled_call(batch_indices, augmentation).memory_analysis()
        except Exception:  # not every backend reports it
            return None
        return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes) / 2**20

    def snapshot(self) -> State:
        return jax.tree.map(jnp.copy, self.state)  # a copy: the next step donates the state it is given

    def restore_snapshot(self, snapshot: State) -> None:
        self.state = jax.tree.map(jnp.copy, snapshot)  # the snapshot stays usable after the next step

    def compile_seconds(self) -> float:
        """Seconds spent compiling, in any thread, since the previous call (or since the trainer
        was made): metrics.jsonl's compile_time_s."""
        previous, self._compile_mark = self._compile_mark, speed.COMPILE_CLOCK.total
        return self._compile_mark - previous

    def predict(self, images: np.ndarray, numbers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Evaluates on one device (each process on its own first one) with float32 parameters,
        whatever the mesh and the precision of training; with the weight average under --ema."""
        return self._predict(distributed.local_copy(eval_weights(self.state)), images, numbers)

    def save(self, global_step: int, position: Position) -> None:
        """Blocks until the checkpoint is complete (jax_impl/checkpoint.py: errors, refusals)."""
        if self.ckpt:
            checkpoint.save(self.ckpt, global_step, self.state, position.to_json())

    def restore(self) -> Position | None:
        restored = checkpoint.restore(self.ckpt, self.state) if self.ckpt else None
        if restored is None:
            return None
        self.state, position = restored
        return Position.from_json(position)

    def close(self) -> None:
        self._train.close()
        if self.ckpt:
            self.ckpt.close()


def run(cfg: Config) -> list[dict]:
    """Trains as `cfg` says, writing RUN_DIR outputs; returns the per-epoch metrics."""
    speed.tune_cpu_process()  # before JAX starts; nothing where it will compute on a GPU
    enable_compile_cache(cfg.compile_cache)
    distributed.initialize(cfg)  # several processes: join them before anything touches a device
    if cfg.torch_device != "auto":  # PyTorch's flag; JAX chooses its backend itself
        print(f"warning: --device {cfg.torch_device} is PyTorch's (train_torch.py); JAX trains on its default backend, "
              f"{jax.default_backend()} (JAX_PLATFORMS chooses)", file=sys.stderr)
    distributed.data_mesh(cfg)  # --devices and --batch-size checked before any output
    return run_training(cfg, JaxTrainer, environment(), write_outputs=jax.process_index() == 0,
                        processes=jax.process_count())
