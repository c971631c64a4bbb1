"""Benchmark JAX and PyTorch side by side, in one run, on whatever backend is present.

    python scripts/benchmark.py [--batch-sizes 32,128,512] [--steps N] [--json OUT] [--markdown OUT] [--quick]

Paths are measured in rounds that alternate between them, so machine noise hits all
alike. Per path and batch size: first call (compile) time, step time median/p10/p90,
images/s, GFLOP/s (FLOPs per step from XLA's cost analysis of the compiled JAX step; the
same count is used for torch, which runs the same math), and peak resident memory
(each path measured alone in a child process). Also: a matmul ceiling of this machine,
epoch wall time, and time to reach 99.0% test digit and sum accuracy with the default recipe.
The JAX step data-parallel over 2 devices ("train_step_2dev", --devices 2; on a CPU, the host
split in two by XLA_FLAGS) needs its own process: it is timed alone, in a child, after the others.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

import numpy as np  # noqa: E402

from common.cli import UserError, run_main  # noqa: E402
from common.malloc import keep_freed_memory  # noqa: E402


# --- the measured paths -----------------------------------------------------


def make_path(framework: str, variant: str, batch_size: int, train):
    """Returns (run(k_steps) -> None that blocks until done, steps per call, flops per step or None)."""
    from common.config import Config

    # "train_step" is exactly what train_jax.py runs (the default steps per call); "single_step"
    # compiles one step per call, to show what fusing steps buys.
    cfg = replace(Config(), batch_size=batch_size)
    if variant == "single_step":
        cfg = replace(cfg, steps_per_call=1)
    if variant == "train_step_2dev":
        cfg = replace(cfg, devices=2)
    steps_per_call = cfg.steps_per_call if framework == "jax" else 1
    rng = np.random.default_rng(0)

    def batches(k):
        return rng.integers(0, len(train), size=(k, batch_size)), rng.integers(0, 2 * cfg.shift + 1, size=(k, batch_size, 2))

    if framework == "jax":
        from jax_impl.train import JaxTrainer

        trainer = JaxTrainer(cfg, train, total_steps=10_000)
        idx, shifts = batches(steps_per_call)
        compiled = trainer._train.lower(trainer.state, trainer.dataset, *trainer.place_batch(idx, shifts)).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        flops = float(cost.get("flops", 0.0)) / steps_per_call or None

        def run(k):
            for _ in range(k // steps_per_call):
                trainer.train_steps(*batches(steps_per_call))  # returns numpy: blocks until done

        return run, steps_per_call, flops

    import torch

    from torch_ref.train import TorchTrainer

    trainer = TorchTrainer(cfg, train, total_steps=10_000)
    if variant == "compile":
        trainer.model = torch.compile(trainer.model)

    def run(k):
        trainer.train_steps(*batches(k))

    return run, 1, None


PATHS = [("jax", "train_step"), ("jax", "single_step"), ("torch", "eager"), ("torch", "compile")]


def peak_rss_mb() -> float:
    # VmHWM, not getrusage's ru_maxrss: the latter keeps the parent's peak across fork + exec,
    # so every child would report the (larger) benchmark process's peak.
    try:
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def device_peak_mb(framework: str) -> float | None:
    if framework == "jax":
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        return stats["peak_bytes_in_use"] / 2**20 if "peak_bytes_in_use" in stats else None
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def probe_memory(spec: str) -> None:
    """Child process: one path alone, compile + 10 steps; prints its peak RSS as JSON."""
    framework, variant, batch = spec.split(":")
    from common.loop import load_splits
    from common.config import Config

    train, _ = load_splits(Config())
    run, per_call, _ = make_path(framework, variant, int(batch), train)
    run(per_call)
    run(10 * per_call)
    print(json.dumps({"peak_rss_mb": peak_rss_mb(), "device_peak_mb": device_peak_mb(framework)}))


def per_step_times(run, per_call: int, calls: int) -> list[float]:
    """Times `calls` calls of `per_call` steps each, one sample (seconds per step) per call."""
    return [_timed(lambda: run(per_call)) / per_call for _ in range(calls)]


def probe_two_devices(spec: str) -> None:
    """Child process (started with 2 host devices): compile + warm-up, then at least `steps` timed
    steps of train_step_2dev; prints the step times and peak memory as JSON."""
    batch, steps = (int(x) for x in spec.split(":"))
    from common.config import Config
    from common.loop import load_splits

    train, _ = load_splits(Config())
    start = time.perf_counter()
    run, per_call, _ = make_path("jax", "train_step_2dev", batch, train)
    run(per_call)
    compile_s = time.perf_counter() - start
    run(2 * per_call)
    times = per_step_times(run, per_call, calls=-(-steps // per_call))
    print(json.dumps({"compile_s": compile_s, "times": times, "steps": len(times) * per_call, "peak_rss_mb": peak_rss_mb(),
                      "device_peak_mb": device_peak_mb("jax")}))


def two_devices_row(batch: int, steps: int, flops: float | None) -> dict:
    """The train_step_2dev row, measured in a child whose XLA sees the host as 2 devices."""
    row = {"framework": "jax", "variant": "train_step_2dev", "batch_size": batch}
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2".strip()}
    out = subprocess.run([sys.executable, __file__, "--probe-two-devices", f"{batch}:{steps}"], env=env,
                         capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        return {**row, "error": (out.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    child = json.loads(out.stdout.strip().splitlines()[-1])
    times = np.asarray(child["times"])
    median = float(np.median(times))
    return {**row, "steps_measured": child["steps"], "compile_s": child["compile_s"], "step_ms_median": 1e3 * median,
            "step_ms_p10": 1e3 * float(np.percentile(times, 10)), "step_ms_p90": 1e3 * float(np.percentile(times, 90)),
            "images_per_s": batch / median, "gflops_per_s": flops / median / 1e9 if flops else None,
            "flops_per_step": flops, "peak_rss_mb": child["peak_rss_mb"], "device_peak_mb": child["device_peak_mb"]}


def child_memory(framework: str, variant: str, batch: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--probe-memory", f"{framework}:{variant}:{batch}"],
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        return {"peak_rss_mb": None, "device_peak_mb": None}
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- machine facts ------------------------------------------------------------


def matmul_ceiling(n: int = 4096, repeats: int = 5) -> dict:
    """GFLOP/s of a large fp32 GEMM through XLA (and torch, for reference)."""
    import jax
    import jax.numpy as jnp
    import torch

    a = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    xla = min(_timed(lambda: mm(a).block_until_ready()) for _ in range(repeats))
    t = torch.ones(n, n)
    torch_s = min(_timed(lambda: t @ t) for _ in range(repeats))
    return {"n": n, "xla_gflops_per_s": 2 * n**3 / xla / 1e9, "torch_gflops_per_s": 2 * n**3 / torch_s / 1e9}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def machine() -> dict:
    import jax
    import torch

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()], "jax": jax.__version__, "torch": torch.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}


# --- step timing, alternating -------------------------------------------------


def bench_steps(batch_sizes: list[int], steps: int, train, with_memory: bool) -> list[dict]:
    from tqdm import tqdm

    results = []
    for batch in batch_sizes:
        live = {}
        for framework, variant in PATHS:
            start = time.perf_counter()
            try:
                run, per_call, flops = make_path(framework, variant, batch, train)
                run(per_call)  # first call: compiles (JAX jit, torch.compile) and warms caches
                live[(framework, variant)] = {"run": run, "per_call": per_call, "flops": flops,
                                              "compile_s": time.perf_counter() - start, "times": []}
            except Exception as e:  # torch.compile needs a C++ toolchain and can fail: record it
                results.append({"framework": framework, "variant": variant, "batch_size": batch,
                                "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
        for path in live.values():
            path["run"](2 * path["per_call"])  # warm-up
        block = math.lcm(*(p["per_call"] for p in live.values()))  # steps per path per round
        rounds = max(1, -(-steps // block))
        for _ in tqdm(range(rounds), desc=f"batch {batch}", leave=False):
            for path in live.values():
                path["times"] += per_step_times(path["run"], path["per_call"], calls=block // path["per_call"])
        flops = next((p["flops"] for (fw, _), p in live.items() if fw == "jax" and p["flops"]), None)
        for (framework, variant), path in live.items():
            times = np.asarray(path["times"])
            median = float(np.median(times))
            row = {"framework": framework, "variant": variant, "batch_size": batch, "steps_measured": rounds * block,
                   "compile_s": path["compile_s"], "step_ms_median": 1e3 * median,
                   "step_ms_p10": 1e3 * float(np.percentile(times, 10)), "step_ms_p90": 1e3 * float(np.percentile(times, 90)),
                   "images_per_s": batch / median, "gflops_per_s": flops / median / 1e9 if flops else None,
                   "flops_per_step": flops}
            if with_memory:
                row.update(child_memory(framework, variant, batch))
            results.append(row)
        results.append(two_devices_row(batch, rounds * block, flops))
    return results


def add_ratios(results: list[dict]) -> None:
    for row in results:
        eager = next((r for r in results if r["batch_size"] == row["batch_size"] and r["variant"] == "eager"
                      and "error" not in r), None)
        if eager and "error" not in row:
            row["throughput_vs_torch_eager"] = row["images_per_s"] / eager["images_per_s"]


# --- epochs and time to accuracy, alternating ------------------------------------


def time_to_accuracy(target: float, max_epochs: int, quick: bool) -> list[dict]:
    """Trains both frameworks with the default recipe, one epoch each in turn, until both test
    accuracies reach `target`; wall time counts training and compile, not data loading or evaluation."""
    from common.config import Config
    from common.loop import epoch_plan, load_splits, steps_per_epoch
    from common.metrics import score
    from jax_impl.train import JaxTrainer
    from torch_ref.train import TorchTrainer

    cfg = Config()
    train, test = load_splits(cfg)
    total = steps_per_epoch(cfg, len(train)) * cfg.epochs
    trainers = {"jax": JaxTrainer(cfg, train, total), "torch": TorchTrainer(cfg, train, total)}
    state = {fw: {"train_s": 0.0, "epochs": [], "reached": None} for fw in trainers}
    for epoch in range(1, max_epochs + 1):
        batches, shifts = epoch_plan(cfg, len(train), epoch)
        if quick:
            batches, shifts = batches[:20], shifts[:20]
        for fw, trainer in trainers.items():
            if state[fw]["reached"]:
                continue
            k = cfg.steps_per_call if fw == "jax" else len(batches)
            start = time.perf_counter()
            for i in range(0, len(batches), k):
                trainer.train_steps(batches[i : i + k], shifts[i : i + k])
            elapsed = time.perf_counter() - start
            state[fw]["train_s"] += elapsed
            m = score(*trainer.predict(test.images, test.numbers), test.labels, test.numbers)
            state[fw]["epochs"].append({"epoch": epoch, "epoch_s": elapsed, **m})
            print(f"  {fw:5s} epoch {epoch}: {elapsed:6.1f}s  digit {100 * m['test_digit_acc']:.2f}%  sum {100 * m['test_sum_acc']:.2f}%")
            if min(m["test_digit_acc"], m["test_sum_acc"]) >= target:
                state[fw]["reached"] = {"epoch": epoch, "train_s": state[fw]["train_s"]}
        if all(s["reached"] for s in state.values()):
            break
    return [{"framework": fw, "target": target, "epoch_wall_s_first": s["epochs"][0]["epoch_s"],
             "epoch_wall_s_median": float(np.median([e["epoch_s"] for e in s["epochs"]])),
             "reached": s["reached"], "epochs": s["epochs"]} for fw, s in state.items()]


# --- report -------------------------------------------------------------------------


def markdown(report: dict) -> str:
    m = report["machine"]
    ceiling = report["matmul_ceiling"]
    settings = [text for key, text in [("malloc_keeps_freed_memory", "glibc malloc keeps freed memory (`keep_freed_memory`)"),
                                        ("jax_runs_on_calling_thread", "JAX runs single-device calls on the calling thread (`run_on_calling_thread`)")]
                if m.get(key)]
    lines = [f"# Benchmark: {m['cpu']} ({m['cores']} cores, {m['backend']}), {m['date']}", "",
             f"jax {m['jax']}, torch {m['torch']}, python {m['python']}. Matmul ceiling (fp32 {ceiling['n']}^2 GEMM): "
             f"XLA {ceiling['xla_gflops_per_s']:.0f} GFLOP/s, torch {ceiling['torch_gflops_per_s']:.0f} GFLOP/s."
             + (f" Process settings of the training scripts: {'; '.join(settings)}." if settings else ""), "",
             "| framework | variant | batch | compile s | step ms (median) | p10-p90 | images/s | GFLOP/s | % of ceiling | peak RSS MB | vs torch eager |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['framework']} | {r['variant']} | {r['batch_size']} | failed: {r['error'][:80]} ||||||||")
            continue
        g = r["gflops_per_s"]
        pct = f"{100 * g / ceiling['xla_gflops_per_s']:.0f}%" if g else "-"
        rss = f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") else "-"
        lines.append(f"| {r['framework']} | {r['variant']} | {r['batch_size']} | {r['compile_s']:.2f} | {r['step_ms_median']:.1f} | "
                     f"{r['step_ms_p10']:.1f}-{r['step_ms_p90']:.1f} | {r['images_per_s']:.0f} | {g:.0f} | {pct} | {rss} | "
                     f"{r.get('throughput_vs_torch_eager', float('nan')):.2f}x |" if g else
                     f"| {r['framework']} | {r['variant']} | {r['batch_size']} | {r['compile_s']:.2f} | {r['step_ms_median']:.1f} | "
                     f"{r['step_ms_p10']:.1f}-{r['step_ms_p90']:.1f} | {r['images_per_s']:.0f} | - | - | {rss} | "
                     f"{r.get('throughput_vs_torch_eager', float('nan')):.2f}x |")
    if report.get("time_to_accuracy"):
        lines += ["", "Default recipe, both frameworks trained in turn, one epoch each (training time incl. compile; evaluation excluded):", "",
                  "| framework | first epoch s | median epoch s | reached 99.0% digit and sum | after |", "|---|---:|---:|---|---:|"]
        for t in report["time_to_accuracy"]:
            reached = t["reached"]
            lines.append(f"| {t['framework']} | {t['epoch_wall_s_first']:.1f} | {t['epoch_wall_s_median']:.1f} | "
                         f"{'epoch ' + str(reached['epoch']) if reached else 'no'} | {reached['train_s']:.0f} s |" if reached else
                         f"| {t['framework']} | {t['epoch_wall_s_first']:.1f} | {t['epoch_wall_s_median']:.1f} | no | - |")
    return "\n".join(lines) + "\n"


def main() -> None:
    from common.config import OneLineParser

    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="32,128,512")
    parser.add_argument("--steps", type=int, default=40, help="measured steps per path and batch size (>= 30; rounded up to whole rounds)")
    parser.add_argument("--json", default=None, metavar="OUT")
    parser.add_argument("--markdown", default=None, metavar="OUT")
    parser.add_argument("--quick", action="store_true", help="a smoke run: one batch size, few steps, no memory probes, short epochs")
    parser.add_argument("--max-epochs", type=int, default=None, help="cap for the time-to-accuracy run (default: the recipe's epochs)")
    parser.add_argument("--probe-memory", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--probe-two-devices", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    malloc_tuned = keep_freed_memory()  # the process settings of the training scripts, for every path alike
    from jax_impl.cpu_speed import run_on_calling_thread

    run_on_calling_thread()
    if args.probe_memory:
        return probe_memory(args.probe_memory)
    if args.probe_two_devices:
        return probe_two_devices(args.probe_two_devices)
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        raise UserError(f"--batch-sizes wants integers separated by commas, got {args.batch_sizes!r}") from None
    if any(b <= 0 for b in batch_sizes) or args.steps <= 0:
        raise UserError("--batch-sizes and --steps must be positive")
    if args.quick:
        batch_sizes, args.steps = batch_sizes[:1], 8

    import jax

    from common.config import Config
    from common.loop import load_splits

    train, _ = load_splits(Config())
    on_calling_thread = not jax.config.read("jax_cpu_enable_async_dispatch")  # what JAX was told, read back
    report = {"machine": {**machine(), "malloc_keeps_freed_memory": malloc_tuned, "jax_runs_on_calling_thread": on_calling_thread},
              "matmul_ceiling": matmul_ceiling(1024 if args.quick else 4096)}
    print(f"machine: {report['machine']['cpu']}, matmul ceiling {report['matmul_ceiling']['xla_gflops_per_s']:.0f} GFLOP/s (XLA)")
    report["results"] = bench_steps(batch_sizes, args.steps, train, with_memory=not args.quick)
    add_ratios(report["results"])
    print("time to 99.0% test digit and sum accuracy (default recipe):")
    report["time_to_accuracy"] = time_to_accuracy(0.99, 1 if args.quick else (args.max_epochs or Config().epochs), args.quick)
    table = markdown(report)
    print(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(table)


if __name__ == "__main__":
    run_main(main)
