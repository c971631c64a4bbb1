"""Time to accuracy: each framework trains epoch by epoch until 99.0% test digit and sum, its
epochs run by the training loop itself (`common.loop.EpochLoop.train_epoch`, as `fit` runs
them), timed up to a device synchronisation and evaluated off the clock."""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path

import numpy as np

from bench.machine import device_peaks
from bench.paths import make_trainer, path_config, warm_up
from bench.timing import over_budget
from common import data as D
from common.config import PRESETS, Config, flag
from common.loop import EpochLoop, Position, epoch_plan, load_splits, steps_per_epoch
from common.metrics import score
from common.runlog import NullLog

TARGET = 0.99
QUICK_STEPS = 20  # --quick: the first steps of each epoch

# The recipe of the time-to-99% run on an accelerator. A GPU stays busy with larger batches, so
# fewer, larger steps at a higher learning rate; the digit design, whose sum is right as soon as
# its digit is; no translation (it slows the first epochs); a whole epoch per compiled call.
ACCELERATOR_RECIPE = {k: v for k, v in PRESETS["accelerator"].items() if k != "steps_per_call"}  # common/config.py


def measure(args: argparse.Namespace, report: dict, torch_device, save: Callable[[], object]) -> None:
    """The training part, into `report` (saved after every epoch)."""
    print("training runs (time to 99.0% test digit and sum):")
    runs = training_runs(report["suite"], report.get("results", []), str(torch_device))

    def report_runs(rows: list[dict]) -> None:
        report["time_to_accuracy"] = rows
        report["device_peak_mb"] = device_peaks(torch_device)
        save()

    report_runs(time_to_accuracy(runs, 1 if args.quick else args.max_epochs, args.quick, in_turn=report["suite"] == "cpu",
                                 args=args, report=report_runs))


def recipe_flags(cfg: Config) -> str:
    """The flags of train_*.py that give `cfg` (its fields that differ from the defaults)."""
    default = Config()
    return " ".join(f"{flag(f.name)} {getattr(cfg, f.name)}" for f in fields(cfg)
                    if f.name not in ("torch_device", "preset") and getattr(cfg, f.name) != getattr(default, f.name)) or "(defaults)"


def fastest(results: list[dict], framework: str, batch: int, allowed: tuple[str, ...]) -> str:
    """The variant among `allowed` with the shortest median step at `batch` (the first if none was measured)."""
    rows = [r for r in results if r["framework"] == framework and r["batch_size"] == batch and r["variant"] in allowed and "error" not in r]
    return min(rows, key=lambda r: r["step_ms_median"])["variant"] if rows else allowed[0]


def training_runs(suite: str, results: list[dict], torch_device: str) -> list[dict]:
    """What trains until the target (or through all its epochs): on a CPU both frameworks with
    the default recipe; on an accelerator each framework's fastest variant of the accelerator
    recipe, and JAX's default recipe in fp32 and bf16 (the bf16 accuracy goal)."""
    base = replace(Config(), torch_device=torch_device)
    if suite == "cpu":
        return [{"name": "default", "framework": "jax", "variant": "single_step", "cfg": base, "until_target": True},
                {"name": "default", "framework": "torch", "variant": "eager", "cfg": base, "until_target": True}]
    recipe = replace(base, **ACCELERATOR_RECIPE)
    batch = recipe.batch_size
    return [{"name": "accelerator", "framework": "jax", "cfg": recipe, "until_target": True,
             "variant": fastest(results, "jax", batch, ("epoch_step", "train_step"))},
            {"name": "accelerator", "framework": "torch", "cfg": recipe, "until_target": True,
             "variant": fastest(results, "torch", batch, ("eager", "compile", "compile_cudagraphs"))},
            {"name": "default fp32", "framework": "jax", "variant": "train_step", "cfg": base, "until_target": False},
            {"name": "default bf16", "framework": "jax", "variant": "train_step_bf16", "cfg": base, "until_target": False}]


def epoch_loop(cfg: Config, trainer, train: D.Split, test: D.Split) -> EpochLoop:
    """The training loop of `fit` around `trainer`, for its `train_epoch`: no run folder (the
    trainer saves nothing, and nothing here ends an epoch or logs one)."""
    return EpochLoop(cfg, trainer, len(train), test, NullLog(Path(tempfile.gettempdir())))


