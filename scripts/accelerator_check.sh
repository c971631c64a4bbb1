#!/usr/bin/env bash
# The one run on a lent GPU machine: both frameworks checked and measured on one H200 in at
# most 300 s of wall time, every result written into OUT_DIR the moment it exists, so a cut at
# any second keeps what finished (docs/devices.md).
#
#   bash scripts/accelerator_check.sh --prepare                      # here, before the lease
#   PYTHON=python3 bash scripts/accelerator_check.sh "$OUT" --full    # there: the device command
#
# The device tool copies the checkout and the ignored paths named in `carry`, never ../shared:
# --prepare copies the four MNIST IDX files from $MNIST_DIR, ../shared/data/mnist or the user
# cache into .device/mnist (ignored by git), which the device call carries (carry [".device"])
# and this script reads first. There: the image's python3 with its packages, no pip, no
# network; PYTHONPATH is set here. The stages, in order of value, each under a cap (the caps add
# up to less than the budget):
#   probe       versions (CUDA, cuDNN), devices, one convolution and one matmul forward and
#               backward in each framework on the GPU against the CPU      -> probe.json
#   benchmark   step rows at batch 512, 128, 2048, 8192 as time allows     -> benchmark.json, .md
#   speedrun    --preset speedrun, both frameworks seed by seed from a warm compilation cache,
#               as many of 10 seeds as fit (into benchmark.json, .md)  -> benchmark-speedrun.png
#   time_to_99  each framework's fastest variant of the accelerator recipe to 99%, then JAX's
#               default recipe in fp32 and bf16 (into benchmark.json, .md)
#   parity      the parity report, design by design                        -> parity.json
#   tests       tests/test_devices.py
# OUT_DIR stays flat and small (the device tool brings back 8 files): those 6 files, log.md (each
# stage's output, streamed as it comes), summary.json and summary.md (rewritten before and after
# every stage: a stage "running" in a summary whose "finished" is false was cut there).
# --full stops in its first seconds when MNIST is missing, and the probe stops the check when
# JAX or PyTorch sees no GPU or computes wrongly there. ACCELERATOR_CHECK_STAND_IN=cpu runs the
# same stages on the CPU with small sizes and a short budget: CI's rehearsal of the device run
# (tests/test_accelerator_check.py). Exit code 0 when every stage passed, 1 when one failed or
# was cut, 2 when the check could not start.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
IDX="train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte"
DEVICE_MNIST="$ROOT/.device/mnist"

# has_mnist DIR: whether DIR holds the four IDX files (gzipped or not).
has_mnist() {
    local f
    for f in $IDX; do [ -f "$1/$f.gz" ] || [ -f "$1/$f" ] || return 1; done
}

prepare() {
    local src
    for src in "${MNIST_DIR:-}" "$ROOT/../shared/data/mnist" "${XDG_CACHE_HOME:-$HOME/.cache}/mnist-sum"; do
        [ -n "$src" ] && has_mnist "$src" && break
        src=
    done
    if [ -z "$src" ]; then
        echo "error: no MNIST in \$MNIST_DIR, ../shared/data/mnist or the user cache (python scripts/train_jax.py --dry-run downloads it)" >&2
        exit 2
    fi
    mkdir -p "$DEVICE_MNIST" || exit 2
    for f in $IDX; do cp "$src/$f"* "$DEVICE_MNIST/" || exit 2; done
    echo "MNIST from $src copied into .device/mnist: name it in the device call's carry ([\".device\"])"
}

if [ "${1:-}" = "--prepare" ]; then
    prepare
    exit 0
fi
USAGE="usage: scripts/accelerator_check.sh --prepare | OUT_DIR --full"
if [ $# -ne 2 ] || [ "$2" != "--full" ]; then
    echo "$USAGE" >&2
    exit 2
fi
OUT=$1
case ${ACCELERATOR_CHECK_STAND_IN:-} in
    "") MODE=full ;;
    cpu) MODE=stand-in ;;
    *) echo "error: ACCELERATOR_CHECK_STAND_IN must be cpu or unset, got '$ACCELERATOR_CHECK_STAND_IN'" >&2; exit 2 ;;
esac
cd "$ROOT" || exit 2
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-$(command -v python3 || command -v python)}
if has_mnist "$DEVICE_MNIST"; then
    export MNIST_DIR="$DEVICE_MNIST"
