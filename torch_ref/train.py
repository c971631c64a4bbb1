"""Training with PyTorch: the same recipe, data order and outputs as jax_impl/train.py, on the
CPU or a CUDA GPU (--device). On either, the training set lives on the device and each batch is
gathered and cropped there, so one code path serves both."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common import data as D
from common.config import Config, steps_per_call
from common.errors import ConfigError
from common.loop import Position, run_training
from common.malloc import keep_freed_memory
from common.schedule import lr_at, lr_knots
from torch_ref import checkpoint
from torch_ref.model import SumNet


def resolve_device(name: str = "auto") -> torch.device:
    """--device: "auto" is CUDA when PyTorch sees a GPU, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device cuda: PyTorch {torch.__version__} sees no CUDA device (use --device cpu or auto)")
    return torch.device(name)


def allow_tf32(allowed: bool) -> None:
    """TF32 in float32 matmuls and convolutions on CUDA. JAX's default precision on NVIDIA GPUs
    uses it for both; PyTorch's default only for convolutions. The legacy flags, because they
    keep PyTorch's newer fp32_precision settings consistent, and mixing the two APIs raises."""
    torch.backends.cuda.matmul.allow_tf32 = allowed
    torch.backends.cudnn.allow_tf32 = allowed


def preprocess(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (n, 28, 28) -> normalised (n, 1, 28, 28), in torch's default dtype (float32;
    float64 in the float64 parity check)."""
    return ((images_u8.to(torch.get_default_dtype()) / 255.0 - D.MEAN) / D.STD).unsqueeze(1)


def translate(images_u8: torch.Tensor, offsets: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Moves each image by its offset: zero-pad by max_shift, crop 28x28 at `offsets` (n, 2)."""
    padded = F.pad(images_u8, (max_shift,) * 4)
    grid = torch.arange(28, device=images_u8.device)
    rows = (offsets[:, 0, None] + grid)[:, :, None]
    cols = (offsets[:, 1, None] + grid)[:, None, :]
    return padded[torch.arange(len(offsets), device=images_u8.device)[:, None, None], rows, cols]


@functools.cache
def elastic_upsampling(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """common.data's bilinear 4x4 -> 28x28 matrix, built once per dtype and device rather than every step."""
    return torch.from_numpy(D.elastic_upsampling()).to(dtype=dtype, device=device)


def warp(images_u8: torch.Tensor, params: torch.Tensor, max_shift: int) -> torch.Tensor:
    """jax_impl/train.py's `warp`: the same inverse map, sampled by grid_sample (bilinear, zeros
    outside, align_corners=True so coordinate -1..1 spans pixel centres 0..27)."""
    p = params.to(torch.get_default_dtype())
    grid = torch.arange(28, dtype=p.dtype, device=p.device) - 13.5
    rows, cols = torch.meshgrid(grid, grid, indexing="ij")
    cos, sin = (torch.cos(p[:, 2]) / p[:, 3])[:, None, None], (torch.sin(p[:, 2]) / p[:, 3])[:, None, None]
    src_rows = cos * rows - sin * cols + 13.5 + p[:, 0, None, None] - max_shift
    src_cols = sin * rows + cos * cols + 13.5 + p[:, 1, None, None] - max_shift
    if p.shape[1] > 4:
        upsample = elastic_upsampling(p.dtype, p.device)
        field = upsample @ p[:, 4:].reshape(-1, 2, D.ELASTIC_GRID, D.ELASTIC_GRID) @ upsample.T
        src_rows, src_cols = src_rows + field[:, 0], src_cols + field[:, 1]
    xy = torch.stack([src_cols, src_rows], dim=-1) / 13.5 - 1  # grid_sample wants (x, y) in -1..1
    images = images_u8.to(p.dtype).unsqueeze(1)
    return F.grid_sample(images, xy, mode="bilinear", padding_mode="zeros", align_corners=True).squeeze(1)


def augment(images_u8: torch.Tensor, augmentation: torch.Tensor, max_shift: int) -> torch.Tensor:
    """The augmentation `common.loop.epoch_plan` drew: a crop offset (n, 2), or a warp (n, 4 or more)."""
    if augmentation.shape[-1] == 2:
        return translate(images_u8, augmentation, max_shift)
    return warp(images_u8, augmentation, max_shift)


def loss_fn(model: SumNet, images: torch.Tensor, numbers: torch.Tensor, labels: torch.Tensor,
            smoothing: float = 0.0, sum_weight: float = 1.0) -> torch.Tensor:
    """Mean over the batch of CE(digit) + sum_weight * CE(sum)."""
    digit_logits, sum_logits = model(images, numbers)
    return (F.cross_entropy(digit_logits, labels, label_smoothing=smoothing)
            + sum_weight * F.cross_entropy(sum_logits, labels + numbers, label_smoothing=smoothing))


def make_optimizer(cfg: Config, model: SumNet, total_steps: int):
    # Same math as optax.adamw: decoupled weight decay, eps outside the square root. On CUDA the
    # fused kernel: one launch per step instead of several per parameter (same formula).
    fused = next(model.parameters()).is_cuda
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, weight_decay=cfg.weight_decay,
                            fused=fused or None)
    knots = lr_knots(cfg, total_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_at(step, knots) / cfg.lr)
    return opt, sched


