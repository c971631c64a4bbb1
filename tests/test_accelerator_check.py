"""scripts/accelerator_check.sh as a machine without a GPU runs it (smoke mode): every stage
runs and passes, its files land flat in OUT_DIR, and a failing stage fails the check. The GPU
hidden from both frameworks, so the same holds on a machine that has one."""

from __future__ import annotations

import json

from conftest import accelerator_check

STAGES = ["environment", "tests", "dry_runs", "benchmark", "parity"]


def test_smoke_mode_runs_every_stage_and_writes_flat_files(accelerator_smoke):
    result, out = accelerator_smoke
    assert result.returncode == 0, result.stdout[-4000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["benchmark.json", "benchmark.md", "dry_runs.json", "environment.json", "log.md", "summary.json", "summary.md"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "smoke" and summary["passed"]
    assert [s["stage"] for s in summary["stages"]] == STAGES and {s["status"] for s in summary["stages"]} == {"ok"}
    env = json.loads((out / "environment.json").read_text())
    assert env["jax_backend"] == "cpu" and not env["accelerator"] and env["jax"] and env["torch"]
    dry = json.loads((out / "dry_runs.json").read_text())
    assert dry["jax"]["environment"]["device_name"] and dry["torch"]["environment"]["device_name"] == "cpu"
    assert all(len(dry[fw]["metrics"]) == 1 for fw in ("jax", "torch"))
    bench = json.loads((out / "benchmark.json").read_text())
    assert bench["suite"] == "cpu" and len(bench["time_to_accuracy"]) == 2  # the rest: tests/test_benchmark.py
    log = (out / "log.md").read_text()
    assert all(f"## {stage}: ok" in log for stage in STAGES)


def test_a_failing_stage_fails_the_check(tmp_path):
    """MNIST missing: the first stage fails (or, on a slow machine, runs out of the budget), and
    a budget of 12 s leaves no time for the rest, which are skipped and count as failed."""
    out = tmp_path / "check"
    result = accelerator_check(out, MNIST_DIR=str(tmp_path / "nowhere"), ACCELERATOR_CHECK_BUDGET_S="12")
    assert result.returncode == 1
    summary = json.loads((out / "summary.json").read_text())
    statuses = {s["stage"]: s["status"] for s in summary["stages"]}
    assert not summary["passed"] and statuses["environment"] in ("failed", "timeout after 12s")
    assert all(statuses[s].startswith("skipped") for s in STAGES[1:])
    if statuses["environment"] == "failed":
        assert "no such directory" in (out / "log.md").read_text()
