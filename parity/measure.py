"""The parity measurements between jax_impl and torch_ref, shared by the pytest suite and
scripts/parity_report.py. Each function returns the measured difference; callers compare
it to TOLERANCES.

Why these tolerances (float32 throughout, machine epsilon 1.2e-7):
- logits 1e-5 absolute: trained logits reach |20|, where a float32 ulp is 2e-6, and each
  is a sum of ~3,000 products in a different order in XLA and oneDNN (see `forward`).
- loss 1e-6 relative: a mean over the batch of values ~0.05-5, a few ulps.
- gradients, float64: 1e-12 relative to the largest entry of each tensor, on the whole batch.
  This proves the formulas equal on any CPU: float64 rounding is ~1e9 times below float32's,
  so no relu kink is ambiguous and no example needs setting apart.
- gradients, float32: 1e-5 relative to the largest entry of each tensor: backward sums run over
  the whole batch (128 x 28 x 28 positions for conv1), so rounding grows with the sum's length.
  Examples with a unit within rounding of relu's kink are set apart (see `near_relu_kink`).
- one update 1e-6 absolute: Adam's first step moves each weight by ~lr * sign(g), so the
  update's size is set by lr (<= 2e-3) and its error by float32 rounding of m / sqrt(v);
  entries whose gradient is near Adam's eps are set apart (see `one_update`).
- trajectory 1e-9 relative per step, run in float64 by both frameworks: training is
  chaotic here. A 1-ulp (1e-7) nudge of the weights makes the SAME JAX program's per-step
  losses drift apart by 0.4-2% within 200 steps (a gain of ~1e5), so no two float32
  implementations can meet a tight bar, however correct. In float64 the rounding starts at
  ~1e-16, so 200 steps of the same code paths (model, loss, optimiser, learning-rate
  schedule, batches, augmentation) stay below ~1e-11, while any mismatch of formula, even one
  float32 constant (the schedule once gave 6e-7 relative), shows at full size. The float32
  figure is reported next to it.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from common import data as D
from common.config import DESIGNS, PRESETS, Config
from common.loop import epoch_plan
from jax_impl import train as jtrain
from parity.convert import flax_to_torch, torch_to_flax
from torch_ref import train as ttrain
from torch_ref.model import SumNet as TorchSumNet

TOLERANCES = {
    "logits_max_abs_diff": 1e-5,
    "logits_float32_max_abs_err": 2e-5,  # ~10 float32 ulps at |logit| ~ 20 (see `forward`)
    "loss_rel_diff": 1e-6,
    "grad_max_rel_diff": 1e-5,
    "loss_rel_diff_float64": 1e-13,  # float64: a mean of ~128 values, a few ulps of 1.1e-16
    "grad_max_rel_diff_float64": 1e-12,  # float64 rounding over sums of up to ~1e5 terms; 6e-15 measured
    "update_max_abs_diff": 1e-6,
    "trajectory_max_rel_loss_diff": 1e-9,
    # The deep trunk's batch-norm running statistics after the float64 trajectory, relative to
    # each tensor's largest entry: averages of that trajectory's activations, so the same bar.
    "running_stats_max_rel_diff": 1e-9,
    "ema_max_rel_diff": 1e-9,  # --ema's average of the same trajectory's weights: the same bar
    "prediction_agreement": 1.0,  # a minimum: every test prediction the same
}
# The deep trunk's float64 gradients, relative to each tensor's largest entry. Batch norm follows
# each bias-free convolution, so a kernel's gradient is a sum over ~1e5 positions of terms that
# largely cancel (batch norm's backward removes the mean of the gradient, and MNIST's blank
# background is one constant): the result is far smaller than its terms, and its rounding
# relative to it larger than the plain trunk's (1.3e-12 measured, conv1b's kernel).
# A wrong formula (PyTorch's variance rule, say) errs by 1e-3 or more.
DEEP_TOLERANCES = {"grad_max_rel_diff_float64": 1e-11}


def tolerances(trunk: str) -> dict:
    """TOLERANCES, with the deep trunk's own where it has one."""
    return {**TOLERANCES, **(DEEP_TOLERANCES if trunk == "deep" else {})}


