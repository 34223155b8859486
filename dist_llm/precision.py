"""Which floating-point format to train in, chosen from the hardware (`train.dtype: auto`).

bf16 halves memory and, where the hardware has bf16 matrix units (every NVIDIA GPU since
Ampere; x86 CPUs with AVX512-BF16 or AMX), runs matmuls 2-4x faster than fp32. Where it has none
(most laptops, AVX2-only servers, pre-Ampere GPUs) torch emulates bf16 and a CPU matmul runs
about 50x SLOWER than fp32 (../shared/notes/cpu-kinds.md). On a CPU the choice is therefore
measured, not guessed from a feature list: a ~50 ms probe times the same matmul in both formats.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import torch

# bf16 is chosen on a CPU only where its matmul is at least this much faster than fp32. Native
# units measure 1.4-4x, emulation 0.02x: the gap is wide enough that machine noise never flips it.
BF16_MIN_SPEEDUP = 1.0


@dataclasses.dataclass(frozen=True)
class Precision:
    dtype: str  # "fp32", "bf16" or "fp16": what the run uses
    reason: str  # why, in words, for the console and TensorBoard
    warning: str = ""  # set when an explicit choice is known to be slow here


def resolve_dtype(requested: str, zero_stage: int, device: torch.device) -> Precision:
    """`train.dtype` as the run will use it: `auto` becomes bf16 or fp32 for this device."""
    if requested != "auto":
        warning = ""
        if requested == "bf16" and device.type == "cpu":
            speedup = cpu_bf16_speedup()
            if speedup < BF16_MIN_SPEEDUP:
                warning = (
                    f"train.dtype=bf16 on a CPU without native bf16: a bf16 matmul measured "
                    f"{1 / speedup:.1f}x slower than fp32 here; train.dtype=auto or fp32 runs faster"
                )
        return Precision(requested, "set in the config", warning)
    if zero_stage == 0:
        # DeepSpeed's bf16 without ZeRO is an unfused fp16-style optimizer that trains badly.
        return Precision("fp32", "auto: ZeRO-0 (DeepSpeed's bf16 needs parallel.zero_stage >= 1)")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported():
            return Precision("bf16", f"auto: {name} has bf16 matrix units")
        return Precision("fp32", f"auto: {name} has no bf16 (set train.dtype=fp16 for its fp16 units)")
    if device.type != "cpu":
        return Precision("fp32", f"auto: no bf16 probe for device type {device.type}")
    speedup = cpu_bf16_speedup()
    if speedup >= BF16_MIN_SPEEDUP:
        return Precision("bf16", f"auto: bf16 matmul measured {speedup:.1f}x fp32 on this CPU")
    return Precision("fp32", f"auto: bf16 matmul measured {1 / speedup:.1f}x slower than fp32 on this CPU")


@functools.cache
def cpu_bf16_speedup(n: int = 256, rounds: int = 3, seconds: float = 0.005) -> float:
    """bf16 / fp32 matmul throughput on this CPU (about 50 ms; cached for the process).

    The two formats are timed in alternation and the best round of each is kept, so a burst of
    load from another process slows both rather than one."""
    best = {torch.float32: 0.0, torch.bfloat16: 0.0}
    for _ in range(rounds):
        for dtype in best:
            best[dtype] = max(best[dtype], matmul_flops(dtype, torch.device("cpu"), n, seconds))
    return best[torch.bfloat16] / best[torch.float32]


def matmul_flops(dtype: torch.dtype, device: torch.device, n: int = 1024, seconds: float = 0.5) -> float:
    """FLOP/s of an n x n x n matmul in `dtype`, timed for about `seconds` after one warm-up."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    a @ b
    _sync(device)
    count, start = 0, time.perf_counter()
    while count == 0 or time.perf_counter() - start < seconds:
        a @ b
        count += 1
        if count % 8 == 0:
            _sync(device)  # GPUs queue work: time what has run, not what was queued
    _sync(device)
    return 2 * n**3 * count / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def format_flops(flops: float) -> str:
    """1.35e12 -> '1.35 TFLOP/s', 9.1e8 -> '0.91 GFLOP/s': three significant digits at any size."""
    for unit, scale in (("PFLOP/s", 1e15), ("TFLOP/s", 1e12), ("GFLOP/s", 1e9)):
        if flops >= scale:
            return f"{flops / scale:.3g} {unit}"
    return f"{flops / 1e9:.3g} GFLOP/s"
