"""The PyTorch reference: jax_impl/model.py layer for layer, in plain torch.nn (NCHW)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.config import Config
from common.data import NUM_DIGITS, NUM_SUMS


class NumberLine(nn.Module):
    """jax_impl/model.py's NumberLine: learned positions of the digit classes, of r and of the
    sums on one line; sum logits fall with the squared distance from the decided digit's + r's."""

    def __init__(self):
        super().__init__()
        self.digit_at = nn.Parameter(0.1 * torch.randn(NUM_DIGITS))
        self.number_at = nn.Parameter(0.1 * torch.randn(NUM_DIGITS))
        self.sum_at = nn.Parameter(0.1 * torch.randn(NUM_SUMS))
        self.log_sharpness = nn.Parameter(torch.zeros(()))

    def forward(self, digit_logits: torch.Tensor, numbers: torch.Tensor) -> torch.Tensor:
        likeliest = F.one_hot(digit_logits.argmax(1), NUM_DIGITS).to(digit_logits.dtype)  # no gradient, as in JAX
        position = likeliest @ self.digit_at + self.number_at[numbers]
        return -self.log_sharpness.exp() * (position[:, None] - self.sum_at) ** 2


# jax_impl/model.py's BN_MOMENTUM and BN_EPSILON: PyTorch's defaults, written out.
BN_MOMENTUM = 0.1
BN_EPSILON = 1e-5


class SumNet(nn.Module):
    # Each layer starts from PyTorch's default initialisation, not Flax's: the parity checks copy
    # weights across, and independent runs compare what each framework's users get
    # (docs/parity.md, "Trained independently").
    def __init__(self, cfg: Config):
        super().__init__()
        self.design, self.trunk = cfg.design, cfg.trunk
        flat = cfg.trunk_sizes()[1] ** 2 * cfg.conv2
        if cfg.trunk == "deep":  # no conv bias before a batch norm (jax_impl/model.py says why)
            conv = lambda c_in, c_out: nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)  # noqa: E731
            norm = lambda c: nn.BatchNorm2d(c, eps=BN_EPSILON, momentum=BN_MOMENTUM)  # noqa: E731
            self.conv1, self.norm1 = conv(1, cfg.conv1), norm(cfg.conv1)
            self.conv1b, self.norm1b = conv(cfg.conv1, cfg.conv1), norm(cfg.conv1)
            self.conv2, self.norm2 = conv(cfg.conv1, cfg.conv2), norm(cfg.conv2)
            self.conv2b, self.norm2b = conv(cfg.conv2, cfg.conv2), norm(cfg.conv2)
        else:
            pad = (lambda k: k // 2) if cfg.padding == "same" else (lambda k: 0)  # odd kernels: Flax's SAME
            self.conv1 = nn.Conv2d(1, cfg.conv1, cfg.kernel1, padding=pad(cfg.kernel1))
            self.conv2 = nn.Conv2d(cfg.conv1, cfg.conv2, cfg.kernel2, padding=pad(cfg.kernel2))
        self.fc = nn.Linear(flat + NUM_DIGITS if cfg.design == "flatten" else flat, cfg.hidden)
        self.digit_head = nn.Linear(cfg.hidden, NUM_DIGITS)
        if cfg.design == "numberline":
            self.numberline = NumberLine()
            return
        if cfg.design == "digit":
            self.adder = nn.Linear(2 * NUM_DIGITS, cfg.adder_hidden)
        self.sum_head = nn.Linear(cfg.hidden if cfg.design == "flatten" else cfg.adder_hidden, NUM_SUMS)

    def forward(self, images: torch.Tensor, numbers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (n, 1, 28, 28) normalised float32; numbers (n,) int64 -> (digit logits, sum logits)."""
        x = self.features(images).flatten(1)  # (c, h, w) order; jax_impl flattens (h, w, c): parity/convert.py maps them
        one_hot = F.one_hot(numbers, NUM_DIGITS).to(x.dtype)
        if self.design == "flatten":
            h = F.relu(self.fc(torch.cat([x, one_hot], dim=1)))
            return self.digit_head(h), self.sum_head(h)
        digit_logits = self.digit_head(F.relu(self.fc(x)))
        if self.design == "numberline":
            return digit_logits, self.numberline(digit_logits, numbers)
        adder_in = torch.cat([F.softmax(digit_logits, dim=1), one_hot], dim=1)
        return digit_logits, self.sum_head(F.relu(self.adder(adder_in)))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The trunk's output, (n, conv2, side, side). Batch norm uses the batch's statistics in
        training mode, the running ones after `model.eval()`."""
        if self.trunk == "plain":
            x = F.max_pool2d(F.relu(self.conv1(images)), 2)
            return F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.norm1(self.conv1(images)))
        x = F.avg_pool2d(F.relu(self.norm1b(self.conv1b(x))), 2)  # average: jax_impl/model.py says why
        x = F.relu(self.norm2(self.conv2(x)))
        return F.avg_pool2d(F.relu(self.norm2b(self.conv2b(x))), 2)
