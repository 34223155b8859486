"""Which earlier tokens each token attends to: all of them (causal), or only those of its own
document (document-causal), and the kernel that computes it.

Training rows pack several unrelated documents end to end (`document_ids` from the loader says
which token belongs to which). Under `model.attention: document` a token sees only the earlier
tokens of its own document, as if each document were its own sequence (Llama 3's pre-training
did this; torchtitan's `block_causal`, Megatron's `--reset-attention-mask`).

Kernels, chosen by `model.attention_kernel` (auto: by device):
- `flex` (auto on CUDA): `flex_attention` with a block mask, compiled; blocks that cross a
  document boundary are skipped, so the cost falls with the number of documents in a row.
- `sdpa` (auto elsewhere): `scaled_dot_product_attention` with a dense [B, 1, T, T] mask. In
  torch 2.13 `flex_attention` has no backward on CPU, and SDPA's CPU kernels take a mask. The
  mask is built once per forward and shared by all layers, as a boolean one (B*T*T bytes) and,
  for the kernel, an additive one in the compute dtype (`_additive`): given the boolean mask,
  SDPA converts it itself in every layer and keeps each layer's copy for backward, n_layers x
  B*T*T*4 bytes (measured: 8 GiB a rank at 16k tokens in 8 layers, against 1 GiB shared).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

# One batch's document-causal mask in the form its kernel takes: a [B, 1, T, T] bool tensor
# (True = may attend) for sdpa, a flex_attention BlockMask for flex; None = plain causal.
Mask = object


def kernel_for(choice: str, device: torch.device) -> str:
    if choice != "auto":
        return choice
    return "flex" if device.type == "cuda" else "sdpa"


_last: list = [None, None, None]  # (document_ids, kernel, mask) of the latest batch


def document_mask(document_ids: torch.Tensor, kernel: str) -> Mask:
    """The mask of a batch whose row b, position t belongs to document `document_ids[b, t]`.

    The latest one is kept: pipeline stages hold one block each and pass the same
    `document_ids` tensor along, so each stage builds its micro-batch's mask once, not per layer."""
    if _last[0] is document_ids and _last[1] == kernel:
        return _last[2]
    if kernel == "flex":
        mask = _block_mask(document_ids)
    else:
        same = document_ids.unsqueeze(2) == document_ids.unsqueeze(1)
        seq = document_ids.shape[1]
        causal = torch.ones(seq, seq, dtype=torch.bool, device=document_ids.device).tril()
        mask = (same & causal).unsqueeze(1)
    _last[:] = [document_ids, kernel, mask]
    return mask


def _block_mask(document_ids: torch.Tensor):
    from torch.nn.attention.flex_attention import create_block_mask

    def document_causal(b, h, q, kv):
        return (document_ids[b, q] == document_ids[b, kv]) & (q >= kv)

    batch, seq = document_ids.shape
    return create_block_mask(document_causal, batch, None, seq, seq, device=document_ids.device)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # Uncompiled, flex_attention materializes every score: compiling is what makes it a kernel.
    return torch.compile(flex_attention, dynamic=False)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask | None) -> torch.Tensor:
    """Attention of q [B, H, T, D] over k, v [B, KV, T, D] (grouped-query: H a multiple of KV)."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    if isinstance(mask, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_additive(mask, q.dtype), enable_gqa=True)
    flex = _compiled_flex() if q.device.type == "cuda" else _eager_flex()
    return flex(q, k, v, block_mask=mask, enable_gqa=True)


_last_additive: list = [None, None, None]  # (boolean mask, dtype, additive mask) of the latest batch


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The boolean mask as 0 / -inf in `dtype`, built once for all the layers that share it (one
    tensor saved for backward, not one per layer)."""
    if _last_additive[0] is mask and _last_additive[1] == dtype:
        return _last_additive[2]
    additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    _last_additive[:] = [mask, dtype, additive]
    return additive


def _eager_flex():
    # Off CUDA, flex is forward-only in torch 2.13 and used to check the mask itself (tests).
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """Each token's position within its document [B, T] (rows start a new document at 0)."""
    seq = document_ids.shape[1]
    index = torch.arange(seq, device=document_ids.device).expand_as(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - first
