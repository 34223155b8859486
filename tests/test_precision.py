"""`train.dtype: auto`: the format chosen for each kind of hardware, with the hardware probes
(CUDA's bf16 query, the CPU matmul timing) replaced at their boundary only."""

import math

import pytest
import torch

from dist_llm import precision
from dist_llm.precision import format_flops, resolve_dtype

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)


@pytest.fixture
def cpu_speedup(monkeypatch):
    """Set what the CPU probe measures (bf16 / fp32 matmul throughput)."""

    def set_to(value: float):
        monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: value)

    return set_to


@pytest.fixture
def gpu(monkeypatch):
    def set_to(name: str, bf16: bool):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)

    return set_to


def test_cpu_with_native_bf16_trains_in_bf16(cpu_speedup):
    cpu_speedup(3.5)
    got = resolve_dtype("auto", 1, CPU)
    assert got.dtype == "bf16" and "3.5x fp32" in got.reason and not got.warning


def test_cpu_without_native_bf16_trains_in_fp32(cpu_speedup):
    cpu_speedup(0.02)
    got = resolve_dtype("auto", 2, CPU)
    assert got.dtype == "fp32" and "50.0x slower than fp32" in got.reason


def test_gpus_with_and_without_bf16(gpu):
    gpu("NVIDIA H100 80GB HBM3", True)
    got = resolve_dtype("auto", 1, GPU)
    assert got.dtype == "bf16" and "H100" in got.reason
    gpu("Tesla V100-SXM2-32GB", False)
    got = resolve_dtype("auto", 1, GPU)
    assert got.dtype == "fp32" and "V100" in got.reason and "fp16" in got.reason


def test_auto_under_zero0_is_fp32_where_bf16_would_be_fast(cpu_speedup):
    cpu_speedup(3.5)
    got = resolve_dtype("auto", 0, CPU)
    assert got.dtype == "fp32" and "ZeRO-0" in got.reason


def test_an_explicit_choice_is_kept_and_slow_bf16_is_named(monkeypatch, cpu_speedup):
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: pytest.fail("fp32 needs no probe"))
    assert resolve_dtype("fp32", 1, CPU) == precision.Precision("fp32", "set in the config")
    cpu_speedup(0.02)
    got = resolve_dtype("bf16", 1, CPU)
    assert got.dtype == "bf16" and "50.0x slower than fp32" in got.warning
    cpu_speedup(3.0)
    assert not resolve_dtype("bf16", 1, CPU).warning


def test_the_real_probe_measures_both_formats():
    speedup = precision.cpu_bf16_speedup()
    assert math.isfinite(speedup) and speedup > 0


def test_flops_are_printed_with_three_digits_at_any_size():
    assert format_flops(9.1e8) == "0.91 GFLOP/s"  # emulated bf16 on an AVX2 CPU: never "0.0 TFLOP/s"
    assert format_flops(4.52e10) == "45.2 GFLOP/s"
    assert format_flops(1.35e12) == "1.35 TFLOP/s"
    assert format_flops(9.89e14) == "989 TFLOP/s"
