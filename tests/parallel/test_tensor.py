"""Tensor-parallel building blocks: the plan, padding, and the vocabulary-parallel loss."""

import torch

from dist_llm.config import load_config
from dist_llm.model.llama import Llama
from dist_llm.parallel.tensor import (
    ColumnParallelLinear,
    RowParallelLinear,
    TensorParallel,
    VocabParallelEmbedding,
    VocabParallelOutput,
    apply_tensor_parallel,
    padded_vocab,
)

from ..launch_util import torchrun


def test_vocab_parallel_pieces_equal_the_full_ones(tmp_path):
    out = tmp_path / "out.pt"
    torchrun(2, ["tests/parallel/tensor_worker.py", str(out)])
    got = torch.load(out, weights_only=True)
    assert got["padding_is_minus_inf"]
    assert got["embedding"] <= 1e-6 and got["logits"] <= 1e-5, got
    assert got["loss"] <= 1e-5 and got["sum"] <= 1e-3 and got["head_grad"] <= 1e-6, got


def test_plan_swaps_every_matrix_and_shards_by_heads():
    cfg = load_config(
        None,
        ["model.vocab_size=101", "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2"],
    )
    dense = Llama(cfg.model)
    sharded = apply_tensor_parallel(Llama(cfg.model), TensorParallel(rank=1, size=2))
    kinds = {name: type(m) for name, m in sharded.named_modules()}
    assert kinds["tok_embeddings"] is VocabParallelEmbedding and kinds["output"] is VocabParallelOutput
    assert kinds["layers.1.attention.wk"] is ColumnParallelLinear
    assert kinds["layers.1.feed_forward.w2"] is RowParallelLinear
    # rank 1 holds the second half of the heads (rows) and of the down projection's inputs
    head = cfg.model.head_size
    assert torch.equal(sharded.layers[0].attention.wq.weight, dense.layers[0].attention.wq.weight[2 * head :])
    assert torch.equal(sharded.layers[0].attention.wk.weight, dense.layers[0].attention.wk.weight[head:])
    w2 = dense.layers[0].feed_forward.w2.weight
    assert torch.equal(sharded.layers[0].feed_forward.w2.weight, w2[:, w2.shape[1] // 2 :])
    # vocabulary 101 padded to 102: rank 1 holds rows 51..100 and one zero row
    assert padded_vocab(101, 2) == 102
    assert torch.equal(sharded.tok_embeddings.weight[:-1], dense.tok_embeddings.weight[51:])
    assert not sharded.tok_embeddings.weight[-1].any()
    split = [p for p in sharded.parameters() if getattr(p, "model_parallel", False)]
    assert len(split) == 2 + 7 * cfg.model.n_layers and all(hasattr(p, "tp_dim") for p in split)
