"""The measured paths: per framework and variant, the Config it trains with, its trainer, and a
call of its steps on batches drawn beforehand."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from common import data as D
from common.config import ACCELERATOR_STEPS_PER_CALL, Config
from common.loop import steps_per_epoch

SUITES = {
    "cpu": [("jax", "train_step"), ("jax", "single_step"), ("torch", "eager"), ("torch", "compile")],
    "accelerator": [("jax", "train_step"), ("jax", "train_step_bf16"), ("jax", "epoch_step"),
                    ("torch", "eager"), ("torch", "eager_bf16"), ("torch", "compile"), ("torch", "compile_cudagraphs")],
}
# torch.compile's mode per PyTorch variant (None: eager). channels_last is the speedrun's choice
# (--speedrun-torch), not a row of the step suites.
TORCH_COMPILE = {"eager": None, "eager_bf16": None, "compile": "default", "compile_cudagraphs": "reduce-overhead",
                 "channels_last": None}


def path_config(framework: str, variant: str, batch_size: int, base: Config, n_train: int) -> Config:
    """The Config a path trains with (`base` with the variant's changes)."""
    # train_step: several steps per compiled call, the default on an accelerator (common/config.py).
    cfg = replace(base, batch_size=batch_size, steps_per_call=base.steps_per_call or ACCELERATOR_STEPS_PER_CALL)
    if variant == "single_step":
        cfg = replace(cfg, steps_per_call=1)
    if variant == "train_step_2dev":
        cfg = replace(cfg, jax_devices=2)
    if variant.endswith("_bf16"):
        cfg = replace(cfg, precision="bf16")
    if variant == "epoch_step":
        cfg = replace(cfg, steps_per_call=steps_per_epoch(cfg, n_train))
    return cfg


def make_trainer(framework: str, variant: str, cfg: Config, train: D.Split, total_steps: int = 10_000):
    """The framework's trainer (common.loop.Trainer) for `cfg`, changed as the variant says."""
    if framework == "jax":
        from jax_impl.train import JaxTrainer

        # A whole epoch per call needs the loop that compiles one step whatever the count.
        return JaxTrainer(cfg, train, total_steps, loop="scan" if variant == "epoch_step" else None)
    from torch_ref.train import TorchTrainer

    trainer = TorchTrainer(cfg, train, total_steps)
    if TORCH_COMPILE[variant]:
        trainer.forward = compiled(trainer.model, TORCH_COMPILE[variant])
    if variant.endswith("_bf16"):
        trainer.train_steps = in_bf16_autocast(trainer.train_steps, trainer.device.type)
    if variant == "channels_last":
        trainer.forward = in_channels_last(trainer.model)
    return trainer


def compiled(model, mode: str):
    """The model's forward and backward under torch.compile; "reduce-overhead" replays them as
    CUDA graphs, which may reuse the last step's memory, so each call starts a new step."""
    import torch

    program = torch.compile(model, mode=mode, dynamic=False)
    if mode != "reduce-overhead":
        return program

    def forward(*args):
        torch.compiler.cudagraph_mark_step_begin()
        return program(*args)

    return forward


def in_bf16_autocast(train_steps, device_type: str):
    """PyTorch's counterpart of JAX's bf16 rows: the steps under bf16 autocast (float32
    parameters, optimiser state and loss; TorchTrainer has no precision setting of its own)."""
    import torch

    def steps(*args):
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return train_steps(*args)

    return steps


def in_channels_last(model):
    """The model's weights, and each step's images, in the channels_last layout (NHWC), which
    PyTorch's CPU convolutions run faster (benchmarks/README.md, the speedrun's PyTorch row).
    `Module.to` changes the parameters in place, so the optimiser keeps them, and Adam's moments
    take their layout."""
    import torch

    model.to(memory_format=torch.channels_last)

    def forward(images, numbers):
        return model(images.contiguous(memory_format=torch.channels_last), numbers)

    return forward


def warm_up(trainer, batch_indices: np.ndarray, shifts: np.ndarray | None) -> None:
    """One call, then waits for JAX's fused program if it compiles in the background
    (jax_impl/speed.py), so that every timed call runs the program it is timed for."""
    trainer.train_steps(batch_indices, shifts)
    trainer.wait_until_compiled()


def make_path(framework: str, variant: str, batch_size: int, train: D.Split, base: Config):
    """Returns (trainer, run(k_steps) -> None that ends with a device synchronisation, steps per
    call, the first call's batch). `base`: the Config the variant changes (PyTorch's device is
    its `torch_device`). Batches come from a small pool drawn beforehand, so no drawing is timed."""
    cfg = path_config(framework, variant, batch_size, base, len(train))
    trainer = make_trainer(framework, variant, cfg, train)
    per_call = cfg.steps_per_call
    rng = np.random.default_rng(0)
    pool = [(rng.integers(0, len(train), size=(per_call, batch_size)),
             rng.integers(0, 2 * cfg.shift + 1, size=(per_call, batch_size, 2)) if cfg.shift else None) for _ in range(4)]
    calls = 0

    def run(k: int) -> None:
        nonlocal calls
        for _ in range(max(1, k // per_call)):
            trainer.train_steps(*pool[calls % len(pool)])
            calls += 1
        trainer.synchronize()

    return trainer, run, per_call, pool[0]


def one_step_cost(batch: int, train: D.Split, base: Config) -> dict:
    """FLOPs and bytes of one training step at this batch size, from XLA's cost analysis of a
    one-step unrolled program: in a lax.scan (the GPU's calls) the analysis counts the loop body
    once, whatever its trip count, so a k-step call's count divided by k is k times too low."""
    from jax_impl.train import JaxTrainer

    cfg = replace(base, batch_size=batch, steps_per_call=1)
    trainer = JaxTrainer(cfg, train, 10_000, loop="unroll")
    rng = np.random.default_rng(0)
    shifts = rng.integers(0, 2 * cfg.shift + 1, size=(1, batch, 2)) if cfg.shift else None
    cost = trainer.compiled_call(rng.integers(0, len(train), size=(1, batch)), shifts).cost_analysis()
    trainer.close()
    cost = (cost[0] if isinstance(cost, list) else cost) or {}
    return {"flops_per_step": float(cost.get("flops", 0.0)) or None, "bytes_per_step": float(cost.get("bytes accessed", 0.0)) or None}


def precision_of(framework: str, variant: str, on_gpu: bool) -> str:
    """How a row computes its float32 matmuls and convolutions: TF32 or full float32."""
    if variant.endswith("_bf16"):
        return "bf16 compute" if framework == "jax" else "bf16 autocast"
    if not on_gpu:
        return "fp32 (no TF32 on a CPU)"
    if framework == "jax":
        import jax

        # XLA's default precision on NVIDIA GPUs computes float32 dots and convolutions in TF32.
        return f"jax_default_matmul_precision={jax.config.jax_default_matmul_precision or 'default (TF32)'}"
    import torch

    return f"allow_tf32 matmul={torch.backends.cuda.matmul.allow_tf32} cudnn={torch.backends.cudnn.allow_tf32}"
