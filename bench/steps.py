"""Step times: every path of the suite at each batch size, measured in rounds that alternate
between them so machine noise hits all alike; then each row's share of the ceilings."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import replace

from bench import children
from bench.machine import ceilings, record_torch_peak
from bench.paths import SUITES, make_path, one_step_cost, precision_of, warm_up
from bench.timing import over_budget, per_call_times, summary
from common import data as D
from common.errors import UserError

# The accelerator's first batch size is the accelerator recipe's, so a cut run keeps it.
BATCH_SIZES = {"cpu": "32,128,512", "accelerator": "512,128,2048,8192"}
# torch.compile recompiles for every batch size (dynamic=False), each time for tens of seconds:
# on an accelerator only where the goals and the recipes are measured.
COMPILED_BATCHES = (128, 512)


def chosen_paths(suite: str, only: str | None) -> list[tuple[str, str]]:
    """The suite's paths (on a CPU with the 2-device one), or those named in --only."""
    paths = SUITES[suite] + ([("jax", "train_step_2dev")] if suite == "cpu" else [])
    if only is None:
        return paths
    wanted = set(only.split(","))
    unknown = wanted - {variant for _, variant in paths}
    if unknown:
        raise UserError(f"--only: no variant {', '.join(sorted(unknown))} here; choose from {', '.join(v for _, v in paths)}")
    return [p for p in paths if p[1] in wanted]


def skipped_path(args: argparse.Namespace, suite: str, variant: str, batch: int) -> bool:
    """Paths measured elsewhere or not at this batch size."""
    if variant == "train_step_2dev":  # in a child process of its own, after the others
        return True
    return suite == "accelerator" and variant.startswith("compile") and batch not in COMPILED_BATCHES and not args.quick


def measure(args: argparse.Namespace, report: dict, batch_sizes: list[int], torch_device, train: D.Split,
            save: Callable[[], object]) -> None:
    """The steps part: the ceilings, then the step rows, into `report` (saved as each batch size is done)."""
    suite = report["suite"]
    big = suite == "accelerator" and not args.quick
    report["ceilings"] = ceilings(8192 if big else 1024 if args.quick else 4096, ("fp32", "bf16") if suite == "accelerator" else ("fp32",),
                                  torch_device, repeats=10 if big else 3, copy_mb=1024 if big else 64)
    save()
    print(f"machine: JAX on {report['machine']['jax_device']}, PyTorch on {report['machine']['torch_device']}; "
          f"fp32 matmul {report['ceilings']['jax_fp32_gflops_per_s']:.0f} GFLOP/s (XLA)")

    def report_rows(rows: list[dict]) -> None:  # kept on disk as they come, should the run be cut short
        report["results"] = rows
        add_shares(rows, report["ceilings"], len(train), suite)
        save()

    report_rows(bench_steps(args, suite, batch_sizes, train, report_rows))


def bench_steps(args: argparse.Namespace, suite: str, batch_sizes: list[int], train: D.Split,
                report_rows: Callable[[list[dict]], None] = lambda rows: None) -> list[dict]:
    """The step rows, batch size by batch size (each handed to `report_rows` as it is done). With
    --time-budget, no new batch size starts after half of it and no new path after three
    quarters, so the rows of the batch sizes begun are measured within it."""
    from common.config import Config

    paths = chosen_paths(suite, args.only)
    base = replace(Config(), torch_device=args.device)
    results = []
    for batch in batch_sizes:
        if over_budget(args, 0.5):
            results.append({"framework": "-", "variant": "-", "batch_size": batch, "error": "not measured: --time-budget"})
            continue
        live = start_paths(args, suite, paths, batch, train, base, results)
        rounds, block = time_rounds(args, batch, live)
        cost = one_step_cost(batch, train, base) if live else {}
        results += [path_row(args, suite, framework, variant, batch, path, cost) for (framework, variant), path in live.items()]
        for path in live.values():
            path["trainer"].close()  # JAX's background compile thread
        del live
        if ("jax", "train_step_2dev") in paths:
            results.append(children.two_devices_row(args, batch, rounds * block, cost.get("flops_per_step")))
        report_rows(results)
    return results


