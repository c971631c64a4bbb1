"""scripts/benchmark.py --quick runs end to end and writes every figure (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_writes_all_figures(tmp_path, mnist_dir):
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--quick", "--batch-sizes", "16",
                             "--json", str(out_json), "--markdown", str(out_md)],
                            capture_output=True, text=True, timeout=900, env={**__import__("os").environ, "MNIST_DIR": str(mnist_dir)})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out_json.read_text())
    assert report["machine"]["cores"] >= 1 and report["matmul_ceiling"]["xla_gflops_per_s"] > 0
    rows = {(r["framework"], r["variant"]): r for r in report["results"]}
    assert {("jax", "train_step"), ("jax", "single_step"), ("torch", "eager"), ("torch", "compile")} <= rows.keys()
    for key in ("jax", "train_step"), ("torch", "eager"):
        row = rows[key]
        assert row["batch_size"] == 16 and row["step_ms_median"] > 0 and row["images_per_s"] > 0
        assert row["gflops_per_s"] > 0 and row["compile_s"] > 0 and "throughput_vs_torch_eager" in row
    assert rows[("jax", "train_step")]["flops_per_step"] > 1e8  # XLA's count for the real step: ~0.5 GFLOP at 16
    assert {t["framework"] for t in report["time_to_accuracy"]} == {"jax", "torch"}
    assert "| jax | train_step | 16 |" in out_md.read_text()