def prepare_run(run: dict, max_epochs: int | None, stop: int | None) -> None:
    """Builds the run's trainer and its loop, and compiles and warms it up on a copy of its
    initial state (compile_s), every shape an epoch (up to step `stop`) uses."""
    train, test = load_splits(run["cfg"])
    cfg = run["cfg"] = path_config(run["framework"], run["variant"], run["cfg"].batch_size, run["cfg"], len(train))
    run.update(test=test, train_s=0.0, epochs=[], reached=None, total_epochs=min(max_epochs or cfg.epochs, cfg.epochs))
    run["trainer"] = trainer = make_trainer(run["framework"], run["variant"], cfg, train, steps_per_epoch(cfg, len(train)) * cfg.epochs)
    run["loop"] = epoch_loop(cfg, trainer, train, test)
    batches, shifts = epoch_plan(cfg, len(train), 1)
    batches, shifts = batches[:stop], None if shifts is None else shifts[:stop]
    chunk = trainer.steps_per_call
    start, saved = time.perf_counter(), trainer.snapshot()
    for size in sorted({min(chunk, len(batches) - i) for i in range(0, len(batches), chunk)}):
        warm_up(trainer, batches[:size], None if shifts is None else shifts[:size])
    trainer.synchronize()
    trainer.restore_snapshot(saved)
    run["compile_s"] = time.perf_counter() - start


def train_epoch(run: dict, epoch: int, stop: int | None) -> None:
    """One epoch (up to step `stop`) through the loop, timed up to a device synchronisation, then
    the test set's scores, off the clock."""
    trainer, test = run["trainer"], run["test"]
    start = time.perf_counter()
    run["loop"].train_epoch(Position(epoch), stop)
    trainer.synchronize()
    elapsed = time.perf_counter() - start
    run["train_s"] += elapsed
    m = score(*trainer.predict(test.images, test.numbers), test.labels, test.numbers)
    run["epochs"].append({"epoch": epoch, "epoch_s": elapsed, **m})
    print(f"  {run['framework']:5s} {run['name']:12s} epoch {epoch}: {elapsed:6.2f}s  "
          f"digit {100 * m['test_digit_acc']:.2f}%  sum {100 * m['test_sum_acc']:.2f}%")
    if run["reached"] is None and min(m["test_digit_acc"], m["test_sum_acc"]) >= TARGET:
        run["reached"] = {"epoch": epoch, "train_s": run["train_s"]}


def accuracy_row(run: dict) -> dict:
    """A run's figures so far; `finished` is false while it still trains (or if it was cut)."""
    row = {"name": run["name"], "framework": run["framework"], "variant": run["variant"], "recipe": recipe_flags(run["cfg"]),
           "target": TARGET, "finished": run.get("finished", False)}
    if "not_run" in run:
        return {**row, "error": run["not_run"]}
    if not run.get("epochs"):
        return {**row, "compile_s": run.get("compile_s"), "reached": None, "epochs": []}
    e = run["epochs"]
    return {**row, "compile_s": run["compile_s"], "epoch_wall_s_first": e[0]["epoch_s"],
            "epoch_wall_s_median": float(np.median([x["epoch_s"] for x in e])), "reached": run["reached"],
            "final_test_digit_acc": e[-1]["test_digit_acc"], "final_test_sum_acc": e[-1]["test_sum_acc"], "epochs": e}


def time_to_accuracy(runs: list[dict], max_epochs: int | None, quick: bool, in_turn: bool,
                     args: argparse.Namespace | None = None, report: Callable[[list[dict]], None] = lambda rows: None) -> list[dict]:
    """Trains each run epoch by epoch until the target (or through its epochs). `in_turn` (a
    CPU): every run compiles first, then they train one epoch each in turn, so machine noise hits
    all alike. Otherwise one run after the other, each handed to `report` as it is done, so a cut
    keeps the runs before it; none starts after three quarters of --time-budget. Each compiles
    and warms up on a copy of its initial state (compile_s); the training time counts the steps
    after that, up to a device synchronisation, not data loading or the per-epoch evaluation.
    `report` also gets every epoch's rows. `quick`: the first QUICK_STEPS steps of each epoch."""
    stop = QUICK_STEPS if quick else None
    rows = lambda: [accuracy_row(r) for r in runs]  # noqa: E731
    for group in [runs] if in_turn else [[r] for r in runs]:
        if over_budget(args, 0.75):
            for run in group:
                run["not_run"] = "not run: --time-budget"
            continue
        for run in group:
            prepare_run(run, max_epochs, stop)
        for epoch in range(1, max(r["total_epochs"] for r in group) + 1):
            for run in group:
                if epoch <= run["total_epochs"] and not (run["until_target"] and run["reached"]):
                    train_epoch(run, epoch, stop)
            report(rows())
        for run in group:
            run["finished"] = True
            run["trainer"].close()
        report(rows())
    return rows()
