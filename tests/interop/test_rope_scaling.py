"""A longer context for an existing model: rotary scaling (linear, Llama 3, YaRN) against
transformers' own implementation, through export-hf and import-hf, and on the real SmolLM2-135M
extended four times, from its 8192 positions to 32768."""

import dataclasses
import json

import pytest
import torch
from transformers import LlamaForCausalLM

from dist_llm.checkpoint import check_model_matches, load_weights, save_weights_only, saved_config
from dist_llm.cli import main
from dist_llm.config import Config, ModelConfig, RopeScaling, load_config
from dist_llm.errors import CheckpointError
from dist_llm.interop.hf import import_hf
from dist_llm.model.llama import Llama

SCALINGS = {
    "linear": RopeScaling(type="linear", factor=4.0),
    "llama3": RopeScaling(type="llama3", factor=4.0, original_max_seq_len=128),
    "yarn": RopeScaling(type="yarn", factor=4.0, original_max_seq_len=128),
}


def tiny(scaling: RopeScaling) -> ModelConfig:
    return ModelConfig(
        vocab_size=256,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=128,
        max_seq_len=512,
        rope_theta=10000.0,
        rope_scaling=scaling,
    )


@pytest.mark.parametrize("kind", list(SCALINGS))
def test_scaled_rotary_matches_transformers_past_the_original_context(kind, tmp_path, tokenizer_dir):
    """Logits at 480 positions (past the original 128) equal transformers' on the exported
    folder; config.json carries the scaling and import-hf reads it back."""
    config = Config(model=tiny(SCALINGS[kind]))
    torch.manual_seed(0)
    ours = Llama(config.model).eval()
    ckpt = save_weights_only(tmp_path / "ckpt", ours.state_dict(), config, tokenizer_dir)
    assert main(["export-hf", "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["rope_scaling"]["rope_type"] == kind
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, 256, (1, 480))
    unscaled = Llama(dataclasses.replace(config.model, rope_scaling=RopeScaling())).eval()
    unscaled.load_state_dict(ours.state_dict())
    with torch.no_grad():
        logits = ours(tokens)
        # float64 tables here, float32 angles in transformers: 1e-5 of angle at position 480
        assert (hf(tokens).logits - logits).abs().max().item() <= 2e-5
        assert (unscaled(tokens) - logits).abs().max().item() > 1e-3  # the scaling did something (100x)
    back = import_hf(tmp_path / "hf", tmp_path / "back", seq_len=128)
    assert saved_config(back).model.rope_scaling == SCALINGS[kind]


def test_unsupported_scaling_is_refused_by_name(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    hf = json.loads(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    hf["rope_scaling"] = {"rope_type": "longrope", "factor": 4.0}
    (folder / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match=r"longrope.*not supported.*linear, llama3, yarn"):
        import_hf(folder, tmp_path / "out")


def test_scaling_needs_the_original_context():
    with pytest.raises(ValueError, match="original_max_seq_len"):
        load_config(None, ["model.rope_scaling.type=llama3", "model.rope_scaling.factor=4"])


def test_smollm2_extended_four_times(smollm2, tmp_path):
    """SmolLM2-135M-Instruct (max_position_embeddings 8192) with Llama 3 scaling to 32768: starting weights for
    continued pre-training (checkpoint.init_from accepts them, a resume would not) whose export
    gives transformers the same logits."""
    hf_dir, _, _ = smollm2
    original = import_hf(hf_dir, tmp_path / "imported", seq_len=256)
    saved = saved_config(original)
    state = load_weights(original, saved.model)
    assert saved.model.max_seq_len == 8192
    scaling = RopeScaling(type="llama3", factor=4.0, original_max_seq_len=8192)
    longer = dataclasses.replace(saved.model, max_seq_len=32768, rope_scaling=scaling)
    check_model_matches(saved.model, longer, original, weights_only=True)  # init_from: accepted
    with pytest.raises(CheckpointError, match="max_seq_len"):
        check_model_matches(saved.model, longer, original)  # a resume: refused
    extended = save_weights_only(tmp_path / "extended", state, Config(model=longer), original)
    assert main(["export-hf", "--checkpoint", str(extended), "--out", str(tmp_path / "hf")]) == 0
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert exported["max_position_embeddings"] == 32768
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = Llama(longer).eval()
    ours.load_state_dict(state, strict=False)
    tokens = torch.randint(0, longer.vocab_size, (1, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(tokens).logits - ours(tokens)).abs().max().item() <= 1e-4
