"""Quantized linear layers, and the quantized model structure a checkpoint's metadata describes.

  int8          weight-only, symmetric, one scale per output channel
  int4          weight-only, one scale per group of `group_size` inputs, two codes per byte;
                symmetric (codes -8..7, w = s c) or, with "symmetric": false in the metadata,
                asymmetric (codes 0..15 and an integer zero point z per group, w = s (c - z))
  int8-dynamic  W8A8: int8 per-channel weights (stored as for int8) and int8 activations
                quantized dynamically per token (one scale per row, as vLLM's and
                llm-compressor's "W8A8 dynamic per-token" scheme), an int8 x int8 -> int32 GEMM
                (`torch._int_mm`) rescaled by both scales (`DynamicInt8Linear`)

A quantized checkpoint's dist_llm.json holds {"quantization": {"method", "group_size"}} (and
"symmetric", absent = true: the checkpoints written before zero points existed);
`prepare_for_loading` and `finish_loading` turn a plain model into the one it stores, so
loading it needs no compression stage (`compress/quantize.py` is the stage that writes it).

Kernels: the stored codes and scales are the portable format (the checkpoint's tensors); on CPU,
a few rows at a time (decode), the weight-only layers run torch's packed weight-only matmuls
(`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) on bf16 activations, their layout built
from the stored codes when the model loads. Anything else (prefill and evaluation batches, other
devices, int4 group sizes those kernels lack) dequantizes and runs an fp32 matmul, the reference.
int8-dynamic's integer product runs `torch._int_mm` wherever it accepts the shapes (any on CPU;
on CUDA more than 16 rows, widths multiples of 8), else the same integers in a float64 matmul
(exact: |sum| <= 127^2 * in_features < 2^53); its reference is the same quantization in float64.

The model layer: nothing here may import parallel/, train/, compress/ or interop/.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dist_llm.model.roles import BLOCK_LINEARS

# Measured on one 2-core AVX512/AMX CPU, a 576 -> 1536 layer (us): the packed kernels against
# dequantize-then-matmul at 1 row 32 vs 315, at 16 rows 228 vs 492, at 64 rows 817 vs 821, at
# 256 rows 2,925 vs 1,748. So decode and short prompts run packed, long batches the reference.
PACKED_MAX_ROWS = 32
INT4_PACKED_GROUPS = (32, 64, 128, 256)  # the group sizes _weight_int4pack_mm_for_cpu accepts
# Clipped ranges (mse=True), as the GPTQ reference code's Quantizer(mse=True, norm=2.4, grid=100,
# maxshrink=0.8): the range shrunk by p = 1, 0.99, ..., 0.21 (80 factors), the one minimising
# sum |w - Q(w)|^2.4 over the group kept (p = 1, the plain range, is among them).
MSE_NORM, MSE_GRID, MSE_SHRINK_STEPS = 2.4, 100, 80


class QuantLinear(nn.Module):
    """y = x @ dequantize(W)^T for int8 (per output channel) or packed int4 (per input group)."""

    _packed: tuple[torch.Tensor, torch.Tensor] | None = None  # the CPU kernels' (weight, scales)

    def __init__(
        self, in_features: int, out_features: int, bits: int, group_size: int, symmetric: bool = True
    ):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group_size = (
            in_features,
            out_features,
            bits,
            group_size,
        )
        if bits == 8 and not symmetric:
            raise ValueError("int8 is symmetric (per output channel); zero points are for int4")
        self.symmetric = symmetric
        self.packed_kernels = True  # False: always the reference (use_packed_kernels)
        if bits == 8:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
            self.register_buffer("scale", torch.zeros(out_features, 1))
        else:
            if in_features % group_size or group_size % 2:
                raise ValueError(f"int4 group size {group_size} must be even and divide {in_features}")
            self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
            self.register_buffer("scale", torch.zeros(out_features, in_features // group_size))
            if not symmetric:  # the integer zero point of each group, 0..15
                self.register_buffer(
                    "zero", torch.zeros(out_features, in_features // group_size, dtype=torch.uint8)
                )

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, bits: int, group_size: int, symmetric: bool = True, mse: bool = False
    ) -> QuantLinear:
        """Round to nearest, on the groups' min/max ranges (mse: clipped ranges, MSE_NORM)."""
        q = cls(linear.in_features, linear.out_features, bits, group_size, symmetric)
        w = linear.weight.detach().float()
        if bits == 8:
            scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
            q.scale.copy_(scale)
            q.qweight.copy_(torch.round(w / scale).clamp(-127, 127).to(torch.int8))
            q.pack()
            return q
        groups = w.unflatten(-1, (-1, group_size))
        scale, zero = int4_params(groups, symmetric, mse)
        codes = int4_codes(groups, scale.unsqueeze(-1), None if zero is None else zero.unsqueeze(-1))
        return cls.from_codes(codes.flatten(-2), scale, bits, group_size, zero)

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scale: torch.Tensor,
        bits: int,
        group_size: int,
        zero: torch.Tensor | None = None,
    ) -> QuantLinear:
        """From integer codes [out, in] (in [-127, 127], [-8, 7], or [0, 15] with zero points)
        and their scales ([out, 1] or [out, in / group_size]) and int4 zero points (None:
        symmetric; else integers 0..15 [out, in / group_size]), as a quantizer chose them."""
        q = cls(codes.shape[1], codes.shape[0], bits, group_size, symmetric=zero is None)
        q.scale.copy_(scale)
        if zero is not None:
            q.zero.copy_(zero.to(torch.uint8))
        q.qweight.copy_(codes.to(torch.int8) if bits == 8 else pack_int4(codes, 8 if zero is None else 0))
        q.pack()
        return q

    @property
    def packable(self) -> bool:
        # What torch's int4 CPU packing accepts (it checks N; odd group sizes crash it).
        return self.bits == 8 or (self.group_size in INT4_PACKED_GROUPS and self.out_features % 16 == 0)

    def pack(self) -> None:
        """Build the packed kernels' layout from the stored codes (not saved: state_dict keeps
        only the portable codes and scales)."""
        if not self.packable or self.qweight.device.type != "cpu":
            self._packed = None
        elif self.bits == 8:
            self._packed = (self.qweight, self.scale.flatten().to(torch.bfloat16))
        else:
            # The kernel computes (n - 8) * scale + zero from the stored nibbles n (0..15):
            # symmetric n = c + 8, zero 0; asymmetric n = c and s (c - z) = s (n - 8) + s (8 - z).
            nibbles = torch.stack([self.qweight & 0x0F, self.qweight >> 4], dim=-1).flatten(-2)
            weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibbles.to(torch.int32), 1)
            zeros = torch.zeros_like(self.scale) if self.symmetric else self.scale * (8 - self.zero.float())
            scales = torch.stack([self.scale, zeros], dim=-1).transpose(0, 1).contiguous()
            self._packed = (weight, scales.to(torch.bfloat16))  # (in / group, out, [scale, zero])

    def _load_from_state_dict(self, *args, **kwargs):
        self._packed = None  # built from the old codes; forward or finish_loading packs the new
        super()._load_from_state_dict(*args, **kwargs)

    def codes(self) -> torch.Tensor:
        """The integer codes as int8, one per weight ([-127, 127] for int8, [-8, 7] for
        symmetric int4, [0, 15] for asymmetric int4)."""
        if self.bits == 8:
            return self.qweight
        offset = 8 if self.symmetric else 0
        low = (self.qweight & 0x0F).to(torch.int8) - offset
        high = (self.qweight >> 4).to(torch.int8) - offset
        return torch.stack([low, high], dim=-1).flatten(-2)

    def dequantize(self) -> torch.Tensor:
        if self.bits == 8:
            return self.qweight.float() * self.scale
        q = self.codes().float().unflatten(-1, (-1, self.group_size))
        zero = None if self.symmetric else self.zero.float().unsqueeze(-1)
        return int4_values(q, self.scale.unsqueeze(-1), zero).flatten(-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        few_rows = x.numel() <= PACKED_MAX_ROWS * self.in_features
        if self.packed_kernels and self.packable and few_rows and x.device.type == "cpu":
            return self.packed_forward(x)
        return self.reference_forward(x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize().to(x.dtype))

    def packed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """torch's packed CPU kernel; bf16 activations and output (its fast path: on fp32
        activations the same kernels are 5-20x slower than an fp32 matmul here)."""
        if self._packed is None:
            self.pack()
        weight, scales = self._packed
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.bits == 8:
            y = torch.ops.aten._weight_int8pack_mm(rows, weight, scales)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, weight, self.group_size, scales)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def int4_params(
    groups: torch.Tensor, symmetric: bool = True, mse: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point of each group of `groups` [..., group] (the last dimension): symmetric,
    scale = absmax / 7 and no zero point (None); asymmetric, scale = (max - min) / 15 over the
    range [min(w, 0), max(w, 0)] and zero = round(-min / scale), an integer in 0..15 (as a float
    tensor). mse: each group's range shrunk by the factor (of MSE_SHRINK_STEPS) that minimises
    sum |w - Q(w)|^MSE_NORM, the GPTQ reference code's clipping search."""
    if symmetric:
        low, high = None, groups.abs().amax(dim=-1)
    else:
        low, high = groups.amin(dim=-1).clamp(max=0), groups.amax(dim=-1).clamp(min=0)

    def grid(p: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        if symmetric:
            return (p * high).clamp(min=1e-12) / 7, None
        scale = (p * (high - low)).clamp(min=1e-12) / 15
        return scale, torch.round(-p * low / scale)

    scale, zero = grid(1.0)
    if not mse:
        return scale, zero
    best = _int4_error(groups, scale, zero)
    for i in range(1, MSE_SHRINK_STEPS):
        s, z = grid(1 - i / MSE_GRID)
        error = _int4_error(groups, s, z)
        better = error < best
        best = torch.where(better, error, best)
        scale = torch.where(better, s, scale)
        zero = None if symmetric else torch.where(better, z, zero)
    return scale, zero


def _int4_error(groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    s, z = scale.unsqueeze(-1), None if zero is None else zero.unsqueeze(-1)
    return (int4_values(int4_codes(groups, s, z), s, z) - groups).abs().pow(MSE_NORM).sum(dim=-1)


def int4_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None) -> torch.Tensor:
    """Round to nearest on the grid (broadcasting): codes in [-8, 7], or in [0, 15] with zero points."""
    if zero is None:
        return torch.round(w / scale).clamp(-8, 7)
    return (torch.round(w / scale) + zero).clamp(0, 15)


def int4_values(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None) -> torch.Tensor:
    """The weights the codes stand for: scale * codes, or scale * (codes - zero) (any bits)."""
    return codes * scale if zero is None else (codes - zero) * scale


def pack_int4(codes: torch.Tensor, offset: int = 8) -> torch.Tensor:
    """int4 codes [out, in] -> [out, in / 2] bytes, two nibbles codes + offset each (low nibble
    first): offset 8 for symmetric codes in [-8, 7], 0 for asymmetric ones in [0, 15]."""
    pairs = (codes.to(torch.int16) + offset).unflatten(-1, (-1, 2))
    return (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)


def use_packed_kernels(model: nn.Module, on: bool) -> None:
    """Let the weight-only layers run the packed CPU kernels (the default) or only the reference,
    for measuring one against the other."""
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.packed_kernels = on


def bits_of(method: str) -> int:
    return 4 if method == "int4" else 8


def swap_block_linears(model: nn.Module, make: Callable[[nn.Module], nn.Module]) -> None:
    """Replace each block linear `m` by `make(m)`, in place."""
    for block in model.layers:
        for name in BLOCK_LINEARS:
            parent_name, _, leaf = name.rpartition(".")
            parent = block.get_submodule(parent_name)
            setattr(parent, leaf, make(getattr(parent, leaf)))


def prepare_for_loading(model: nn.Module, spec: dict) -> None:
    """Give a fresh model the quantized module structure described by a checkpoint's metadata."""
    bits, group = bits_of(spec["method"]), spec["group_size"]
    symmetric = spec.get("symmetric", True)  # absent in checkpoints from before zero points
    swap_block_linears(
        model, lambda linear: QuantLinear(linear.in_features, linear.out_features, bits, group, symmetric)
    )


def finish_loading(model: nn.Module, spec: dict) -> nn.Module:
    """Weight-only: build the packed kernels' layout now, not in the first decode step.
    int8-dynamic: any int8 weight-only layer left (a model quantized in process) becomes the W8A8
    layer over the same codes and scales."""
    if spec["method"] == "int8-dynamic":
        swap_block_linears(model, DynamicInt8Linear.of)
        return model
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.pack()
    return model


# ---------------------------------------------------------------- W8A8 (int8-dynamic)


class DynamicInt8Linear(QuantLinear):
    """W8A8 dynamic per token: the int8 layer's codes q_w and per-output-channel scales s_w, and
    per row of the input s_x = max|x_row| / 127, q_x = round(x / s_x);
    y = (q_x @ q_w^T, exact in int32) * s_x * s_w."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, 8, 0)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 8, group_size: int = 0) -> DynamicInt8Linear:
        return cls.of(QuantLinear.from_linear(linear, 8, 0))  # the int8 layer's rounding

    @classmethod
    def of(cls, module: nn.Module) -> DynamicInt8Linear:
        """The W8A8 layer over an int8 weight-only layer's codes and scales (itself if it is one)."""
        if isinstance(module, cls):
            return module
        if not isinstance(module, QuantLinear) or module.bits != 8:
            raise TypeError(f"int8-dynamic needs int8 codes, not {type(module).__name__}")
        q = cls(module.in_features, module.out_features).to(module.qweight.device)
        q.qweight.copy_(module.qweight)
        q.scale.copy_(module.scale)
        return q

    def pack(self) -> None:
        self._packed = None  # no packed layout: _int_mm reads the stored codes (transposed view)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float()
        q, s = quantize_rows(rows)
        y = int8_matmul(q, self.qweight.t()).float() * s * self.scale.t()
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same quantization and product, in float64."""
        rows = x.reshape(-1, self.in_features).double()
        s = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
        q = torch.round(rows / s).clamp(-127, 127)
        y = (q @ self.qweight.double().t()) * s * self.scale.double().t()
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def quantize_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: (codes [M, K] int8, scales [M, 1]); a row of zeros gets codes 0."""
    scale = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
    return torch.round(rows / scale).clamp(-127, 127).to(torch.int8), scale


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] int8 @ b [K, N] int8 -> int32, exactly: `torch._int_mm` where it takes the shapes
    (CPU: any; CUDA: M > 16, K and N multiples of 8, a decode step's few rows padded with zero
    rows), else a float64 matmul of the same integers (exact below 2^53)."""
    m, k = a.shape
    n = b.shape[1]
    if a.device.type == "cpu":
        return torch._int_mm(a, b)
    if a.device.type == "cuda" and k % 8 == 0 and n % 8 == 0:
        if m > 16:
            return torch._int_mm(a, b)
        padded = torch.cat([a, a.new_zeros(17 - m, k)])
        return torch._int_mm(padded, b)[:m]
    return int8_matmul_float64(a, b)


def int8_matmul_float64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The same integer product in float64: every partial sum is an integer below 127^2 * K,
    exact while that is under 2^53 (K < 5.5e11)."""
    return (a.double() @ b.double()).to(torch.int32)