@torch.no_grad()
def average(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """jax_impl/train.py's `average`: one step of the exponential moving average, of the
    parameters and of batch norm's running statistics alike (timm's ModelEmaV2); PyTorch's
    count of batches, an integer that serves no average here, is copied."""
    for e, w in zip(ema.state_dict().values(), model.state_dict().values()):
        if e.is_floating_point():
            e.mul_(decay).add_(w, alpha=1 - decay)
        else:
            e.copy_(w)


def predict_logits(model: SumNet, images_u8: np.ndarray, numbers: np.ndarray, chunk: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """(digit logits, sum logits) as numpy, computed on the model's device, `chunk` images a pass."""
    device = next(model.parameters()).device
    with torch.no_grad():
        # torch.tensor copies: the loaded arrays are read-only, which torch.from_numpy warns about
        outs = [model(preprocess(torch.tensor(images_u8[i : i + chunk], device=device)),
                      torch.tensor(numbers[i : i + chunk], device=device).long())
                for i in range(0, len(numbers), chunk)]
    return tuple(torch.cat([o[j] for o in outs]).cpu().numpy() for j in (0, 1))


def environment(device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"framework": "torch", "torch": torch.__version__, "backend": device.type, "device": str(device),
            "device_name": name, "threads": torch.get_num_threads()}


class TorchTrainer:
    """The PyTorch side of `common.loop.Trainer`."""

    def __init__(self, cfg: Config, train_split: D.Split, total_steps: int, run_dir: Path | None = None):
        self.cfg, self.device = cfg, resolve_device(cfg.torch_device)
        torch.manual_seed(cfg.seed)
        self.model = SumNet(cfg).to(self.device)  # initialised on the CPU: the same weights on every device
        # --ema: the weight average, which evaluation and prediction use; it never trains.
        self.ema = copy.deepcopy(self.model).eval() if cfg.ema else None
        self.opt, self.sched = make_optimizer(cfg, self.model, total_steps)
        # Copies (the loaded arrays are read-only), made once: batches are gathered on the device.
        self.images = torch.tensor(train_split.images, device=self.device)
        self.labels = torch.tensor(train_split.labels, dtype=torch.long, device=self.device)
        self.numbers = torch.tensor(train_split.numbers, dtype=torch.long, device=self.device)
        self.steps_per_call = steps_per_call(cfg, on_cpu=self.device.type == "cpu")
        self.run_dir = run_dir
        self.forward = self.model  # what the steps call: scripts/benchmark.py puts torch.compile's in its place

    def batch_images(self, idx: torch.Tensor, augmentation: torch.Tensor | None) -> torch.Tensor:
        """The images (b, 28, 28) of one batch as the step sees them (uint8; float pixels when
        warped): indices (b,) and crop offsets (b, 2) or warps (b, 4 or more) on the device, gathered
        and augmented there."""
        images = self.images[idx]
        return images if augmentation is None else augment(images, augmentation, self.cfg.shift)

    def train_steps(self, batch_indices: np.ndarray, augmentation: np.ndarray | None = None) -> np.ndarray:
        # One copy of the chunk's indices and offsets to the device and one read of its losses, as
        # JAX's compiled call: nothing inside a chunk waits for the device.
        idx = torch.from_numpy(batch_indices).to(self.device, torch.long)
        # int32 crop offsets index as they are
        placed = None if augmentation is None else torch.from_numpy(augmentation).to(self.device)
        losses = []
        self.model.train()
        for k in range(len(idx)):
            self.opt.zero_grad(set_to_none=True)
            images = self.batch_images(idx[k], None if placed is None else placed[k])
            loss = loss_fn(self.forward, preprocess(images), self.numbers[idx[k]], self.labels[idx[k]],
                           self.cfg.label_smoothing, self.cfg.sum_weight)
            loss.backward()
            self.opt.step()
            self.sched.step()
            if self.ema is not None:
                average(self.ema, self.model, self.cfg.ema)
            losses.append(loss.detach())
        return np.asarray(torch.stack(losses).tolist())

    def predict(self, images: np.ndarray, numbers: np.ndarray, chunk: int = 2000) -> tuple[np.ndarray, np.ndarray]:
        """In evaluation mode (batch norm with its running statistics), with the average under --ema."""
        self.model.eval()
        return predict_logits(self.model if self.ema is None else self.ema, images, numbers, chunk)

    def save(self, global_step: int, position: Position) -> None:
        """Blocks until the checkpoint is on disk (torch_ref/checkpoint.py: errors, refusals)."""
        if self.run_dir is not None:
            checkpoint.save(self.run_dir / checkpoint.FILE, global_step, position.to_json(), self.model, self.opt,
                            self.sched, self.ema)

    def restore(self) -> Position | None:
        restored = None
        if self.run_dir is not None:
            restored = checkpoint.restore(self.run_dir / checkpoint.FILE, self.model, self.opt, self.sched, self.ema)
        return None if restored is None else Position.from_json(restored)

    def wait_until_compiled(self) -> None:
        pass  # nothing compiles in the background

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def call_memory_mb(self, batch_indices: np.ndarray, augmentation: np.ndarray | None = None) -> float | None:
        """CUDA memory at the peak of one call: the trainer's own tensors (training set,
        parameters, gradients, Adam moments) plus what the call allocates on top. Runs the call."""
        if self.device.type != "cuda":
            return None
        tensors = [self.images, self.labels, self.numbers, *self.model.parameters()]
        tensors += [p.grad for p in self.model.parameters() if p.grad is not None]
        tensors += [t for state in self.opt.state.values() for t in state.values() if torch.is_tensor(t)]
        own = sum(t.numel() * t.element_size() for t in tensors)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        self.train_steps(batch_indices, augmentation)
        return (own + torch.cuda.max_memory_allocated(self.device) - before) / 2**20

    def snapshot(self) -> dict:
        return copy.deepcopy({"model": self.model.state_dict(), "opt": self.opt.state_dict(),
                              "sched": self.sched.state_dict(), "ema": None if self.ema is None else self.ema.state_dict()})

    def restore_snapshot(self, snapshot: dict) -> None:
        self.model.load_state_dict(snapshot["model"])  # copies into the same parameters: compiled graphs stay valid
        self.opt.load_state_dict(snapshot["opt"])
        self.sched.load_state_dict(snapshot["sched"])
        if self.ema is not None:
            self.ema.load_state_dict(snapshot["ema"])

    def compile_seconds(self) -> None:
        """Not measured: eager PyTorch compiles nothing, and torch.compile's time falls inside the
        first steps."""
        return None

    def close(self) -> None:
        pass


def run(cfg: Config) -> list[dict]:
    """Trains as `cfg` says, writing RUN_DIR outputs; returns the per-epoch metrics."""
    if cfg.jax_devices > 1 or cfg.precision != "fp32" or cfg.coordinator:
        raise ConfigError("--devices, --precision and --coordinator are for train_jax.py; the PyTorch reference "
                          "runs on one device in float32")
    device = resolve_device(cfg.torch_device)
    if device.type == "cpu":
        keep_freed_memory()  # a CPU setting (common/malloc.py says why)
    else:
        allow_tf32(True)  # the precision JAX uses on the same GPU
    return run_training(cfg, TorchTrainer, environment(device))
