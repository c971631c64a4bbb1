"""Process starts: what a user's first and second start of a training script cost, each its own
process, JAX with an empty compilation cache and then with the cache it left."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def cold_starts(quick: bool, device: str) -> list[dict]:
    """What a user's process start costs: each trainer's 1-epoch default run (a dry run with
    --quick) as its own process, JAX with an empty compilation cache, then again with the cache
    it left. Per run: the process's wall time, the first epoch's training time (compilation
    included) and, for JAX, the seconds spent compiling (metrics.jsonl)."""
    from common import data as D

    data_dir = str(D.locate(None))
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        env = {**os.environ, "XDG_CACHE_HOME": f"{scratch}/cache"}  # a cache of its own, empty at first
        env.pop("MNIST_SUM_NO_COMPILE_CACHE", None)
        for name, script, extra in (("jax, empty cache", "train_jax.py", []), ("jax, warm cache", "train_jax.py", []),
                                    ("torch", "train_torch.py", ["--device", device])):
            out = Path(scratch) / name.replace(", ", "-").replace(" ", "-")
            command = [sys.executable, str(SCRIPTS / script), "--out", str(out), "--data-dir", data_dir, *extra,
                       *(["--dry-run"] if quick else ["--epochs", "1"])]
            rows.append(start_row(name, command, env, out))
    return rows


def start_row(name: str, command: list[str], env: dict, out: Path) -> dict:
    """One training script's process: its wall time and its first epoch's line of metrics.jsonl."""
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        return {"run": name, "error": (done.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    print(f"  {name}: process {wall:.1f} s, first epoch {first['train_time_s']:.1f} s")
    return {"run": name, "process_s": wall, "first_epoch_train_s": first["train_time_s"],
            "compile_s": first.get("compile_time_s"), "test_digit_acc": first["test_digit_acc"],
            "test_sum_acc": first["test_sum_acc"]}