WARP_TOLERANCES = {
    # Warped images, in pixel units (0-255). float64: PyTorch's grid_sample takes coordinates
    # scaled to -1..1 and scales them back, ~1e-15 relative at coordinates up to ~40, times a
    # pixel step of up to 255 per pixel: ~1e-11 at most (9e-13 seen). float32: the same with
    # float32's 1.2e-7 and the angle's cosine and sine rounded on each side (8e-4 seen).
    "warp_max_abs_diff_float64": 1e-10,
    "warp_max_abs_diff": 1e-2,
}
PRETRAIN_STEPS = 300  # enough real training that logits are large (|logit| ~ 10-20)
TRAJECTORY_STEPS = 200


@contextlib.contextmanager
def float64():
    """Both frameworks compute in float64 inside this block."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with jax.enable_x64(True):
            yield
    finally:
        torch.set_default_dtype(old)


@contextlib.contextmanager
def exact_float32():
    """float32 computed as float32 on both sides: no TF32 in matmuls and convolutions, which
    NVIDIA GPUs otherwise use (JAX's default precision, PyTorch's for convolutions) and whose
    10-bit mantissa would swamp every float32 tolerance here. On a CPU it changes nothing."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    ttrain.allow_tf32(False)
    try:
        with jax.default_matmul_precision("highest"):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def flax_weights(state: dict) -> dict:
    """A JAX state's model as one Flax pure dict (parity/convert.py's layout): the parameters, and
    the batch statistics where the model has them, merged by layer."""
    weights = {}
    for part in jtrain.model_weights(state).values():
        for layer, values in nnx.to_pure_dict(part).items():
            weights.setdefault(layer, {}).update(jax.tree.map(np.asarray, values))
    return weights


def fill(part: nnx.State, weights: dict) -> None:
    """Sets the entries of `part` (the parameters, or the batch statistics) from `weights` (a
    `flax_weights` dict), in the current float type (float64 in `float64()`)."""
    names = nnx.to_pure_dict(part)
    nnx.replace_by_pure_dict(part, {layer: {name: jnp.asarray(weights[layer][name], float) for name in names[layer]}
                                    for layer in names})


class Pair:
    """A JAX trainer and a PyTorch trainer holding the same Flax-layout `weights` (parameters,
    and batch statistics where the model has them), each with a fresh optimiser whose schedule
    spans `total_steps`."""

    def __init__(self, cfg: Config, train: D.Split, weights: dict, total_steps: int):
        self.cfg = cfg
        self.jax = jtrain.JaxTrainer(cfg, train, total_steps)
        state = self.jax.state
        for part in jtrain.model_weights(state).values():
            fill(part, weights)
        self.jax.state = {**state, "opt_state": self.jax.tx.init(state["params"])}
        if cfg.ema:  # the weight average starts from these weights, as it starts from the initial ones
            self.jax.state["ema"] = jax.tree.map(jnp.copy, jtrain.model_weights(state))
        self.torch = ttrain.TorchTrainer(cfg, train, total_steps)
        self.torch.model.load_state_dict(flax_to_torch(weights, self.torch.model.state_dict()))
        if cfg.ema:
            self.torch.ema.load_state_dict(self.torch.model.state_dict())

    def jax_params(self) -> dict:
        return jax.tree.map(np.asarray, nnx.to_pure_dict(self.jax.state["params"]))

    def jax_weights(self) -> dict:
        return flax_weights(self.jax.state)

    def torch_params_as_flax(self) -> dict:
        return torch_to_flax(self.torch.model.state_dict(), self.jax_params())

    def torch_weights_as_flax(self) -> dict:
        return torch_to_flax(self.torch.model.state_dict(), self.jax_weights())


def pretrained_params(cfg: Config, train: D.Split, steps: int = PRETRAIN_STEPS) -> dict:
    """Flax weights after `steps` real training steps (JAX), so logits are large: the parameters,
    and the batch statistics where the model has them (`flax_weights`)."""
    trainer = jtrain.JaxTrainer(cfg, train, steps)
    for idx in D.epoch_batches(len(train), cfg.batch_size, cfg.seed, 0)[:steps]:
        trainer.train_steps(idx[None])
    return flax_weights(trainer.state)


def trajectory_plan(cfg: Config, n_train: int, steps: int = TRAJECTORY_STEPS) -> tuple[np.ndarray, np.ndarray | None]:
    """The first `steps` batches (and crop offsets) of the real recipe's first epoch."""
    batches, shifts = epoch_plan(cfg, n_train, 1)
    return batches[:steps], None if shifts is None else shifts[:steps]


