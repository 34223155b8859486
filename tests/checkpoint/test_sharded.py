"""Sharded tensors on disk (checkpoint/sharded.py): pieces written as they are, any rectangle
read back from whatever pieces overlap it, metadata in JSON (nothing unpickled), and every
damaged file named."""

import json

import pytest
import torch

from dist_llm.checkpoint import sharded
from dist_llm.checkpoint.sharded import INDEX, Piece, Sharded
from dist_llm.errors import CheckpointError

FULL = torch.arange(6 * 10, dtype=torch.float32).reshape(6, 10)


def pieces_of(full, cuts):
    return [Piece((r, c), full[r : r + h, c : c + w].clone()) for r, c, h, w in cuts]


@pytest.fixture
def saved(tmp_path):
    # Uneven rectangles, several per tensor, as a ZeRO partition of a TP slice makes them.
    shards = {
        "model/w": Sharded(
            FULL.shape, pieces_of(FULL, [(0, 0, 1, 4), (0, 4, 1, 6), (1, 0, 4, 10), (5, 0, 1, 10)])
        ),
        "model/norm": Sharded((10,), [Piece((0,), torch.linspace(0, 1, 10))]),
    }
    folder = tmp_path / "shards"
    sharded.save(folder, shards)
    return folder


def test_any_rectangle_reads_back_from_the_pieces_that_overlap_it(saved):
    assert torch.equal(sharded.read_full(saved, ["model/w"])["model/w"], FULL)
    wanted = {
        "model/w": Sharded(FULL.shape, [Piece((0, 3), torch.zeros(3, 5)), Piece((4, 1), torch.zeros(2, 2))])
    }
    sharded.load(saved, wanted)
    got = wanted["model/w"].pieces
    assert torch.equal(got[0].tensor, FULL[0:3, 3:8]) and torch.equal(got[1].tensor, FULL[4:6, 1:3])
    assert sharded.specs(saved) == {"model/w": ((6, 10), torch.float32), "model/norm": ((10,), torch.float32)}


def test_metadata_is_json_with_every_file_hashed_and_nothing_pickled(saved):
    assert sorted(p.name for p in saved.iterdir()) == ["__0_0.distcp", INDEX]  # no DCP .metadata pickle
    index = json.loads((saved / INDEX).read_text())
    assert len(index["tensors"]["model/w"]["pieces"]) == 4
    assert set(index["files"]["__0_0.distcp"]) == {"size", "sha256"}
    assert sharded.verify(saved) == []


def test_overlapping_pieces_are_refused_at_save(tmp_path):
    overlapping = {"model/w": Sharded(FULL.shape, pieces_of(FULL, [(0, 0, 4, 10), (3, 0, 3, 10)]))}
    with pytest.raises(
        CheckpointError, match=r"writing the shards in .* failed on rank 0: ValueError: .*overlapping"
    ):
        sharded.save(tmp_path / "shards", overlapping)


def test_missing_truncated_and_corrupted_files_are_named(saved):
    shard = saved / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes: only the sha256 can tell
    shard.write_bytes(bytes(data))
    assert sharded.verify(saved) == [f"{shard}: sha256 differs from {INDEX} (the file is damaged)"]
    shard.write_bytes(bytes(data[:100]))
    with pytest.raises(CheckpointError, match=f"{shard} is truncated or changed: 100 bytes"):
        sharded.read_full(saved, ["model/w"])
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard} is missing"):
        sharded.read_full(saved, ["model/norm"])
    (saved / INDEX).write_text("{")
    with pytest.raises(CheckpointError, match=f"{saved / INDEX} is damaged"):
        sharded.specs(saved)


def test_a_tensor_of_another_shape_is_named(saved):
    with pytest.raises(CheckpointError, match=r"'model/w' has shape \(6, 10\), this model's \(6, 11\)"):
        sharded.load(saved, {"model/w": Sharded((6, 11), [Piece((0, 0), torch.zeros(6, 11))])})
