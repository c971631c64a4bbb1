"""scripts/benchmark.py and its pieces (bench/): --quick runs end to end (in the accelerator
check's CPU rehearsal) and writes every figure (no timing is asserted); the process starts; the
accelerator suite's paths and its time-to-accuracy mechanics, run on the CPU with a small network
(the same code a GPU run takes); the speedrun, end to end in its --quick form."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from bench import paths, speedrun, starts, timing, training
from common import data as D
from common.config import PRESETS, Config
from common.loop import GUESSING, Position, epoch_plan, steps_per_epoch
from common.metrics import score

ROOT = Path(__file__).resolve().parents[1]
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
    by_run = {c["run"]: c for c in starts.cold_starts(quick=True, device="cpu")}
    assert by_run.keys() == {"jax, empty cache", "jax, warm cache", "torch"}
    assert all(c["process_s"] > c["first_epoch_train_s"] > 0 for c in by_run.values())
    assert by_run["jax, empty cache"]["compile_s"] > by_run["jax, warm cache"]["compile_s"] > 0  # the cache saved compiling
    assert by_run["torch"]["compile_s"] is None


def small_split(splits, n: int) -> D.Split:
    train, _ = splits
    return D.Split(train.images[:n], train.labels[:n], train.numbers[:n])


@pytest.mark.slow
@pytest.mark.parametrize("framework, variant", [p for p in paths.SUITES["accelerator"] if p[1] not in ("compile", "compile_cudagraphs")]
                         + [("torch", "compile_cudagraphs")])
def test_every_accelerator_path_runs_here(splits, framework, variant):
    """Each path of the GPU benchmark builds, warms up and runs its calls on the CPU (a whole
    epoch per call: the 8 steps of a 128-image split). torch.compile's default mode runs in the
    quick benchmark above; with CUDA graphs it is the same compile, graphs skipped on a CPU."""
    split = small_split(splits, 128)
    trainer, run, per_call, first = paths.make_path(framework, variant, 16, split, base=SMALL)
    assert per_call == {"epoch_step": 8}.get(variant, SMALL.steps_per_call)
    paths.warm_up(trainer, *first)
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
    one = paths.one_step_cost(16, split, SMALL)["flops_per_step"]
    trainer, _, per_call, first = paths.make_path("jax", "train_step", 16, split, base=SMALL)  # unrolled on a CPU
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
    cfg = paths.path_config(framework, variant, 16, SMALL, len(split))
    batches, shifts = epoch_plan(cfg, len(split), 1)
    plain = paths.make_trainer(framework, variant, cfg, split, 100)
    warmed = paths.make_trainer(framework, variant, cfg, split, 100)
    saved = warmed.snapshot()
    paths.warm_up(warmed, batches, shifts)
    warmed.restore_snapshot(saved)
    np.testing.assert_array_equal(plain.train_steps(batches, shifts), warmed.train_steps(batches, shifts))


def test_training_runs_pick_the_fastest_variant():
    results = [{"framework": "torch", "variant": v, "batch_size": 512, "step_ms_median": ms}
               for v, ms in (("eager", 3.0), ("compile", 2.0), ("compile_cudagraphs", 1.0))]
    results.append({"framework": "torch", "variant": "compile_cudagraphs", "batch_size": 128, "error": "failed"})
    runs = training.training_runs("accelerator", results, "cuda")
    by_name = {(r["name"], r["framework"]): r for r in runs}
    assert by_name[("accelerator", "torch")]["variant"] == "compile_cudagraphs"
    assert by_name[("accelerator", "jax")]["variant"] == "epoch_step"  # no JAX rows: the first choice
    assert by_name[("default bf16", "jax")]["variant"] == "train_step_bf16"
    recipe = by_name[("accelerator", "jax")]["cfg"]
    assert recipe.batch_size == training.ACCELERATOR_RECIPE["batch_size"] and recipe.torch_device == "cuda"
    assert "--batch-size 512" in training.recipe_flags(recipe) and "--device" not in training.recipe_flags(recipe)


def test_on_a_gpu_the_training_runs_are_written_one_by_one(monkeypatch):
    """The accelerator's order (in_turn=False): each run compiles, trains and is handed over
    before the next starts, so a cut keeps the runs before it; a run past the time budget is
    recorded as not run."""
    runs = [{"name": "small", "framework": fw, "variant": v, "cfg": replace(SMALL, batch_size=16), "until_target": True}
            for fw, v in (("jax", "train_step"), ("torch", "eager"))]
    seen = []
    rows = training.time_to_accuracy(runs, 1, quick=True, in_turn=False, report=lambda r: seen.append([(x["finished"], len(x["epochs"])) for x in r]))
    assert seen[0] == [(False, 1), (False, 0)] and seen[1] == [(True, 1), (False, 0)]  # the JAX run done before PyTorch's starts
    assert seen[-1] == [(True, 1), (True, 1)] and all(r["compile_s"] > 0 for r in rows)
    monkeypatch.setattr(timing, "START", float("-inf"))  # the budget long spent
    late = [{**runs[0], "cfg": replace(SMALL, batch_size=16)}]
    assert training.time_to_accuracy(late, 1, quick=True, in_turn=False, args=argparse.Namespace(time_budget=1.0))[0]["error"] == "not run: --time-budget"


def test_a_time_to_accuracy_epoch_trains_the_epoch_plans_steps(splits):
    """Built and warmed up on a snapshot (prepare_run), then trained through the training loop
    and cut at `stop` as --quick cuts it: the model is exactly one that ran the epoch plan's
    first steps directly, and the epoch's scores are that model's."""
    run = {"name": "small", "framework": "torch", "variant": "eager", "cfg": replace(SMALL, batch_size=16), "until_target": True}
    training.prepare_run(run, 1, stop=8)
    training.train_epoch(run, 1, stop=8)
    train, test = splits
    cfg = run["cfg"]
    direct = paths.make_trainer("torch", "eager", cfg, train, steps_per_epoch(cfg, len(train)) * cfg.epochs)
    batches, shifts = epoch_plan(cfg, len(train), 1)
    direct.train_steps(batches[:8], shifts[:8])
    expected = score(*direct.predict(test.images, test.numbers), test.labels, test.numbers)
    assert run["epochs"] == [{"epoch": 1, "epoch_s": run["epochs"][0]["epoch_s"], **expected}]


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_scoring_between_the_speedruns_pieces_leaves_its_training_unchanged(splits, framework):
    """The speedrun trains each epoch in pieces through the loop and scores the test set between
    them: the steps and the final predictions are exactly those of one uninterrupted epoch."""
    split, test = small_split(splits, 256), splits[1]
    test = D.Split(test.images[:500], test.labels[:500], test.numbers[:500])
    cfg = replace(SMALL, batch_size=16, steps_per_call=1)  # one program: JAX's warm start would mix in a second
    whole, pieces = (paths.make_trainer(framework, "default" if framework == "jax" else "eager", cfg, split, 100) for _ in range(2))
    losses = training.epoch_loop(cfg, whole, split, test).train_epoch(Position(1))
    loop, done, pieced = training.epoch_loop(cfg, pieces, split, test), 0, []
    for stop in speedrun.eval_stops(len(losses), pieces.steps_per_call, points=3):
        pieced += loop.train_epoch(Position(1, done), stop)
        speedrun.scores(pieces, test)
        done = stop
    np.testing.assert_array_equal(losses, pieced)
    for a, b in zip(whole.predict(test.images, test.numbers), pieces.predict(test.images, test.numbers)):
        np.testing.assert_array_equal(a, b)


def test_the_evaluation_points_split_an_epoch_into_whole_calls():
    assert speedrun.eval_stops(16, 1) == [2, 4, 6, 8, 10, 12, 14, 16]
    assert speedrun.eval_stops(3, 1) == [1, 2, 3]  # fewer steps than points: each step once
    stops = speedrun.eval_stops(234, 16)  # 16 steps per call (an accelerator): a short last call only at the end
    assert len(stops) == 8 and stops[-1] == 234 and all(s % 16 == 0 for s in stops[:-1])
    assert speedrun.eval_stops(234, 1)[:2] == [29, 58] and len(speedrun.eval_stops(234, 1)) == 8


def test_channels_last_trains_what_eager_trains(splits):
    """--speedrun-torch channels_last: the same steps in the NHWC layout (weights and Adam's
    moments included). Tolerance 1e-5 relative on the losses: another layout sums the
    convolutions in another order, about 1e-7 relative over these 16 steps; a layout mistake
    (the fc layer reading features in another order) changes the loss in the first digits."""
    split = small_split(splits, 256)
    cfg = replace(SMALL, batch_size=16, kernel1=5, padding="valid")
    batches, shifts = epoch_plan(cfg, len(split), 1)
    eager, nhwc = (paths.make_trainer("torch", v, cfg, split, 100) for v in ("eager", "channels_last"))
    np.testing.assert_allclose(nhwc.train_steps(batches, shifts), eager.train_steps(batches, shifts), rtol=1e-5)
    assert nhwc.model.conv2.weight.is_contiguous(memory_format=torch.channels_last)


def test_a_run_reaches_the_target_where_both_heads_first_reach_it():
    """The clock of the first point where the lower head is at or above the preset's target:
    99.0% and 99.5% read the same curve at different points."""
    curve = [{"epoch": 1, "step": step, "clock_s": clock, "test_digit_acc": digit, "test_sum_acc": summ}
             for step, clock, digit, summ in [(10, 1.0, 0.991, 0.989), (20, 2.0, 0.992, 0.990), (30, 3.0, 0.996, 0.994),
                                              (40, 4.0, 0.995, 0.995), (50, 5.0, 0.993, 0.996)]]
    at_99, at_995 = (speedrun.result(curve, 0.5, target) for target in (0.99, 0.995))
    assert (at_99["time_to_target_s"], at_99["target_at"]) == (2.0, {"epoch": 1, "step": 20})
    assert (at_995["time_to_target_s"], at_995["target_at"]) == (4.0, {"epoch": 1, "step": 40})
    assert at_995["final_test_digit_acc"] == 0.993 and at_995["train_s"] == 5.0
    never = speedrun.result(curve[:2], None, 0.995)
    assert never["time_to_target_s"] is None and never["target_at"] is None


def test_every_speedrun_preset_is_a_preset_with_a_target_above_a_guess():
    for preset, target in speedrun.TARGETS.items():
        cfg = speedrun.recipe(preset, 3, "cpu").validate()
        assert cfg.preset == preset and cfg.seed == 3 and 0.9 < target < 1


def test_a_presets_time_is_compared_with_anothers_seed_by_seed():
    """The ratio of training times pairs the runs of one seed, and leaves out seeds where one of
    the two did not run (the time budget)."""
    runs = [{"seed": 0, "preset": "speedrun", "framework": "jax", "train_s": 4.0},
            {"seed": 0, "preset": "fast", "framework": "jax", "train_s": 10.0},
            {"seed": 0, "preset": "fast", "framework": "torch", "train_s": 1.0},
            {"seed": 1, "preset": "speedrun", "framework": "jax", "train_s": 3.0},
            {"seed": 1, "preset": "fast", "framework": "jax", "train_s": 5.0},
            {"seed": 2, "preset": "speedrun", "framework": "jax", "train_s": 1.0},
            {"seed": 2, "preset": "fast", "framework": "jax", "error": "not run: --time-budget"}]
    r = speedrun.ratio(runs, "jax", "speedrun", "fast")
    assert (r["seeds"], r["train_s_ratio_min"], r["train_s_ratio_max"]) == (2, 0.4, 0.6)
    assert r["train_s_ratio_mean"] == pytest.approx(0.5)
    assert speedrun.ratio(runs, "torch", "speedrun", "fast")["seeds"] == 0


@pytest.fixture(scope="module")
def quick_speedrun(tmp_path_factory) -> tuple[dict, Path]:
    """`benchmark.py --parts speedrun --quick --speedrun-preset speedrun-99.5,fast`: 2 seeds, 16
    steps an epoch, each seed both presets in turn, on the real MNIST, cold starts. The
    accelerator check's rehearsal runs the speedrun preset from a warm cache
    (tests/test_accelerator_check.py)."""
    out = tmp_path_factory.mktemp("speedrun")
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--parts", "speedrun", "--quick",
                           "--speedrun-preset", "speedrun-99.5,fast", "--json", str(out / "sr.json"), "--markdown", str(out / "sr.md")],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "sr.json").read_text()), out


@pytest.mark.slow
def test_the_speedrun_alternates_the_frameworks_and_presets_seed_by_seed(quick_speedrun):
    report, _ = quick_speedrun
    section = report["speedrun"]
    assert [(r["seed"], r["preset"], r["framework"], r["variant"]) for r in section["runs"]] == [
        (seed, preset, framework, variant) for seed in (0, 1) for preset in ("speedrun-99.5", "fast")
        for framework, variant in (("jax", "default"), ("torch", "channels_last"))]
    assert section["preset"] == "speedrun-99.5" and section["seeds"] == 2 and section["quick"]
    assert {p: v["target"] for p, v in section["presets"].items()} == {"speedrun-99.5": 0.995, "fast": 0.99}
    assert section["start"] == "cold"
    recipe = section["presets"]["speedrun-99.5"]["recipe"]
    assert "--batch-size 256" in recipe and "--seed" not in recipe
    assert "--epochs 2" in section["presets"]["fast"]["recipe"]
    assert "results" not in report and "time_to_accuracy" not in report  # the other parts did not run


@pytest.mark.slow
def test_each_speedrun_curve_runs_forward_on_its_own_clock(quick_speedrun):
    """Eight scored points over each epoch's 16 steps, through every epoch of the preset; the
    clock rises between them and ends at the run's training time; JAX counts its compiling (a
    cold start compiles), PyTorch eager says nothing; the target is not reached in these few
    steps, yet every run learned (its digit head scores above twice a guess's accuracy)."""
    for run in report_runs(quick_speedrun):
        curve, epochs = run["curve"], PRESETS[run["preset"]]["epochs"]
        assert [(p["epoch"], p["step"]) for p in curve] == [(e, s) for e in range(1, epochs + 1) for s in range(2, 17, 2)]
        clocks = [p["clock_s"] for p in curve]
        assert 0 < clocks[0] and all(a < b for a, b in zip(clocks, clocks[1:])) and run["train_s"] == clocks[-1]
        # Above 85% after these few steps on these recipes (86-90% here), far from the bound.
        assert run["final_test_digit_acc"] == curve[-1]["test_digit_acc"] > GUESSING
        assert run["time_to_target_s"] is None and run["target_at"] is None
        assert (run["compile_s"] > 0) if run["framework"] == "jax" else run["compile_s"] is None


def report_runs(quick_speedrun) -> list[dict]:
    return quick_speedrun[0]["speedrun"]["runs"]


@pytest.mark.slow
def test_the_speedrun_summary_counts_every_seed_of_every_preset(quick_speedrun):
    summary = {(s["preset"], s["framework"]): s for s in quick_speedrun[0]["speedrun"]["summary"]}
    assert summary.keys() == {(p, f) for p in ("speedrun-99.5", "fast") for f in ("jax", "torch")}
    for (preset, framework), s in summary.items():
        runs = [r for r in report_runs(quick_speedrun) if r["framework"] == framework and r["preset"] == preset]
        assert s["runs"] == 2 and s["reached"] == 0 and s["time_to_target_s_mean"] is None
        assert s["final_test_sum_acc_min"] == min(r["final_test_sum_acc"] for r in runs)
        assert s["train_s_mean"] == pytest.approx(np.mean([r["train_s"] for r in runs]))


@pytest.mark.slow
def test_the_first_presets_time_is_compared_with_the_others(quick_speedrun):
    ratios = {r["framework"]: r for r in quick_speedrun[0]["speedrun"]["ratios"]}
    assert ratios.keys() == {"jax", "torch"}
    for framework, r in ratios.items():
        times = {(x["preset"], x["seed"]): x["train_s"] for x in report_runs(quick_speedrun) if x["framework"] == framework}
        expected = [times["speedrun-99.5", seed] / times["fast", seed] for seed in (0, 1)]
        assert (r["preset"], r["baseline"], r["seeds"]) == ("speedrun-99.5", "fast", 2)
        assert r["train_s_ratio_mean"] == pytest.approx(np.mean(expected)) and r["train_s_ratio_min"] == min(expected)


@pytest.mark.slow
def test_the_speedrun_plot_is_a_png_beside_the_markdown(quick_speedrun):
    report, out = quick_speedrun
    plot = out / "sr-speedrun.png"
    assert report["speedrun"]["plot"] == str(plot) and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "sr.md").read_text()
    assert "](sr-speedrun.png)" in text and "| 1 | torch | channels_last |" in text and "| jax | default | 0 of 2 |" in text
    assert "`--preset speedrun-99.5`" in text and "reached 99.5% digit and sum" in text
    assert "`--preset fast`" in text and "reached 99.0% digit and sum" in text
    assert "| jax | `fast` | 2 |" in text  # the ratio table
