"""The machine: the process settings both frameworks start with, the facts a report names, the
ceilings a step is measured against, and the memory each framework held."""

from __future__ import annotations

import os
import platform
import resource
import time

from bench.timing import timed
from common.errors import UserError

TORCH_PEAK_BYTES = [0]  # the process's CUDA peak, kept across the trainers' per-call resets


def start_frameworks(device: str):
    """The process settings, then JAX, then PyTorch on `device`. JAX starts first: on a GPU it
    checks the cuDNN it finds loaded, and importing torch loads its own. Returns
    (torch device, suite, whether malloc keeps freed memory)."""
    import jax

    from common.errors import ConfigError
    from common.malloc import keep_freed_memory
    from jax_impl.speed import tune_cpu_process

    tuned = tune_cpu_process()  # where JAX computes on the CPU: the training scripts' settings
    jax.devices()
    from torch_ref.train import allow_tf32, resolve_device

    try:
        torch_device = resolve_device(device)
    except ConfigError as e:
        raise UserError(str(e)) from None
    if torch_device.type == "cpu":
        tuned = keep_freed_memory() or tuned
    else:
        import torch

        allow_tf32(True)  # the precision train_torch.py uses there, as JAX's default
        torch.backends.cudnn.benchmark = True  # cuDNN times its algorithms per shape, as XLA autotunes its convolutions
    suite = "cpu" if jax.default_backend() == "cpu" and torch_device.type == "cpu" else "accelerator"
    return torch_device, suite, tuned


def machine(torch_device) -> dict:
    """What a report names: the CPU, the devices, the versions, the date."""
    import jax
    import torch

    from torch_ref.train import environment

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()], "jax_device": jax.devices()[0].device_kind,
            "torch_device": environment(torch_device)["device_name"], "jax": jax.__version__, "torch": torch.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}


def ceilings(n: int, dtypes: tuple[str, ...], torch_device, repeats: int, copy_mb: int) -> dict:
    """What this chip measures at its best: GFLOP/s of an n x n matmul per dtype, and GB/s of a
    device-to-device copy (bytes read plus bytes written), in each framework, each the best of
    `repeats`. The fp32 matmuls run at each framework's training precision (TF32 on NVIDIA GPUs).
    Operands are random: constant data makes a GPU's matrix units run faster than real data."""
    import jax
    import jax.numpy as jnp
    import torch

    def best(fn, sync) -> float:
        fn()
        sync()
        return min(timed(lambda: (fn(), sync())) for _ in range(repeats))

    sync_torch = (lambda: torch.cuda.synchronize(torch_device)) if torch_device.type == "cuda" else (lambda: None)
    out = {"matmul_n": n, "copy_mb": copy_mb, "operands": "random normal"}
    key = jax.random.key(0)
    for name in dtypes:
        a = jax.random.normal(key, (n, n), {"fp32": jnp.float32, "bf16": jnp.bfloat16}[name])
        mm = jax.jit(lambda x: x @ x)
        result = {}
        out[f"jax_{name}_gflops_per_s"] = 2 * n**3 / best(lambda: result.update(y=mm(a)), lambda: result["y"].block_until_ready()) / 1e9
        t = torch.randn(n, n, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[name], device=torch_device)
        out[f"torch_{name}_gflops_per_s"] = 2 * n**3 / best(lambda: t @ t, sync_torch) / 1e9
    elements = copy_mb * 2**20 // 4
    x = jax.random.normal(key, (elements,), jnp.float32)
    cp = jax.jit(lambda v: v.copy())
    result = {}
    out["jax_copy_gb_per_s"] = 2 * 4 * elements / best(lambda: result.update(y=cp(x)), lambda: result["y"].block_until_ready()) / 1e9
    src, dst = torch.randn(elements, device=torch_device), torch.empty(elements, device=torch_device)
    out["torch_copy_gb_per_s"] = 2 * 4 * elements / best(lambda: dst.copy_(src), sync_torch) / 1e9
    return out


def peak_rss_mb() -> float:
    """This process's peak resident memory."""
    # VmHWM, not getrusage's ru_maxrss: the latter keeps the parent's peak across fork + exec,
    # so every child would report the (larger) benchmark process's peak.
    try:
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def record_torch_peak(device) -> None:
    """Keeps PyTorch's CUDA peak so far, before a trainer's call resets it (`call_memory_mb`)."""
    if device.type == "cuda":
        import torch

        TORCH_PEAK_BYTES[0] = max(TORCH_PEAK_BYTES[0], torch.cuda.max_memory_allocated(device))


def device_peaks(torch_device) -> dict:
    """The largest device memory each framework held at once in this process (None on a CPU)."""
    import jax
    import torch

    stats = jax.devices()[0].memory_stats() or {}
    jax_peak = stats.get("peak_bytes_in_use")
    torch_peak = max(TORCH_PEAK_BYTES[0], torch.cuda.max_memory_allocated(torch_device)) if torch_device.type == "cuda" else None
    return {"jax": jax_peak / 2**20 if jax_peak else None, "torch": torch_peak / 2**20 if torch_peak else None}
