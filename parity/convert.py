"""Weights across frameworks: Flax NNX parameters <-> PyTorch state_dict.

Layout differences handled here, and only here:
- conv kernels: Flax HWIO, PyTorch OIHW;
- linear kernels: Flax (in, out), PyTorch weight (out, in);
- the first fully connected layer's inputs: Flax flattens the image features
  in (h, w, c) order, PyTorch in (c, h, w); the one-hot(r) columns (design
  "flatten") come after them in both and are copied as they are;
- the number line's positions (design "numberline") have one layout in both.
The maps are permutations and transposes, so they also carry gradients and
Adam moments, and a round trip is exact.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from common.data import NUM_DIGITS  # the one-hot(r) columns of design "flatten"'s fc layer


class ShapeMismatch(ValueError):
    pass


def _side(fc_inputs: int, channels: int, layers: set[str]) -> int:
    """The side of the trunk's last feature map (7 with padding "same", 5 with "valid" 5x5 then
    3x3), from the fc layer's inputs; design "flatten" (no adder, no number line) adds one-hot(r)."""
    with_number = not {"adder", "numberline"} & layers
    return math.isqrt((fc_inputs - NUM_DIGITS * with_number) // channels)


def _fc_rows_hwc_to_chw(kernel: np.ndarray, channels: int, side: int) -> np.ndarray:
    """Reorders the image rows of the fc kernel (in, out) from (h, w, c) to (c, h, w)."""
    flat = side * side * channels
    image = kernel[:flat].reshape(side, side, channels, -1).transpose(2, 0, 1, 3).reshape(flat, -1)
    return np.concatenate([image, kernel[flat:]])


def _fc_rows_chw_to_hwc(kernel: np.ndarray, channels: int, side: int) -> np.ndarray:
    flat = side * side * channels
    image = kernel[:flat].reshape(channels, side, side, -1).transpose(1, 2, 0, 3).reshape(flat, -1)
    return np.concatenate([image, kernel[flat:]])


def _check(name: str, got: tuple, want: tuple, side: str) -> None:
    if tuple(got) != tuple(want):
        raise ShapeMismatch(f"{name}: converted shape {tuple(got)} does not fit the {side} model's {tuple(want)}; "
                            "were both models built with the same --design/--conv1/--conv2/--hidden/--kernel1/--kernel2/--padding?")


def flax_to_torch(params: dict, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Flax pure-dict parameters (or gradients) -> a PyTorch state_dict shaped like `like`."""
    channels = np.shape(params["conv2"]["kernel"])[-1]
    side = _side(np.shape(params["fc"]["kernel"])[0], channels, set(params))
    if {key.split(".")[0] for key in like} != set(params):
        raise ShapeMismatch(f"layers differ: Flax {sorted(params)}, PyTorch {sorted({k.split('.')[0] for k in like})}")
    out = {}
    for layer in params:
        if "kernel" not in params[layer]:  # the number line's positions: the same layout in both
            named = [(name, np.asarray(value)) for name, value in params[layer].items()]
        else:
            kernel, bias = np.asarray(params[layer]["kernel"]), np.asarray(params[layer]["bias"])
            if kernel.ndim == 4:
                weight = kernel.transpose(3, 2, 0, 1)
            else:
                weight = (_fc_rows_hwc_to_chw(kernel, channels, side) if layer == "fc" else kernel).T
            named = [("weight", weight), ("bias", bias)]
        for suffix, value in named:
            key = f"{layer}.{suffix}"
            if key not in like:
                raise ShapeMismatch(f"{key}: no such parameter in the PyTorch model")
            _check(key, value.shape, like[key].shape, "PyTorch")
            out[key] = torch.from_numpy(np.array(value, copy=True)).to(like[key].dtype)
    return out


def torch_to_flax(state_dict: dict[str, torch.Tensor], like: dict) -> dict:
    """A PyTorch state_dict (or gradients by name) -> Flax pure-dict parameters shaped like `like`."""
    channels = state_dict["conv2.weight"].shape[0]
    layers = sorted({key.split(".")[0] for key in state_dict})
    side = _side(state_dict["fc.weight"].shape[1], channels, set(layers))
    if set(layers) != set(like):
        raise ShapeMismatch(f"layers differ: PyTorch {layers}, Flax {sorted(like)}")
    out = {}
    for layer in layers:
        if f"{layer}.weight" not in state_dict:  # the number line's positions: the same layout in both
            out[layer] = {}
            for name in like[layer]:
                value = state_dict[f"{layer}.{name}"].detach().cpu().numpy().copy()
                _check(f"{layer}.{name}", value.shape, np.shape(like[layer][name]), "Flax")
                out[layer][name] = value
            continue
        weight = state_dict[f"{layer}.weight"].detach().cpu().numpy()
        bias = state_dict[f"{layer}.bias"].detach().cpu().numpy()
        if weight.ndim == 4:
            kernel = weight.transpose(2, 3, 1, 0)
        else:
            kernel = _fc_rows_chw_to_hwc(weight.T, channels, side) if layer == "fc" else weight.T
        _check(f"{layer}.kernel", kernel.shape, np.shape(like[layer]["kernel"]), "Flax")
        _check(f"{layer}.bias", bias.shape, np.shape(like[layer]["bias"]), "Flax")
        out[layer] = {"kernel": np.ascontiguousarray(kernel), "bias": bias.copy()}
    return out
