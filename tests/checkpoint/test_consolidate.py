"""`dist-llm checkpoint consolidate`: a sharded training checkpoint into a weights-only one,
streamed. The file, read back by safetensors itself, holds load_weights' tensors of the shards
and is the same bytes as the weights-only writer's; the output rules of every stage hold."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dist_llm.checkpoint import (
    META,
    TOKENIZER_FILES,
    WEIGHTS,
    is_weights_only,
    load_model,
    load_weights,
    read_meta,
    save_weights_only,
)
from dist_llm.cli import main
from dist_llm.model.roles import untie

from ..output_util import snapshot, staging_left, unrelated_folder
from .builders import model_state, moments_of, tiny_config, write_old_format, write_sharded


def training_checkpoint(tmp_path, tokenizer_dir, tied=True, seed=0):
    """A sharded checkpoint of step 4, every tensor in 3 pieces (as 3 tensor-parallel ranks)."""
    cfg = tiny_config(tied)
    weights = model_state(cfg, seed)
    tensors = {f"model/{n}": t for n, t in weights.items()} | moments_of(weights)
    path = tmp_path / f"run{seed}" / "checkpoints" / "step_000000004"
    return write_sharded(path, cfg, tensors, tokenizer_dir, split=3), cfg, weights


@pytest.mark.parametrize("tied", [True, False])
def test_consolidated_weights_equal_the_shards(tmp_path, tokenizer_dir, tied, capsys):
    ckpt, cfg, weights = training_checkpoint(tmp_path, tokenizer_dir, tied)
    out = tmp_path / "consolidated"
    assert main(["checkpoint", "consolidate", str(ckpt), "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"wrote {out}\n"
    sharded = untie(load_weights(ckpt, cfg.model), cfg.model)
    back = load_file(str(out / WEIGHTS))  # safetensors' own reader
    assert back.keys() == sharded.keys() == weights.keys()
    assert all(torch.equal(back[n], sharded[n]) and torch.equal(back[n], weights[n]) for n in weights)
    with safe_open(str(out / WEIGHTS), framework="pt") as f:
        assert f.metadata() is None  # as the weights-only writer leaves it
    reference = save_weights_only(tmp_path / "reference", load_weights(ckpt, cfg.model), cfg)
    assert (out / WEIGHTS).read_bytes() == (reference / WEIGHTS).read_bytes()
    meta = read_meta(out)  # lists every file at its size
    assert is_weights_only(out) and meta["step"] == 4 and meta["tokens"] == 4 * 1024
    assert meta["consolidated_from"] == str(ckpt.resolve()) and meta["config"] == read_meta(ckpt)["config"]
    assert sorted(meta["files"]) == sorted([WEIGHTS, *TOKENIZER_FILES])
    model, _, tokenizer = load_model(out)
    direct, _, _ = load_model(ckpt)
    tokens = torch.tensor([tokenizer.encode("Now is the winter of our discontent").ids])
    with torch.no_grad():
        assert torch.equal(model(tokens), direct(tokens))


def test_old_format_training_checkpoints_consolidate_too(tmp_path, tokenizer_dir):
    cfg = tiny_config(True)
    weights = model_state(cfg)
    old = write_old_format(tmp_path / "old", cfg, weights, moments_of(weights), tokenizer_dir)
    assert main(["checkpoint", "consolidate", str(old), "--out", str(tmp_path / "out")]) == 0
    back = load_file(str(tmp_path / "out" / WEIGHTS))
    assert back.keys() == weights.keys() and all(torch.equal(back[n], weights[n]) for n in weights)


def test_the_output_rules_of_every_stage(tmp_path, tokenizer_dir, capsys):
    ckpt, _, _ = training_checkpoint(tmp_path, tokenizer_dir, seed=0)
    other, _, _ = training_checkpoint(tmp_path, tokenizer_dir, seed=1)

    def consolidate(source, out, *extra):
        return main(["checkpoint", "consolidate", str(source), "--out", str(out), *extra])

    victim = unrelated_folder(tmp_path / "victim")
    for target in (victim, other):  # somebody's folder; a training checkpoint (not weights-only)
        before = snapshot(target)
        for extra in ([], ["--overwrite"]):
            assert consolidate(ckpt, target, *extra) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"error: {target} exists and is not a weights-only dist-llm checkpoint")
        assert snapshot(target) == before and staging_left(target) == []
    out = tmp_path / "out"
    assert consolidate(ckpt, out) == 0
    first = snapshot(out)
    assert consolidate(other, out) == 2
    assert capsys.readouterr().err.startswith(
        f"error: {out} already holds a weights-only dist-llm checkpoint"
    )
    assert snapshot(out) == first
    assert consolidate(other, out, "--overwrite") == 0
    assert snapshot(out)[WEIGHTS] != first[WEIGHTS] and staging_left(out) == []
    assert consolidate(out, tmp_path / "again") == 2  # weights-only already
    assert f"error: {out} is a weights-only checkpoint already" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()


def test_a_damaged_checkpoint_is_named_before_anything_is_written(tmp_path, tokenizer_dir, capsys):
    ckpt, _, _ = training_checkpoint(tmp_path, tokenizer_dir)
    shard = next((ckpt / "shards").glob("*.distcp"))
    with open(shard, "r+b") as f:
        f.truncate(1000)
    out = tmp_path / "out"
    assert main(["checkpoint", "consolidate", str(ckpt), "--out", str(out)]) == 2
    assert f"error: {shard} is truncated or changed: 1000 bytes, {META} says" in capsys.readouterr().err
    assert not out.exists() and staging_left(out) == []
    json.loads((ckpt / META).read_text())  # untouched
