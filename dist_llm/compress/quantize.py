"""`dist-llm quantize`: weight quantization of the block linears, stored compactly, loaded back.

  int8          weight-only, symmetric, one scale per output channel
  int4          weight-only, symmetric, one scale per group of `group_size` inputs, two per byte
  int8-dynamic  int8 per-channel weights (stored as for int8), run on CPU through
                torch.ao's dynamic quantization (int8 activations per batch, fbgemm int8 GEMMs)

Weight-only layers dequantize in forward: they save memory and disk, and on GPUs memory
bandwidth; on these CPUs only int8-dynamic is faster than fp32 (docs/compression.md has the
measured table). The embedding and the output head stay in fp32.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dist_llm.compress.prune import LINEARS
from dist_llm.config import ModelConfig
from dist_llm.errors import InputError
from dist_llm.files import check_output_dir

METHODS = ("int8", "int4", "int8-dynamic")


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


def _bits(method: str) -> int:
    return 4 if method == "int4" else 8


def _swap_block_linears(model: nn.Module, make) -> None:
    """Replace each block linear `m` by `make(m)`, in place."""
    for block in model.layers:
        for name in LINEARS:
            parent_name, _, leaf = name.rpartition(".")
            parent = block.get_submodule(parent_name)
            setattr(parent, leaf, make(getattr(parent, leaf)))


def quantize_model(model: nn.Module, method: str, group_size: int) -> None:
    """Replace every block linear by its quantized form, in place."""
    _swap_block_linears(model, lambda linear: QuantLinear.from_linear(linear, _bits(method), group_size))


def prepare_for_loading(model: nn.Module, spec: dict) -> None:
    """Give a fresh model the quantized module structure described by a checkpoint's metadata."""
    bits, group = _bits(spec["method"]), spec["group_size"]
    _swap_block_linears(
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
    _swap_block_linears(model, _dequantized_linear)
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    targets = {f"layers.{i}.{name}" for i in range(len(model.layers)) for name in LINEARS}
    return quantize_dynamic(model, {name: per_channel_dynamic_qconfig for name in targets}, dtype=torch.qint8)


def run_quantize(
    checkpoint, out, method: str, group_size: int, evaluation: dict, overwrite: bool = False
) -> dict:
    from dist_llm.compress.report import check_evaluation, save_and_report
    from dist_llm.train.checkpoint import WEIGHTS_ONLY, load_model, saved_config

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    # Every argument before anything is written: the report's evaluation is only read at the end.
    check_evaluation(evaluation)
    if method == "int4":
        _check_group_size(saved_config(checkpoint).model, group_size)
    check_output_dir(Path(out), WEIGHTS_ONLY, overwrite)
    model, config, _ = load_model(checkpoint)
    spec = {"method": method, "group_size": group_size if method == "int4" else 0}
    quantize_model(model, method, group_size)
    return save_and_report(
        "quantize",
        checkpoint,
        out,
        model,
        config,
        spec,
        evaluation,
        overwrite=overwrite,
        extra_meta={"quantization": spec},
    )


def _check_group_size(model: ModelConfig, group_size: int) -> None:
    """int4 groups split every block linear's inputs: dim (wq, wk, wv, w1, w3), the heads (wo) and
    ffn_hidden (w2)."""
    widths = {model.dim, model.n_heads * model.head_size, model.ffn_hidden}
    if group_size < 2 or group_size % 2 or any(w % group_size for w in widths):
        raise InputError(
            f"--group-size {group_size} must be even and divide the block linears' input widths "
            f"{sorted(widths)}"
        )