def start_paths(args: argparse.Namespace, suite: str, paths: list[tuple[str, str]], batch: int, train: D.Split, base,
                results: list[dict]) -> dict:
    """Each path of this batch size built and warmed up (compile_s); a path that fails, or would
    start past three quarters of --time-budget, becomes an error row in `results`."""
    live = {}
    for framework, variant in paths:
        if skipped_path(args, suite, variant, batch):
            continue
        if over_budget(args, 0.75):
            results.append({"framework": framework, "variant": variant, "batch_size": batch, "error": "not measured: --time-budget"})
            continue
        start = time.perf_counter()
        try:
            trainer, run, per_call, first = make_path(framework, variant, batch, train, base)
            warm_up(trainer, *first)  # the first call: compiles (JAX, torch.compile) and warms caches
            live[(framework, variant)] = {"trainer": trainer, "run": run, "per_call": per_call, "first": first,
                                          "compile_s": time.perf_counter() - start, "times": []}
        except Exception as e:  # torch.compile needs a C++ toolchain and can fail: record it
            results.append({"framework": framework, "variant": variant, "batch_size": batch,
                            "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"})
    return live


def time_rounds(args: argparse.Namespace, batch: int, live: dict) -> tuple[int, int]:
    """The timed rounds over the live paths (their samples into each path's "times"); returns
    (rounds, steps per round)."""
    from tqdm import tqdm

    for path in live.values():
        path["run"](2 * path["per_call"])  # warm-up, not timed
    # Each round runs every path for about the same number of steps, in whole calls; a path
    # whose call is a whole epoch gets at least five calls, for a spread.
    block = max((p["per_call"] for p in live.values()), default=16)
    rounds = max(-(-args.steps // block), 5 if block > 16 else 1)
    for _ in tqdm(range(rounds), desc=f"batch {batch}", leave=False):
        for path in live.values():
            path["times"] += per_call_times(path["run"], path["per_call"], calls=max(1, round(block / path["per_call"])))
    return rounds, block


def path_row(args: argparse.Namespace, suite: str, framework: str, variant: str, batch: int, path: dict, cost: dict) -> dict:
    """A measured path's row: its times, XLA's cost of a step, its precision and memory."""
    row = {"framework": framework, "variant": variant, "batch_size": batch, "steps_per_call": path["per_call"],
           "steps_measured": len(path["times"]) * path["per_call"], "compile_s": path["compile_s"],
           **summary(path["times"], batch), **cost, "precision": precision_of(framework, variant, suite == "accelerator")}
    if framework == "torch":
        record_torch_peak(path["trainer"].device)
    row["device_mb"] = path["trainer"].call_memory_mb(*path["first"])
    if suite == "cpu" and not args.quick:
        row.update(children.child_memory(args, framework, variant, batch))
    return row


def add_shares(results: list[dict], ceiling: dict, n_train: int, suite: str) -> None:
    """Per row: GFLOP/s and its share of the matmul ceiling of its framework and precision, the
    epoch it implies, its throughput against PyTorch eager and PyTorch's best at the same batch
    size, and on an accelerator its share of the copy bandwidth (the bytes XLA counts for one
    step, an upper bound of the memory traffic; a CPU's caches make that count meaningless there)."""
    for row in results:
        if "error" in row:
            continue
        median = row["step_ms_median"] / 1e3
        flops, moved = row.get("flops_per_step"), row.get("bytes_per_step")
        row["gflops_per_s"] = flops / median / 1e9 if flops else None
        dtype = "bf16" if row["variant"].endswith("_bf16") else "fp32"
        peak = ceiling.get(f"{row['framework']}_{dtype}_gflops_per_s")
        row["pct_of_matmul_ceiling"] = 100 * row["gflops_per_s"] / peak if row["gflops_per_s"] and peak else None
        copy_bw = ceiling.get(f"{row['framework']}_copy_gb_per_s")
        row["pct_of_copy_bandwidth"] = 100 * moved / median / 1e9 / copy_bw if moved and copy_bw and suite != "cpu" else None
        row["epoch_s"] = (n_train // row["batch_size"]) * median
        torch_rows = [r for r in results if r["framework"] == "torch" and r["batch_size"] == row["batch_size"] and "error" not in r]
        eager = next((r for r in torch_rows if r["variant"] == "eager"), None)
        if eager:
            row["throughput_vs_torch_eager"] = row["images_per_s"] / eager["images_per_s"]
        if torch_rows:
            row["throughput_vs_torch_best"] = row["images_per_s"] / max(r["images_per_s"] for r in torch_rows)
