"""scripts/summarize.py: a results row from finished runs, read exactly as training writes them;
a malformed run, the same run twice, or runs of different recipes or frameworks are one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from common.config import ADDED_LATER
from tests.test_resume import command

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--dry-run", "--conv1", "8", "--conv2", "16", "--hidden", "64", "--seed", "3"]


def summarize(*runs: Path | str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "summarize.py"), *map(str, runs)],
                          capture_output=True, text=True, timeout=120)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One real (dry) run, as training leaves it."""
    run = tmp_path_factory.mktemp("summarize") / "seed3"
    result = subprocess.run(command("jax", *SMALL, "--out", str(run)), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return run


def copy_run(trained: Path, to: Path, **config) -> Path:
    """The trained run under another name, with some settings of its config.json changed."""
    shutil.copytree(trained, to)
    saved = json.loads((to / "config.json").read_text())
    framework = config.pop("framework", None)
    saved["config"].update(config)
    if framework:
        saved["environment"]["framework"] = framework
    (to / "config.json").write_text(json.dumps(saved))
    return to


def test_a_row_from_runs_of_several_seeds(trained, tmp_path):
    other = copy_run(trained, tmp_path / "seed4", seed=4)
    result = summarize(trained, other)
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)
    assert row["seeds"] == [3, 4] and row["framework"] == "jax" and row["epochs"] == 1
    assert row["digit"].endswith("± 0.00")  # the same figures twice: no spread


def test_a_trailing_blank_line_is_read_as_training_reads_it(trained, tmp_path):
    run = copy_run(trained, tmp_path / "blank")
    with (run / "metrics.jsonl").open("a") as f:
        f.write("\n")
    result = summarize(run)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["seeds"] == [3]


def test_the_same_run_twice_is_refused(trained, tmp_path):
    assert "same run" in one_line_error(summarize(trained, trained))
    assert "same run" in one_line_error(summarize(trained, trained / ".." / trained.name))
    copy = copy_run(trained, tmp_path / "copy")  # a copy is the same seed's run again
    assert "same run" in one_line_error(summarize(trained, copy))


@pytest.mark.parametrize("change, named", [
    ({"design": "digit"}, "design"),
    ({"lr": 0.5}, "lr"),
    ({"preset": "best"}, "preset"),
    ({"dry_run": False, "epochs": 1}, "dry_run"),
    ({"framework": "torch"}, "torch"),
])
def test_runs_of_different_recipes_or_frameworks_are_refused(change, named, trained, tmp_path):
    other = copy_run(trained, tmp_path / "other", seed=4, **change)
    for order in ((trained, other), (other, trained)):
        line = one_line_error(summarize(*order))
        assert named in line and ("one recipe" in line or "one framework" in line), line


def damage(run: Path, what: str) -> None:
    if what == "no folder":
        shutil.rmtree(run)
    elif what == "no config":
        (run / "config.json").unlink()
    elif what == "config not JSON":
        (run / "config.json").write_text("{")
    elif what == "config without environment":
        (run / "config.json").write_text(json.dumps({"config": json.loads((run / "config.json").read_text())["config"]}))
    elif what == "config a list":
        (run / "config.json").write_text("[]")
    elif what == "no metrics":
        (run / "metrics.jsonl").unlink()
    elif what == "metrics not JSON":
        (run / "metrics.jsonl").write_text("{not json\n")
    elif what == "metrics without a key":
        row = json.loads((run / "metrics.jsonl").read_text())
        del row["test_sum_acc"]
        (run / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    elif what == "metrics with text for a number":
        row = json.loads((run / "metrics.jsonl").read_text())
        row["train_time_s"] = "fast"
        (run / "metrics.jsonl").write_text(json.dumps(row) + "\n")


@pytest.mark.parametrize("what, message", [
    ("no folder", "no such run folder"),
    ("no config", "config.json: missing"),
    ("config not JSON", "config.json"),
    ("config without environment", "no 'environment'"),
    ("config a list", "not a run's config"),
    ("no metrics", "0 of 1 epochs logged"),
    ("metrics not JSON", "metrics.jsonl, line 1: not JSON"),
    ("metrics without a key", "line 1: no number for test_sum_acc"),
    ("metrics with text for a number", "line 1: no number for train_time_s"),
])
def test_a_malformed_run_is_one_line(what, message, trained, tmp_path):
    run = copy_run(trained, tmp_path / "damaged")
    damage(run, what)
    line = one_line_error(summarize(run))
    assert message in line and str(run) in line, line


def test_an_unfinished_run_is_one_line(trained, tmp_path):
    run = copy_run(trained, tmp_path / "unfinished", dry_run=False, epochs=3)
    assert "1 of 3 epochs logged; the run has not finished" in one_line_error(summarize(run))


def rewrite_metrics(run: Path, **changes) -> None:
    """Sets figures of the last epoch in metrics.jsonl (json writes a float NaN as NaN, as training would)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows[-1].update(changes)
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.mark.parametrize("markdown", [False, True])
def test_a_nan_accuracy_is_refused_in_one_line(markdown, trained, tmp_path):
    """It once printed "nan ± nan" and exited 0."""
    run = copy_run(trained, tmp_path / "nan")
    rewrite_metrics(run, test_digit_acc=float("nan"))
    before = (run / "metrics.jsonl").read_bytes()
    line = one_line_error(summarize(run, *(["--markdown"] if markdown else [])))
    assert f"{run / 'metrics.jsonl'}: epoch 1 has test_digit_acc nan" in line, line
    assert (run / "metrics.jsonl").read_bytes() == before


def test_a_run_holding_pairs_out_without_its_unseen_accuracy_is_refused(trained, tmp_path):
    run = copy_run(trained, tmp_path / "held_out", holdout_pairs=10)  # the trained run logged no unseen figure
    assert "epoch 1 has no number for test_sum_acc_unseen" in one_line_error(summarize(run))


def test_an_older_run_without_the_fields_added_later_gives_the_same_row(trained, tmp_path):
    run = copy_run(trained, tmp_path / "old")
    saved = json.loads((run / "config.json").read_text())
    del saved["format"]
    for name in ADDED_LATER:
        del saved["config"][name]
    (run / "config.json").write_text(json.dumps(saved))
    old, new = summarize(run), summarize(trained)
    assert old.returncode == 0 and old.stderr == "", old.stderr
    assert json.loads(old.stdout) == json.loads(new.stdout)


def test_an_unknown_field_from_a_newer_run_is_a_warning_and_the_row_is_made(trained, tmp_path):
    run = copy_run(trained, tmp_path / "newer", new_field_v2="x")
    result = summarize(run)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [f"warning: {run / 'config.json'} holds settings this version does not know "
                                          "(new_field_v2); ignoring them"]
    assert json.loads(result.stdout)["seeds"] == [3]
