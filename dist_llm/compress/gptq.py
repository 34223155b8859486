"""GPTQ (Frantar et al. 2022): calibrated int4 / int8 weights that compensate their own error.

Each block linear's weight W [out, in] is quantized one input column at a time, in order; the
rounding error of column i is spread over the columns not yet quantized through the inverse
Hessian of the layer-wise loss ||W X - Q X||^2, H = 2 X X^T over calibration inputs X [in, n]:

    err = (w_i - q_i) / [H^-1]_ii ;   W[:, i:] -= err [H^-1]_{i, i:}   (H^-1 = its upper Cholesky factor)

which is the paper's Algorithm 1: the Cholesky form of the inverse Hessian (numerically stable
and computed once), dampening (`damp` x mean diagonal added to H), lazy updates in blocks of
columns, optional act-order (columns by decreasing H_ii) and group-wise scales. The scales are
the same as round-to-nearest's (`model/quantized.py`): symmetric, one per output channel for
int8; for int4 one per `group_size` inputs, symmetric or with zero points (asymmetric), on the
group's min/max range or its MSE-clipped one, set from the (already error-updated) weights when
the first column of a group is reached; with act-order, groups are kept in their input order
with scales from the unquantized weights (the "static groups" variant), so the result is the
checkpoint format every loader and export already reads.

The model is quantized block by block, sequentially: each block's calibration inputs are the
outputs of the blocks before it, already quantized, and inside a block the linears go in four
steps (q/k/v, wo, w1/w3, w2), each seeing the quantized ones before it ("true sequential").

No maintained library fit (checked 2026-12, docs/compression.md): gptqmodel 7.7 needs torch >=
2.14.1 and builds C++ extensions, auto-gptq 0.7.1 is unmaintained and built for CUDA, and both,
like llm-compressor 0.14 (transformers <= 5.17), optimum and torchao's GPTQ, quantize Hugging
Face model classes, not this model.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from dist_llm.model.quantized import QuantLinear, int4_codes, int4_params, int4_values, swap_block_linears

# The block linears in the order they are quantized; each step's inputs come from the block
# with the earlier steps already quantized.
STEPS = (
    ("attention.wq", "attention.wk", "attention.wv"),
    ("attention.wo",),
    ("feed_forward.w1", "feed_forward.w3"),
    ("feed_forward.w2",),
)


def scales_of(
    w: torch.Tensor, bits: int, symmetric: bool = True, mse: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point (None: symmetric) of each row of w [out, k], as round-to-nearest
    chooses them."""
    if bits == 8:
        return w.abs().amax(dim=1).clamp(min=1e-12) / 127, None
    return int4_params(w, symmetric, mse)


def quantize_column(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int
) -> torch.Tensor:
    if bits == 8:
        return torch.round(w / scale).clamp(-127, 127)
    return int4_codes(w, scale, zero)


