"""scripts/accelerator_check.sh rehearsed under the GPU machine's rules (conftest.py): a copy of
only what the device tool sends (the files git tracks or does not ignore, plus the .device
folder that the documented --prepare made), nothing beside it, no install, no MNIST_DIR, an
empty user cache, the interpreter as `python3` on PATH, and the documented device command run
verbatim, with the CPU stand-in (small sizes, a short budget) as the only difference. Once
through; once killed with SIGKILL part-way; once without the stand-in on a CPU, where it must
stop at the probe; once without MNIST, where it must not start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import DEVICE_COMMAND, PREPARE_COMMAND, ROOT, copy_checkout, device_env, start_device_command

STAGES = ["probe", "benchmark", "speedrun", "time_to_99", "parity", "tests"]
OUTPUTS = ["benchmark-speedrun.png", "benchmark.json", "benchmark.md", "log.md", "parity.json", "probe.json", "summary.json",
           "summary.md"]
DEVICE_FILES_BACK = 8  # the device tool brings back at most 8 files from OUT


def statuses(out: Path) -> dict[str, str]:
    return {s["stage"]: s["status"] for s in json.loads((out / "summary.json").read_text())["stages"]}


def every_json_parses(out: Path) -> None:
    for path in out.glob("*.json"):
        json.loads(path.read_text())


def session_processes(sid: int) -> list[int]:
    """The live processes of session `sid` (/proc/PID/stat after the command's brackets: the
    state, then the session id fourth); zombies are dead already, waiting for their parent."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def kill_session(sid: int) -> None:
    """SIGKILL to every process the check started (the stages' `timeout` makes process groups of
    their own, so killing one group would leave them running), until none is left."""
    while pids := session_processes(sid):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


def test_the_documented_commands_are_the_ones_rehearsed():
    for doc in (ROOT / "docs" / "devices.md", ROOT / "scripts" / "accelerator_check.sh"):
        text = doc.read_text()
        assert DEVICE_COMMAND in text and PREPARE_COMMAND in text, doc


@pytest.mark.slow
def test_the_rehearsal_runs_every_stage_and_keeps_its_files_flat(accelerator_rehearsal, device_copy):
    code, output, out = accelerator_rehearsal
    assert code == 0, output[-4000:]
    assert sorted(p.name for p in out.iterdir()) == OUTPUTS and len(OUTPUTS) <= DEVICE_FILES_BACK
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "stand-in" and summary["finished"] and summary["passed"] and summary["running"] is None
    assert [s["stage"] for s in summary["stages"]] == STAGES and set(statuses(out).values()) == {"ok"}
    assert sum(s["cap_s"] for s in summary["stages"]) <= summary["budget_s"]
    probe = json.loads((out / "probe.json").read_text())
    assert Path(probe["checkout"]) == device_copy and Path(probe["mnist"]) == device_copy / ".device" / "mnist"
    assert probe["jax_backend"] == "cpu" and probe["env"]["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    compare = probe["compare"]
    assert all(v <= compare["tolerance"] for fw in ("jax", "torch") for v in compare[fw].values())
    parity = json.loads((out / "parity.json").read_text())
    assert parity["designs_done"] and not parity["failures"]["warp"]
    bench = json.loads((out / "benchmark.json").read_text())
    assert bench["results"] and all(t["finished"] for t in bench["time_to_accuracy"])  # the rest: tests/test_benchmark.py
    # The speedrun's rows survive the training stage that rewrites the report after it; JAX loads
    # its programs from the cache the warm-up filled.
    speedrun = bench["speedrun"]
    assert speedrun["start"] == "warm" and [r["framework"] for r in speedrun["runs"]] == ["jax", "torch"] * 2
    assert "](benchmark-speedrun.png)" in (out / "benchmark.md").read_text()
    log = (out / "log.md").read_text()
    assert all(f"{stage}: ok after" in log for stage in STAGES)


@pytest.mark.slow
def test_a_kill_part_way_leaves_valid_json_and_says_what_was_cut(tmp_path, device_copy):
    """SIGKILL to all of the check once the benchmark stage has written its first file: the
    probe's results stay, every JSON file parses, and the summary names the stage that was cut
    and the ones never started."""
    out = tmp_path / "out"
    check = start_device_command(device_copy, out, device_env(tmp_path, ACCELERATOR_CHECK_STAND_IN="cpu"))
    try:
        while check.poll() is None and not (out / "benchmark.json").exists():
            time.sleep(0.5)
    finally:
        kill_session(check.pid)
        check.communicate()
    every_json_parses(out)
    summary = json.loads((out / "summary.json").read_text())
    assert not summary["finished"] and summary["passed"] is None and summary["running"] == "benchmark"
    assert statuses(out) == {"probe": "ok", "benchmark": "running", **{s: "pending" for s in STAGES[2:]}}
    assert "compare" in json.loads((out / "probe.json").read_text())
    assert json.loads((out / "benchmark.json").read_text())["machine"]["cores"] >= 1
    assert "## benchmark" in (out / "log.md").read_text()  # streamed: the stage's start is there


def test_full_mode_without_a_gpu_stops_at_the_probe(tmp_path, device_copy):
    """No stand-in: on a machine without a GPU (or with it hidden) --full is an error in its
    first stage, never a CPU run of the rest."""
    out = tmp_path / "out"
    check = start_device_command(device_copy, out, device_env(tmp_path, CUDA_VISIBLE_DEVICES=""))
    output, _ = check.communicate(timeout=600)
    assert check.returncode == 1, output[-3000:]
    assert statuses(out) == {"probe": "failed", **{s: "not run: the probe failed" for s in STAGES[1:]}}
    assert "error: no GPU" in output or "error: JAX has no GPU backend" in output
    assert not (out / "benchmark.json").exists()


def test_without_the_prepared_mnist_the_check_does_not_start(tmp_path):
    checkout = copy_checkout(ROOT, tmp_path / "repo")  # no .device: --prepare never ran
    env = device_env(tmp_path)
    check = start_device_command(checkout, tmp_path / "out", env)
    output, _ = check.communicate(timeout=60)
    assert check.returncode == 2 and output.count("\n") == 1 and "--prepare" in output
    assert not (tmp_path / "out").exists()
    prepare = subprocess.run(["bash", "-c", PREPARE_COMMAND], cwd=checkout, env=env, capture_output=True, text=True)
    assert prepare.returncode == 2 and "no MNIST" in prepare.stderr  # nothing beside the copy, an empty cache