elif [ -z "${MNIST_DIR:-}" ] || ! has_mnist "$MNIST_DIR"; then
    echo "error: no MNIST in .device/mnist${MNIST_DIR:+ or $MNIST_DIR}: run 'bash scripts/accelerator_check.sh --prepare' before the lease and carry .device" >&2
    exit 2
fi
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT

# Python's output streams into log.md as it comes (a killed stage loses no tail); JAX takes GPU
# memory as it needs it, not most of the card, so PyTorch in the same process finds some; no
# progress bars in the log. The stand-in hides any GPU from both frameworks.
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TQDM_DISABLE=1
if [ "$MODE" = full ]; then
    # The GPU first, the CPU for the probe's comparison. Where JAX has no CUDA plugin it still
    # falls back to the CPU (seen on a CPU machine), so the probe checks the backend it got.
    export JAX_PLATFORMS=cuda,cpu
    EXPECT=gpu BUDGET=300
    STAGES="probe:30 benchmark:90 speedrun:75 time_to_99:45 parity:35 tests:20"
    # PyTorch eager with cudnn.benchmark: channels_last, its CPU choice, is unmeasured on a GPU.
    SPEEDRUN_TORCH=eager
    BENCH_ARGS="--batch-sizes 512,128,2048,8192" QUICK=""
    TESTS_K=""
else
    export JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES=""
    # About twice what each stage takes on a 2-core CPU shared with other work.
    EXPECT=cpu BUDGET=660
    STAGES="probe:60 benchmark:150 speedrun:120 time_to_99:90 parity:170 tests:60"
    SPEEDRUN_TORCH=channels_last
    BENCH_ARGS="--batch-sizes 16 --only train_step,single_step,eager" QUICK="--quick"
    TESTS_K="auto_is_cuda or batches_and_crops or sees_exactly or exact_float32 or stay_off"
fi
START=$SECONDS
: > "$OUT/log.md"
for s in $STAGES; do printf '%s\t%s\tpending\t\n' "${s%%:*}" "${s##*:}" >> "$SCRATCH/stages"; done

# set_status NAME STATUS [SECONDS]: the stage's line in the table, then the summary.
set_status() {
    awk -F'\t' -v OFS='\t' -v n="$1" -v st="$2" -v sec="${3:-}" '$1 == n {$3 = st; $4 = sec} {print}' \
        "$SCRATCH/stages" > "$SCRATCH/stages.new" && mv "$SCRATCH/stages.new" "$SCRATCH/stages"
    write_summary
}

# write_summary [finished]: summary.json and summary.md from the table, each written atomically.
write_summary() {
    "$PY" - "$SCRATCH/stages" "$OUT" "$MODE" "$BUDGET" "$((SECONDS - START))" "${1:-}" <<'EOF'
import json, sys
from pathlib import Path
from common.integrity import write_atomically
table, out, mode, budget, elapsed, finished = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6] == "finished"
stages = [dict(zip(("stage", "cap_s", "status", "seconds"), line.split("\t"))) for line in Path(table).read_text().splitlines()]
for s in stages:
    s["cap_s"], s["seconds"] = int(s["cap_s"]), int(s["seconds"]) if s["seconds"] else None
running = next((s["stage"] for s in stages if s["status"] == "running"), None)
passed = all(s["status"] == "ok" for s in stages) if finished else None
summary = {"mode": mode, "finished": finished, "passed": passed, "running": running, "seconds": elapsed, "budget_s": budget,
           "note": "finished is false while the check runs; if it stays false, the check was cut in the stage 'running' "
                   "and the stages 'pending' never started", "stages": stages}
write_atomically(out / "summary.json", [(json.dumps(summary, indent=2) + "\n").encode()])
state = ("passed" if passed else "FAILED") if finished else f"not finished (running: {running})"
rows = "\n".join(f"| {s['stage']} | {s['status']} | {s['seconds'] if s['seconds'] is not None else '-'} | {s['cap_s']} |" for s in stages)
write_atomically(out / "summary.md", [(f"# Accelerator check ({mode}): {state}, {elapsed} s of {budget}\n\n"
                                       f"| stage | status | seconds | cap s |\n|---|---|---:|---:|\n{rows}\n\n"
                                       "Outputs: probe.json, benchmark.json/.md, benchmark-speedrun.png, parity.json; each stage's output in log.md.\n").encode()])
EOF
}

