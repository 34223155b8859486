"""`dist-llm prune`: unstructured / N:M sparsity and structured pruning to a smaller dense model.

Unstructured and 2:4 sparsity apply to every linear layer inside the blocks (not the embedding
or the head), scored by magnitude |W| (one comparison group per matrix, the classic baseline)
or by Wanda, |W_ij| * ||X_j||_2 with X the layer's input on calibration data, compared within
each output row (Sun et al. 2023). The activation statistics come from one pass of the dense
model ("one-shot"; the paper feeds each layer the already-pruned earlier layers' outputs).

Structured pruning removes whole units ranked by activation-based importance on calibration
data (as in Minitron, Muralidharan et al. 2024) and writes a smaller dense model:
  mlp        SwiGLU channels, importance mean |silu(w1 x) * w3 x|
  heads      key/value groups with their query heads, importance the norm of their attention output
  layers     whole blocks, importance 1 - cos(block input, block output) (ShortGPT's block influence)
  embedding  hidden channels, importance mean |RMSNorm(h)| over every norm input
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from dist_llm.checkpoint import WEIGHTS_ONLY, load_model, saved_config
from dist_llm.compress.calibrate import check_calibration
from dist_llm.config import Config, ModelConfig
from dist_llm.errors import InputError
from dist_llm.files import check_output_dir
from dist_llm.model.llama import Llama
from dist_llm.model.roles import BLOCK_LINEARS, role_of

LINEARS = BLOCK_LINEARS  # every linear layer of a block, as a path below layers.N
UNSTRUCTURED = ("magnitude", "wanda")
STRUCTURED = ("mlp", "heads", "layers", "embedding")


def block_linears(model: Llama) -> dict[str, nn.Linear]:
    return {
        f"layers.{i}.{name}": block.get_submodule(name)
        for i, block in enumerate(model.layers)
        for name in LINEARS
    }


@torch.no_grad()
def _run(model: Llama, batches: list[torch.Tensor]) -> None:
    for ids in batches:
        model(ids)


def _with_hooks(modules: dict[str, nn.Module], hook: Callable, batches, model) -> None:
    handles = [
        m.register_forward_hook(lambda mod, args, out, name=name: hook(name, args[0], out))
        for name, m in modules.items()
    ]
    try:
        _run(model, batches)
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------- unstructured / N:M


@torch.no_grad()
def input_norms(model: Llama, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """||X_j||_2 over all calibration tokens, per input feature of every block linear."""
    sums: dict[str, torch.Tensor] = {}

    def hook(name, x, _out):
        sq = x.float().pow(2).flatten(0, -2).sum(0)
        sums[name] = sums.get(name, 0) + sq

    _with_hooks(block_linears(model), hook, batches, model)
    return {name: s.sqrt() for name, s in sums.items()}


@torch.no_grad()
def sparsify(model: Llama, method: str, sparsity: float, pattern: str, norms: dict | None) -> dict:
    """Zero weights in place; returns {zeroed, total} over the pruned matrices."""
    zeroed = total = 0
    n, m = (int(x) for x in pattern.split(":")) if pattern else (0, 0)
    for name, linear in block_linears(model).items():
        w = linear.weight
        score = w.abs() if method == "magnitude" else w.abs() * norms[name].to(w.dtype)[None, :]
        if n:  # N:M: keep the n best of every m consecutive inputs
            groups = score.reshape(w.shape[0], -1, m)
            drop = groups.argsort(dim=-1)[..., : m - n]
            mask = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False).reshape(w.shape)
        elif method == "magnitude":  # one comparison group: the whole matrix
            k = int(w.numel() * sparsity)
            mask = torch.ones_like(w, dtype=torch.bool)
            if k:
                mask.view(-1)[score.view(-1).argsort()[:k]] = False
        else:  # wanda: per output row
            k = int(w.shape[1] * sparsity)
            mask = torch.ones_like(w, dtype=torch.bool)
            if k:
                mask.scatter_(1, score.argsort(dim=1)[:, :k], False)
        w.mul_(mask)
        zeroed += int((~mask).sum())
        total += w.numel()
    return {"zeroed": zeroed, "total": total}


# ---------------------------------------------------------------- structured


@torch.no_grad()
def prune_structured(
    model: Llama, config: Config, method: str, ratio: float, batches
) -> tuple[Llama, Config]:
    """A new, smaller model (and its config) keeping the most important `1 - ratio` of the units."""
    m = config.model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if method == "mlp":
        scores = _mlp_importance(model, batches)
        keep = max(1, round(m.ffn_hidden * (1 - ratio)))
        for i, score in enumerate(scores):
            _keep_units(state, i, ("mlp_in", "mlp_out"), score.topk(keep).indices.sort().values)
        new = _replace(m, ffn_hidden=keep)
    elif method == "heads":
        scores = _group_importance(model, batches)
        groups = m.n_kv_heads
        keep = max(1, round(groups * (1 - ratio)))
        q_per_kv, hd = m.n_heads // groups, m.head_size
        for i, score in enumerate(scores):
            kept = score.topk(keep).indices.sort().values
            kv_rows = torch.cat([torch.arange(g * hd, (g + 1) * hd) for g in kept.tolist()])
            q_rows = torch.cat(
                [torch.arange(g * q_per_kv * hd, (g + 1) * q_per_kv * hd) for g in kept.tolist()]
            )
            _keep_units(state, i, ("attention_q", "attention_out"), q_rows)
            _keep_units(state, i, ("attention_kv",), kv_rows)
        new = _replace(m, n_heads=keep * q_per_kv, n_kv_heads=keep, head_dim=hd)
    elif method == "layers":
        scores = _block_influence(model, batches)
        drop = max(1, round(m.n_layers * ratio)) if ratio < 1 else int(ratio)
        kept = sorted(torch.tensor(scores).topk(m.n_layers - drop).indices.tolist())
        state = _renumber_layers(state, kept)
        new = _replace(m, n_layers=len(kept))
    elif method == "embedding":
        score = _channel_importance(model, batches)
        keep = max(2, round(m.dim * (1 - ratio)))
        idx = score.topk(keep).indices.sort().values
        state = _slice_hidden(state, idx)
        new = _replace(m, dim=keep, head_dim=m.head_size)
    else:
        raise ValueError(f"unknown structured method {method!r}; choose from {STRUCTURED}")
    pruned = Llama(new)
    pruned.load_state_dict(state)
    out = Config(
        **{
            **{
                f: getattr(config, f) for f in ("data", "parallel", "optim", "train", "checkpoint", "logging")
            },
            "model": new,
        }
    )
    return pruned.eval(), out


def _replace(m: ModelConfig, **changes) -> ModelConfig:
    import dataclasses

    return ModelConfig(**{**dataclasses.asdict(m), **changes})


def _mlp_importance(model: Llama, batches) -> list[torch.Tensor]:
    sums = [0] * len(model.layers)

    def hook(name, x, _out):
        sums[int(name)] = sums[int(name)] + x.float().abs().flatten(0, -2).sum(0)

    _with_hooks({str(i): b.feed_forward.w2 for i, b in enumerate(model.layers)}, hook, batches, model)
    return sums


def _group_importance(model: Llama, batches) -> list[torch.Tensor]:
    m = model.config
    hd, q_per_kv = m.head_size, m.n_heads // m.n_kv_heads
    sums = [0] * len(model.layers)

    def hook(name, x, _out):  # x: attention output before wo, [B, T, heads * head_dim]
        per_head = x.float().unflatten(-1, (m.n_heads, hd)).norm(dim=-1).flatten(0, -2).sum(0)
        sums[int(name)] = sums[int(name)] + per_head.view(m.n_kv_heads, q_per_kv).sum(-1)

    _with_hooks({str(i): b.attention.wo for i, b in enumerate(model.layers)}, hook, batches, model)
    return sums


def _block_influence(model: Llama, batches) -> list[float]:
    totals = [0.0] * len(model.layers)
    counts = [0] * len(model.layers)

    def hook(name, args_x, out):
        cos = torch.nn.functional.cosine_similarity(args_x.float(), out.float(), dim=-1)
        totals[int(name)] += float((1 - cos).sum())
        counts[int(name)] += cos.numel()

    _with_hooks({str(i): b for i, b in enumerate(model.layers)}, hook, batches, model)
    return [t / max(c, 1) for t, c in zip(totals, counts, strict=True)]


def _channel_importance(model: Llama, batches) -> torch.Tensor:
    total = 0

    def hook(name, _x, out):
        nonlocal total
        total = total + out.float().abs().flatten(0, -2).sum(0)

    norms = {
        f"{i}.{n}": getattr(b, n) for i, b in enumerate(model.layers) for n in ("attention_norm", "ffn_norm")
    }
    norms["final"] = model.norm
    _with_hooks(norms, hook, batches, model)
    return total


def _renumber_layers(state: dict, kept: list[int]) -> dict:
    out = {k: v for k, v in state.items() if not k.startswith("layers.")}
    for new_i, old_i in enumerate(kept):
        prefix = f"layers.{old_i}."
        out.update(
            {f"layers.{new_i}." + k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        )
    return out


def _keep_units(state: dict, layer: int, treated_as: tuple[str, ...], idx: torch.Tensor) -> None:
    """Keep units `idx` (rows of heads or MLP channels) of the matrices of block `layer` that
    pruning treats as one of `treated_as`, in place. The units lie along the dimension tensor
    parallelism splits: the outputs of wq/wk/wv/w1/w3, the inputs of wo/w2."""
    prefix = f"layers.{layer}."
    for name in [k for k in state if k.startswith(prefix)]:
        role = role_of(name)
        if role.prune in treated_as:
            state[name] = state[name].index_select(role.split_dim, idx)


def _slice_hidden(state: dict, idx: torch.Tensor) -> dict:
    return {k: v.index_select(role_of(k).hidden_dim, idx) for k, v in state.items()}


# ---------------------------------------------------------------- the stage


def run_prune(
    checkpoint,
    out,
    method: str,
    amount: float,
    pattern: str,
    calibration: dict,
    evaluation: dict,
    overwrite: bool = False,
) -> dict:
    from dist_llm.compress.calibrate import calibration_batches
    from dist_llm.compress.report import check_evaluation, save_and_report

    # Every argument before anything is written: the report's evaluation is only read at the end.
    _check_method(method, pattern)
    check_calibration(calibration)
    check_evaluation(evaluation)
    check_output_dir(Path(out), WEIGHTS_ONLY, overwrite)
    if saved_config(checkpoint).model.moe.num_experts:
        raise InputError(f"{checkpoint} is a mixture-of-experts model, which prune does not handle yet")
    model, config, tokenizer = load_model(checkpoint)
    batches = calibration_batches(tokenizer, **calibration)
    settings = {"method": method, "amount": amount, "pattern": pattern, "calibration": calibration}
    if method in UNSTRUCTURED:
        norms = input_norms(model, batches) if method == "wanda" else None
        counts = sparsify(model, method, amount, pattern, norms)
        settings["sparsity_of_pruned_matrices"] = counts["zeroed"] / counts["total"]
    else:
        model, config = prune_structured(model, config, method, amount, batches)
    return save_and_report("prune", checkpoint, out, model, config, settings, evaluation, overwrite=overwrite)


def _check_method(method: str, pattern: str) -> None:
    if method not in UNSTRUCTURED + STRUCTURED:
        raise ValueError(f"unknown method {method!r}; choose from {UNSTRUCTURED + STRUCTURED}")
    if pattern and not re.fullmatch(r"[1-9][0-9]*:[1-9][0-9]*", pattern):
        raise InputError(f"--pattern {pattern!r} is not N:M (such as 2:4)")
