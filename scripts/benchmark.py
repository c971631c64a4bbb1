"""Benchmark JAX and PyTorch side by side, in one run, on the CPU or a GPU.

    python scripts/benchmark.py [--batch-sizes 32,128,512] [--steps N] [--device auto|cpu|cuda]
                                [--json OUT] [--markdown OUT] [--quick] [--part steps,training,starts]

JAX runs on its default backend (a GPU when it has one; JAX_PLATFORMS respected), PyTorch on
--device (auto: CUDA when PyTorch sees a GPU). Per path and batch size: the first call's time
(compilation and warm-up) apart from the step times, which are the median and p10-p90 of timed
calls that each end with a device synchronisation; images/s; GFLOP/s (FLOPs per step from XLA's
cost analysis of one unrolled JAX step; PyTorch runs the same math, so the same count is used
for it) and its share of the measured ceilings (random operands); memory; each row's float32
precision (TF32 or not). Paths are measured in rounds that alternate between them, so machine
noise hits all alike. Then each framework trains its fastest recipe for this kind of chip
until 99.0% test digit and sum (on a CPU epoch by epoch in turn; on a GPU one run after the
other, each written when done). Then, in processes of their own, the cold starts. --part runs
some of these (scripts/accelerator_check.sh runs the steps and the training in two stages);
--json and --markdown are rewritten, atomically, as each batch size, epoch or run is done.

On a CPU (benchmarks/cpu.*): JAX's train step (16 steps per compiled call) and one step per
call (what train_jax.py runs on a CPU), PyTorch eager and torch.compile, at batch 32, 128, 512; peak RSS
per path in a child process; the JAX step data-parallel over 2 host devices in a child of its own.
On a GPU: JAX in fp32 and bf16 with its steps in a lax.scan (this backend's default), and a whole
epoch per call; PyTorch eager (`cudnn.benchmark` on, as XLA autotunes its convolutions) in fp32
and in bf16 autocast, torch.compile, and torch.compile with CUDA graphs (at batch 128 and 512
only: each compile costs tens of seconds); at batch 512, 128, 2048, 8192; the device memory of
each path; the ceilings of bf16 and fp32 matmuls and of a device-to-device copy in each
framework; the default recipe in fp32 and bf16.
"""

from __future__ import annotations

import argparse
import json
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

from common.cli import run_main  # noqa: E402
from common.errors import UserError  # noqa: E402
from common.config import ACCELERATOR_STEPS_PER_CALL, PRESETS  # noqa: E402

SUITES = {
    "cpu": [("jax", "train_step"), ("jax", "single_step"), ("torch", "eager"), ("torch", "compile")],
    "accelerator": [("jax", "train_step"), ("jax", "train_step_bf16"), ("jax", "epoch_step"),
                    ("torch", "eager"), ("torch", "eager_bf16"), ("torch", "compile"), ("torch", "compile_cudagraphs")],
}
# The accelerator's first batch size is the accelerator recipe's, so a cut run keeps it.
BATCH_SIZES = {"cpu": "32,128,512", "accelerator": "512,128,2048,8192"}
# torch.compile recompiles for every batch size (dynamic=False), each time for tens of seconds:
# on an accelerator only where the goals and the recipes are measured.
COMPILED_BATCHES = (128, 512)
TORCH_COMPILE = {"eager": None, "eager_bf16": None, "compile": "default", "compile_cudagraphs": "reduce-overhead"}
TARGET = 0.99
START = time.perf_counter()

# The recipe of the time-to-99% run on an accelerator. A GPU stays busy with larger batches, so
# fewer, larger steps at a higher learning rate; the digit design, whose sum is right as soon as
# its digit is; no translation (it slows the first epochs); a whole epoch per compiled call.
ACCELERATOR_RECIPE = {k: v for k, v in PRESETS["accelerator"].items() if k != "steps_per_call"}  # common/config.py


# --- the measured paths -----------------------------------------------------


def path_config(framework: str, variant: str, batch_size: int, base, n_train: int):
    """The Config a path trains with (`base` with the variant's changes)."""
    from common.loop import steps_per_epoch

    # train_step: several steps per compiled call, the default on an accelerator (common/config.py).
    cfg = replace(base, batch_size=batch_size, steps_per_call=base.steps_per_call or ACCELERATOR_STEPS_PER_CALL)
    if variant == "single_step":
        cfg = replace(cfg, steps_per_call=1)
    if variant == "train_step_2dev":
        cfg = replace(cfg, jax_devices=2)
    if variant.endswith("_bf16"):
        cfg = replace(cfg, precision="bf16")
    if variant == "epoch_step":
        cfg = replace(cfg, steps_per_call=steps_per_epoch(cfg, n_train))
    return cfg


