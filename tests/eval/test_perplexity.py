import json
import math

import pytest
import torch
import torch.nn.functional as F

from dist_llm.checkpoint import load_model, save_weights_only
from dist_llm.cli import main
from dist_llm.config import load_config
from dist_llm.data.documents import ReadOptions
from dist_llm.data.shard import ShardOptions, shard_corpus
from dist_llm.data.tokenizer import load_tokenizer
from dist_llm.eval.perplexity import run_eval
from dist_llm.model.generate import generate
from dist_llm.model.llama import Llama

CONFIGS = "configs/tiny.yaml"


@pytest.fixture(scope="module")
def val_data(tmp_path_factory, comedies, tokenizer_dir):
    out = tmp_path_factory.mktemp("eval") / "ds"
    opts = ShardOptions(
        seq_len=64, val_fraction=0.2, shard_tokens=64 * 200, read=ReadOptions(doc_split="blank-line")
    )
    shard_corpus([str(comedies[0])], tokenizer_dir, out, opts)
    return out


def make_checkpoint(path, tokenizer_dir, uniform=False, seed=0):
    from pathlib import Path

    config = load_config(Path(__file__).resolve().parents[2] / CONFIGS)
    torch.manual_seed(seed)
    model = Llama(config.model)
    if uniform:
        torch.nn.init.zeros_(model.output.weight)  # every logit 0: the uniform distribution
    return save_weights_only(path, model.state_dict(), config, tokenizer_dir), config


def test_uniform_model_has_perplexity_equal_to_the_vocabulary(tmp_path, tokenizer_dir, val_data, plays):
    ckpt, config = make_checkpoint(tmp_path / "uniform", tokenizer_dir, uniform=True)
    vocab = config.model.vocab_size
    result = run_eval(ckpt, data=str(val_data), split="val")
    assert result["loss"] == pytest.approx(math.log(vocab), abs=1e-6)
    assert result["perplexity"] == pytest.approx(vocab, rel=1e-5)
    text = tmp_path / "play.txt"
    text.write_text(plays[3].read_text(encoding="utf-8")[:3000], encoding="utf-8")
    result = run_eval(ckpt, texts=[str(text)], window=32)
    n_tokens = len(load_tokenizer(tokenizer_dir).encode(text.read_text(encoding="utf-8")).ids)
    assert result["tokens"] == n_tokens
    assert result["bits_per_byte"] == pytest.approx(
        n_tokens * math.log2(vocab) / len(text.read_bytes()), rel=1e-5
    )


def test_sliding_window_scores_every_token_once(tmp_path, tokenizer_dir, plays):
    ckpt, _ = make_checkpoint(tmp_path / "random", tokenizer_dir, seed=3)
    text = tmp_path / "t.txt"
    text.write_text(plays[5].read_text(encoding="utf-8")[:400], encoding="utf-8")
    model, _, tokenizer = load_model(ckpt)
    ids = torch.tensor([0, *tokenizer.encode(text.read_text(encoding="utf-8")).ids])
    assert len(ids) < 256  # fits one window of the tiny model
    with torch.no_grad():
        full = F.cross_entropy(model(ids[:-1].unsqueeze(0))[0], ids[1:], reduction="sum").item()
    whole = run_eval(ckpt, texts=[str(text)], window=256)
    assert whole["nll_sum"] == pytest.approx(full, rel=1e-5)
    windowed = run_eval(ckpt, texts=[str(text)], window=16)
    assert windowed["tokens"] == whole["tokens"] == len(ids) - 1


def test_eval_and_generate_commands(tmp_path, tokenizer_dir, val_data, capsys):
    ckpt, _ = make_checkpoint(tmp_path / "c", tokenizer_dir)
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(val_data), "--max-batches", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"tokens", "nll_sum", "loss", "perplexity", "bits_per_byte"}
    assert result["tokens"] == 2 * 8 * 64
    generate_args = [
        "generate",
        "--checkpoint",
        str(ckpt),
        "--prompt",
        "To be",
        "--max-new-tokens",
        "12",
        "--temperature",
        "0.9",
        "--top-k",
        "50",
        "--top-p",
        "0.9",
        "--seed",
        "7",
    ]
    assert main(generate_args) == 0
    first = capsys.readouterr().out
    assert main(generate_args) == 0
    assert capsys.readouterr().out == first and first.startswith("To be")
    assert main(["eval", "--checkpoint", str(tmp_path / "missing"), "--data", str(val_data)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_greedy_with_cache_equals_greedy_without(tmp_path, tokenizer_dir):
    ckpt, _ = make_checkpoint(tmp_path / "g", tokenizer_dir, seed=11)
    model, _, tokenizer = load_model(ckpt)
    prompt = tokenizer.encode("Now is the winter of our discontent").ids
    cached = generate(model, prompt, 40)
    assert cached == generate(model, prompt, 40, use_cache=False)
    sampled = generate(model, prompt, 20, temperature=1.0, top_k=20, top_p=0.8, seed=5)
    assert sampled == generate(
        model, prompt, 20, temperature=1.0, top_k=20, top_p=0.8, seed=5, use_cache=False
    )
