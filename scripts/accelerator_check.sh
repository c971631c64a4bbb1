#!/usr/bin/env bash
# The prepared check of both frameworks on an accelerator. On one H200-class GPU, in under 8
# minutes: versions and devices, the device and parity tests, a dry run of each trainer, the
# benchmark with its time-to-99% runs, and the parity report, all on the GPU. Without a GPU (or
# with --smoke) a smoke version of each stage runs in about two minutes; CI runs it
# (tests/test_accelerator_check.py), so the script cannot rot.
#
#   scripts/accelerator_check.sh OUT_DIR [--smoke]
#
# Runs from a checkout with no install (PYTHONPATH is set here); $PYTHON, else python, else
# python3. MNIST: $MNIST_DIR, else shared/data/mnist in or beside the checkout, else the cache.
# Writes into OUT_DIR, flat: environment.json, dry_runs.json, benchmark.json, benchmark.md,
# parity.json, log.md (every stage's output), summary.md and summary.json (each stage's status
# and seconds). Exit code 0 when every stage passed, else 1.
set -uo pipefail

OUT=${1:?usage: scripts/accelerator_check.sh OUT_DIR [--smoke]}
MODE=full
[ "${2:-}" = "--smoke" ] && MODE=smoke
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-$(command -v python || command -v python3)}
if [ -z "${MNIST_DIR:-}" ]; then
    for d in "$ROOT/shared/data/mnist" "$ROOT/../shared/data/mnist"; do
        [ -d "$d" ] && export MNIST_DIR="$d" && break
    done
fi
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
START=$SECONDS
BUDGET=${ACCELERATOR_CHECK_BUDGET_S:-470}  # seconds for the whole check: under 8 minutes with the summary
FAILED=0
: > "$OUT/log.md"
: > "$SCRATCH/stages"

# stage NAME CAP_SECONDS: runs the function NAME with a time limit (its cap, or what is left of
# the budget; the whole process group goes at the limit), appends its output to log.md and its
# status to the summary.
stage() {
    local name=$1 cap=$2 status t0=$SECONDS
    local left=$((BUDGET - (SECONDS - START)))
    local limit=$((cap < left ? cap : left))
    if [ "$limit" -lt 10 ]; then
        status="skipped: no time left"
        : > "$SCRATCH/$name.log"
    else
        timeout --kill-after=10 "$limit" bash -c "$name" > "$SCRATCH/$name.log" 2>&1
        case $? in
            0) status=ok ;;
            124 | 137) status="timeout after ${limit}s" ;;
            *) status=failed ;;
        esac
    fi
    [ "$status" = ok ] || FAILED=1
    printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" >> "$SCRATCH/stages"
    { printf '## %s: %s, %ss\n\n```\n' "$name" "$status" "$((SECONDS - t0))"
      tail -c 30000 "$SCRATCH/$name.log"
      printf '```\n\n'; } >> "$OUT/log.md"
    echo "[$((SECONDS - START))s] $name: $status"
    [ "$status" = ok ] || tail -n 15 "$SCRATCH/$name.log"
}

# JAX starts before torch is imported wherever both run in one process: on a GPU it checks the
# cuDNN it finds loaded, and importing torch loads its own.
environment() {
    "$PY" - "$OUT/environment.json" "$MODE" <<'EOF'
import json, os, platform, shutil, subprocess, sys
import jax, jaxlib
backend = jax.default_backend()
import flax, numpy, optax, orbax.checkpoint, torch
from common import data as D
out, mode = sys.argv[1], sys.argv[2]
cuda = torch.cuda.is_available()
env = {"mode": mode, "python": platform.python_version(), "platform": platform.platform(),
       "jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__, "optax": optax.__version__,
       "orbax_checkpoint": getattr(orbax.checkpoint, "__version__", None), "numpy": numpy.__version__,
       "torch": torch.__version__, "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
       "jax_backend": backend, "jax_devices": [f"{d} ({d.device_kind})" for d in jax.devices()],
       "torch_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else ["cpu"],
       "accelerator": backend != "cpu" or cuda, "mnist": str(D.locate(None))}
if shutil.which("nvidia-smi"):
    env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                       capture_output=True, text=True).stdout.strip()
