"""scripts/benchmark.py: --quick runs end to end (in the accelerator check's CPU rehearsal) and
writes every figure (no timing is asserted); the process starts; the accelerator suite's paths
and its time-to-accuracy mechanics, run on the CPU with a small network (the same code a GPU
run takes)."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import jax
import numpy as np
import pytest
import torch

from common import data as D
from common.config import Config
from common.loop import epoch_plan
from scripts import benchmark as B

SMALL = replace(Config(), conv1=4, conv2=8, hidden=16, steps_per_call=4, torch_device="cpu")


@pytest.mark.slow
def test_quick_benchmark_writes_all_figures(accelerator_rehearsal):
    """The rehearsal's benchmark stages: `--part steps --quick --batch-sizes 16` over three paths,
    then `--part training --quick` into the same files (scripts/accelerator_check.sh)."""
    _, _, out = accelerator_rehearsal
    out_json, out_md = out / "benchmark.json", out / "benchmark.md"
    report = json.loads(out_json.read_text())
    assert report["suite"] == "cpu" and report["machine"]["cores"] >= 1
    assert report["machine"]["jax_device"] and report["machine"]["torch_device"] == "cpu"
    assert report["ceilings"]["jax_fp32_gflops_per_s"] > 0 and report["ceilings"]["torch_copy_gb_per_s"] > 0
    assert report["ceilings"]["operands"] == "random normal"
    rows = {(r["framework"], r["variant"]): r for r in report["results"]}
    assert rows.keys() == {("jax", "train_step"), ("jax", "single_step"), ("torch", "eager")}
    for row in rows.values():
        assert row["batch_size"] == 16 and row["step_ms_median"] > 0 and row["images_per_s"] > 0 and row["epoch_s"] > 0
        assert row["gflops_per_s"] > 0 and row["pct_of_matmul_ceiling"] > 0 and row["compile_s"] > 0
        assert row["throughput_vs_torch_eager"] > 0 and row["throughput_vs_torch_best"] > 0
        assert row["precision"] == "fp32 (no TF32 on a CPU)"
    # One count for every row, from the one-step program: XLA's count for the real step, ~0.5 GFLOP at 16.
    assert {r["flops_per_step"] for r in rows.values()} == {rows[("jax", "single_step")]["flops_per_step"]} and rows[("jax", "train_step")]["flops_per_step"] > 1e8
    assert rows[("jax", "train_step")]["device_mb"] > 47  # the training set alone is 47 MB
    assert {(t["framework"], t["name"]) for t in report["time_to_accuracy"]} == {("jax", "default"), ("torch", "default")}
    assert all(t["compile_s"] > 0 and t["epochs"] and t["finished"] for t in report["time_to_accuracy"])
    text = out_md.read_text()
    assert "| jax | train_step | 16 |" in text and "| default | torch | eager |" in text


@pytest.mark.slow
def test_process_starts_are_timed_cold_then_warm():
    """`--part starts --quick`: each trainer's dry run as its own process, JAX's cache empty then warm."""
    starts = {c["run"]: c for c in B.cold_starts(quick=True, device="cpu")}
    assert starts.keys() == {"jax, empty cache", "jax, warm cache", "torch"}
    assert all(c["process_s"] > c["first_epoch_train_s"] > 0 for c in starts.values())
    assert starts["jax, empty cache"]["compile_s"] > starts["jax, warm cache"]["compile_s"] > 0  # the cache saved compiling
    assert starts["torch"]["compile_s"] is None


def small_split(splits, n: int) -> D.Split:
    train, _ = splits
    return D.Split(train.images[:n], train.labels[:n], train.numbers[:n])


@pytest.mark.slow
@pytest.mark.parametrize("framework, variant", [p for p in B.SUITES["accelerator"] if p[1] not in ("compile", "compile_cudagraphs")]
                         + [("torch", "compile_cudagraphs")])
def test_every_accelerator_path_runs_here(splits, framework, variant):
    """Each path of the GPU benchmark builds, warms up and runs its calls on the CPU (a whole
    epoch per call: the 8 steps of a 128-image split). torch.compile's default mode runs in the
    quick benchmark above; with CUDA graphs it is the same compile, graphs skipped on a CPU."""
    split = small_split(splits, 128)
    trainer, run, per_call, first = B.make_path(framework, variant, 16, split, base=SMALL)
    assert per_call == {"epoch_step": 8}.get(variant, SMALL.steps_per_call)
    B.warm_up(trainer, *first)
    run(2 * per_call)
    if framework == "jax":
        assert trainer.call_memory_mb(*first) > 0
        assert {x.dtype.name for x in jax.tree.leaves(trainer.state["params"])} == {"float32"}  # bf16 computes, float32 is kept
    else:
        assert trainer.call_memory_mb(*first) is None  # CUDA memory only
        assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}  # autocast computes in bf16, float32 is kept


def test_flops_per_step_are_one_unrolled_steps_count(splits):
    """A lax.scan's cost analysis counts its body once whatever the trip count, so the count
    comes from a one-step unrolled program: a 4-step unrolled call counts 4 times as much."""
    split = small_split(splits, 128)
    one = B.one_step_cost(16, split, SMALL)["flops_per_step"]
    trainer, _, per_call, first = B.make_path("jax", "train_step", 16, split, base=SMALL)  # unrolled on a CPU
    four = trainer.compiled_call(*first).cost_analysis()
    four = (four[0] if isinstance(four, list) else four)["flops"]
    # 1%: what runs once per call, not per step (the divergence check on the parameters), is a
    # far smaller share of a call than that.
    assert per_call == 4 and four / 4 == pytest.approx(one, rel=0.01)


@pytest.mark.parametrize("framework, variant", [("jax", "epoch_step"), ("torch", "eager")])
def test_a_warm_up_on_a_snapshot_leaves_training_unchanged(splits, framework, variant):
    """The time-to-accuracy runs compile on a copy of the initial state: what they train after
    is exactly what a trainer without the warm-up trains."""
    split = small_split(splits, 256)
    cfg = B.path_config(framework, variant, 16, SMALL, len(split))
    batches, shifts = epoch_plan(cfg, len(split), 1)
    plain = B.make_trainer(framework, variant, cfg, split, 100)
    warmed = B.make_trainer(framework, variant, cfg, split, 100)
    saved = warmed.snapshot()
    B.warm_up(warmed, batches, shifts)
    warmed.restore_snapshot(saved)
    np.testing.assert_array_equal(plain.train_steps(batches, shifts), warmed.train_steps(batches, shifts))


def test_training_runs_pick_the_fastest_variant():
    results = [{"framework": "torch", "variant": v, "batch_size": 512, "step_ms_median": ms}
               for v, ms in (("eager", 3.0), ("compile", 2.0), ("compile_cudagraphs", 1.0))]
    results.append({"framework": "torch", "variant": "compile_cudagraphs", "batch_size": 128, "error": "failed"})
    runs = B.training_runs("accelerator", results, "cuda")
    by_name = {(r["name"], r["framework"]): r for r in runs}
    assert by_name[("accelerator", "torch")]["variant"] == "compile_cudagraphs"
    assert by_name[("accelerator", "jax")]["variant"] == "epoch_step"  # no JAX rows: the first choice
    assert by_name[("default bf16", "jax")]["variant"] == "train_step_bf16"
    recipe = by_name[("accelerator", "jax")]["cfg"]
    assert recipe.batch_size == B.ACCELERATOR_RECIPE["batch_size"] and recipe.torch_device == "cuda"
    assert "--batch-size 512" in B.recipe_flags(recipe) and "--device" not in B.recipe_flags(recipe)


def test_on_a_gpu_the_training_runs_are_written_one_by_one(monkeypatch):
    """The accelerator's order (in_turn=False): each run compiles, trains and is handed over
    before the next starts, so a cut keeps the runs before it; a run past the time budget is
    recorded as not run."""
    runs = [{"name": "small", "framework": fw, "variant": v, "cfg": replace(SMALL, batch_size=16), "until_target": True}
            for fw, v in (("jax", "train_step"), ("torch", "eager"))]
    seen = []
    rows = B.time_to_accuracy(runs, 1, quick=True, in_turn=False, report=lambda r: seen.append([(x["finished"], len(x["epochs"])) for x in r]))
    assert seen[0] == [(False, 1), (False, 0)] and seen[1] == [(True, 1), (False, 0)]  # the JAX run done before PyTorch's starts
    assert seen[-1] == [(True, 1), (True, 1)] and all(r["compile_s"] > 0 for r in rows)
    monkeypatch.setattr(B, "START", float("-inf"))  # the budget long spent
    late = [{**runs[0], "cfg": replace(SMALL, batch_size=16)}]
    assert B.time_to_accuracy(late, 1, quick=True, in_turn=False, args=argparse.Namespace(time_budget=1.0))[0]["error"] == "not run: --time-budget"