def warps(cfg: Config, images_u8: np.ndarray, shifts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The warped images (--rotate, --scale, --elastic) of each framework, in pixel units."""
    j = jtrain.warp(jnp.asarray(images_u8), jnp.asarray(shifts), cfg.shift)
    t = ttrain.warp(torch.from_numpy(images_u8), torch.from_numpy(shifts), cfg.shift)
    return np.asarray(j), t.numpy()


def warp_report(train: D.Split) -> dict:
    """The rotation, scaling and elastic distortion of one batch (the digit design's parity
    recipe), both frameworks, float32 and float64; the same for every design, so measured once."""
    cfg = config_for("digit")
    idx, aug = (a[0] for a in trajectory_plan(cfg, len(train)))
    j, t = warps(cfg, train.images[idx], aug)
    with float64():
        j64, t64 = warps(cfg, train.images[idx], aug)
    assert j64.dtype == t64.dtype == np.float64
    return {"warp_max_abs_diff": float(np.abs(j - t).max()), "warp_max_abs_diff_float64": float(np.abs(j64 - t64).max())}


def max_rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def forward(cfg: Config, train: D.Split, params: dict, test: D.Split) -> dict:
    """Logits of both heads on all test pairs, in float32 (the real thing) and float64.

    The float32 logits of trained weights (|logit| ~ 20, where float32 values are 1.9e-6
    apart) are each 7e-6 to 1.03e-5 from the exact (float64) answer, varying from run to
    run (oneDNN picks its kernels by the threads it gets): the fc layer alone sums 3,136
    products, in a different order in XLA and oneDNN. Two such errors can add past 1e-5
    between the frameworks (1.1e-5 seen), so the issue's 1e-5 bar is applied where it
    measures the formula: between the two frameworks in float64 (~1e-14). Each framework's
    float32 logits must be within 2e-5 (~10 ulps) of the exact ones.
    """
    pair = Pair(cfg, train, params, 1)
    j32, t32 = pair.jax.predict(test.images, test.numbers), pair.torch.predict(test.images, test.numbers)
    with float64():
        pair64 = Pair(cfg, train, params, 1)
        j64, t64 = pair64.jax.predict(test.images, test.numbers), pair64.torch.predict(test.images, test.numbers)

    def max_abs(a, b):
        return float(max(np.abs(a[0] - b[0]).max(), np.abs(a[1] - b[1]).max()))

    return {
        "logits_max_abs_diff": max_abs(j64, t64),
        "logits_float32_max_abs_err": max(max_abs(j32, t64), max_abs(t32, t64)),
        "logits_max_abs_diff_float32": max_abs(j32, t32),
        "prediction_agreement": float(((j32[0].argmax(1) == t32[0].argmax(1)) & (j32[1].argmax(1) == t32[1].argmax(1))).mean()),
        "max_abs_logit": float(max(np.abs(t32[0]).max(), np.abs(t32[1]).max())),
    }


def _jax_loss_and_grads(cfg: Config, weights: dict, images: np.ndarray, numbers: np.ndarray, labels: np.ndarray):
    """The loss and the parameters' gradients in training mode (batch norm on the batch's statistics)."""
    graphdef, params, rest = nnx.split(jtrain.init_model(cfg), nnx.Param, ...)
    for part in (params, rest):
        fill(part, weights)

    def loss_of(p):
        return jtrain.loss_fn(nnx.merge(graphdef, p, rest, copy=True), jtrain.preprocess(jnp.asarray(images)),
                              jnp.asarray(numbers), jnp.asarray(labels), cfg.label_smoothing, cfg.sum_weight)

    loss, grads = jax.value_and_grad(loss_of)(params)
    return float(loss), jax.tree.map(np.asarray, nnx.to_pure_dict(grads))


KINK_MARGIN = 1e-5  # relative to the layer's largest |pre-activation|: 30x float32's error there (3e-7 measured)


def near_relu_kink(cfg: Config, params: dict, images: np.ndarray, numbers: np.ndarray) -> np.ndarray:
    """Which examples have a pre-activation within float32 rounding of relu's kink at 0.

    Such a unit is on in one computation and off in another, equally correct one: one unit
    at 3e-7 (float64) came out -1.3e-8 in JAX's float32 and switched its gradient off, moving
    conv2's kernel gradient by 1.2% of its largest entry. Measured in float64 with forward
    hooks on the torch model: relu reads the pooled conv outputs, fc's output and the adder's.
    """
    with float64():
        model = TorchSumNet(cfg)
        model.load_state_dict(flax_to_torch(params, model.state_dict()))
        taken = []
        pool = lambda out: torch.nn.functional.max_pool2d(out, 2)  # noqa: E731  relu(pool(x)) == pool(relu(x))
        for name in ("conv1", "conv2", "fc", "adder"):
            if hasattr(model, name):
                post = pool if name.startswith("conv") else (lambda out: out)
                getattr(model, name).register_forward_hook(lambda m, i, out, post=post: taken.append(post(out)))
        with torch.no_grad():
            model(ttrain.preprocess(torch.from_numpy(images)), torch.from_numpy(numbers).long())
    near = np.zeros(len(images), bool)
    for pre in taken:
        pre = pre.flatten(1).numpy()
        near |= (np.abs(pre) < KINK_MARGIN * np.abs(pre).max()).any(axis=1)
    return near


def loss_and_grads(pair: Pair, train: D.Split, idx: np.ndarray, set_apart_kinks: bool = True) -> dict:
    """Loss and every parameter's gradient on one real batch, compared in Flax layout.
    In float32, examples with a unit at relu's kink (`near_relu_kink`) are set apart and
    counted; in float64 (`set_apart_kinks=False`) no kink is ambiguous and the whole batch counts."""
    near = (near_relu_kink(pair.cfg, pair.jax_params(), train.images[idx], train.numbers[idx]) if set_apart_kinks
            else np.zeros(len(idx), bool))
    idx = idx[~near]
    images, numbers, labels = train.images[idx], train.numbers[idx], train.labels[idx]
    j_loss, j_grads = _jax_loss_and_grads(pair.cfg, pair.jax_weights(), images, numbers, labels)
    model = pair.torch.model
    model.train()  # batch norm on the batch's statistics, as in JAX's training step
    model.zero_grad(set_to_none=True)
    on_device = lambda a: torch.from_numpy(a).to(pair.torch.device)  # noqa: E731  the trainer's device
    t_loss = ttrain.loss_fn(model, ttrain.preprocess(on_device(images)), on_device(numbers).long(),
                            on_device(labels).long(), pair.cfg.label_smoothing, pair.cfg.sum_weight)
    t_loss.backward()
    t_grads = torch_to_flax({k: p.grad for k, p in model.named_parameters()}, j_grads)
    per_param = {f"{layer}.{kind}": max_rel(j_grads[layer][kind], t_grads[layer][kind])
                 for layer in j_grads for kind in j_grads[layer]}
    return {"loss_rel_diff": abs(j_loss - t_loss.item()) / abs(t_loss.item()),
            "grad_max_rel_diff": max(per_param.values()), "grad_rel_diff_per_param": per_param,
            "examples_compared": int(len(idx)), "examples_near_relu_kink": int(near.sum())}


ADAM_EPS = 1e-8
WELL_CONDITIONED_GRAD = 100 * ADAM_EPS


def one_update(pair: Pair, idx: np.ndarray, shifts: np.ndarray | None) -> dict:
    """One optimiser step of each framework's real training path from the same weights.

    Adam's first step moves a weight by lr * g / (|g| + eps). Where |g| is near eps (1e-8)
    that is hypersensitive: the gradients' float32 rounding (about 1e-6 of each tensor's
    largest entry, ~1e-9 absolute) changes such a step by percents of lr, in any two correct
    implementations. So the figure is taken over entries with |g| >= 100 * eps (sensitivity
    below 1%) or exactly 0 (no step at all), over 90% of all; the rest are reported beside it.
    """
    images = train_images = pair.jax.dataset["images"]
    images = np.asarray(train_images[idx] if shifts is None else jtrain.augment(train_images[idx], jnp.asarray(shifts), pair.cfg.shift))
    _, grads = _jax_loss_and_grads(pair.cfg, pair.jax_weights(), images, np.asarray(pair.jax.dataset["numbers"][idx]),
                                   np.asarray(pair.jax.dataset["labels"][idx]))
    before = pair.jax_params()
    step_shifts = None if shifts is None else shifts[None]
    pair.jax.train_steps(idx[None], step_shifts)
    pair.torch.train_steps(idx[None], step_shifts)
    j, t = pair.jax_params(), pair.torch_params_as_flax()
    # g == 0 exactly (inputs that ReLU switched off) gives no step in either framework: well-conditioned too.
    diffs = [(np.abs(j[l][k] - t[l][k]), (np.abs(grads[l][k]) >= WELL_CONDITIONED_GRAD) | (grads[l][k] == 0))
             for l in j for k in j[l]]
    return {"update_max_abs_diff": max(float(d[ok].max(initial=0)) for d, ok in diffs),
            "update_max_abs_diff_near_eps": max(float(d[~ok].max(initial=0)) for d, ok in diffs),
            "update_entries_near_eps": int(sum((~ok).sum() for _, ok in diffs)),
            "update_entries": int(sum(ok.size for _, ok in diffs)),
            "update_max_abs_step": max(float(np.abs(j[l][k] - before[l][k]).max()) for l in j for k in j[l])}


def trajectory(pair: Pair, batches: np.ndarray, shifts: np.ndarray | None) -> dict:
    """Both real training paths for len(batches) steps on the same batches (and augmentation),
    JAX with as many steps per compiled call as train_jax.py would take here."""
    steps_per_call = pair.jax.steps_per_call
    start = pair.jax_params()
    j_losses = np.concatenate([pair.jax.train_steps(batches[i : i + steps_per_call],
                                                    None if shifts is None else shifts[i : i + steps_per_call])
                               for i in range(0, len(batches), steps_per_call)])
    t_losses = pair.torch.train_steps(batches, shifts)
    rel = np.abs(j_losses - t_losses) / np.abs(t_losses)
    moved = max(float(np.abs(after - before).max() / np.abs(before).max())
                for after, before in zip(jax.tree.leaves(pair.jax_params()), jax.tree.leaves(start)))
    report = {"trajectory_max_rel_loss_diff": float(rel.max()), "trajectory_first_loss": float(t_losses[0]),
              "trajectory_final_loss": float(t_losses[-1]), "trajectory_weights_moved": moved}
    if "batch_stats" in pair.jax.state:  # batch norm's running statistics after these steps
        j, t = pair.jax_weights(), pair.torch_weights_as_flax()
        report["running_stats_max_rel_diff"] = max(max_rel(j[layer][name], t[layer][name])
                                                   for layer in j for name in ("mean", "var") if name in j[layer])
    if "ema" in pair.jax.state:  # the weight average, parameters and statistics
        j = flax_weights(pair.jax.state["ema"])
        t = torch_to_flax(pair.torch.ema.state_dict(), j)
        report["ema_max_rel_diff"] = max(max_rel(j[layer][name], t[layer][name]) for layer in j for name in j[layer])
    return report


def structure(cfg: Config) -> dict:
    """Parameter counts and shapes (in Flax layout) and output shapes for several batch sizes."""
    flax_model = jtrain.init_model(cfg)
    torch_model = ttrain.SumNet(cfg)
    flax_params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(flax_model, nnx.Param)))
    mapped = torch_to_flax(torch_model.state_dict(), flax_params)  # raises on any shape mismatch
    outputs = {}
    for n in (1, 7, 128):
        images = np.zeros((n, 28, 28, 1), np.float32)
        numbers = np.arange(n) % 10
        jd, js = flax_model(jnp.asarray(images), jnp.asarray(numbers, jnp.int32))
        td, ts = torch_model(torch.zeros(n, 1, 28, 28), torch.from_numpy(numbers).long())
        outputs[n] = {"jax": (jd.shape, js.shape), "torch": (tuple(td.shape), tuple(ts.shape))}
    return {
        "flax_param_count": sum(v.size for layer in flax_params.values() for v in layer.values()),
        "torch_param_count": sum(p.numel() for p in torch_model.parameters()),
        "flax_shapes": {f"{l}.{k}": v.shape for l in flax_params for k, v in flax_params[l].items()},
        "mapped_shapes": {f"{l}.{k}": v.shape for l in mapped for k, v in mapped[l].items()},
        "outputs": outputs,
    }


@exact_float32()
def full_report(cfg: Config, train: D.Split, test: D.Split, pretrain_steps: int = PRETRAIN_STEPS,
                total: int = TRAJECTORY_STEPS) -> dict:
    """Checks 1-5 for one design; returns every measured figure. Fewer steps (the accelerator
    check's CPU rehearsal) run the same checks on smaller logits and a shorter trajectory.
    The deep trunk has no float32 gradient or one-step figure. Batch norm centres every
    pre-activation on relu's kink, so many units sit within float32 rounding of it, and it
    normalises each example by the whole batch's statistics, so the examples holding such a
    unit cannot be set apart without changing every other example's gradient. On the whole
    batch a flipped unit moved conv1's float32 kernel gradient by 3e-4 of its largest entry,
    and Adam's first step turned some small entries the other way (4e-4 apart, twice the
    step). The float64 figures compare the formulas on the whole batch, and the float64
    trajectory the steps."""
    params = pretrained_params(cfg, train, pretrain_steps)
    batches, shifts = trajectory_plan(cfg, len(train), total)
    report = {"design": cfg.design, "trunk": cfg.trunk}
    report.update(forward(cfg, train, params, test))
    if cfg.trunk == "plain":  # float32 gradients and one float32 step: not for batch norm (below)
        report.update(loss_and_grads(Pair(cfg, train, params, total), train, batches[0]))
    with float64():
        exact = loss_and_grads(Pair(cfg, train, params, total), train, batches[0], set_apart_kinks=False)
    report["loss_rel_diff_float64"], report["grad_max_rel_diff_float64"] = exact["loss_rel_diff"], exact["grad_max_rel_diff"]
    if cfg.trunk == "plain":
        report.update(one_update(Pair(cfg, train, params, total), batches[0], None if shifts is None else shifts[0]))
    with float64():
        report.update(trajectory(Pair(cfg, train, params, total), batches, shifts))
    float32 = trajectory(Pair(cfg, train, params, total), batches, shifts)
    report["trajectory_max_rel_loss_diff_float32"] = float32["trajectory_max_rel_loss_diff"]
    s = structure(cfg)
    report["param_count"] = s["torch_param_count"]
    report["structure_ok"] = (s["flax_param_count"] == s["torch_param_count"] and s["flax_shapes"] == s["mapped_shapes"]
                              and all(o["jax"] == o["torch"] for o in s["outputs"].values()))
    return report


def failures(report: dict) -> list[str]:
    # A figure only some cases have (batch norm's statistics, the weight average; the plain
    # trunk's float32 gradients and step) is judged where it is.
    bad = [f"{k} = {report[k]:.3g} > {tol:g}" for k, tol in tolerances(report["trunk"]).items()
           if k != "prediction_agreement" and k in report and report[k] > tol]
    if report["prediction_agreement"] < TOLERANCES["prediction_agreement"]:
        bad.append(f"prediction_agreement = {report['prediction_agreement']:.5f} < 1")
    if not report["structure_ok"]:
        bad.append("structure differs")
    return bad


# Every design is checked with the default translation (--shift 2); the digit design, the best
# recipe's, with rotation, scaling and elastic distortion on top, so each augmentation path is in
# every check.
AUGMENTATION = {"digit": {"rotate": 15.0, "scale": 0.15, "elastic": 2.5}}


# What is checked: every design, and the model options beside them, each as a design is. The
# speedrun preset's model and recipe (5x5 then 3x3 unpadded convolutions, Adam's betas, label
# smoothing, the sum weight), unpadded 3x3 then 5x5 convolutions, whose feature maps have odd
# sides (26, then 9) that the pools cut as PyTorch's do, and the deep trunk.
CASES: dict[str, dict] = {
    **{design: {"design": design} for design in DESIGNS},
    "speedrun": dict(PRESETS["speedrun"]),
    "valid_3_5": {"design": "digit", "kernel1": 3, "kernel2": 5, "padding": "valid"},
    # The deep trunk with batch norm, and the weight average (a decay that moves it well within
    # the trajectory's steps).
    "deep": {"design": "digit", "trunk": "deep", "ema": 0.99},
}


def config_for(case: str, **overrides) -> Config:
    """The Config a parity case checks: a design's name, or another key of CASES."""
    return replace(Config(), **{**CASES[case], **AUGMENTATION.get(case, {}), **overrides})
