"""The speedrun: a speedrun preset (common/config.py) trained by both frameworks over seeds
0..N-1, in turn (JAX seed 0, PyTorch seed 0, JAX seed 1, ...), so machine noise hits both alike;
with several presets each seed runs them all, one after the other.
Each run starts from a fresh trainer and its clock runs from building the trainer to the end of
its last step, compilation included, as a user's first start pays it. The test set is scored at
points through each epoch, off the clock: the curve, and the time to the preset's target on
both heads."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace

import numpy as np

from bench.paths import make_trainer
from bench.timing import over_budget
from bench.training import epoch_loop, recipe_flags
from common import data as D
from common.config import PRESETS, Config
from common.loop import Position, load_splits, steps_per_epoch
from common.metrics import score

EVALS_PER_EPOCH = 8
TORCH_VARIANTS = ("eager", "compile", "channels_last")  # --speedrun-torch (bench/paths.py makes each)
JAX_VARIANT = "default"  # JaxTrainer as train_jax.py makes it (steps per call: common/config.py:steps_per_call)
QUICK_SEEDS, QUICK_STEPS = 2, 16  # --quick: two seeds, two steps between evaluations
# Each speedrun preset and the test accuracy, digit and sum, that its clock runs to (--speedrun-preset);
# `fast`, the recipe before the speedrun, so the speedrun's gain over it is timed on the same clock.
TARGETS = {"speedrun": 0.99, "speedrun-99.5": 0.995, "fast": 0.99}


def recipe(preset: str, seed: int, torch_device: str) -> Config:
    return replace(Config(), preset=preset, **PRESETS[preset], seed=seed, torch_device=torch_device)


def measure(args: argparse.Namespace, report: dict, torch_device, save: Callable[[], object]) -> None:
    """The speedrun part into report["speedrun"], saved after every run; none starts after three
    quarters of --time-budget. With several presets (--speedrun-preset a,b) each seed runs them
    all in turn, so the ratio of their times is measured side by side: the machine's speed drifts
    between separate runs (docs/results.md, "Speedrun")."""
    presets = args.speedrun_presets
    seeds = range(min(args.seeds, QUICK_SEEDS) if args.quick else args.seeds)
    section = report["speedrun"] = {
        "preset": presets[0], "presets": {p: {"recipe": recipe_flags(recipe(p, 0, "auto")), "target": TARGETS[p]} for p in presets},
        "seeds": len(seeds), "torch_variant": args.speedrun_torch, "evals_per_epoch": EVALS_PER_EPOCH, "quick": args.quick,
        "start": args.speedrun_start, "runs": [], "summary": [], "ratios": []}
    print(f"speedrun (--preset {','.join(presets)}, {len(seeds)} seeds, JAX and PyTorch {args.speedrun_torch} in turn, "
          f"{args.speedrun_start} starts):")
    if args.speedrun_start == "warm":
        fill_compile_cache([recipe(p, 0, str(torch_device)) for p in presets])
    for seed in seeds:
        for preset in presets:
            cfg = recipe(preset, seed, str(torch_device))
            splits = load_splits(cfg)  # off the clock: reading MNIST is no part of training
            for framework, variant in (("jax", JAX_VARIANT), ("torch", args.speedrun_torch)):
                section["runs"].append(run_row(args, seed, preset, framework, variant, cfg, splits, TARGETS[preset]))
                section["summary"] = [summarize(section["runs"], fw, p) for p in presets for fw in ("jax", "torch")]
                section["ratios"] = [ratio(section["runs"], fw, presets[0], p) for p in presets[1:] for fw in ("jax", "torch")]
                save()


def fill_compile_cache(cfgs: list[Config]) -> None:
    """A user's second start: JAX's persistent compilation cache (in a folder of this process's
    own) filled by one untimed run of a few steps of each recipe, so each timed run loads its
    programs from disk (`cold_start` clears only the in-memory caches)."""
    import tempfile

    from jax_impl.train import enable_compile_cache

    enable_compile_cache(folder=tempfile.mkdtemp(prefix="speedrun-jax-cache-"))
    for cfg in cfgs:
        with cold_start("jax"):
            speedrun("jax", JAX_VARIANT, cfg, load_splits(cfg), QUICK_STEPS, TARGETS[cfg.preset])


def run_row(args: argparse.Namespace, seed: int, preset: str, framework: str, variant: str, cfg: Config,
            splits: tuple[D.Split, D.Split], target: float) -> dict:
    """One run's row, or past three quarters of --time-budget the note that it did not run."""
    row = {"seed": seed, "preset": preset, "framework": framework, "variant": variant}
    if over_budget(args, 0.75):
        return {**row, "error": "not run: --time-budget"}
    row.update(speedrun(framework, variant, cfg, splits, QUICK_STEPS if args.quick else None, target))
    print(f"  {preset} {framework:5s} seed {seed}: {describe(row, target)}")
    return row


