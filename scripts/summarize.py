"""Summarise finished runs (one per seed) as one results row: mean and spread of the final test
accuracies, training time, and the time to reach 99.0% test digit AND sum accuracy.

    python scripts/summarize.py runs/best-0 runs/best-1 runs/best-2
    python scripts/summarize.py runs/best-* --markdown   # the row as README.md shows it
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.cli import run_main  # noqa: E402
from common.errors import UserError, os_error_line  # noqa: E402
from common.config import RECIPE_FIELDS, OneLineParser, read_saved_run  # noqa: E402
from common.runlog import METRIC_KEYS, is_number, read_metrics  # noqa: E402

TARGET = 0.99
UNSEEN = "test_sum_acc_unseen"  # logged by runs that hold (digit, r) pairs out
# What must agree between the runs of one row: all but the seed (and where the run went).
SAME_IN_A_ROW = ("dry_run", *(name for name in RECIPE_FIELDS if name != "seed"))


def read_run(run_dir: Path) -> dict:
    """A finished run's figures; every problem is a one-line UserError naming the run."""
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run folder")
    saved = read_saved_run(run_dir)  # as predict.py and --resume read it
    if saved.warning():
        print(saved.warning(), file=sys.stderr)
    config = saved.config.to_dict()
    expected = 1 if config["dry_run"] else config["epochs"]
    try:
        rows = read_metrics(run_dir / "metrics.jsonl")  # exactly as training reads its own log
    except OSError as e:
        raise UserError(f"{run_dir}: cannot read its metrics ({os_error_line(e)})") from None
    except ValueError as e:
        raise UserError(str(e)) from None
    if len(rows) < expected:
        raise UserError(f"{run_dir}: {len(rows)} of {expected} epochs logged; the run has not finished")
    require_finite(rows, run_dir / "metrics.jsonl", unseen=config["holdout_pairs"] > 0)
    train_time = np.cumsum([row["train_time_s"] for row in rows])
    reached = [i for i, row in enumerate(rows) if min(row["test_digit_acc"], row["test_sum_acc"]) >= TARGET]
    last = rows[-1]
    return {"dir": run_dir, "framework": saved.framework, "config": config, "epochs": len(rows),
            "digit": 100 * last["test_digit_acc"], "sum": 100 * last["test_sum_acc"],
            "unseen": 100 * last[UNSEEN] if UNSEEN in last else None,
            "train_s": float(train_time[-1]), "to_99_s": float(train_time[reached[0]]) if reached else None}


def require_finite(rows: list[dict], path: Path, unseen: bool) -> None:
    """Every figure a row is made of is a finite number: a NaN would print as "nan ± nan", and
    a run with pairs held out that lacks its unseen accuracy would print "-" as if it had none."""
    for row in rows:
        bad = [k for k in (*METRIC_KEYS, UNSEEN) if k in row and is_number(row[k]) and not math.isfinite(row[k])]
        if bad:
            raise UserError(f"{path}: epoch {row['epoch']} has {', '.join(f'{k} {row[k]}' for k in bad)}; "
                            "a row is made of finite figures only")
        if unseen and not is_number(row.get(UNSEEN)):
            raise UserError(f"{path}: epoch {row['epoch']} has no number for {UNSEEN} (the run holds pairs out)")


def check_one_row(runs: list[dict]) -> None:
    """One row is one recipe in one framework, each run a different seed."""
    first = runs[0]
    seen: dict = {}
    for run in runs:
        same = seen.get(run["dir"].resolve()) or seen.get(("seed", run["config"].get("seed")))
        if same is not None:
            raise UserError(f"{run['dir']} and {same['dir']} are the same run (seed {run['config'].get('seed')}); "
                            "give each seed's run once")
        seen[run["dir"].resolve()] = seen[("seed", run["config"].get("seed"))] = run
        if run["framework"] != first["framework"]:
            raise UserError(f"{run['dir']} is a {run['framework']} run, {first['dir']} a {first['framework']} run; "
                            "one row is one framework")
        for name in SAME_IN_A_ROW:
            if run["config"].get(name) != first["config"].get(name):
                raise UserError(f"{run['dir']} has {name} {run['config'].get(name)!r}, {first['dir']} "
                                f"{first['config'].get(name)!r}; one row is one recipe")


def mean_spread(values: list[float | None], fmt: str) -> str:
    """mean ± half the range (min to max) over the seeds; "-" where a run has no value."""
    if any(v is None for v in values):
        return "-"
    v = np.array(values)
    return f"{v.mean():{fmt}} ± {(v.max() - v.min()) / 2:{fmt}}"


def summarize(runs: list[dict]) -> dict:
    cfg = runs[0]["config"]
    return {"framework": runs[0]["framework"], "design": cfg["design"], "preset": cfg["preset"],
            "holdout_pairs": cfg["holdout_pairs"], "seeds": [r["config"]["seed"] for r in runs],
            "epochs": runs[0]["epochs"], "digit": mean_spread([r["digit"] for r in runs], ".2f"),
            "sum": mean_spread([r["sum"] for r in runs], ".2f"), "unseen": mean_spread([r["unseen"] for r in runs], ".1f"),
            "train_s": mean_spread([r["train_s"] for r in runs], ".0f"),
            "to_99_s": mean_spread([r["to_99_s"] for r in runs], ".1f")}


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories, one per seed, same recipe")
    parser.add_argument("--markdown", action="store_true", help="print the README table row")
    args = parser.parse_args(argv)
    runs = [read_run(r) for r in args.runs]
    check_one_row(runs)
    row = summarize(runs)
    if args.markdown:
        print(f"| {row['framework']} | {row['design']} | {row['preset']} | {row['holdout_pairs']} | {row['digit']} | "
              f"{row['sum']} | {row['unseen']} | {row['epochs']} | {row['train_s']} | {row['to_99_s']} |")
    else:
        print(json.dumps(row, indent=1))


if __name__ == "__main__":
    run_main(main)
