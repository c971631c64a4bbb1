"""What a benchmark run writes: the report it adds to, its markdown tables and JSON (rewritten
whole, atomically, as each part goes: a kill mid-write leaves the last whole file), and the
speedrun's plot."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

from bench.machine import machine
from common.errors import UserError
from common.integrity import write_atomically


def start_report(json_path: str | None, parts: list[str], suite: str, torch_device, malloc_tuned: bool) -> dict:
    """The report this run adds to: without the steps part, the one in --json (its rows pick the
    training runs' variants) if there is one; else a new one naming the machine."""
    from jax_impl.speed import runs_on_calling_thread

    if "steps" not in parts and json_path and Path(json_path).exists():
        try:
            return json.loads(Path(json_path).read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{json_path}: not a benchmark report ({type(e).__name__}); run --part steps first or name another --json") from None
    return {"suite": suite, "machine": {**machine(torch_device), "malloc_keeps_freed_memory": malloc_tuned,
                                        "jax_runs_on_calling_thread": runs_on_calling_thread(),
                                        "torch_cudnn_benchmark": torch_device.type == "cuda"}}


def write(report: dict, json_path: str | None, markdown_path: str | None) -> str:
    """Rewrites --json and --markdown, each atomically; returns the markdown."""
    table = markdown(report, Path(markdown_path).parent if markdown_path else None)
    for path, text in ((json_path, json.dumps(report, indent=2) + "\n"), (markdown_path, table)):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            write_atomically(Path(path), [text.encode()])
    return table


def markdown(report: dict, folder: Path | None = None) -> str:
    """The report's tables; `folder`: where the markdown goes (the plot is linked from there)."""
    lines = machine_lines(report) + step_lines(report) + training_lines(report) + start_lines(report)
    return "\n".join(lines + speedrun_lines(report, folder)) + "\n"


def _num(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _plus_minus(mean: float | None, std: float | None) -> str:
    return "-" if mean is None else f"{mean:.2f}" + ("" if std is None else f" ± {std:.2f}")


def _range(low: float | None, high: float | None, spec: str = ".2f") -> str:
    return "-" if low is None else f"{low:{spec}}-{high:{spec}}"


def machine_lines(report: dict) -> list[str]:
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
    return [f"# Benchmark: JAX on {m['jax_device']} ({m['backend']}), PyTorch on {m['torch_device']}; {m['cpu']} ({m['cores']} cores), {m['date']}", "",
            f"jax {m['jax']}, torch {m['torch']}, python {m['python']}. Ceilings: {ceiling}"
            + (f" Process settings of the training scripts: {'; '.join(settings)}." if settings else ""), ""]


def step_lines(report: dict) -> list[str]:
    if not report.get("results"):
        return []
    lines = ["| framework | variant | batch | steps/call | compile s | step ms (median) | p10-p90 | images/s | epoch s | GFLOP/s | "
             "% matmul ceiling | % copy bandwidth | device MB | peak RSS MB | vs torch eager | vs torch best | float32 as |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['framework']} | {r['variant']} | {r['batch_size']} | {r['error'][:80]} ||||||||||||||")
            continue
        lines.append(f"| {r['framework']} | {r['variant']} | {r['batch_size']} | {r.get('steps_per_call', '-')} | {r['compile_s']:.2f} | "
                     f"{r['step_ms_median']:.2f} | {r['step_ms_p10']:.2f}-{r['step_ms_p90']:.2f} | {r['images_per_s']:.0f} | "
                     f"{_num(r.get('epoch_s'), '.3f')} | {_num(r.get('gflops_per_s'), '.0f')} | {_num(r.get('pct_of_matmul_ceiling'), '.0f')} | "
                     f"{_num(r.get('pct_of_copy_bandwidth'), '.0f')} | {_num(r.get('device_mb'), '.0f')} | {_num(r.get('peak_rss_mb'), '.0f')} | "
                     f"{_num(r.get('throughput_vs_torch_eager'), '.2f')}x | {_num(r.get('throughput_vs_torch_best'), '.2f')}x | "
                     f"{r.get('precision', '-')} |")
    return lines


def training_lines(report: dict) -> list[str]:
    if not report.get("time_to_accuracy"):
        return []
    order = "one epoch each in turn" if report["suite"] == "cpu" else "one run after the other"
    lines = ["", f"Training runs, {order} (training time after compilation, up to a device synchronisation; "
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
    return lines


def start_lines(report: dict) -> list[str]:
    if not report.get("cold_starts"):
        return []
    lines = ["", "Process starts: each trainer's 1-epoch default run as a user starts it (its own process; JAX "
             "first with an empty compilation cache, then with the cache it left):", "",
             "| run | process s | first epoch s (compile included) | of which compiling s |", "|---|---:|---:|---:|"]
    for c in report["cold_starts"]:
        lines.append(f"| {c['run']} | failed: {c['error'][:80]} |||" if "error" in c else
                     f"| {c['run']} | {c['process_s']:.1f} | {c['first_epoch_train_s']:.1f} | {_num(c['compile_s'], '.1f')} |")
    return lines


def speedrun_lines(report: dict, folder: Path | None) -> list[str]:
    """Per preset the summary over seeds per framework, then a row per run; with several presets
    the ratios of their training times; then the plot."""
    s = report.get("speedrun")
    if not s:
        return []
    lines = []
    for preset in s["presets"]:
        lines += preset_lines(s, preset)
    if s["ratios"]:
        first = s["preset"]
        lines += ["", f"Training time of `{first}` over each other preset's, seed by seed (each seed ran the presets one "
                  "after the other):", "", "| framework | over | seeds | ratio, mean | min-max |", "|---|---|---:|---:|---:|"]
        lines += [f"| {r['framework']} | `{r['baseline']}` | {r['seeds']} | {_num(r['train_s_ratio_mean'], '.3f')} | "
                  f"{_range(r['train_s_ratio_min'], r['train_s_ratio_max'], '.3f')} |" for r in s["ratios"]]
    if s.get("plot"):
        link = os.path.relpath(s["plot"], folder) if folder else s["plot"]
        lines += ["", f"![test accuracy against seconds, per framework and seed]({link})"]
    return lines


def preset_lines(s: dict, preset: str) -> list[str]:
    """One preset's tables: the summary per framework, then a row per run."""
    recipe, goal = s["presets"][preset]["recipe"], f"{100 * s['presets'][preset]['target']:.1f}%"
    seeds = "seed 0" if s["seeds"] == 1 else f"seeds 0-{s['seeds'] - 1}"
    turn = "seed by seed" if len(s["presets"]) == 1 else f"seed by seed, each seed running `{', '.join(s['presets'])}` in turn"
    lines = ["", f"Speedrun: `--preset {preset}` (`{recipe}`), {seeds}, JAX and PyTorch "
             f"({s['torch_variant']}) in turn {turn}, each from a fresh trainer and a {s['start']} start{' (JAX: its programs from a compilation cache a warm-up run filled)' if s['start'] == 'warm' else ' (nothing compiled before)'}; the clock runs from building the "
             f"trainer to the end of its last step, compilation included, the test set's scoring ({s['evals_per_epoch']} "
             "times an epoch) excluded" + (" (--quick: a few steps)" if s["quick"] else "") + ":", "",
             f"| framework | variant | reached {goal} digit and sum | time to {goal} s, mean ± std | min-max | "
             "compile s (mean) | training s (mean) | final digit % mean (min) | final sum % mean (min) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for f in s["summary"]:
        if f["preset"] != preset or not f["runs"]:
            continue
        lines.append(f"| {f['framework']} | {f['variant']} | {f['reached']} of {f['runs']} | "
                     f"{_plus_minus(f['time_to_target_s_mean'], f['time_to_target_s_std'])} | "
                     f"{_range(f['time_to_target_s_min'], f['time_to_target_s_max'])} | "
                     f"{_num(f['compile_s_mean'], '.2f')} | {f['train_s_mean']:.2f} | "
                     f"{100 * f['final_test_digit_acc_mean']:.2f} ({100 * f['final_test_digit_acc_min']:.2f}) | "
                     f"{100 * f['final_test_sum_acc_mean']:.2f} ({100 * f['final_test_sum_acc_min']:.2f}) |")
    lines += ["", f"| seed | framework | variant | compile s | time to {goal} s | at step | training s | final digit % | final sum % |",
              "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in (r for r in s["runs"] if r["preset"] == preset):
        lead = f"| {r['seed']} | {r['framework']} | {r['variant']} |"
        if "error" in r:
            lines.append(f"{lead} {r['error']} ||||||")
            continue
        at = r["target_at"]
        lines.append(f"{lead} {_num(r['compile_s'], '.2f')} | {_num(r['time_to_target_s'], '.2f')} | "
                     f"{'-' if at is None else at['step']} | {r['train_s']:.2f} | "
                     f"{100 * r['final_test_digit_acc']:.2f} | {100 * r['final_test_sum_acc']:.2f} |")
    return lines


def draw_curves(ax, runs: list[dict], target: float) -> None:
    """Each run's curve on `ax`, one colour per framework, the target (%) drawn across."""
    for framework, colour in (("jax", "tab:blue"), ("torch", "tab:orange")):
        for i, r in enumerate(x for x in runs if x["framework"] == framework):
            curve = r["curve"]
            ax.plot([p["clock_s"] for p in curve], [100 * min(p["test_digit_acc"], p["test_sum_acc"]) for p in curve],
                    "o-", color=colour, alpha=0.6, markersize=3, label=f"{framework} ({r['variant']})" if i == 0 else None)
    ax.axhline(target, color="gray", linestyle="--", label=f"{target:.1f}%")
    ax.set(xlabel="seconds since the trainer was built (compilation in, evaluation out)")
    ax.grid(alpha=0.3)


def plot_speedrun(section: dict, path: Path) -> Path:
    """Test accuracy (the lower of the two heads) against the run's clock, a line per run, one
    colour per framework, the target drawn across: the whole curve, and beside it the approach
    to the target; a row of the two per preset. Written atomically (a reader never sees half a
    PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = list(section["presets"])
    fig, grid = plt.subplots(len(presets), 2, figsize=(12, 4.5 * len(presets)), squeeze=False)
    for preset, axes in zip(presets, grid):
        target = 100 * section["presets"][preset]["target"]
        runs = [r for r in section["runs"] if r["preset"] == preset and "error" not in r]
        for ax in axes:
            draw_curves(ax, runs, target)
        axes[0].set(ylabel="test accuracy, lower of digit and sum (%)", title=f"--preset {preset}, {section['seeds']} seeds")
        axes[1].set(ylim=(target - 2, 100), title=f"near {target:.1f}%")
        axes[1].sharex(axes[0])
        axes[0].legend(loc="lower right")
    fig.tight_layout()
    png = io.BytesIO()
    try:
        fig.savefig(png, dpi=100, format="png")
    finally:
        plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, [png.getvalue()])
    return path