print(json.dumps(env, indent=2))
open(out, "w").write(json.dumps(env, indent=2) + "\n")
EOF
}

# The parity tests and the parity report compile the same programs: the second finds them in
# this cache. The benchmark does not use it, so its compile times are its own.
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0

tests() {
    export JAX_COMPILATION_CACHE_DIR="$SCRATCH/jax-cache"
    if [ "$MODE" = smoke ]; then  # the fast device tests; CI runs the whole suite anyway
        set -- tests/test_devices.py -k "auto_is_cuda or batches_and_crops or sees_exactly or exact_float32 or stay_off"
    else
        set -- tests/test_devices.py parity_tests
    fi
    "$PY" -c 'import sys, jax; jax.devices(); import pytest; sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", *sys.argv[1:]]))' "$@"
}

dry_runs() {
    "$PY" scripts/train_jax.py --dry-run --out "$SCRATCH/jax" && "$PY" scripts/train_torch.py --dry-run --out "$SCRATCH/torch" &&
    "$PY" - "$SCRATCH" "$OUT/dry_runs.json" <<'EOF'
import json, sys
from pathlib import Path
runs = {fw: {"environment": json.loads((Path(sys.argv[1]) / fw / "config.json").read_text())["environment"],
             "metrics": [json.loads(line) for line in (Path(sys.argv[1]) / fw / "metrics.jsonl").read_text().splitlines()]}
        for fw in ("jax", "torch")}
Path(sys.argv[2]).write_text(json.dumps(runs, indent=2) + "\n")
print(json.dumps({fw: r["environment"] for fw, r in runs.items()}, indent=2))
EOF
}

benchmark() {
    if [ "$MODE" = smoke ]; then set -- --quick --batch-sizes 16; else set -- --time-budget 190; fi
    "$PY" scripts/benchmark.py --json "$OUT/benchmark.json" --markdown "$OUT/benchmark.md" "$@"
}

parity() {
    if [ "$MODE" = smoke ]; then  # minutes on a CPU: the parity tests in CI cover it there
        echo "not run in smoke mode"
        return 0
    fi
    JAX_COMPILATION_CACHE_DIR="$SCRATCH/jax-cache" "$PY" scripts/parity_report.py --json "$OUT/parity.json"
}

export -f environment tests dry_runs benchmark parity
export OUT SCRATCH PY MODE
echo "accelerator check ($MODE mode) into $OUT"
stage environment 60
if [ "$MODE" = full ] && ! grep -q '"accelerator": true' "$OUT/environment.json" 2>/dev/null; then
    MODE=smoke
    echo "no accelerator found: smoke mode"
fi
stage tests 150
stage dry_runs 90
stage benchmark 230
stage parity 120

"$PY" - "$SCRATCH/stages" "$OUT" "$MODE" "$((SECONDS - START))" <<'EOF'
import json, sys
from pathlib import Path
stages = [dict(zip(("stage", "status", "seconds"), line.split("\t"))) for line in Path(sys.argv[1]).read_text().splitlines()]
out, mode, total = Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
ok = all(s["status"] == "ok" for s in stages)
(out / "summary.json").write_text(json.dumps({"mode": mode, "passed": ok, "seconds": total, "stages": stages}, indent=2) + "\n")
rows = "\n".join(f"| {s['stage']} | {s['status']} | {s['seconds']} |" for s in stages)
(out / "summary.md").write_text(f"# Accelerator check ({mode} mode): {'passed' if ok else 'FAILED'} in {total} s\n\n"
                                f"| stage | status | seconds |\n|---|---|---:|\n{rows}\n\n"
                                "Outputs: environment.json, dry_runs.json, benchmark.json/.md, parity.json; each stage's output in log.md.\n")
print((out / "summary.md").read_text())
EOF
exit $FAILED
