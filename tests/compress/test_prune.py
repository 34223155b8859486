"""Pruning: Wanda against magnitude on the real SmolLM2 (as published for LLaMA), N:M structure,
and structured pruning checked against the unpruned model."""

import json

import pytest
import torch

from dist_llm.checkpoint import load_model, save_weights_only
from dist_llm.cli import main
from dist_llm.compress.calibrate import calibration_batches
from dist_llm.compress.prune import block_linears, input_norms, prune_structured, sparsify
from dist_llm.config import Config, ModelConfig
from dist_llm.eval.perplexity import run_eval
from dist_llm.interop.hf import import_hf
from dist_llm.model.llama import Llama


@pytest.fixture(scope="module")
def smol(smollm2, tmp_path_factory, plays):
    work = tmp_path_factory.mktemp("prune")
    import_hf(smollm2[0], work / "dense", seq_len=256)
    (work / "calib.txt").write_text(plays[0].read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    (work / "eval.txt").write_text(plays[-1].read_text(encoding="utf-8")[30_000:33_000], encoding="utf-8")
    return work


def test_wanda_keeps_perplexity_far_below_magnitude_at_half_sparsity(smol):
    model, config, tok = load_model(smol / "dense")
    calib = calibration_batches(tok, None, "train", [str(smol / "calib.txt")], samples=16, seq_len=128)
    norms = input_norms(model, calib)
    dense = run_eval(smol / "dense", texts=[str(smol / "eval.txt")], device="cpu")["perplexity"]
    ppl = {}
    for method in ("magnitude", "wanda"):
        pruned, _, _ = load_model(smol / "dense")
        counts = sparsify(pruned, method, 0.5, "", norms)
        assert counts["zeroed"] / counts["total"] == pytest.approx(0.5, abs=1e-3)
        save_weights_only(smol / method, pruned.state_dict(), config, smol / "dense")
        ppl[method] = run_eval(smol / method, texts=[str(smol / "eval.txt")], device="cpu")["perplexity"]
    assert dense < ppl["wanda"] < 0.5 * ppl["magnitude"], (dense, ppl)


def test_two_of_four_sparsity_has_the_pattern(smol):
    model, _, tok = load_model(smol / "dense")
    calib = calibration_batches(tok, None, "train", [str(smol / "calib.txt")], samples=4, seq_len=64)
    sparsify(model, "wanda", 0.0, "2:4", input_norms(model, calib))
    for linear in block_linears(model).values():
        zeros = (linear.weight.view(linear.weight.shape[0], -1, 4) == 0).sum(-1)
        assert bool((zeros >= 2).all())  # exactly 2 pruned per group (a weight may already be 0)


def tiny(tmp_path, tokenizer_dir, **model):
    config = Config(
        model=ModelConfig(
            **{
                "vocab_size": 2048,
                "dim": 64,
                "n_layers": 4,
                "n_heads": 4,
                "n_kv_heads": 2,
                "ffn_hidden": 128,
                "max_seq_len": 64,
                **model,
            }
        )
    )
    torch.manual_seed(0)
    net = Llama(config.model).eval()
    return net, config, save_weights_only(tmp_path / "tiny", net.state_dict(), config, tokenizer_dir)


@pytest.mark.parametrize("method", ["mlp", "heads", "embedding"])
def test_pruning_nothing_changes_nothing(method, tmp_path, tokenizer_dir):
    net, config, _ = tiny(tmp_path, tokenizer_dir)
    calib = [torch.randint(0, 2048, (2, 32))]
    same, _ = prune_structured(net, config, method, 0.0, calib)
    tokens = torch.randint(0, 2048, (2, 32))
    with torch.no_grad():
        assert torch.allclose(same(tokens), net(tokens), atol=1e-5)


def test_structured_pruning_removes_the_least_important_units(tmp_path, tokenizer_dir):
    net, config, _ = tiny(tmp_path, tokenizer_dir)
    calib = [torch.randint(0, 2048, (4, 32))]
    with torch.no_grad():
        net.layers[1].feed_forward.w3.weight[:32] = 0  # channels 0-31 of layer 1 now output nothing
        net.layers[2].attention.wv.weight[:16] = 0  # KV group 0 of layer 2 now contributes nothing
    small, small_config = prune_structured(net, config, "mlp", 0.25, calib)
    assert small_config.model.ffn_hidden == 96
    expected = net.layers[1].feed_forward.w1.weight[32:]
    assert torch.equal(small.layers[1].feed_forward.w1.weight, expected)
    small, small_config = prune_structured(net, config, "heads", 0.5, calib)
    assert (small_config.model.n_heads, small_config.model.n_kv_heads, small_config.model.head_size) == (
        2,
        1,
        16,
    )
    assert torch.equal(small.layers[2].attention.wk.weight, net.layers[2].attention.wk.weight[16:])
    tokens = torch.randint(0, 2048, (2, 32))
    with (
        torch.no_grad()
    ):  # group 0 of layer 2 was dead: removing it there changes nothing in layer 2's output
        h = net.tok_embeddings(tokens)
        attn_full = net.layers[2].attention(
            net.layers[2].attention_norm(h), net.rope_cos[:32], net.rope_sin[:32], None
        )
        attn_small = small.layers[2].attention(
            small.layers[2].attention_norm(h), small.rope_cos[:32], small.rope_sin[:32], None
        )
        assert torch.allclose(attn_full, attn_small, atol=1e-5)


def test_dropping_a_layer_equals_skipping_it(tmp_path, tokenizer_dir):
    net, config, _ = tiny(tmp_path, tokenizer_dir)
    calib = [torch.randint(0, 2048, (4, 32))]
    with torch.no_grad():  # block 3 now adds nothing to the residual stream: the obvious one to drop
        net.layers[3].attention.wo.weight.zero_()
        net.layers[3].feed_forward.w2.weight.zero_()
    small, small_config = prune_structured(net, config, "layers", 0.25, calib)
    assert small_config.model.n_layers == 3
    tokens = torch.randint(0, 2048, (2, 32))
    with torch.no_grad():
        assert torch.allclose(small(tokens), net(tokens), atol=1e-5)


def test_prune_command_writes_a_smaller_model_and_a_report(tmp_path, tokenizer_dir, plays):
    _, _, ckpt = tiny(tmp_path, tokenizer_dir)
    text = tmp_path / "t.txt"
    text.write_text(plays[2].read_text(encoding="utf-8")[:6000], encoding="utf-8")
    out = tmp_path / "pruned"
    assert (
        main(
            [
                "prune",
                "--checkpoint",
                str(ckpt),
                "--out",
                str(out),
                "--method",
                "mlp",
                "--ratio",
                "0.5",
                "--text",
                str(text),
                "--calib-samples",
                "4",
                "--calib-seq-len",
                "32",
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["stage"] == "prune" and report["result"]["parameters"] < report["baseline"]["parameters"]
    assert report["ratios"]["bytes_on_disk"] < 1 and report["result"]["perplexity"] > 1
    _model, config, _ = load_model(out)
    assert config.model.ffn_hidden == 64
    assert (out / "tensorboard").is_dir()