def make_trainer(framework: str, variant: str, cfg, train, total_steps: int = 10_000):
    if framework == "jax":
        from jax_impl.train import JaxTrainer

        # A whole epoch per call needs the loop that compiles one step whatever the count.
        return JaxTrainer(cfg, train, total_steps, loop="scan" if variant == "epoch_step" else None)
    from torch_ref.train import TorchTrainer

    trainer = TorchTrainer(cfg, train, total_steps)
    if TORCH_COMPILE[variant]:
        trainer.forward = compiled(trainer.model, TORCH_COMPILE[variant])
    if variant.endswith("_bf16"):
        trainer.train_steps = in_bf16_autocast(trainer.train_steps, trainer.device.type)
    return trainer


def compiled(model, mode: str):
    """The model's forward and backward under torch.compile; "reduce-overhead" replays them as
    CUDA graphs, which may reuse the last step's memory, so each call starts a new step."""
    import torch

    program = torch.compile(model, mode=mode, dynamic=False)
    if mode != "reduce-overhead":
        return program

    def forward(*args):
        torch.compiler.cudagraph_mark_step_begin()
        return program(*args)

    return forward


def in_bf16_autocast(train_steps, device_type: str):
    """PyTorch's counterpart of JAX's bf16 rows: the steps under bf16 autocast (float32
    parameters, optimiser state and loss; TorchTrainer has no precision setting of its own)."""
    import torch

    def steps(*args):
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return train_steps(*args)

    return steps


def warm_up(trainer, batch_indices: np.ndarray, shifts: np.ndarray | None) -> None:
    """One call, then waits for JAX's fused program if it compiles in the background
    (jax_impl/speed.py), so that every timed call runs the program it is timed for."""
    trainer.train_steps(batch_indices, shifts)
    trainer.wait_until_compiled()


def make_path(framework: str, variant: str, batch_size: int, train, base):
    """Returns (trainer, run(k_steps) -> None that ends with a device synchronisation, steps per
    call, the first call's batch). `base`: the Config the variant changes (PyTorch's device is
    its `device`). Batches come from a small pool drawn beforehand, so no drawing is timed."""
    cfg = path_config(framework, variant, batch_size, base, len(train))
    trainer = make_trainer(framework, variant, cfg, train)
    per_call = cfg.steps_per_call
    rng = np.random.default_rng(0)
    pool = [(rng.integers(0, len(train), size=(per_call, batch_size)),
             rng.integers(0, 2 * cfg.shift + 1, size=(per_call, batch_size, 2)) if cfg.shift else None) for _ in range(4)]
    calls = 0

    def run(k: int) -> None:
        nonlocal calls
        for _ in range(max(1, k // per_call)):
            trainer.train_steps(*pool[calls % len(pool)])
            calls += 1
        trainer.synchronize()

    return trainer, run, per_call, pool[0]


def one_step_cost(batch: int, train, base) -> dict:
    """FLOPs and bytes of one training step at this batch size, from XLA's cost analysis of a
    one-step unrolled program: in a lax.scan (the GPU's calls) the analysis counts the loop body
    once, whatever its trip count, so a k-step call's count divided by k is k times too low."""
    from jax_impl.train import JaxTrainer

    cfg = replace(base, batch_size=batch, steps_per_call=1)
    trainer = JaxTrainer(cfg, train, 10_000, loop="unroll")
    rng = np.random.default_rng(0)
    shifts = rng.integers(0, 2 * cfg.shift + 1, size=(1, batch, 2)) if cfg.shift else None
    cost = trainer.compiled_call(rng.integers(0, len(train), size=(1, batch)), shifts).cost_analysis()
    trainer.close()
    cost = (cost[0] if isinstance(cost, list) else cost) or {}
    return {"flops_per_step": float(cost.get("flops", 0.0)) or None, "bytes_per_step": float(cost.get("bytes accessed", 0.0)) or None}


def precision_of(framework: str, variant: str, on_gpu: bool) -> str:
    """How a row computes its float32 matmuls and convolutions: TF32 or full float32."""
    if variant.endswith("_bf16"):
        return "bf16 compute" if framework == "jax" else "bf16 autocast"
    if not on_gpu:
        return "fp32 (no TF32 on a CPU)"
    if framework == "jax":
        import jax

        # XLA's default precision on NVIDIA GPUs computes float32 dots and convolutions in TF32.
        return f"jax_default_matmul_precision={jax.config.jax_default_matmul_precision or 'default (TF32)'}"
    import torch

    return f"allow_tf32 matmul={torch.backends.cuda.matmul.allow_tf32} cudnn={torch.backends.cudnn.allow_tf32}"


TORCH_PEAK_BYTES = [0]  # the process's CUDA peak, kept across the trainers' per-call resets


def peak_rss_mb() -> float:
    # VmHWM, not getrusage's ru_maxrss: the latter keeps the parent's peak across fork + exec,
    # so every child would report the (larger) benchmark process's peak.
    try:
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def probe_memory(spec: str, device: str) -> None:
    """Child process: one path alone, compile + 10 steps; prints its peak RSS as JSON."""
    framework, variant, batch = spec.split(":")
    from common.config import Config
    from common.loop import load_splits

    train, _ = load_splits(Config())
    _, run, per_call, first = make_path(framework, variant, int(batch), train, replace(Config(), torch_device=device))
    run(per_call)
    run(10 * per_call)
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}))


