"""Quantized linear layers, and the quantized model structure a checkpoint's metadata describes.

  int8          weight-only, symmetric, one scale per output channel
  int4          weight-only, symmetric, one scale per group of `group_size` inputs, two per byte
  int8-dynamic  int8 per-channel weights (stored as for int8), run on CPU through
                torch.ao's dynamic quantization (int8 activations per batch, fbgemm int8 GEMMs)

A quantized checkpoint's dist_llm.json holds {"quantization": {"method", "group_size"}};
`prepare_for_loading` and `finish_loading` turn a plain model into the one it stores, so
loading it needs no compression stage (`compress/quantize.py` is the stage that writes it).

The model layer: nothing here may import parallel/, train/, compress/ or interop/.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dist_llm.model.roles import BLOCK_LINEARS


class QuantLinear(nn.Module):
    """y = x @ dequantize(W)^T for int8 (per output channel) or packed int4 (per input group)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group_size = (
            in_features,
            out_features,
            bits,
            group_size,
        )
        if bits == 8:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
            self.register_buffer("scale", torch.zeros(out_features, 1))
        else:
            if in_features % group_size or group_size % 2:
                raise ValueError(f"int4 group size {group_size} must be even and divide {in_features}")
            self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
            self.register_buffer("scale", torch.zeros(out_features, in_features // group_size))

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int) -> QuantLinear:
        q = cls(linear.in_features, linear.out_features, bits, group_size)
        q.qweight.copy_(quantize(linear.weight.detach().float(), bits, group_size, out=q.scale))
        return q

    def dequantize(self) -> torch.Tensor:
        if self.bits == 8:
            return self.qweight.float() * self.scale
        low = (self.qweight & 0x0F).to(torch.int8) - 8
        high = (self.qweight >> 4).to(torch.int8) - 8
        q = torch.stack([low, high], dim=-1).flatten(-2).float()
        return (q.unflatten(-1, (-1, self.group_size)) * self.scale.unsqueeze(-1)).flatten(-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize().to(x.dtype))


def quantize(w: torch.Tensor, bits: int, group_size: int, out: torch.Tensor) -> torch.Tensor:
    """Symmetric round-to-nearest; writes the scales into `out` and returns the integer codes."""
    if bits == 8:
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
        out.copy_(scale)
        return torch.round(w / scale).clamp(-127, 127).to(torch.int8)
    groups = w.unflatten(-1, (-1, group_size))
    scale = groups.abs().amax(dim=-1).clamp(min=1e-12) / 7
    out.copy_(scale)
    q = torch.round(groups / scale.unsqueeze(-1)).clamp(-8, 7).flatten(-2).to(torch.int16) + 8
    pairs = q.unflatten(-1, (-1, 2))
    return (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)


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
    swap_block_linears(
        model, lambda linear: QuantLinear(linear.in_features, linear.out_features, bits, group)
    )


def _dequantized_linear(q: QuantLinear) -> nn.Linear:
    linear = nn.Linear(q.in_features, q.out_features, bias=False)
    linear.weight.data = q.dequantize()  # exactly on the int8 grid, so re-quantizing is lossless
    return linear


def finish_loading(model: nn.Module, spec: dict) -> nn.Module:
    """int8-dynamic: hand the int8 weights to torch.ao's dynamic quantization (fbgemm kernels)."""
    if spec["method"] != "int8-dynamic":
        return model
    swap_block_linears(model, _dequantized_linear)
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    targets = {f"layers.{i}.{name}" for i in range(len(model.layers)) for name in BLOCK_LINEARS}
    return quantize_dynamic(model, {name: per_channel_dynamic_qconfig for name in targets}, dtype=torch.qint8)
