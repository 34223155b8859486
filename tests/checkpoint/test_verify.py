"""`dist-llm checkpoint verify`: one OK line with the counts for an intact checkpoint; for a
damaged one every problem in one pass, each naming its file once, and exit 2."""

import json

from dist_llm.checkpoint import META, WEIGHTS, save_weights_only
from dist_llm.cli import main

from .builders import tiny_config
from .test_consolidate import training_checkpoint


def verify(path, capsys) -> tuple[int, str, str]:
    code = main(["checkpoint", "verify", str(path)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_an_intact_checkpoint_is_ok_with_its_counts(tmp_path, tokenizer_dir, capsys):
    ckpt, cfg, weights = training_checkpoint(tmp_path, tokenizer_dir)
    files = json.loads((ckpt / META).read_text())["files"]
    code, out, _ = verify(ckpt, capsys)
    assert code == 0 and out.count("\n") == 1
    assert out.startswith(f"OK {ckpt}: step 4, {len(files)} files (")
    assert out.endswith("at their sizes; sha256 of 1 shard file as recorded, 60 tensors whole\n")
    only = save_weights_only(tmp_path / "weights-only", weights, cfg, tokenizer_dir)
    code, out, _ = verify(only, capsys)
    assert code == 0 and out.startswith(f"OK {only}: step 0, 4 files (")
    assert out.endswith("; weights-only, no shards to hash\n")


def test_every_problem_is_named_once(tmp_path, tokenizer_dir, capsys):
    ckpt, _, _ = training_checkpoint(tmp_path, tokenizer_dir)
    shard = next((ckpt / "shards").glob("*.distcp"))
    with open(shard, "r+b") as f:  # one byte flipped: the size is right, the sha256 is not
        f.seek(shard.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    (ckpt / "rng" / "rank_00000.pt").unlink()
    size = json.loads((ckpt / META).read_text())["files"]["tokenizer.json"]
    with open(ckpt / "tokenizer.json", "r+b") as f:
        f.truncate(10)
    code, out, err = verify(ckpt, capsys)
    assert code == 2 and out == ""
    assert err.splitlines() == [
        f"error: 3 problems in {ckpt}:",
        f"  {ckpt / 'rng' / 'rank_00000.pt'}: missing (listed in {META})",
        f"  {ckpt / 'tokenizer.json'}: 10 bytes, {META} says {size} (truncated or changed)",
        f"  {shard}: sha256 differs from shards.json (the file is damaged)",
    ]


def test_a_truncated_shard_is_named_once(tmp_path, tokenizer_dir, capsys):
    ckpt, _, _ = training_checkpoint(tmp_path, tokenizer_dir)
    shard = next((ckpt / "shards").glob("*.distcp"))
    with open(shard, "r+b") as f:
        f.truncate(1000)
    code, _, err = verify(ckpt, capsys)
    assert code == 2 and err.count(str(shard)) == 1
    assert f"error: 1 problem in {ckpt}:\n  {shard}: 1000 bytes, {META} says" in err


def test_shards_that_do_not_cover_a_tensor_are_named(tmp_path, tokenizer_dir, capsys):
    ckpt, _, _ = training_checkpoint(tmp_path, tokenizer_dir)
    index_file = ckpt / "shards" / "shards.json"
    index = json.loads(index_file.read_text())
    pieces = index["tensors"]["model/norm.weight"]["pieces"]
    del pieces[1]  # as if one rank's piece had not been recorded
    index_file.write_text(json.dumps(index))
    meta = json.loads((ckpt / META).read_text())
    meta["files"]["shards/shards.json"] = index_file.stat().st_size  # consistent sizes
    (ckpt / META).write_text(json.dumps(meta))
    code, _, err = verify(ckpt, capsys)
    assert code == 2
    held = sum(p[1][0] for p in pieces)
    assert f"{index_file}: its pieces of 'model/norm.weight' hold {held} of its 64 elements" in err


def test_weights_only_and_unreadable_checkpoints(tmp_path, tokenizer_dir, capsys):
    from .builders import model_state

    cfg = tiny_config(True)
    only = save_weights_only(tmp_path / "weights-only", model_state(cfg), cfg)
    with open(only / WEIGHTS, "r+b") as f:
        f.truncate(100)
    code, _, err = verify(only, capsys)
    assert code == 2 and f"  {only / WEIGHTS}: 100 bytes, {META} says" in err
    (only / META).write_text("{ not json")
    code, _, err = verify(only, capsys)
    assert code == 2 and err.startswith(f"error: {only / META} is damaged (not valid JSON")
    code, _, err = verify(tmp_path / "nothing", capsys)
    assert code == 2 and err == f"error: checkpoint {tmp_path / 'nothing'} does not exist\n"
