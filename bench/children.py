"""The rows measured in child processes of scripts/benchmark.py: each path's peak memory alone,
and the JAX step over 2 XLA host devices (a process's device count is fixed when JAX starts)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from bench.machine import peak_rss_mb
from bench.paths import make_path, warm_up
from bench.timing import per_call_times, summary

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"


def child_args(args: argparse.Namespace) -> list[str]:
    return [sys.executable, str(SCRIPT), "--device", args.device]


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


def child_memory(args: argparse.Namespace, framework: str, variant: str, batch: int) -> dict:
    """`probe_memory` in a child: the path's peak RSS (None if the child failed)."""
    out = subprocess.run([*child_args(args), "--probe-memory", f"{framework}:{variant}:{batch}"],
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        return {"peak_rss_mb": None}
    return json.loads(out.stdout.strip().splitlines()[-1])


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


def two_devices_row(args: argparse.Namespace, batch: int, steps: int, flops: float | None) -> dict:
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