def child_args(args) -> list[str]:
    return [sys.executable, __file__, "--device", args.device]


def child_memory(args, framework: str, variant: str, batch: int) -> dict:
    out = subprocess.run([*child_args(args), "--probe-memory", f"{framework}:{variant}:{batch}"],
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        return {"peak_rss_mb": None}
    return json.loads(out.stdout.strip().splitlines()[-1])


def per_call_times(run, per_call: int, calls: int) -> list[float]:
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
    trainer, run, per_call, first = make_path("jax", "train_step_2dev", batch, train, Config())
    warm_up(trainer, *first)
    compile_s = time.perf_counter() - start
    run(2 * per_call)
    times = per_call_times(run, per_call, calls=-(-steps // per_call))
    print(json.dumps({"compile_s": compile_s, "times": times, "steps": len(times) * per_call, "peak_rss_mb": peak_rss_mb()}))


def summary(times: list[float], batch: int) -> dict:
    times = np.asarray(times)
    median = float(np.median(times))
    return {"step_ms_median": 1e3 * median, "step_ms_p10": 1e3 * float(np.percentile(times, 10)),
            "step_ms_p90": 1e3 * float(np.percentile(times, 90)), "images_per_s": batch / median}


def two_devices_row(args, batch: int, steps: int, flops: float | None) -> dict:
    """The train_step_2dev row, measured in a child whose XLA sees the host as 2 devices."""
    row = {"framework": "jax", "variant": "train_step_2dev", "batch_size": batch}
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2".strip()}
    out = subprocess.run([*child_args(args), "--probe-two-devices", f"{batch}:{steps}"], env=env,
                         capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        return {**row, "error": (out.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    child = json.loads(out.stdout.strip().splitlines()[-1])
    return {**row, "steps_measured": child["steps"], "compile_s": child["compile_s"], **summary(child["times"], batch),
            "flops_per_step": flops, "peak_rss_mb": child["peak_rss_mb"]}


# --- machine facts ------------------------------------------------------------


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def ceilings(n: int, dtypes: tuple[str, ...], torch_device, repeats: int, copy_mb: int) -> dict:
    """What this chip measures at its best: GFLOP/s of an n x n matmul per dtype, and GB/s of a
    device-to-device copy (bytes read plus bytes written), in each framework, each the best of
    `repeats`. The fp32 matmuls run at each framework's training precision (TF32 on NVIDIA GPUs).
    Operands are random: constant data makes a GPU's matrix units run faster than real data."""
    import jax
    import jax.numpy as jnp
    import torch

    def best(fn, sync) -> float:
        fn()
        sync()
        return min(_timed(lambda: (fn(), sync())) for _ in range(repeats))

    sync_torch = (lambda: torch.cuda.synchronize(torch_device)) if torch_device.type == "cuda" else (lambda: None)
    out = {"matmul_n": n, "copy_mb": copy_mb, "operands": "random normal"}
    key = jax.random.key(0)
    for name in dtypes:
        a = jax.random.normal(key, (n, n), {"fp32": jnp.float32, "bf16": jnp.bfloat16}[name])
        mm = jax.jit(lambda x: x @ x)
        result = {}
        out[f"jax_{name}_gflops_per_s"] = 2 * n**3 / best(lambda: result.update(y=mm(a)), lambda: result["y"].block_until_ready()) / 1e9
        t = torch.randn(n, n, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[name], device=torch_device)
        out[f"torch_{name}_gflops_per_s"] = 2 * n**3 / best(lambda: t @ t, sync_torch) / 1e9
    elements = copy_mb * 2**20 // 4
    x = jax.random.normal(key, (elements,), jnp.float32)
    cp = jax.jit(lambda v: v.copy())
    result = {}
    out["jax_copy_gb_per_s"] = 2 * 4 * elements / best(lambda: result.update(y=cp(x)), lambda: result["y"].block_until_ready()) / 1e9
    src, dst = torch.randn(elements, device=torch_device), torch.empty(elements, device=torch_device)
    out["torch_copy_gb_per_s"] = 2 * 4 * elements / best(lambda: dst.copy_(src), sync_torch) / 1e9
    return out


def machine(torch_device) -> dict:
    import jax
    import torch

    from torch_ref.train import environment

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()], "jax_device": jax.devices()[0].device_kind,
            "torch_device": environment(torch_device)["device_name"], "jax": jax.__version__, "torch": torch.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}


# --- step timing, alternating -------------------------------------------------


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


def over_budget(args, share: float) -> bool:
    """Whether `share` of --time-budget has passed since the process started."""
    return bool(args.time_budget) and time.perf_counter() - START > share * args.time_budget


def skipped_path(args, suite: str, variant: str, batch: int) -> bool:
    """Paths measured elsewhere or not at this batch size."""
    if variant == "train_step_2dev":  # in a child process of its own, after the others
        return True
    return suite == "accelerator" and variant.startswith("compile") and batch not in COMPILED_BATCHES and not args.quick


def bench_steps(args, suite: str, batch_sizes: list[int], train, report_rows=lambda rows: None) -> list[dict]:
    """The step rows, batch size by batch size (each handed to `report_rows` as it is done). With
    --time-budget, no new batch size starts after half of it and no new path after three
    quarters, so the rows of the batch sizes begun are measured within it."""
    from tqdm import tqdm

    from common.config import Config

    paths = chosen_paths(suite, args.only)
    base = replace(Config(), torch_device=args.device)
    on_gpu = suite == "accelerator"
    results = []
    for batch in batch_sizes:
        if over_budget(args, 0.5):
            results.append({"framework": "-", "variant": "-", "batch_size": batch, "error": "not measured: --time-budget"})
            continue
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
        for path in live.values():
            path["run"](2 * path["per_call"])  # warm-up, not timed
        # Each round runs every path for about the same number of steps, in whole calls; a path
        # whose call is a whole epoch gets at least five calls, for a spread.
        block = max((p["per_call"] for p in live.values()), default=16)
        rounds = max(-(-args.steps // block), 5 if block > 16 else 1)
        for _ in tqdm(range(rounds), desc=f"batch {batch}", leave=False):
            for path in live.values():
                path["times"] += per_call_times(path["run"], path["per_call"], calls=max(1, round(block / path["per_call"])))
        cost = one_step_cost(batch, train, base) if live else {}
        for (framework, variant), path in live.items():
            row = {"framework": framework, "variant": variant, "batch_size": batch, "steps_per_call": path["per_call"],
                   "steps_measured": len(path["times"]) * path["per_call"], "compile_s": path["compile_s"],
                   **summary(path["times"], batch), **cost, "precision": precision_of(framework, variant, on_gpu)}
            if framework == "torch" and path["trainer"].device.type == "cuda":
                import torch

                TORCH_PEAK_BYTES[0] = max(TORCH_PEAK_BYTES[0], torch.cuda.max_memory_allocated(path["trainer"].device))
            row["device_mb"] = path["trainer"].call_memory_mb(*path["first"])
            if suite == "cpu" and not args.quick:
                row.update(child_memory(args, framework, variant, batch))
            results.append(row)
        for path in live.values():
            path["trainer"].close()  # JAX's background compile thread
        del live
        if ("jax", "train_step_2dev") in paths:
            results.append(two_devices_row(args, batch, rounds * block, cost.get("flops_per_step")))
        report_rows(results)
    return results


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


# --- training runs: time to accuracy, alternating ------------------------------------


def recipe_flags(cfg) -> str:
    """The flags of train_*.py that give `cfg` (its fields that differ from the defaults)."""
    from dataclasses import fields

    from common.config import Config, flag

    default = Config()
    return " ".join(f"{flag(f.name)} {getattr(cfg, f.name)}" for f in fields(cfg)
                    if f.name not in ("torch_device", "preset") and getattr(cfg, f.name) != getattr(default, f.name)) or "(defaults)"


def fastest(results: list[dict], framework: str, batch: int, allowed: tuple[str, ...]) -> str:
    rows = [r for r in results if r["framework"] == framework and r["batch_size"] == batch and r["variant"] in allowed and "error" not in r]
    return min(rows, key=lambda r: r["step_ms_median"])["variant"] if rows else allowed[0]


def training_runs(suite: str, results: list[dict], torch_device: str) -> list[dict]:
    """What trains until the target (or through all its epochs): on a CPU both frameworks with
    the default recipe; on an accelerator each framework's fastest variant of the accelerator
    recipe, and JAX's default recipe in fp32 and bf16 (the bf16 accuracy goal)."""
    from common.config import Config

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


def prepare_run(run: dict, max_epochs: int | None, plan) -> None:
    """Builds the run's trainer and compiles and warms it up on a copy of its initial state
    (compile_s), every shape an epoch uses."""
    from common.loop import load_splits, steps_per_epoch

    train, test = load_splits(run["cfg"])
    cfg = run["cfg"] = path_config(run["framework"], run["variant"], run["cfg"].batch_size, run["cfg"], len(train))
    run.update(train=train, test=test, train_s=0.0, epochs=[], reached=None, total_epochs=min(max_epochs or cfg.epochs, cfg.epochs))
    run["trainer"] = trainer = make_trainer(run["framework"], run["variant"], cfg, train, steps_per_epoch(cfg, len(train)) * cfg.epochs)
    run["chunk"] = trainer.steps_per_call
    batches, shifts = plan(run, 1)
    start, saved = time.perf_counter(), trainer.snapshot()
    for size in sorted({min(run["chunk"], len(batches) - i) for i in range(0, len(batches), run["chunk"])}):
        warm_up(trainer, batches[:size], None if shifts is None else shifts[:size])
    trainer.synchronize()
    trainer.restore_snapshot(saved)
    run["compile_s"] = time.perf_counter() - start


def train_epoch(run: dict, epoch: int, plan) -> None:
    from common.metrics import score

    trainer = run["trainer"]
    batches, shifts = plan(run, epoch)
    start = time.perf_counter()
    for i in range(0, len(batches), run["chunk"]):
        trainer.train_steps(batches[i : i + run["chunk"]], None if shifts is None else shifts[i : i + run["chunk"]])
    trainer.synchronize()
    elapsed = time.perf_counter() - start
    run["train_s"] += elapsed
    m = score(*trainer.predict(run["test"].images, run["test"].numbers), run["test"].labels, run["test"].numbers)
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


def time_to_accuracy(runs: list[dict], max_epochs: int | None, quick: bool, in_turn: bool, args=None,
                     report=lambda rows: None) -> list[dict]:
    """Trains each run epoch by epoch until the target (or through its epochs). `in_turn` (a
    CPU): every run compiles first, then they train one epoch each in turn, so machine noise hits
    all alike. Otherwise one run after the other, each handed to `report` as it is done, so a cut
    keeps the runs before it; none starts after three quarters of --time-budget. Each compiles
    and warms up on a copy of its initial state (compile_s); the training time counts the steps
    after that, up to a device synchronisation, not data loading or the per-epoch evaluation.
    `report` also gets every epoch's rows."""
    from common.loop import epoch_plan

    def plan(run: dict, epoch: int) -> tuple[np.ndarray, np.ndarray | None]:
        batches, shifts = epoch_plan(run["cfg"], len(run["train"]), epoch)
        return (batches[:20], None if shifts is None else shifts[:20]) if quick else (batches, shifts)

    rows = lambda: [accuracy_row(r) for r in runs]  # noqa: E731
    for group in [runs] if in_turn else [[r] for r in runs]:
        if args is not None and over_budget(args, 0.75):
            for run in group:
                run["not_run"] = "not run: --time-budget"
            continue
        for run in group:
            prepare_run(run, max_epochs, plan)
        for epoch in range(1, max(r["total_epochs"] for r in group) + 1):
            for run in group:
                if epoch <= run["total_epochs"] and not (run["until_target"] and run["reached"]):
                    train_epoch(run, epoch, plan)
            report(rows())
        for run in group:
            run["finished"] = True
            getattr(run["trainer"], "close", lambda: None)()
        report(rows())
    return rows()


# --- report -------------------------------------------------------------------------


def _num(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def cold_starts(quick: bool, device: str) -> list[dict]:
    """What a user's process start costs: each trainer's 1-epoch default run (a dry run with
    --quick) as its own process, JAX with an empty compilation cache, then again with the cache
    it left. Per run: the process's wall time, the first epoch's training time (compilation
    included) and, for JAX, the seconds spent compiling (metrics.jsonl)."""
    import tempfile

    from common import data as D

    data_dir = str(D.locate(None))
    scripts = Path(__file__).resolve().parent
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        env = {**os.environ, "XDG_CACHE_HOME": f"{scratch}/cache"}  # a cache of its own, empty at first
        env.pop("MNIST_SUM_NO_COMPILE_CACHE", None)
        for name, script, extra in (("jax, empty cache", "train_jax.py", []), ("jax, warm cache", "train_jax.py", []),
                                    ("torch", "train_torch.py", ["--device", device])):
            out = Path(scratch) / name.replace(", ", "-").replace(" ", "-")
            command = [sys.executable, str(scripts / script), "--out", str(out), "--data-dir", data_dir, *extra,
                       *(["--dry-run"] if quick else ["--epochs", "1"])]
            start = time.perf_counter()
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
            wall = time.perf_counter() - start
            if done.returncode != 0:
                rows.append({"run": name, "error": (done.stderr.strip().splitlines() or ["failed"])[-1][:200]})
                continue
            first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
            rows.append({"run": name, "process_s": wall, "first_epoch_train_s": first["train_time_s"],
                         "compile_s": first.get("compile_time_s"), "test_digit_acc": first["test_digit_acc"],
                         "test_sum_acc": first["test_sum_acc"]})
            print(f"  {name}: process {wall:.1f} s, first epoch {first['train_time_s']:.1f} s")
    return rows


def markdown(report: dict) -> str:
    m, c = report["machine"], report.get("ceilings")
    settings = [text for key, text in [("malloc_keeps_freed_memory", "glibc malloc keeps freed memory (`keep_freed_memory`)"),
                                        ("jax_runs_on_calling_thread", "JAX runs single-device calls on the calling thread (`run_on_calling_thread`)")]
                if m.get(key)]
    ceiling = "not measured."
    if c:
        peaks = ", ".join(f"{fw}_{d} {c[f'{fw}_{d}_gflops_per_s']:.0f}" for d in ("fp32", "bf16") for fw in ("jax", "torch")
                          if f"{fw}_{d}_gflops_per_s" in c)
        ceiling = (f"{c['matmul_n']}^2 matmul GFLOP/s {peaks} (fp32 at the training precision, random operands); "
                   f"{c['copy_mb']} MB device copy GB/s jax {c['jax_copy_gb_per_s']:.0f}, torch {c['torch_copy_gb_per_s']:.0f}.")
    lines = [f"# Benchmark: JAX on {m['jax_device']} ({m['backend']}), PyTorch on {m['torch_device']}; {m['cpu']} ({m['cores']} cores), {m['date']}", "",
             f"jax {m['jax']}, torch {m['torch']}, python {m['python']}. Ceilings: {ceiling}"
             + (f" Process settings of the training scripts: {'; '.join(settings)}." if settings else ""), ""]
    if report.get("results"):
        lines += ["| framework | variant | batch | steps/call | compile s | step ms (median) | p10-p90 | images/s | epoch s | GFLOP/s | "
                  "% matmul ceiling | % copy bandwidth | device MB | peak RSS MB | vs torch eager | vs torch best | float32 as |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in report.get("results", []):
        if "error" in r:
            lines.append(f"| {r['framework']} | {r['variant']} | {r['batch_size']} | {r['error'][:80]} ||||||||||||||")
            continue
        lines.append(f"| {r['framework']} | {r['variant']} | {r['batch_size']} | {r.get('steps_per_call', '-')} | {r['compile_s']:.2f} | "
                     f"{r['step_ms_median']:.2f} | {r['step_ms_p10']:.2f}-{r['step_ms_p90']:.2f} | {r['images_per_s']:.0f} | "
                     f"{_num(r.get('epoch_s'), '.3f')} | {_num(r.get('gflops_per_s'), '.0f')} | {_num(r.get('pct_of_matmul_ceiling'), '.0f')} | "
                     f"{_num(r.get('pct_of_copy_bandwidth'), '.0f')} | {_num(r.get('device_mb'), '.0f')} | {_num(r.get('peak_rss_mb'), '.0f')} | "
                     f"{_num(r.get('throughput_vs_torch_eager'), '.2f')}x | {_num(r.get('throughput_vs_torch_best'), '.2f')}x | "
                     f"{r.get('precision', '-')} |")
    if report.get("time_to_accuracy"):
        order = "one epoch each in turn" if report["suite"] == "cpu" else "one run after the other"
        lines += ["", f"Training runs, {order} (training time after compilation, up to a device synchronisation; "
                  "evaluation excluded):", "",
                  "| run | framework | variant | recipe | compile s | first epoch s | median epoch s | reached 99.0% digit and sum | "
                  "after s | final digit % | final sum % |", "|---|---|---|---|---:|---:|---:|---|---:|---:|---:|"]
        for t in report["time_to_accuracy"]:
            if "error" in t or not t["epochs"]:
                lines.append(f"| {t['name']} | {t['framework']} | {t['variant']} | `{t['recipe']}` | "
                             f"{t.get('error') or 'cut while compiling'} |||||||")
                continue
            reached = t["reached"]
            lines.append(f"| {t['name']} | {t['framework']} | {t['variant']} | `{t['recipe']}` | {t['compile_s']:.1f} | "
                         f"{t['epoch_wall_s_first']:.2f} | {t['epoch_wall_s_median']:.2f} | "
                         f"{'epoch ' + str(reached['epoch']) if reached else 'no'} | {_num(reached and reached['train_s'], '.2f')} | "
                         f"{100 * t['final_test_digit_acc']:.2f} | {100 * t['final_test_sum_acc']:.2f} |"
                         + ("" if t["finished"] else " (cut)"))
    if report.get("cold_starts"):
        lines += ["", "Process starts: each trainer's 1-epoch default run as a user starts it (its own process; JAX "
                  "first with an empty compilation cache, then with the cache it left):", "",
                  "| run | process s | first epoch s (compile included) | of which compiling s |", "|---|---:|---:|---:|"]
        for c in report["cold_starts"]:
            lines.append(f"| {c['run']} | failed: {c['error'][:80]} |||" if "error" in c else
                         f"| {c['run']} | {c['process_s']:.1f} | {c['first_epoch_train_s']:.1f} | {_num(c['compile_s'], '.1f')} |")
    return "\n".join(lines) + "\n"


def check_numbers(args) -> list[int]:
    """The batch sizes; every numeric flag checked before anything runs."""
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        raise UserError(f"--batch-sizes wants integers separated by commas, got {args.batch_sizes!r}") from None
    if not all(1 <= b <= 60_000 for b in batch_sizes):
        raise UserError(f"--batch-sizes must each be in 1..60000, got {args.batch_sizes}")
    if not 1 <= args.steps <= 100_000:
        raise UserError(f"--steps must be in 1..100000, got {args.steps}")
    if args.max_epochs is not None and not 1 <= args.max_epochs <= 10_000:
        raise UserError(f"--max-epochs must be in 1..10000, got {args.max_epochs}")
    return batch_sizes


def start_frameworks(device: str):
    """The process settings, then JAX, then PyTorch on `device`. JAX starts first: on a GPU it
    checks the cuDNN it finds loaded, and importing torch loads its own. Returns
    (torch device, suite, whether malloc keeps freed memory)."""
    import jax

    from common.errors import ConfigError
    from common.malloc import keep_freed_memory
    from jax_impl.speed import tune_cpu_process

    tuned = tune_cpu_process()  # where JAX computes on the CPU: the training scripts' settings
    jax.devices()
    from torch_ref.train import allow_tf32, resolve_device

    try:
        torch_device = resolve_device(device)
    except ConfigError as e:
        raise UserError(str(e)) from None
    if torch_device.type == "cpu":
        tuned = keep_freed_memory() or tuned
    else:
        import torch

        allow_tf32(True)  # the precision train_torch.py uses there, as JAX's default
        torch.backends.cudnn.benchmark = True  # cuDNN times its algorithms per shape, as XLA autotunes its convolutions
    suite = "cpu" if jax.default_backend() == "cpu" and torch_device.type == "cpu" else "accelerator"
    return torch_device, suite, tuned


PARTS = ("steps", "training", "starts")


def parse_args():
    from common.config import TORCH_DEVICES, OneLineParser

    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default=BATCH_SIZES["cpu"], help=f"default on an accelerator: {BATCH_SIZES['accelerator']}")
    parser.add_argument("--steps", type=int, default=40, help="measured steps per path and batch size (>= 30; rounded up to whole rounds)")
    parser.add_argument("--device", choices=TORCH_DEVICES, default="auto", help="PyTorch's device (auto: cuda if available)")
    parser.add_argument("--json", default=None, metavar="OUT")
    parser.add_argument("--markdown", default=None, metavar="OUT")
    parser.add_argument("--quick", action="store_true", help="a smoke run: one batch size, few steps, no memory probes, short epochs")
    parser.add_argument("--max-epochs", type=int, default=None, help="cap for the training runs (default: each recipe's epochs)")
    parser.add_argument("--only", default=None, metavar="VARIANTS", help="measure only these variants, e.g. train_step,eager")
    parser.add_argument("--part", default=",".join(PARTS), metavar="PARTS",
                        help="which parts, in this order: steps (and the ceilings), training (time to 99%%; picks the "
                             "variants from the steps in --json when run alone), starts (process starts)")
    parser.add_argument("--time-budget", type=float, default=None, metavar="S",
                        help="no new batch size after half of S seconds, no new path after three quarters; no "
                             "training run starts after three quarters")
    parser.add_argument("--probe-memory", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--probe-two-devices", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.time_budget is not None and not 0 < args.time_budget < 1e6:
        raise UserError(f"--time-budget must be a positive number of seconds, got {args.time_budget}")
    parts = args.part.split(",")
    if not parts or set(parts) - set(PARTS):
        raise UserError(f"--part wants some of {','.join(PARTS)}, got {args.part!r}")
    return args, check_numbers(args), parts


def start_report(args, parts: list[str], suite: str, torch_device, malloc_tuned: bool) -> dict:
    """The report this run adds to: without the steps part, the one in --json (its rows pick the
    training runs' variants) if there is one; else a new one naming the machine."""
    from jax_impl.speed import runs_on_calling_thread

    if "steps" not in parts and args.json and Path(args.json).exists():
        try:
            return json.loads(Path(args.json).read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{args.json}: not a benchmark report ({type(e).__name__}); run --part steps first or name another --json") from None
    return {"suite": suite, "machine": {**machine(torch_device), "malloc_keeps_freed_memory": malloc_tuned,
                                        "jax_runs_on_calling_thread": runs_on_calling_thread(),
                                        "torch_cudnn_benchmark": torch_device.type == "cuda"}}


def measure_steps(args, report: dict, suite: str, batch_sizes: list[int], torch_device, train) -> None:
    big = suite == "accelerator" and not args.quick
    report["ceilings"] = ceilings(8192 if big else 1024 if args.quick else 4096, ("fp32", "bf16") if suite == "accelerator" else ("fp32",),
                                  torch_device, repeats=10 if big else 3, copy_mb=1024 if big else 64)
    write(report, args)
    print(f"machine: JAX on {report['machine']['jax_device']}, PyTorch on {report['machine']['torch_device']}; "
          f"fp32 matmul {report['ceilings']['jax_fp32_gflops_per_s']:.0f} GFLOP/s (XLA)")

    def report_rows(rows: list[dict]) -> None:  # kept on disk as they come, should the run be cut short
        report["results"] = rows
        add_shares(rows, report["ceilings"], len(train), suite)
        write(report, args)

    report_rows(bench_steps(args, suite, batch_sizes, train, report_rows))


def measure_training(args, report: dict, suite: str, torch_device) -> None:
    print("training runs (time to 99.0% test digit and sum):")
    runs = training_runs(suite, report.get("results", []), str(torch_device))

    def report_runs(rows: list[dict]) -> None:
        report["time_to_accuracy"] = rows
        report["device_peak_mb"] = device_peaks(torch_device)
        write(report, args)

    report_runs(time_to_accuracy(runs, 1 if args.quick else args.max_epochs, args.quick, in_turn=suite == "cpu",
                                 args=args, report=report_runs))


def main() -> None:
    args, batch_sizes, parts = parse_args()
    torch_device, suite, malloc_tuned = start_frameworks(args.device)
    if args.probe_memory:
        return probe_memory(args.probe_memory, args.device)
    if args.probe_two_devices:
        return probe_two_devices(args.probe_two_devices)
    if suite == "accelerator" and args.batch_sizes == BATCH_SIZES["cpu"]:
        batch_sizes = [int(b) for b in BATCH_SIZES["accelerator"].split(",")]
    if args.quick:
        batch_sizes, args.steps = batch_sizes[:1], 8
    chosen_paths(suite, args.only)  # an unknown --only answers before any work

    from common.config import Config
    from common.loop import load_splits

    report = start_report(args, parts, suite, torch_device, malloc_tuned)
    if "steps" in parts:
        train, _ = load_splits(Config())
        measure_steps(args, report, suite, batch_sizes, torch_device, train)
    if "training" in parts:
        measure_training(args, report, suite, torch_device)
    if "starts" in parts:
        print("process starts (cold and warm compilation cache):")
        report["cold_starts"] = cold_starts(args.quick, args.device)
    print(write(report, args))


def write(report: dict, args) -> str:
    """Rewrites --json and --markdown, each atomically: a kill mid-write leaves the last whole file."""
    from common.integrity import write_atomically

    table = markdown(report)
    for path, text in ((args.json, json.dumps(report, indent=2) + "\n"), (args.markdown, table)):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            write_atomically(Path(path), [text.encode()])
    return table


def device_peaks(torch_device) -> dict:
    """The largest device memory each framework held at once in this process (None on a CPU)."""
    import jax
    import torch

    stats = jax.devices()[0].memory_stats() or {}
    jax_peak = stats.get("peak_bytes_in_use")
    torch_peak = max(TORCH_PEAK_BYTES[0], torch.cuda.max_memory_allocated(torch_device)) if torch_device.type == "cuda" else None
    return {"jax": jax_peak / 2**20 if jax_peak else None, "torch": torch_peak / 2**20 if torch_peak else None}


if __name__ == "__main__":
    run_main(main)