@torch.no_grad()
def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int = 0,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    *,
    symmetric: bool = True,
    mse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GPTQ of one weight [out, in] for the Hessian [in, in] of its inputs.

    Returns (codes [out, in] as float integers, scales [out, 1] for int8 (group_size 0) or
    [out, in / group_size] for int4, zero points like the scales or None if symmetric):
    dequantized, W ~ codes * scales, or (codes - zeros) * scales, per group."""
    w = weight.detach().double().clone()
    h = hessian.detach().double().clone()
    n_in = w.shape[1]
    group = group_size if group_size else n_in
    dead = torch.diag(h) == 0  # inputs that were always zero: nothing to compensate with
    h[dead, dead] = 1
    w[:, dead] = 0
    grids = [scales_of(g, bits, symmetric, mse) for g in w.split(group, dim=1)]
    scales = torch.stack([s for s, _ in grids], dim=1)  # [out, groups]
    zeros = None if symmetric or bits == 8 else torch.stack([z for _, z in grids], dim=1)
    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(n_in)
    w, h = w[:, order], h[order][:, order]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(n_in, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros_like(w)
    # Scales are set when a group's first column comes up, from the weights as updated so far;
    # blocks are whole groups, so that group lies in the block being updated.
    if group_size and not act_order:
        block_size = max(block_size // group_size, 1) * group_size
    for start in range(0, n_in, block_size):
        end = min(start + block_size, n_in)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        hblock = hinv[start:end, start:end]
        for i in range(end - start):
            column = int(order[start + i])
            if group_size and not act_order and column % group_size == 0:
                scale, zero = scales_of(block[:, i : i + group_size], bits, symmetric, mse)
                scales[:, column // group_size] = scale
                if zeros is not None:
                    zeros[:, column // group_size] = zero
            scale = scales[:, column // group]
            zero = None if zeros is None else zeros[:, column // group]
            codes[:, start + i] = quantize_column(block[:, i], scale, zero, bits)
            error = (block[:, i] - int4_values(codes[:, start + i], scale, zero)) / hblock[i, i]
            block[:, i:] -= error.unsqueeze(1) * hblock[i, i:].unsqueeze(0)
            errors[:, i] = error
        w[:, end:] -= errors @ hinv[start:end, end:]
    codes = codes[:, torch.argsort(order)]
    return codes.float(), scales.float(), None if zeros is None else zeros.float()


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None) -> torch.Tensor:
    group = codes.shape[1] // scales.shape[1]
    if zeros is None:
        return codes * scales.repeat_interleave(group, dim=1)
    return (codes - zeros.repeat_interleave(group, dim=1)) * scales.repeat_interleave(group, dim=1)


class _Hessian:
    """A forward pre-hook accumulating sum(x x^T) of a linear's inputs (fp32 products, summed in
    fp64: the linears of one step share their input, so one Hessian serves them all)."""

    def __init__(self, linear: nn.Module):
        self.sum, self.count = None, 0
        self.handle = linear.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        product = (x.T @ x).double()
        self.sum = product if self.sum is None else self.sum + product
        self.count += x.shape[0]

    def result(self) -> torch.Tensor:
        return 2 * self.sum / self.count


class _Stop(Exception):
    pass


@torch.no_grad()
def block_inputs(model: nn.Module, batches: list[torch.Tensor]) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) the first block is called with, for each calibration batch."""
    captured = []

    def hook(module, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    handle = model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            with contextlib.suppress(_Stop):
                model(batch.to(model.tok_embeddings.weight.device))
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def gptq_model(
    model: nn.Module,
    batches: list[torch.Tensor],
    bits: int,
    group_size: int,
    damp: float = 0.01,
    act_order: bool = False,
    *,
    symmetric: bool = True,
    mse: bool = False,
) -> None:
    """Quantize every block linear with GPTQ, block by block, in place (-> QuantLinear layers)."""
    inputs = block_inputs(model, batches)
    quantized = {}
    for block in model.layers:
        for step in STEPS:
            hessian = _Hessian(block.get_submodule(step[0]))
            try:
                for args, kwargs in inputs:
                    block(*args, **kwargs)
            finally:
                hessian.handle.remove()
            h = hessian.result()
            for name in step:
                linear = block.get_submodule(name)
                found = gptq(
                    linear.weight, h, bits, group_size, damp, act_order, symmetric=symmetric, mse=mse
                )
                # The later steps and blocks see this linear quantized (its dequantized weights).
                linear.weight.copy_(dequantize(*found).to(linear.weight.dtype))
                quantized[id(linear)] = found
        inputs = [((block(*args, **kwargs), *args[1:]), kwargs) for args, kwargs in inputs]

    def layer(linear: nn.Module) -> QuantLinear:
        codes, scales, zeros = quantized[id(linear)]
        return QuantLinear.from_codes(codes, scales, bits, group_size, zeros)

    swap_block_linears(model, layer)
