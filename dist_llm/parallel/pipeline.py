"""Pipeline parallelism: the plain model sliced into DeepSpeed `PipelineModule` stages.

The layer list is [embedding, block 0 .. block L-1, final norm, output head]; DeepSpeed places a
contiguous run of it on each stage, balancing the blocks (`partition_method="type:BlockStage"`),
and runs the 1F1B schedule over the gradient-accumulation micro-batches. With tied embeddings the
head is the embedding module itself (a `TiedLayerSpec` on the first and last stage whose
gradients DeepSpeed sums between the two).

Under document masking the first stage takes (input_ids, document_ids) and every block stage
passes (hidden, document_ids) on, so each stage builds the same mask the plain model would.

Each stage module keeps the plain model's parameter names below it (`layers.3.attention.wq`),
is built on the meta device, tensor-parallelized by the same plan as the unpipelined model, and
filled from the weight source: a rank only ever allocates its own stage's shards.
"""

from __future__ import annotations

import torch
from torch import nn

from dist_llm.config import ModelConfig
from dist_llm.model.llama import Block, RMSNorm, attention_inputs, rope_tables
from dist_llm.model.roles import HEAD_WEIGHT, stored_name
from dist_llm.parallel.tensor import TensorParallel, apply_tensor_parallel, vocab_logits
from dist_llm.parallel.weights import Source, materialize


def _build(stage: nn.Module, tp: TensorParallel, source: Source, device) -> None:
    apply_tensor_parallel(stage, tp)
    materialize(stage, source, tp, device)


class EmbeddingStage(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel, source: Source, device):
        super().__init__()
        with torch.device("meta"):
            self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.tp, self.vocab_size = tp, config.vocab_size
        _build(self, tp, source, device)

    def forward(self, inputs):
        if isinstance(inputs, tuple):  # (input_ids, document_ids)
            return self.tok_embeddings(inputs[0]), inputs[1]
        return self.tok_embeddings(inputs)


class BlockStage(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, tp: TensorParallel, source: Source, device):
        super().__init__()
        self.config, self.tp = config, tp
        with torch.device("meta"):
            self.layers = nn.ModuleDict({str(layer): Block(config, layer)})
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        _build(self, tp, source, device)

    def reset_buffers(self) -> None:
        cos, sin = rope_tables(self.config)
        device = next(self.parameters()).device
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    def forward(self, inputs):
        h, document_ids = inputs if isinstance(inputs, tuple) else (inputs, None)
        seq = h.shape[1] * (
            self.tp.size if self.tp.sequence_parallel else 1
        )  # positions of the whole sequence
        cos, sin, mask = attention_inputs(self.config, self.rope_cos, self.rope_sin, seq, document_ids)
        (block,) = self.layers.values()
        h = block(h, cos, sin, mask=mask)
        return h if document_ids is None else (h, document_ids)


class NormStage(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel, source: Source, device):
        super().__init__()
        with torch.device("meta"):
            self.norm = RMSNorm(config.dim, config.norm_eps)
        _build(self, tp, source, device)

    def forward(self, inputs):
        return self.norm(inputs[0] if isinstance(inputs, tuple) else inputs)


class HeadStage(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel, source: Source, device):
        super().__init__()
        with torch.device("meta"):
            self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        _build(self, tp, source, device)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.output(h)


def pipeline_inputs(batch: dict, device):
    """The first stage's input from a batch: the token ids, with their document ids if it has them."""
    ids = batch["input_ids"].to(device)
    documents = batch.get("document_ids")
    return ids if documents is None else (ids, documents.to(device))


def tied_head(embedding: EmbeddingStage, h: torch.Tensor) -> torch.Tensor:
    """Logits from the embedding matrix, on the last stage of a tied model."""
    return vocab_logits(h, embedding.tok_embeddings.weight, embedding.tp, embedding.vocab_size)


def build_pipeline(config: ModelConfig, layout, source: Source, device, loss_fn):
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

    tp = layout.tensor
    if config.tie_embeddings:
        tied = stored_name(HEAD_WEIGHT, config)  # the weight the first and last stage share
        first = TiedLayerSpec("embed", EmbeddingStage, config, tp, source, device, tied_weight_attr=tied)
        last = TiedLayerSpec(
            "embed", EmbeddingStage, config, tp, source, device, forward_fn=tied_head, tied_weight_attr=tied
        )
    else:
        first = LayerSpec(EmbeddingStage, config, tp, source, device)
        last = LayerSpec(HeadStage, config, tp, source, device)
    blocks = [LayerSpec(BlockStage, config, i, tp, source, device) for i in range(config.n_layers)]
    module = PipelineModule(
        layers=[first, *blocks, LayerSpec(NormStage, config, tp, source, device), last],
        topology=layout.topology,
        loss_fn=loss_fn,
        partition_method="type:BlockStage",
    )
    layout.grid = module._grid
    tp.group = layout.grid.get_slice_parallel_group()
    return module
