"""Damaged checkpoints are named, with the file and the fix, and `latest` passes over them to
the newest intact one; it never answers "none" while checkpoints exist."""

import json

import pytest

from dist_llm.checkpoint import META, WEIGHTS, latest, newest_intact, read_meta
from dist_llm.errors import CheckpointError

from ..eval.test_perplexity import make_checkpoint


@pytest.fixture
def three(tmp_path, tokenizer_dir):
    """A run folder with step 1, 2 and 3 and `latest` naming step 3."""
    root = tmp_path / "checkpoints"
    root.mkdir()
    steps = [make_checkpoint(root / f"step_{s:09d}", tokenizer_dir, seed=s)[0] for s in (1, 2, 3)]
    (root / "latest").write_text(steps[-1].name)
    return root, steps


def test_every_written_file_is_listed_with_its_size(three):
    _, steps = three
    files = read_meta(steps[0])["files"]
    assert files[WEIGHTS] == (steps[0] / WEIGHTS).stat().st_size
    assert "tokenizer.json" in files and META not in files


def test_garbage_metadata_is_named_and_passed_over(three):
    root, (_, two, three_) = three
    (three_ / META).write_text("{ this is not json")
    with pytest.raises(CheckpointError, match=rf"{three_ / META} is damaged \(not valid JSON"):
        read_meta(three_)
    path, skipped = newest_intact(root)
    assert path == two and len(skipped) == 1 and str(three_ / META) in skipped[0]


def test_missing_and_truncated_files_are_named(three):
    root, (one, two, three_) = three
    (three_ / WEIGHTS).unlink()
    with open(two / "tokenizer.json", "r+b") as f:
        f.truncate(100)
    path, skipped = newest_intact(root)
    assert path == one
    assert f"{three_ / WEIGHTS} is missing (listed in {META})" in skipped[0]
    assert f"{two / 'tokenizer.json'} is truncated or changed: 100 bytes" in skipped[1]


def test_all_damaged_is_an_error_not_a_fresh_start(three, tmp_path):
    root, steps = three
    for step in steps:
        (step / WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match=r"every checkpoint in .* is damaged") as error:
        latest(root)
    assert "checkpoint.resume=never" in str(error.value)
    assert latest(tmp_path / "no-run-yet") is None


def test_checkpoints_from_before_the_file_list_still_load(three):
    _, (one, *_) = three
    meta = json.loads((one / META).read_text())
    del meta["files"]
    (one / META).write_text(json.dumps(meta))
    assert read_meta(one)["step"] == 0
    (one / WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match="is missing"):
        read_meta(one)