# stage NAME CAP: runs the function NAME within its cap or what is left of the budget (the whole
# process group goes at the limit), its output streamed into log.md, its status into the summary.
stage() {
    local name=$1 cap=$2 status t0=$SECONDS
    local left=$((BUDGET - (SECONDS - START) - 5))  # 5 s for the last summary
    export LIMIT=$((cap < left ? cap : left))
    if [ "$LIMIT" -lt 10 ]; then
        status="skipped: no time left"
    else
        set_status "$name" running
        printf '## %s (limit %ss)\n\n```\n' "$name" "$LIMIT" >> "$OUT/log.md"
        timeout --kill-after=5 "$LIMIT" bash -c "$name" >> "$OUT/log.md" 2>&1
        case $? in
            0) status=ok ;;
            124 | 137) status="cut: timeout after ${LIMIT}s" ;;
            *) status=failed ;;
        esac
        printf '```\n\n%s: %s after %ss\n\n' "$name" "$status" "$((SECONDS - t0))" >> "$OUT/log.md"
    fi
    set_status "$name" "$status" "$((SECONDS - t0))"
    echo "[$((SECONDS - START))s] $name: $status"
    [ "$status" = ok ] || [ "$status" = "skipped: no time left" ] || tail -n 12 "$OUT/log.md"
    [ "$status" = ok ]
}

