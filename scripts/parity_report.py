"""Measure how closely the JAX implementation and the PyTorch reference agree (checks 1-5 of
parity_tests/), for every design and model option (parity/measure.py: CASES), and print each
figure next to its tolerance.
Exit code 1 if any tolerance fails.
`python scripts/parity_report.py [--data-dir DIR] [--device D] [--json OUT] [--quick]`

JAX runs on its default backend (JAX_PLATFORMS respected), PyTorch on --device; float32 is
compared without TF32 on either side (parity.exact_float32). --json is rewritten, atomically,
after each design, so a run cut short keeps the designs it finished ("designs_done"). --quick
(the accelerator check's CPU rehearsal) runs the same checks on the first design only, at batch 32,
with 20 pretraining steps, a 5-step trajectory and 1,000 test pairs: the code path, not the figures."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from common.cli import run_main  # noqa: E402


def main() -> None:
    from common.config import TORCH_DEVICES, OneLineParser

    parser = OneLineParser(description=__doc__)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--json", default=None, metavar="OUT")
    parser.add_argument("--device", choices=TORCH_DEVICES, default="auto", help="PyTorch's device (auto: cuda if available)")
    parser.add_argument("--quick", action="store_true", help="fewer pretraining and trajectory steps (a rehearsal, not a measurement)")
    args = parser.parse_args()

    import jax

    jax.devices()  # JAX starts before torch is imported: on a GPU it checks the cuDNN it finds loaded
    from common import data as D
    from common.data import locate, load_mnist, make_splits
    from common.integrity import write_atomically
    from parity import measure as P
    from torch_ref import train as ttrain

    torch_device = ttrain.resolve_device(args.device)  # --device cuda without a GPU: one line, before any work
    train, test = make_splits(load_mnist(locate(args.data_dir)), seed=0)
    designs, steps = (list(P.CASES)[:1], (20, 5)) if args.quick else (list(P.CASES), (P.PRETRAIN_STEPS, P.TRAJECTORY_STEPS))
    small = {"batch_size": 32} if args.quick else {}
    if args.quick:
        test = D.Split(test.images[:1000], test.labels[:1000], test.numbers[:1000])
    devices = {"jax": f"{jax.default_backend()}: {jax.devices()[0].device_kind}", "torch": ttrain.environment(torch_device)["device_name"]}
    reports, failed = {}, {}

    def save(extra: dict) -> None:
        if args.json:
            done = {"designs_done": list(reports), "designs_left": [d for d in designs if d not in reports], "quick": args.quick,
                    "pretrain_steps": steps[0], "trajectory_steps": steps[1], "test_pairs": len(test), "batch_size": small.get("batch_size"), **extra}
            write_atomically(Path(args.json), [(json.dumps({**done, "tolerances": {**P.TOLERANCES, **P.WARP_TOLERANCES},
                                                            "deep_trunk_tolerances": P.DEEP_TOLERANCES, "devices": devices,
                                                            "per_design": reports, "failures": failed}, indent=2, default=str) + "\n").encode()])

    for design in designs:
        reports[design] = P.full_report(P.config_for(design, torch_device=args.device, **small), train, test, *steps)
        failed[design] = P.failures(reports[design])
        save({})
        print(f"{design}: {'ok' if not failed[design] else 'FAIL ' + '; '.join(failed[design])}")

    def own_bar(design: str, key: str) -> bool:
        """The case is judged against a bar of its own for this figure (the deep trunk's), not the column's."""
        return P.tolerances(reports[design]["trunk"])[key] != P.TOLERANCES[key]

    print(f"{'figure':32s} {'tolerance':>10s} " + " ".join(f"{d:>12s}" for d in designs))
    for key, tol in P.TOLERANCES.items():
        sign = ">=" if key == "prediction_agreement" else "<="
        # "-": a figure this case does not have (the float32 gradients and batch norm's statistics:
        # parity/measure.py, `full_report`)
        print(f"{key:32s} {sign}{tol:8.0e} " + " ".join((f"{reports[d][key]:11.3e}" + ("*" if own_bar(d, key) else " "))
                                                        if key in reports[d] else f"{'-':>12s}" for d in designs))
    if any(own_bar(d, k) for d in designs for k in P.TOLERANCES):
        print("* judged against the deep trunk's own bar: " + ", ".join(f"{k} <= {t:g}" for k, t in P.DEEP_TOLERANCES.items()))
    warp = P.warp_report(train)
    for key, tol in P.WARP_TOLERANCES.items():
        print(f"{key:32s} <={tol:8.0e} {warp[key]:12.3e}  (the warp, pixel units; every design)")
    failed["warp"] = [f"{k} = {warp[k]:.3g} > {tol:g}" for k, tol in P.WARP_TOLERANCES.items() if warp[k] > tol]
    # The top-level keys hold the worst case over the designs judged against "tolerances", so one
    # number answers "does it pass?"; a case with a bar of its own is judged in "failures".
    shared = {k: [r[k] for d, r in reports.items() if k in r and not own_bar(d, k)] for k in P.TOLERANCES}
    worst = {k: (min if k == "prediction_agreement" else max)(values) for k, values in shared.items() if values}
    save({**worst, **warp})
    bad = [f"{d}: {f}" for d, fs in failed.items() for f in fs]
    print("PASS: every figure within tolerance" if not bad else "FAIL: " + "; ".join(bad))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    run_main(main)
