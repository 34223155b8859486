"""`dist-llm checkpoint convert`: a training checkpoint of the format before sharding (built here
as its writer wrote it) into shards holding the same tensors, the run's state copied, the old
checkpoint and `latest` untouched; resume's refusal of the old one names the command."""

import json

import pytest
import torch

from dist_llm.checkpoint import META, OPTIMIZER, SHARDS, TOKENIZER_FILES, load_weights, sharded
from dist_llm.checkpoint.convert import convert
from dist_llm.checkpoint.verify import verify_checkpoint
from dist_llm.cli import main
from dist_llm.errors import CheckpointError
from dist_llm.model.roles import tie
from dist_llm.train.checkpoint import resume

from ..launch_util import tiny_train_args, torchrun
from ..output_util import snapshot, staging_left
from ..reference import train_losses
from .builders import model_state, moments_of, old_format_of, tiny_config, write_old_format
from .test_consolidate import training_checkpoint


def old_checkpoint(tmp_path, tokenizer_dir, tied=True, zero0=False, seed=0):
    """A run folder whose `latest` names its one checkpoint, of the format before sharding."""
    cfg = tiny_config(tied)
    weights = model_state(cfg, seed)
    moments = None if zero0 else moments_of(weights, seed + 1)
    path = tmp_path / f"run{seed}" / "checkpoints" / "step_000000004"
    write_old_format(path, cfg, weights, moments, tokenizer_dir)
    (path.parent / "latest").write_text(path.name)
    return path, cfg, weights, moments


@pytest.mark.parametrize("tied", [True, False])
def test_the_shards_hold_the_old_tensors_and_the_run_state_is_copied(tmp_path, tokenizer_dir, tied, capsys):
    old, cfg, weights, moments = old_checkpoint(tmp_path, tokenizer_dir, tied)
    before, run_before = snapshot(old), snapshot(old.parent)
    assert main(["checkpoint", "convert", str(old)]) == 0
    new = old.parent / "step_000000004.sharded"
    assert capsys.readouterr().out == (
        f"wrote {new} ({old} is unchanged); resume from it with checkpoint.resume={new}\n"
    )
    assert snapshot(old) == before and (old.parent / "latest").read_text() == old.name
    assert {k: v for k, v in snapshot(old.parent).items() if not k.startswith(new.name)} == run_before
    expected = {f"model/{n}": t for n, t in weights.items()} | moments
    full = sharded.read_full(new / SHARDS, expected)
    assert sharded.specs(new / SHARDS).keys() == expected.keys()
    assert all(torch.equal(full[k], expected[k]) for k in expected)
    loaded = load_weights(new, cfg.model)
    assert loaded.keys() == tie(weights, cfg.model).keys()
    assert all(torch.equal(loaded[k], v) for k, v in tie(weights, cfg.model).items())
    old_meta, new_meta = (json.loads((p / META).read_text()) for p in (old, new))
    assert {k: v for k, v in new_meta.items() if k not in ("files", "converted_from")} == {
        k: v for k, v in old_meta.items() if k != "files"
    }
    assert new_meta["converted_from"] == str(old.resolve())
    shard_files = {f"{SHARDS}/{name}" for name in sharded.read_index(new / SHARDS)["files"]}
    assert set(new_meta["files"]) == {
        *shard_files,
        f"{SHARDS}/shards.json",
        "data_state.json",
        "rng/rank_00000.pt",
        *TOKENIZER_FILES,
    }  # DeepSpeed's files, model.safetensors and optimizer.safetensors stay behind
    for name in ("data_state.json", "rng/rank_00000.pt", "tokenizer.json"):
        assert (new / name).read_bytes() == (old / name).read_bytes()
    assert verify_checkpoint(new).startswith(f"OK {new}: step 4")
    assert staging_left(new) == []


