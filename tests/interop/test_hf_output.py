"""export-hf and import-hf replace only their own kind of output, and only with --overwrite:
somebody else's folder survives byte for byte (exit 2, the path named), and a failure while
writing leaves the previous output whole with no staging folder beside it."""

import json

import pytest
import torch
from transformers import LlamaForCausalLM

from dist_llm.checkpoint import save_weights_only
from dist_llm.cli import main
from dist_llm.config import Config, ModelConfig
from dist_llm.interop.hf import hf_config
from dist_llm.model.llama import Llama

from ..output_util import snapshot, staging_left, unrelated_folder

MODEL = ModelConfig(
    vocab_size=256, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn_hidden=64, max_seq_len=32
)


def dist_llm_checkpoint(path, seed):
    weights = {k: v + seed for k, v in Llama(MODEL).state_dict().items()}  # Llama's init is seeded
    return save_weights_only(path, weights, Config(model=MODEL))


def hf_folder(path, seed):
    torch.manual_seed(seed)
    LlamaForCausalLM(hf_config(MODEL)).save_pretrained(path)
    return path


SOURCES = {"export-hf": ("--checkpoint", dist_llm_checkpoint), "import-hf": ("--model", hf_folder)}


def make_sources(command, tmp_path, capsys):
    """Two different inputs of the command, source0 and source1."""
    for seed in (0, 1):
        SOURCES[command][1](tmp_path / f"source{seed}", seed)
    capsys.readouterr()  # transformers' progress bars: not the command's output


def run(command, tmp_path, out, seed=0, *extra):
    flag = SOURCES[command][0]
    return main([command, flag, str(tmp_path / f"source{seed}"), "--out", str(out), *extra])


@pytest.mark.parametrize("command", SOURCES)
def test_somebody_elses_folder_survives(command, tmp_path, capsys):
    make_sources(command, tmp_path, capsys)
    victim = unrelated_folder(tmp_path / "victim")
    before = snapshot(victim)
    for extra in ([], ["--overwrite"]):
        assert run(command, tmp_path, victim, 0, *extra) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {victim} exists and is not a") and err.count("\n") == 1, err
        assert "it is never replaced: choose another --out" in err
    assert snapshot(victim) == before and staging_left(victim) == []


@pytest.mark.parametrize("command", SOURCES)
def test_own_output_is_replaced_only_with_overwrite(command, tmp_path, capsys):
    make_sources(command, tmp_path, capsys)
    out = tmp_path / "out"
    assert run(command, tmp_path, out, 0) == 0
    first = snapshot(out)
    assert run(command, tmp_path, out, 1) == 2
    assert capsys.readouterr().err.startswith(f"error: {out} already holds a")
    assert snapshot(out) == first
    assert run(command, tmp_path, out, 1, "--overwrite") == 0
    second = snapshot(out)
    assert second.keys() == first.keys() and second["model.safetensors"] != first["model.safetensors"]
    assert staging_left(out) == []


@pytest.mark.parametrize("command", SOURCES)
def test_a_failure_while_writing_keeps_the_old_output(command, tmp_path, monkeypatch, capsys):
    make_sources(command, tmp_path, capsys)
    out = tmp_path / "out"
    assert run(command, tmp_path, out, 0) == 0
    before = snapshot(out)

    # The weights writer of each: export-hf streams (path first), import-hf uses save_file.
    writer, path_arg = {
        "export-hf": ("dist_llm.interop.hf.write_safetensors", 0),
        "import-hf": ("dist_llm.checkpoint.weights.save_file", 1),
    }[command]

    def dies_halfway(*args, **kwargs):
        with open(args[path_arg], "wb") as f:
            f.write(b"half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr(writer, dies_halfway)
    with pytest.raises(OSError, match="No space left"):
        run(command, tmp_path, out, 1, "--overwrite")
    assert snapshot(out) == before and staging_left(out) == []


def test_only_exactly_their_own_kind_counts(tmp_path, capsys):
    sources = {command: tmp_path / command for command in SOURCES}
    for command, folder in sources.items():
        make_sources(command, folder, capsys)
    export = tmp_path / "export"
    assert run("export-hf", sources["export-hf"], export) == 0
    (export / "README.md").write_text("my model card\n")  # more than export-hf wrote: not its own
    training = tmp_path / "step_000000100"  # a training checkpoint (resumable): not weights-only
    training.mkdir()
    (training / "dist_llm.json").write_text(json.dumps({"format": "dist-llm-checkpoint", "version": 1}))
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "dist_llm.json").write_text("{not json")
    for command, out in [("export-hf", export), ("import-hf", training), ("import-hf", garbage)]:
        before = snapshot(out)
        assert run(command, sources[command], out, 0, "--overwrite") == 2
        assert f"error: {out} exists and is not a" in capsys.readouterr().err
        assert snapshot(out) == before
