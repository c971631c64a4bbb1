"""Benchmark JAX and PyTorch side by side, in one run, on the CPU or a GPU.

    python scripts/benchmark.py [--batch-sizes 32,128,512] [--steps N] [--device auto|cpu|cuda]
                                [--json OUT] [--markdown OUT] [--quick] [--part steps,training,starts,speedrun]
                                [--seeds N] [--speedrun-preset PRESET[,PRESET...]]
                                [--speedrun-start cold|warm] [--speedrun-torch eager|compile|channels_last] [--plot PNG]

JAX runs on its default backend (a GPU when it has one; JAX_PLATFORMS respected), PyTorch on
--device (auto: CUDA when PyTorch sees a GPU). Per path and batch size: the first call's time
(compilation and warm-up) apart from the step times, which are the median and p10-p90 of timed
calls that each end with a device synchronisation; images/s; GFLOP/s (FLOPs per step from XLA's
cost analysis of one unrolled JAX step; PyTorch runs the same math, so the same count is used
for it) and its share of the measured ceilings (random operands); memory; each row's float32
precision (TF32 or not). Paths are measured in rounds that alternate between them, so machine
noise hits all alike. Then each framework trains its fastest recipe for this kind of chip
until 99.0% test digit and sum (on a CPU epoch by epoch in turn; on a GPU one run after the
other, each written when done). Then, in processes of their own, the cold starts. Then the
speedrun: `--preset speedrun` (or `speedrun-99.5`, or several presets, each seed running them in
turn) in both frameworks over --seeds seeds, in turn, each run from a fresh trainer with its
compilation on the clock, the test set scored 8 times an epoch off the clock: the time to 99.0%
(99.5%) digit and sum per seed, and a plot of the curves (--plot, by default beside --markdown
or --json as NAME-speedrun.png). --part runs some of these
(scripts/accelerator_check.sh runs the steps, the speedrun and the training in stages); --json and
--markdown are rewritten, atomically, as each batch size, epoch or run is done.

On a CPU (benchmarks/cpu.*): JAX's train step (16 steps per compiled call) and one step per
call (what train_jax.py runs on a CPU), PyTorch eager and torch.compile, at batch 32, 128, 512; peak RSS
per path in a child process; the JAX step data-parallel over 2 host devices in a child of its own.
On a GPU: JAX in fp32 and bf16 with its steps in a lax.scan (this backend's default), and a whole
epoch per call; PyTorch eager (`cudnn.benchmark` on, as XLA autotunes its convolutions) in fp32
and in bf16 autocast, torch.compile, and torch.compile with CUDA graphs (at batch 128 and 512
only: each compile costs tens of seconds); at batch 512, 128, 2048, 8192; the device memory of
each path; the ceilings of bf16 and fp32 matmuls and of a device-to-device copy in each
framework; the default recipe in fp32 and bf16. The pieces live in bench/, a module a concern.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from bench import children, machine, speedrun, starts, steps, training  # noqa: E402
from bench.report import plot_speedrun, start_report, write  # noqa: E402
from common.cli import run_main  # noqa: E402
from common.config import Config  # noqa: E402
from common.errors import UserError  # noqa: E402
from common.loop import load_splits  # noqa: E402

PARTS = ("steps", "training", "starts", "speedrun")


def main() -> None:
    args, batch_sizes, parts = parse_args()
    torch_device, suite, malloc_tuned = machine.start_frameworks(args.device)
    if args.probe_memory:
        return children.probe_memory(args.probe_memory, args.device)
    if args.probe_two_devices:
        return children.probe_two_devices(args.probe_two_devices)
    if suite == "accelerator" and args.batch_sizes == steps.BATCH_SIZES["cpu"]:
        batch_sizes = [int(b) for b in steps.BATCH_SIZES["accelerator"].split(",")]
    if args.quick:
        batch_sizes, args.steps = batch_sizes[:1], 8
    steps.chosen_paths(suite, args.only)  # an unknown --only answers before any work

    report = start_report(args.json, parts, suite, torch_device, malloc_tuned)
    save = lambda: write(report, args.json, args.markdown)  # noqa: E731
    if "steps" in parts:
        steps.measure(args, report, batch_sizes, torch_device, load_splits(Config())[0], save)
    if "training" in parts:
        training.measure(args, report, torch_device, save)
    if "starts" in parts:
        print("process starts (cold and warm compilation cache):")
        report["cold_starts"] = starts.cold_starts(args.quick, args.device)
    if "speedrun" in parts:
        speedrun.measure(args, report, torch_device, save)
        if (plot := plot_path(args)) is not None:
            report["speedrun"]["plot"] = str(plot_speedrun(report["speedrun"], plot))
    print(save())


def plot_path(args: argparse.Namespace) -> Path | None:
    """--plot, else NAME-speedrun.png beside --markdown (or --json); None: no file is written."""
    if args.plot:
        return Path(args.plot)
    beside = args.markdown or args.json
    return Path(beside).with_name(f"{Path(beside).stem}-speedrun.png") if beside else None


def check_numbers(args: argparse.Namespace) -> list[int]:
    """The batch sizes; every numeric flag, and the speedrun's presets, checked before anything runs."""
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
    if not 1 <= args.seeds <= 1000:
        raise UserError(f"--seeds must be in 1..1000, got {args.seeds}")
    args.speedrun_presets = args.speedrun_preset.split(",")
    if set(args.speedrun_presets) - set(speedrun.TARGETS) or len(set(args.speedrun_presets)) < len(args.speedrun_presets):
        raise UserError(f"--speedrun-preset wants one or more of {','.join(speedrun.TARGETS)}, each once, "
                        f"got {args.speedrun_preset!r}")
    if args.time_budget is not None and not 0 < args.time_budget < 1e6:
        raise UserError(f"--time-budget must be a positive number of seconds, got {args.time_budget}")
    return batch_sizes