def test_resume_refuses_the_old_format_naming_the_command(tmp_path, tokenizer_dir):
    old, cfg, _, _ = old_checkpoint(tmp_path, tokenizer_dir)
    new = old.parent / "step_000000004.sharded"
    # The refusal comes before the engine, the world or the layout is used.
    with pytest.raises(CheckpointError) as refused:
        resume(None, cfg, None, None, old)
    assert f"{old} was written by dist-llm before sharded checkpoints" in str(refused.value)
    assert f"convert it once with `dist-llm checkpoint convert {old}`" in str(refused.value)
    assert f"then resume from the copy with checkpoint.resume={new}" in str(refused.value)
    convert(old)
    with pytest.raises(CheckpointError) as refused:
        resume(None, cfg, None, None, old)
    assert f"it was converted to {new}: resume from that with checkpoint.resume={new}" in str(refused.value)


def test_what_cannot_be_converted_is_refused_before_anything_is_written(tmp_path, tokenizer_dir, capsys):
    zero0, _, _, _ = old_checkpoint(tmp_path, tokenizer_dir, zero0=True)
    assert not (zero0 / OPTIMIZER).exists()
    assert main(["checkpoint", "convert", str(zero0)]) == 2
    err = capsys.readouterr().err
    assert f"error: {zero0} has no {OPTIMIZER}: it was saved under ZeRO-0" in err
    assert f"checkpoint.init_from={zero0}" in err
    new_format, _, _ = training_checkpoint(tmp_path / "sharded", tokenizer_dir)
    assert main(["checkpoint", "convert", str(new_format)]) == 2
    assert "is in the sharded format already" in capsys.readouterr().err
    damaged, _, _, _ = old_checkpoint(tmp_path, tokenizer_dir, seed=1)
    with open(damaged / OPTIMIZER, "r+b") as f:
        f.truncate(100)
    assert main(["checkpoint", "convert", str(damaged)]) == 2
    assert f"error: {damaged / OPTIMIZER} is truncated or changed: 100 bytes" in capsys.readouterr().err
    for path in (zero0, damaged):
        assert not (path.parent / f"{path.name}.sharded").exists() and staging_left(path) == []


def test_deepspeeds_files_are_not_needed(tmp_path, tokenizer_dir):
    old, _, _, _ = old_checkpoint(tmp_path, tokenizer_dir)
    for file in old.glob("*_states.pt"):
        file.unlink()
    assert main(["checkpoint", "convert", str(old), "--out", str(tmp_path / "elsewhere")]) == 0


def test_only_a_converted_checkpoint_is_replaced_and_only_with_overwrite(tmp_path, tokenizer_dir, capsys):
    old, _, _, _ = old_checkpoint(tmp_path, tokenizer_dir)
    saved_by_a_run, _, _ = training_checkpoint(tmp_path / "sharded", tokenizer_dir)
    before = snapshot(saved_by_a_run)
    assert main(["checkpoint", "convert", str(old), "--out", str(saved_by_a_run), "--overwrite"]) == 2
    assert f"error: {saved_by_a_run} exists and is not a converted checkpoint" in capsys.readouterr().err
    assert snapshot(saved_by_a_run) == before
    assert main(["checkpoint", "convert", str(old)]) == 0
    assert main(["checkpoint", "convert", str(old)]) == 2
    assert "already holds a converted checkpoint: pass --overwrite" in capsys.readouterr().err
    assert main(["checkpoint", "convert", str(old), "--overwrite"]) == 0


def test_a_converted_checkpoint_resumes_exactly(tmp_path, comedy_shards):
    """The whole way: a real run's checkpoint written as the old format held it, converted and
    resumed, gives the losses of the run that never stopped, bitwise (fp32, one process)."""

    def train(out, *extra):
        overrides = ("train.steps=6", "checkpoint.every=3", "logging.every=1", "logging.val_every=0")
        return torchrun(1, tiny_train_args(comedy_shards, out, *overrides, *extra))

    train(tmp_path / "reference")
    old = old_format_of(
        tmp_path / "reference" / "checkpoints" / "step_000000003", tmp_path / "old" / "step_000000003"
    )
    new = convert(old)
    proc = train(tmp_path / "resumed", f"checkpoint.resume={new}")
    assert f"resumed from {new} at step 3" in proc.stdout
    want, got = train_losses(tmp_path / "reference"), train_losses(tmp_path / "resumed")
    assert sorted(got) == [4, 5, 6] and all(got[s] == want[s] for s in got), (got, want)
