import itertools
import json
from collections import Counter

import numpy as np
import pytest
import torch

from dist_llm.data.documents import ReadOptions
from dist_llm.data.manifest import DataError, open_split
from dist_llm.data.shard import ShardOptions, shard_corpus
from dist_llm.data.stream import IGNORE_INDEX, TokenLoader, eval_batches

from .test_shard import read_split


def _small(tmp_path_factory, play, tokenizer_dir):
    out = tmp_path_factory.mktemp("small") / "ds"
    opts = ShardOptions(
        seq_len=16, val_fraction=0.0, shard_tokens=16 * 250, read=ReadOptions(doc_split="blank-line")
    )
    shard_corpus([str(play)], tokenizer_dir, out, opts)
    return out


@pytest.fixture(scope="module")
def small(tmp_path_factory, comedies, tokenizer_dir):
    """A few thousand short sequences in ~10 shards: epochs end within a test."""
    return _small(tmp_path_factory, comedies[0], tokenizer_dir)


@pytest.fixture(scope="module")
def other(tmp_path_factory, comedies, tokenizer_dir):
    return _small(tmp_path_factory, comedies[1], tokenizer_dir)


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


def same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_batches_hold_the_shard_samples(shards):
    spec = open_split(str(shards))
    reference = read_split(shards, "train")  # independent tarfile reader, samples in shard order
    offsets = np.cumsum([0] + [s.sequences for s in spec.shards])
    loader = TokenLoader([(spec, 1.0)], batch_size=8, seed=3)
    for batch in take(loader, 5):
        assert batch["input_ids"].shape == batch["labels"].shape == (8, 64)
        assert batch["input_ids"].dtype == torch.int64
        for row, (source, epoch, shard, index) in enumerate(batch["sample_ids"].tolist()):
            assert (source, epoch) == (0, 0)
            ids = reference[offsets[shard] + index]["input_ids"].astype(np.int64)
            assert batch["input_ids"][row].tolist() == ids[:-1].tolist()
            assert batch["labels"][row].tolist() == ids[1:].tolist()
            starts = reference[offsets[shard] + index]["doc_starts"]
            expected = [int(np.sum((starts > 0) & (starts <= t))) for t in range(64)]
            assert batch["document_ids"][row].tolist() == expected


def test_evaluation_batches_carry_the_same_document_ids(small):
    """eval_batches (validation, `dist-llm eval`) mark documents as training batches do, so a
    document-masked model is scored the way it was trained."""
    spec = open_split(str(small))
    reference = read_split(small, "train")
    (batch,) = eval_batches(spec, batch_size=64, max_batches=1)
    for row in range(64):
        starts = reference[row]["doc_starts"]
        expected = [int(np.sum((starts > 0) & (starts <= t))) for t in range(16)]
        assert batch["document_ids"][row].tolist() == expected
    assert batch["document_ids"].max() > 0  # short documents: some rows hold several


def epoch0_ids(spec, dp_size, num_workers, batch_size):
    """Every (shard, index) that ranks x workers yield in epoch 0."""
    seen = Counter()
    for rank in range(dp_size):
        loader = TokenLoader(
            [(spec, 1.0)],
            batch_size=batch_size,
            seed=11,
            dp_rank=rank,
            dp_size=dp_size,
            num_workers=num_workers,
        )
        done_streak = 0
        for batch in loader:
            ids = batch["sample_ids"]
            seen.update((s, i) for _, e, s, i in ids.tolist() if e == 0)
            # A reader's positions only grow: once a whole batch is past epoch 0, so is that reader.
            done_streak = done_streak + 1 if bool((ids[:, 1] > 0).all()) else 0
            if done_streak >= max(1, num_workers):
                break
    return seen


def test_exactly_once_per_epoch_over_2_ranks_x_2_workers(shards):
    spec = open_split(str(shards))
    seen = epoch0_ids(spec, dp_size=2, num_workers=2, batch_size=32)
    assert len(seen) == spec.sequences and set(seen.values()) == {1}
    every = {(s, i) for s, shard in enumerate(spec.shards) for i in range(shard.sequences)}
    assert set(seen) == every