def parse_args() -> tuple[argparse.Namespace, list[int], list[str]]:
    from common.config import TORCH_DEVICES, OneLineParser

    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default=steps.BATCH_SIZES["cpu"], help=f"default on an accelerator: {steps.BATCH_SIZES['accelerator']}")
    parser.add_argument("--steps", type=int, default=40, help="measured steps per path and batch size (>= 30; rounded up to whole rounds)")
    parser.add_argument("--device", choices=TORCH_DEVICES, default="auto", help="PyTorch's device (auto: cuda if available)")
    parser.add_argument("--json", default=None, metavar="OUT")
    parser.add_argument("--markdown", default=None, metavar="OUT")
    parser.add_argument("--quick", action="store_true", help="a smoke run: one batch size, few steps, no memory probes, "
                        "short epochs, two speedrun seeds")
    parser.add_argument("--max-epochs", type=int, default=None, help="cap for the training runs (default: each recipe's epochs)")
    parser.add_argument("--only", default=None, metavar="VARIANTS", help="measure only these variants, e.g. train_step,eager")
    parser.add_argument("--part", "--parts", dest="part", default=",".join(PARTS), metavar="PARTS",
                        help="which parts, in this order: steps (and the ceilings), training (time to 99%%; picks the "
                             "variants from the steps in --json when run alone), starts (process starts), speedrun "
                             "(--speedrun-preset over --seeds seeds, compilation included)")
    parser.add_argument("--seeds", type=int, default=10, help="speedrun: seeds 0..N-1 per framework")
    parser.add_argument("--speedrun-preset", default="speedrun", metavar="PRESET[,PRESET...]",
                        help=f"speedrun: the recipe ({', '.join(speedrun.TARGETS)}), and the test accuracy its clock "
                             "runs to (speedrun and fast, the recipe before it: 99.0%%; speedrun-99.5: 99.5%%); several, "
                             "comma-separated: each seed runs them in turn, and the first one's training time is "
                             "compared with each other's, seed by seed")
    parser.add_argument("--speedrun-start", choices=("cold", "warm"), default="cold",
                        help="speedrun: JAX compiles every program (a first start), or loads them from a "
                             "compilation cache a warm-up run filled (a user's later starts)")
    parser.add_argument("--speedrun-torch", choices=speedrun.TORCH_VARIANTS, default="channels_last",
                        help="speedrun: the PyTorch variant (channels_last, the NHWC layout, was its fastest on a CPU: benchmarks/README.md)")
    parser.add_argument("--plot", default=None, metavar="PNG", help="speedrun: the curves' plot "
                        "(default: NAME-speedrun.png beside --markdown, else beside --json)")
    parser.add_argument("--time-budget", type=float, default=None, metavar="S",
                        help="no new batch size after half of S seconds, no new path after three quarters; no "
                             "training or speedrun run starts after three quarters")
    parser.add_argument("--probe-memory", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--probe-two-devices", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    parts = args.part.split(",")
    if not parts or set(parts) - set(PARTS):
        raise UserError(f"--part wants some of {','.join(PARTS)}, got {args.part!r}")
    return args, check_numbers(args), parts


if __name__ == "__main__":
    run_main(main)