# JAX starts before torch is imported wherever both run in one process: on a GPU it checks the
# cuDNN it finds loaded, and importing torch loads its own.
probe() {
    "$PY" - "$OUT/probe.json" "$EXPECT" <<'EOF'
import json, os, platform, shutil, subprocess, sys
from pathlib import Path
import numpy as np
import jax, jax.numpy as jnp, jaxlib
out, expect = Path(sys.argv[1]), sys.argv[2]
try:
    backend = jax.default_backend()
except RuntimeError as e:  # JAX_PLATFORMS names the GPU: a plugin that cannot start it stops here
    sys.exit(f"error: JAX has no GPU backend (JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS')}): {str(e).splitlines()[0][:300]}")
import flax, optax, orbax.checkpoint, torch
from common import data as D
from common.integrity import write_atomically

def save(report):
    write_atomically(out, [(json.dumps(report, indent=2, default=str) + "\n").encode()])

def jax_cuda_versions():
    try:
        from jax._src.lib import cuda_versions
    except ImportError:
        return None
    if cuda_versions is None:
        return None
    found = {}
    for name in ("cuda_runtime_get_version", "cuda_driver_get_version", "cudnn_get_version", "cublas_get_version", "cufft_get_version"):
        try:
            found[name.removesuffix("_get_version")] = getattr(cuda_versions, name)()
        except Exception as e:
            found[name.removesuffix("_get_version")] = f"unknown ({type(e).__name__})"
    return found

gpu = torch.cuda.is_available()
report = {"mode": expect, "python": platform.python_version(), "platform": platform.platform(), "executable": sys.executable,
          "checkout": str(Path(D.__file__).resolve().parents[1]), "mnist": str(D.locate(None)),
          "env": {k: os.environ.get(k) for k in ("JAX_PLATFORMS", "XLA_PYTHON_CLIENT_PREALLOCATE", "CUDA_VISIBLE_DEVICES", "PYTHONPATH")},
          "jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__, "optax": optax.__version__,
          "orbax_checkpoint": getattr(orbax.checkpoint, "__version__", None), "numpy": np.__version__,
          "jax_backend": backend, "jax_devices": [f"{d} ({d.device_kind})" for d in jax.devices()],
          "jax_platform_version": jax.devices()[0].client.platform_version, "jax_cuda": jax_cuda_versions(),
          "torch": torch.__version__, "torch_cuda": torch.version.cuda, "torch_cudnn": torch.backends.cudnn.version() if gpu else None,
          "torch_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if gpu else ["cpu"]}
try:  # JAX's own account: jaxlib, its CUDA plugin's versions, nvidia-smi's table
    report["jax_environment_info"] = jax.print_environment_info(return_string=True).splitlines()
except Exception as e:
    report["jax_environment_info"] = f"unavailable ({type(e).__name__})"
if shutil.which("nvidia-smi"):
    report["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                          capture_output=True, text=True).stdout.strip()
save(report)  # the versions first: should a computation below hang, they are on disk
print(json.dumps(report, indent=2, default=str))
if expect == "gpu" and (backend != "gpu" or not gpu):
    sys.exit(f"error: no GPU: JAX's backend is {backend}, torch.cuda.is_available() is {gpu}")

# One convolution and one matmul, forward and backward, on random data, in full float32 on the
# accelerator and on the CPU. Tolerance 1e-4 (relative, by norm): float32 in another summation
# order or algorithm lands near 1e-6, TF32 near 1e-3, a broken kernel far off.
TOL = 1e-4
rng = np.random.default_rng(0)
x, w = rng.standard_normal((64, 8, 28, 28), np.float32), rng.standard_normal((16, 8, 3, 3), np.float32)
a, b = rng.standard_normal((256, 512), np.float32), rng.standard_normal((512, 384), np.float32)

def jax_run(device):
    def loss(x, w, a, b):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"), precision="highest")
        z = jnp.matmul(a, b, precision="highest")
        return jnp.sum(jnp.tanh(y)) + jnp.sum(jnp.tanh(z)), (y, z)
    (_, outs), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(*jax.device_put((x, w, a, b), device))
    return [np.asarray(v) for v in (*outs, *grads)]

def torch_run(device):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    ts = [torch.tensor(v, device=device, requires_grad=True) for v in (x, w, a, b)]
    y, z = torch.nn.functional.conv2d(ts[0], ts[1], padding=1), ts[2] @ ts[3]
    (torch.tanh(y).sum() + torch.tanh(z).sum()).backward()
    return [v.detach().cpu().numpy() for v in (y, z, *(t.grad for t in ts))]

names = ("conv", "matmul", "grad_x", "grad_w", "grad_a", "grad_b")
rel = lambda u, v: float(np.linalg.norm(u - v) / np.linalg.norm(v))
report["compare"] = {"tolerance": TOL, "accelerator": expect,
                     "jax": dict(zip(names, map(rel, jax_run(jax.devices()[0]), jax_run(jax.devices("cpu")[0])))),
                     "torch": dict(zip(names, map(rel, torch_run("cuda" if gpu else "cpu"), torch_run("cpu"))))}
save(report)
print(json.dumps(report["compare"], indent=2))
bad = [f"{fw} {k} {v:.2g}" for fw in ("jax", "torch") for k, v in report["compare"][fw].items() if not v <= TOL]
sys.exit(f"error: the accelerator disagrees with the CPU beyond {TOL:g}: {', '.join(bad)}" if bad else 0)
EOF
}

benchmark() {
    # shellcheck disable=SC2086  # the argument lists split on purpose
    "$PY" scripts/benchmark.py --part steps --json "$OUT/benchmark.json" --markdown "$OUT/benchmark.md" \
        --time-budget "$((LIMIT - 5))" $BENCH_ARGS $QUICK
}

# The speedrun's rows: both frameworks in turn, seed by seed, JAX from a compilation cache a
# warm-up run filled (the figure after compilation that the H200 goal names); the plot beside.
speedrun() {
    # shellcheck disable=SC2086
    "$PY" scripts/benchmark.py --part speedrun --speedrun-start warm --speedrun-torch "$SPEEDRUN_TORCH" \
        --json "$OUT/benchmark.json" --markdown "$OUT/benchmark.md" --time-budget "$((LIMIT - 5))" $QUICK
}

time_to_99() {
    # shellcheck disable=SC2086
    "$PY" scripts/benchmark.py --part training --json "$OUT/benchmark.json" --markdown "$OUT/benchmark.md" \
        --time-budget "$((LIMIT - 5))" $QUICK
}

parity() {
    # shellcheck disable=SC2086
    "$PY" scripts/parity_report.py --json "$OUT/parity.json" $QUICK
}

# The device tests only: the parity tests measure what the parity report just measured.
tests() {
    "$PY" -m pytest -q -p no:cacheprovider --runslow tests/test_devices.py ${TESTS_K:+-k "$TESTS_K"}
}

export -f probe benchmark speedrun time_to_99 parity tests
export OUT PY EXPECT BENCH_ARGS QUICK TESTS_K SPEEDRUN_TORCH
echo "accelerator check ($MODE) into $OUT, budget ${BUDGET}s; MNIST from $MNIST_DIR"
write_summary
FAILED=0
for s in $STAGES; do
    name=${s%%:*}
    if [ "$FAILED" = probe ]; then
        set_status "$name" "not run: the probe failed"
        continue
    fi
    stage "$name" "${s##*:}" || { [ "$name" = probe ] && FAILED=probe || FAILED=1; }
done
write_summary finished
cat "$OUT/summary.md"
[ "$FAILED" = 0 ]
