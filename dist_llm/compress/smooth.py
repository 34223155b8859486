"""SmoothQuant (Xiao et al. 2022): move activation outliers into the weights before int8.

int8 activations (int8-dynamic: one scale per token) lose the small channels of a token whose few
large channels set its scale. For each input channel j of a linear, s_j = max|X_j|^alpha /
max|W_:,j|^(1 - alpha) (maxima over calibration inputs and over the rows of every linear reading
that input); X / s and W * s give the same product, and X / s is folded into what produced X, so
the fp32 model computes exactly the same function (up to rounding):

  q, k, v inputs     attention_norm.weight / s       wq, wk, wv columns * s
  w1, w3 inputs      ffn_norm.weight / s             w1, w3 columns * s
  w2 input           w3 rows / s (silu(w1 x) * w3 x is linear in w3 x)     w2 columns * s
  wo input           wv rows / s: each query head's output is a mix of its key/value head's
                     values, so s is shared by the query heads of one key/value group   wo columns * s
"""

from __future__ import annotations

import torch
from torch import nn

MINIMUM = 1e-5  # floor of maxima and scales: a channel that is always zero keeps s = 1


@torch.no_grad()
def activation_maxima(model: nn.Module, batches: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Per block, max |x_j| over calibration inputs of each input the smoothing rescales."""
    maxima = [{} for _ in model.layers]
    handles = []
    for index, block in enumerate(model.layers):
        for key, name in (
            ("attention", "attention.wq"),
            ("wo", "attention.wo"),
            ("ffn", "feed_forward.w1"),
            ("w2", "feed_forward.w2"),
        ):

            def hook(module, args, index=index, key=key):
                x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0).float()
                seen = maxima[index].get(key)
                maxima[index][key] = x if seen is None else torch.maximum(seen, x)

            handles.append(block.get_submodule(name).register_forward_pre_hook(hook))
    try:
        for batch in batches:
            model(batch.to(model.tok_embeddings.weight.device))
    finally:
        for handle in handles:
            handle.remove()
    return maxima


def smoothing_scales(x_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha) over the rows of all `weights`."""
    w_max = torch.cat([w.abs() for w in weights]).amax(dim=0).float()
    s = x_max.clamp(min=MINIMUM).pow(alpha) / w_max.clamp(min=MINIMUM).pow(1 - alpha)
    return s.clamp(min=MINIMUM)


@torch.no_grad()
def smooth_model(model: nn.Module, maxima: list[dict[str, torch.Tensor]], alpha: float) -> None:
    """Fold SmoothQuant's scales into the model, in place (its fp32 function is unchanged)."""
    for block, found in zip(model.layers, maxima, strict=True):
        attention, mlp = block.attention, block.feed_forward
        for norm, linears, key in (
            (block.attention_norm, (attention.wq, attention.wk, attention.wv), "attention"),
            (block.ffn_norm, (mlp.w1, mlp.w3), "ffn"),
        ):
            s = smoothing_scales(found[key], [m.weight for m in linears], alpha)
            norm.weight.div_(s.to(norm.weight.dtype))
            for m in linears:
                m.weight.mul_(s.to(m.weight.dtype))
        s = smoothing_scales(found["w2"], [mlp.w2.weight], alpha)
        mlp.w3.weight.div_(s.unsqueeze(1).to(mlp.w3.weight.dtype))
        mlp.w2.weight.mul_(s.to(mlp.w2.weight.dtype))
        # wo's inputs are [query head, head_dim]; one scale per [key/value head, head_dim].
        shape = (attention.n_kv_heads, attention.n_heads // attention.n_kv_heads, attention.head_dim)
        s = smoothing_scales(_per_kv(found["wo"], shape), [_per_kv(attention.wo.weight.abs(), shape)], alpha)
        attention.wv.weight.div_(s.unsqueeze(1).to(attention.wv.weight.dtype))
        expanded = s.unflatten(0, (shape[0], 1, shape[2])).expand(shape).flatten()
        attention.wo.weight.mul_(expanded.to(attention.wo.weight.dtype))


def _per_kv(t: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """[..., n_heads * head_dim] -> [..., n_kv_heads * head_dim]: the largest over the query heads
    of each key/value group (query head h reads key/value head h // (n_heads / n_kv_heads))."""
    return t.unflatten(-1, shape).amax(dim=-2).flatten(-2)
