"""Training with PyTorch: the same recipe, data order and outputs as jax_impl/train.py."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common import data as D
from common.config import Config, ConfigError
from common.loop import run_training
from common.schedule import lr_at, lr_knots
from torch_ref.model import SumNet


def preprocess(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (n, 28, 28) -> normalised (n, 1, 28, 28), in torch's default dtype (float32;
    float64 in the float64 parity check)."""
    return ((images_u8.to(torch.get_default_dtype()) / 255.0 - D.MEAN) / D.STD).unsqueeze(1)


def translate(images_u8: torch.Tensor, shifts: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Moves each image by its offset: zero-pad by max_shift, crop 28x28 at `shifts` (n, 2)."""
    padded = F.pad(images_u8, (max_shift,) * 4)
    grid = torch.arange(28)
    rows = (shifts[:, 0, None] + grid)[:, :, None]
    cols = (shifts[:, 1, None] + grid)[:, None, :]
    return padded[torch.arange(len(shifts))[:, None, None], rows, cols]


def loss_fn(model: SumNet, images: torch.Tensor, numbers: torch.Tensor, labels: torch.Tensor,
            smoothing: float = 0.0, sum_weight: float = 1.0) -> torch.Tensor:
    """Mean over the batch of CE(digit) + sum_weight * CE(sum)."""
    digit_logits, sum_logits = model(images, numbers)
    return (F.cross_entropy(digit_logits, labels, label_smoothing=smoothing)
            + sum_weight * F.cross_entropy(sum_logits, labels + numbers, label_smoothing=smoothing))


def make_optimizer(cfg: Config, model: SumNet, total_steps: int):
    # Same math as optax.adamw: decoupled weight decay, eps outside the square root.
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
    knots = lr_knots(cfg, total_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_at(step, knots) / cfg.lr)
    return opt, sched


def environment() -> dict:
    return {"framework": "torch", "torch": torch.__version__, "backend": "cpu", "threads": torch.get_num_threads()}


class TorchTrainer:
    """The PyTorch side of `common.loop.Trainer`."""

    def __init__(self, cfg: Config, train_split: D.Split, total_steps: int, run_dir: Path | None = None):
        torch.manual_seed(cfg.seed)
        self.cfg = cfg
        self.model = SumNet(cfg)
        self.opt, self.sched = make_optimizer(cfg, self.model, total_steps)
        self.images = torch.tensor(train_split.images)  # a copy: the loaded arrays are read-only
        self.labels = torch.from_numpy(train_split.labels).long()
        self.numbers = torch.from_numpy(train_split.numbers).long()
        self.run_dir = run_dir

    def train_steps(self, batch_indices: np.ndarray, shifts: np.ndarray | None = None) -> np.ndarray:
        losses = []
        self.model.train()
        for k, idx in enumerate(torch.from_numpy(batch_indices)):
            self.opt.zero_grad(set_to_none=True)
            images = self.images[idx]
            if shifts is not None:
                images = translate(images, torch.from_numpy(shifts[k]).long(), self.cfg.shift)
            loss = loss_fn(self.model, preprocess(images), self.numbers[idx], self.labels[idx],
                           self.cfg.label_smoothing, self.cfg.sum_weight)
            loss.backward()
            self.opt.step()
            self.sched.step()
            losses.append(loss.item())
        return np.asarray(losses)

    @torch.no_grad()
    def predict(self, images: np.ndarray, numbers: np.ndarray, chunk: int = 2000) -> tuple[np.ndarray, np.ndarray]:
        self.model.eval()
        # torch.tensor copies: the loaded arrays are read-only, which torch.from_numpy warns about
        outs = [self.model(preprocess(torch.tensor(images[i : i + chunk])), torch.tensor(numbers[i : i + chunk]).long())
                for i in range(0, len(numbers), chunk)]
        return tuple(torch.cat([o[j] for o in outs]).numpy() for j in (0, 1))

    def save(self, global_step: int, position: dict) -> None:
        if self.run_dir is None:
            return
        path = self.run_dir / "checkpoint.pt"
        tmp = path.with_suffix(".pt.tmp")
        torch.save({"step": global_step, "position": position, "model": self.model.state_dict(),
                    "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict()}, tmp)
        os.replace(tmp, path)  # a crash mid-write never leaves a broken checkpoint.pt

    def restore(self) -> dict | None:
        path = self.run_dir / "checkpoint.pt" if self.run_dir else None
        if path is None or not path.exists():
            return None
        saved = torch.load(path, weights_only=True)
        self.model.load_state_dict(saved["model"])
        self.opt.load_state_dict(saved["optimizer"])
        self.sched.load_state_dict(saved["scheduler"])
        return saved["position"]


def run(cfg: Config) -> list[dict]:
    """Trains as `cfg` says, writing RUN_DIR outputs; returns the per-epoch metrics."""
    if cfg.devices > 1 or cfg.precision != "fp32" or cfg.coordinator:
        raise ConfigError("--devices, --precision and --coordinator are for train_jax.py; the PyTorch reference "
                          "runs on one device in float32")
    return run_training(cfg, TorchTrainer, environment())