def eval_stops(steps: int, per_call: int, points: int = EVALS_PER_EPOCH) -> list[int]:
    """The steps after which the test set is scored: `points` through an epoch of `steps`, each
    after a whole call (a call of several steps is not cut, nor a second program compiled for
    a shorter one), the epoch's end last."""
    calls = -(-steps // per_call)
    return sorted({min(steps, per_call * max(1, round(k * calls / points))) for k in range(1, points + 1)} | {steps})


def speedrun(framework: str, variant: str, cfg: Config, splits: tuple[D.Split, D.Split], steps: int | None,
             target: float) -> dict:
    """One run from a fresh trainer and a cold start, its clock started before the trainer is
    built; `steps`: per epoch (None: all)."""
    per_epoch = steps_per_epoch(cfg, len(splits[0]))
    steps = min(steps or per_epoch, per_epoch)
    with cold_start(framework):
        start = time.perf_counter()
        trainer = make_trainer(framework, variant, cfg, splits[0], per_epoch * cfg.epochs)
        curve, compile_s = train_and_score(trainer, cfg, splits, steps, start)
    return result(curve, compile_s, target)


@contextmanager
def cold_start(framework: str) -> Iterator[None]:
    """A run that compiles as a user's first start does: what the runs before it compiled in this
    process is forgotten (JAX's in-memory caches; the benchmark's process keeps no persistent
    one), and torch.compile starts afresh (its state reset: a new model would otherwise count as
    a recompile of the last one, and past its limit run eager) without Inductor's on-disk cache."""
    if framework == "jax":
        import jax

        jax.clear_caches()
        yield
        return
    import torch
    import torch._inductor.config

    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False):
        yield


def train_and_score(trainer, cfg: Config, splits: tuple[D.Split, D.Split], steps: int, start: float) -> tuple[list[dict], float | None]:
    """The run's epochs through the training loop, in pieces between the evaluation points, the
    clock (started at `start`) stopped for each evaluation. Returns the curve and the seconds
    spent compiling on the clock (None: the framework does not say)."""
    train, test = splits
    clock, compile_s, curve = 0.0, None, []
    try:
        loop = epoch_loop(cfg, trainer, train, test)
        for epoch in range(1, loop.epochs + 1):
            done = 0
            for stop in eval_stops(steps, trainer.steps_per_call):
                loop.train_epoch(Position(epoch, done), stop)
                trainer.synchronize()
                clock += time.perf_counter() - start
                compile_s = add(compile_s, trainer.compile_seconds())
                curve.append({"epoch": epoch, "step": stop, "clock_s": clock, **scores(trainer, test)})
                trainer.compile_seconds()  # the evaluation's compiling is off the clock too
                done, start = stop, time.perf_counter()
    finally:
        trainer.close()
    return curve, compile_s


def add(total: float | None, seconds: float | None) -> float | None:
    return total if seconds is None else (total or 0.0) + seconds


def scores(trainer, test: D.Split) -> dict:
    m = score(*trainer.predict(test.images, test.numbers), test.labels, test.numbers)
    return {"test_digit_acc": m["test_digit_acc"], "test_sum_acc": m["test_sum_acc"]}


def result(curve: list[dict], compile_s: float | None, target: float) -> dict:
    """A run's row: the clock at the first point where both heads reach the target (None: never), the
    final scores, the whole curve."""
    reached = next((p for p in curve if min(p["test_digit_acc"], p["test_sum_acc"]) >= target), None)
    return {"compile_s": compile_s, "train_s": curve[-1]["clock_s"],
            "time_to_target_s": None if reached is None else reached["clock_s"],
            "target_at": None if reached is None else {"epoch": reached["epoch"], "step": reached["step"]},
            "final_test_digit_acc": curve[-1]["test_digit_acc"], "final_test_sum_acc": curve[-1]["test_sum_acc"], "curve": curve}


def describe(row: dict, target: float) -> str:
    reached, goal = row["time_to_target_s"], f"{100 * target:.1f}%"
    return (f"{row['train_s']:.2f} s, " + (f"{goal} after {reached:.2f} s" if reached is not None else f"{goal} not reached")
            + f", digit {100 * row['final_test_digit_acc']:.2f}%  sum {100 * row['final_test_sum_acc']:.2f}%")


def summarize(runs: list[dict], framework: str, preset: str) -> dict:
    """One framework's runs of one preset: time to the target over the seeds that reached it
    (mean, sample standard deviation, min, max), compile and training seconds (mean), final
    scores (mean, min)."""
    mine = [r for r in runs if r["framework"] == framework and r["preset"] == preset]
    done = [r for r in mine if "error" not in r]
    reached = [r["time_to_target_s"] for r in done if r["time_to_target_s"] is not None]
    out = {"preset": preset, "framework": framework, "variant": next((r["variant"] for r in mine), None),
           "runs": len(done), "reached": len(reached), **spread("time_to_target_s", reached),
           "compile_s_mean": mean([r["compile_s"] for r in done if r["compile_s"] is not None]),
           "train_s_mean": mean([r["train_s"] for r in done])}
    for head in ("digit", "sum"):
        values = [r[f"final_test_{head}_acc"] for r in done]
        out |= {f"final_test_{head}_acc_mean": mean(values), f"final_test_{head}_acc_min": min(values, default=None)}
    return out


def ratio(runs: list[dict], framework: str, preset: str, baseline: str) -> dict:
    """One framework's training time on `preset` over its time on `baseline`, seed by seed (the
    two ran one after the other), over the seeds where both ran: mean, min, max."""
    times = {(r["preset"], r["seed"]): r["train_s"] for r in runs if r["framework"] == framework and "error" not in r}
    ratios = [times[preset, seed] / times[baseline, seed] for p, seed in times if p == preset and (baseline, seed) in times]
    return {"framework": framework, "preset": preset, "baseline": baseline, "seeds": len(ratios),
            "train_s_ratio_mean": mean(ratios), "train_s_ratio_min": min(ratios, default=None),
            "train_s_ratio_max": max(ratios, default=None)}


def mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def spread(name: str, values: list[float]) -> dict:
    return {f"{name}_mean": mean(values), f"{name}_std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
            f"{name}_min": min(values, default=None), f"{name}_max": max(values, default=None)}