def test_order_depends_on_seed_and_epoch(small):
    spec = open_split(str(small))
    n = spec.sequences
    a = torch.cat([b["sample_ids"] for b in take(TokenLoader([(spec, 1.0)], batch_size=n // 4, seed=1), 8)])
    b = torch.cat([b["sample_ids"] for b in take(TokenLoader([(spec, 1.0)], batch_size=n // 4, seed=2), 8)])
    epoch0 = a[a[:, 1] == 0][:, 2:]
    epoch1 = a[a[:, 1] == 1][:, 2:]
    assert len(epoch0) == n and len(torch.unique(epoch0, dim=0)) == n
    assert not torch.equal(epoch0[:100], epoch1[:100])
    assert not torch.equal(a[:100], b[:100])
    # Consecutive positions come from different places: a shuffle within and across shards.
    assert len(set(epoch0[:64, 0].tolist())) > 1


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("rank", [0, 1])
def test_exact_resume_at_several_cut_points(small, num_workers, rank):
    spec = open_split(str(small))

    def make():
        return TokenLoader(
            [(spec, 1.0)],
            batch_size=24,
            seed=5,
            dp_rank=rank,
            dp_size=2,
            num_workers=num_workers,
        )

    total = spec.sequences // 24 + 20  # runs past the end of an epoch
    reference = take(make(), total)
    assert reference[-1]["sample_ids"][:, 1].max() >= 1
    for cut in (1, 3, total // 2, total - 5):
        first = make()
        head = take(first, cut)
        state = json.loads(json.dumps(first.state_dict()))  # states are plain JSON
        resumed = make()
        resumed.load_state_dict(state)
        same(head + take(resumed, total - cut), reference)


def test_state_after_partial_iteration_and_reiteration(small):
    spec = open_split(str(small))
    loader = TokenLoader([(spec, 1.0)], batch_size=8, seed=5, num_workers=2)
    reference = take(TokenLoader([(spec, 1.0)], batch_size=8, seed=5, num_workers=2), 12)
    # Breaking out of a loop and iterating again continues where the consumer stopped,
    # whatever the workers had prefetched.
    same(take(loader, 5) + take(loader, 7), reference)


def test_resume_with_another_layout_is_refused(small):
    spec = open_split(str(small))
    loader = TokenLoader([(spec, 1.0)], batch_size=8, seed=5, dp_size=2, num_workers=2)
    take(loader, 3)
    state = loader.state_dict()
    changes = {
        "dp_size": dict(dp_size=4, num_workers=2, batch_size=8, seed=5),
        "readers_per_rank": dict(dp_size=2, num_workers=4, batch_size=8, seed=5),
        "batch_size": dict(dp_size=2, num_workers=2, batch_size=16, seed=5),
        "seed": dict(dp_size=2, num_workers=2, batch_size=8, seed=6),
    }
    for field, kwargs in changes.items():
        other = TokenLoader([(spec, 1.0)], **kwargs)
        with pytest.raises(DataError, match=f"cannot resume the data stream exactly: {field} was"):
            other.load_state_dict(state)
    other = TokenLoader([(spec, 1.0)], batch_size=8, seed=5, dp_size=2, dp_rank=1, num_workers=2)
    with pytest.raises(DataError, match="state of rank 0 given to rank 1"):
        other.load_state_dict(state)


def test_mixing_follows_the_weights_exactly(other, small):
    a, b = open_split(str(other)), open_split(str(small))
    loader = TokenLoader([(a, 3.0), (b, 1.0)], batch_size=64, seed=9)
    ids = torch.cat([x["sample_ids"] for x in take(loader, 128)])  # 8192 samples = 2 blocks of 4096
    counts = Counter(ids[:, 0].tolist())
    assert counts == {0: 6144, 1: 2048}
    # Each source stream is still a clean epoch order: no repeats within an epoch.
    small_ids = ids[ids[:, 0] == 1][:, 1:]
    assert len(torch.unique(small_ids, dim=0)) == len(small_ids)
    # An uneven weight is rounded to 1/4096 per block, never drifting.
    odd = TokenLoader([(a, 0.7), (b, 0.3)], batch_size=64, seed=9)
    ids = torch.cat([x["sample_ids"] for x in take(odd, 64)])
    assert Counter(ids[:, 0].tolist()) == {0: 2867, 1: 1229}


def test_mixing_refuses_incompatible_sources(shards, small, tmp_path, plays):
    with pytest.raises(DataError, match="seq_len"):
        TokenLoader([(open_split(str(shards)), 1.0), (open_split(str(small)), 1.0)], batch_size=4)
    with pytest.raises(DataError, match="no data source"):
        TokenLoader([], batch_size=4)


def test_pipe_urls_read_the_same_data(small):
    local = open_split(str(small))
    piped = open_split(f"pipe:cat {small}/{{shard}}")
    assert piped.shards[0].url == f"pipe:cat {small}/train-000000.tar"
    same(
        take(TokenLoader([(piped, 1.0)], batch_size=16, seed=1), 6),
        take(TokenLoader([(local, 1.0)], batch_size=16, seed=1), 6),
    )


def test_loss_mask_becomes_ignored_labels(tmp_path, tokenizer_dir):
    src = tmp_path / "sft.jsonl"
    rows = [
        {"q": f"Question {i}: who speaks first in act {i}?", "a": f" The answer is number {i}."}
        for i in range(40)
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    read = ReadOptions(prompt_field="q", response_field="a")
    shard_corpus(
        [str(src)], tokenizer_dir, tmp_path / "sft", ShardOptions(seq_len=16, val_fraction=0.0, read=read)
    )
    batch = take(TokenLoader([(open_split(str(tmp_path / "sft")), 1.0)], batch_size=8), 1)[0]
    mask = batch["loss_mask"]
    assert mask.dtype == torch.bool and 0 < mask.float().mean() < 1
    assert torch.equal(batch["labels"] == IGNORE_INDEX, ~mask)


def test_loader_from_config(small):
    from dist_llm.config import load_config
    from dist_llm.data.stream import loader_from_config

    config = load_config(
        None, [f"data.sources=[{{path: '{small}'}}]", "data.seq_len=16", "data.num_workers=0"]
    )
    batch = take(loader_from_config(config.data, batch_size=4), 1)[0]
    assert batch["input_ids"].shape == (4, 16)
    config = load_config(None, [f"data.sources=[{{path: '{small}'}}]", "data.seq_len=32"])
    with pytest.raises(DataError, match=r"sharded with --seq-len 16 but data\.seq_len is 32"):
        loader_from_config(config.data, batch_size=4)


def test_one_epoch_of_steps_covers_the_epoch(shards):
    """Readers split each epoch into near-equal ranges: after one epoch's worth of batches on
    every rank, every sequence has been seen and at most one batch per reader ran ahead."""
    spec = open_split(str(shards))
    dp, workers, batch = 2, 2, 16
    readers = dp * workers
    rounds = -(-spec.sequences // (readers * batch))  # batches per reader to cover its range
    epoch0, ahead = Counter(), 0
    for rank in range(dp):
        loader = TokenLoader(
            [(spec, 1.0)], batch_size=batch, seed=4, dp_rank=rank, dp_size=dp, num_workers=workers
        )
        for b in take(loader, rounds * workers):
            ids = b["sample_ids"].tolist()
            epoch0.update((s, i) for _, e, s, i in ids if e == 0)
            ahead += sum(1 for _, e, _, _ in ids if e == 1)
    assert len(epoch0) == spec.sequences and set(epoch0.values()) == {1}
    assert ahead < readers * batch


def test_too_few_sequences_for_the_readers_is_refused(small):
    spec = open_split(str(small))
    with pytest.raises(DataError, match=r"fewer than the \d+ readers"):
        TokenLoader([(spec, 1.0)], batch_size=4, dp_size=spec.sequences, dp_rank=0, num_workers=2)


def test_tiny_or_invalid_weights_are_refused(small, other):
    a, b = open_split(str(small)), open_split(str(other))
    with pytest.raises(DataError, match=r"weight 0\.0001 rounds to no sample in 4096"):
        TokenLoader([(a, 1.0), (b, 1e-4)], batch_size=4)
    with pytest.raises(DataError, match="must be a positive number"):
        TokenLoader([(a, 1.0), (b, float("inf"))], batch_size=4)
