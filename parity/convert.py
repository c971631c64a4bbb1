"""Weights across frameworks: Flax NNX parameters <-> PyTorch state_dict.

Layout differences handled here, and only here:
- conv kernels: Flax HWIO, PyTorch OIHW;
- linear kernels: Flax (in, out), PyTorch weight (out, in);
- the first fully connected layer's inputs: Flax flattens the image features
  in (h, w, c) order, PyTorch in (c, h, w); the one-hot(r) columns (design
  "flatten") come after them in both and are copied as they are;
- the number line's positions (design "numberline") have one layout in both;
- batch norm (the deep trunk): Flax's scale, bias and running mean and variance
  are PyTorch's weight, bias, running_mean and running_var, one layout; the deep
  trunk's convolutions have no bias.
The maps are permutations and transposes, so they also carry gradients and
Adam moments, and a round trip is exact. A Flax dict holds the parameters, and
with them the batch statistics where the model has them (`nnx.to_pure_dict` of
each, merged by layer).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from common.data import NUM_DIGITS  # the one-hot(r) columns of design "flatten"'s fc layer


class ShapeMismatch(ValueError):
    pass


NORM_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}  # Flax: PyTorch


def _last_conv(layers) -> str:
    """The convolution whose channels the fc layer reads: the deep trunk's conv2b, else conv2."""
    return "conv2b" if "conv2b" in layers else "conv2"


def _torch_names(layer: str) -> dict[str, str]:
    """A layer's Flax names -> PyTorch's, where neither is a kernel: batch norm's, or the number
    line's positions (the same names)."""
    return NORM_NAMES if layer.startswith("norm") else {}


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
                            "were both models built with the same --design/--trunk/--conv1/--conv2/--hidden/--kernel1/--kernel2/--padding?")


def flax_to_torch(params: dict, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Flax pure-dict parameters (or gradients) -> a PyTorch state_dict shaped like `like`."""
    channels = np.shape(params[_last_conv(params)]["kernel"])[-1]
    side = _side(np.shape(params["fc"]["kernel"])[0], channels, set(params))
    if {key.split(".")[0] for key in like} != set(params):
        raise ShapeMismatch(f"layers differ: Flax {sorted(params)}, PyTorch {sorted({k.split('.')[0] for k in like})}")
    out = {}
    for layer in params:
        if "kernel" not in params[layer]:
            names = _torch_names(layer)
            named = [(names.get(name, name), np.asarray(value)) for name, value in params[layer].items()]
        else:
            kernel = np.asarray(params[layer]["kernel"])
            if kernel.ndim == 4:
                weight = kernel.transpose(3, 2, 0, 1)
            else:
                weight = (_fc_rows_hwc_to_chw(kernel, channels, side) if layer == "fc" else kernel).T
            named = [("weight", weight)]
            if "bias" in params[layer]:  # not the deep trunk's convolutions
                named.append(("bias", np.asarray(params[layer]["bias"])))
        for suffix, value in named:
            key = f"{layer}.{suffix}"
            if key not in like:
                raise ShapeMismatch(f"{key}: no such parameter in the PyTorch model")
            _check(key, value.shape, like[key].shape, "PyTorch")
            out[key] = torch.from_numpy(np.array(value, copy=True)).to(like[key].dtype)
    # PyTorch's count of batches seen serves only a cumulative average (momentum None); with a
    # momentum it carries nothing, and the target's own is kept, so that a whole state_dict loads.
    out.update({key: value.clone() for key, value in like.items()
                if key.endswith(".num_batches_tracked") and key.split(".")[0] in params})
    return out


def torch_to_flax(state_dict: dict[str, torch.Tensor], like: dict) -> dict:
    """A PyTorch state_dict (or gradients by name) -> Flax pure-dict parameters shaped like `like`
    (the names in `like` say which: parameters, batch statistics or both)."""
    layers = sorted({key.split(".")[0] for key in state_dict})
    channels = state_dict[f"{_last_conv(layers)}.weight"].shape[0]
    side = _side(state_dict["fc.weight"].shape[1], channels, set(layers))
    if set(layers) != set(like):
        raise ShapeMismatch(f"layers differ: PyTorch {layers}, Flax {sorted(like)}")
    out = {}
    for layer in layers:
        if "kernel" not in like[layer]:
            out[layer] = {}
            names = _torch_names(layer)
            for name in like[layer]:
                value = state_dict[f"{layer}.{names.get(name, name)}"].detach().cpu().numpy().copy()
                _check(f"{layer}.{name}", value.shape, np.shape(like[layer][name]), "Flax")
                out[layer][name] = value
            continue
        weight = state_dict[f"{layer}.weight"].detach().cpu().numpy()
        if weight.ndim == 4:
            kernel = weight.transpose(2, 3, 1, 0)
        else:
            kernel = _fc_rows_chw_to_hwc(weight.T, channels, side) if layer == "fc" else weight.T
        _check(f"{layer}.kernel", kernel.shape, np.shape(like[layer]["kernel"]), "Flax")
        out[layer] = {"kernel": np.ascontiguousarray(kernel)}
        if "bias" in like[layer]:
            bias = state_dict[f"{layer}.bias"].detach().cpu().numpy()
            _check(f"{layer}.bias", bias.shape, np.shape(like[layer]["bias"]), "Flax")
            out[layer]["bias"] = bias.copy()
    return out
