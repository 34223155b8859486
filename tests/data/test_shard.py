import gzip
import hashlib
import io
import json
import re
import tarfile
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from dist_llm.cli import main
from dist_llm.data.clean import clean_text
from dist_llm.data.documents import ReadOptions
from dist_llm.data.shard import ShardOptions, shard_corpus


def read_split(folder: Path, split: str) -> list[dict]:
    """Read shards with plain tarfile + numpy, independently of the loader."""
    manifest = json.loads((folder / "manifest.json").read_text())
    samples = []
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(folder / shard["name"]) as tar:
            members = {}
            for m in tar.getmembers():
                key, _, field = m.name.partition(".")
                members.setdefault(key, {})[field.removesuffix(".npy")] = np.load(
                    io.BytesIO(tar.extractfile(m).read())
                )
            samples.extend(members[k] for k in sorted(members))
    return samples


def token_stream(samples: list[dict]) -> np.ndarray:
    """Undo the packing: consecutive samples share one token."""
    if not samples:
        return np.empty(0, dtype=np.int64)
    parts = [samples[0]["input_ids"]] + [s["input_ids"][1:] for s in samples[1:]]
    return np.concatenate(parts).astype(np.int64)


def documents_of(samples: list[dict], eot: int, tokenizer) -> list[str]:
    stream = token_stream(samples)
    cuts = np.flatnonzero(stream == eot)
    docs, start = [], 0
    for cut in cuts:
        docs.append(tokenizer.decode(stream[start:cut].tolist()))
        start = cut + 1
    return docs


def test_manifest_totals_equal_an_independent_count(shards, plays, tokenizer_dir):
    manifest = json.loads((shards / "manifest.json").read_text())
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"))
    # Independent pipeline: NFC, blank-line blocks, drop empty, drop exact duplicates.
    seen, tokens, docs = set(), 0, 0
    for path in plays:
        text = unicodedata.normalize("NFC", path.read_text(encoding="utf-8")).replace("\r\n", "\n")
        for block in re.split(r"\n[ \t]*\n", text):
            if block.strip() and block not in seen:
                seen.add(block)
                tokens += len(hf.encode(block, add_special_tokens=False)) + 1
                docs += 1
    splits = manifest["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == docs
    assert splits["train"]["document_tokens"] + splits["val"]["document_tokens"] == tokens
    for split in ("train", "val"):
        info, samples = splits[split], read_split(shards, split)
        assert info["sequences"] == len(samples) == sum(s["sequences"] for s in info["shards"])
        assert info["tokens"] == len(samples) * 64
        assert info["document_tokens"] == len(samples) * 64 + 1 + info["tail_tokens_dropped"]
        for entry in info["shards"]:
            data = (shards / entry["name"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["bytes"]
    assert len(splits["train"]["shards"]) > 10
    assert manifest["cleaning"]["duplicate_documents_dropped"] > 0  # stage directions repeat
    for source, path in zip(manifest["sources"], plays, strict=True):
        assert source["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert source["bytes"] == path.stat().st_size


def test_split_is_by_document_and_loses_nothing(shards, tokenizer_dir):
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"))
    manifest = json.loads((shards / "manifest.json").read_text())
    eot = manifest["tokenizer"]["eot_id"]
    train = documents_of(read_split(shards, "train"), eot, hf)
    val = documents_of(read_split(shards, "val"), eot, hf)
    assert len(train) == manifest["splits"]["train"]["documents"] - 1  # the last one is in the dropped tail
    assert len(val) == manifest["splits"]["val"]["documents"] - 1
    assert not set(train) & set(val)
    assert 0.02 < len(val) / (len(train) + len(val)) < 0.08  # --val-fraction 0.05


def test_document_boundaries_and_dtype(shards):
    manifest = json.loads((shards / "manifest.json").read_text())
    eot = manifest["tokenizer"]["eot_id"]
    samples = read_split(shards, "train")
    assert manifest["dtype"] == "uint16"
    for prev, sample in zip([None, *samples], samples, strict=False):
        ids = sample["input_ids"]
        assert ids.dtype == np.uint16 and ids.shape == (65,)
        expected = [t for t in range(1, 65) if ids[t - 1] == eot]
        if prev is None or prev["input_ids"][-2] == eot:
            expected = [0, *expected]
        assert sample["doc_starts"].tolist() == expected


def test_same_inputs_give_byte_identical_shards(tmp_path, comedies, tokenizer_dir):
    opts = dict(seq_len=32, val_fraction=0.1, shard_tokens=32 * 300, read=ReadOptions(doc_split="blank-line"))
    a = shard_corpus(
        [str(p) for p in comedies], tokenizer_dir, tmp_path / "a", ShardOptions(workers=1, **opts)
    )
    b = shard_corpus(
        [str(p) for p in comedies], tokenizer_dir, tmp_path / "b", ShardOptions(workers=2, **opts)
    )
    assert a == b
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir()) and len(names) > 5
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_existing_output_is_kept_unless_overwrite(tmp_path, comedies, tokenizer_dir):
    opts = ShardOptions(seq_len=32, val_fraction=0.0)
    inputs = [str(comedies[0])]
    shard_corpus(inputs, tokenizer_dir, tmp_path / "out", opts)
    before = (tmp_path / "out" / "manifest.json").read_bytes()
    with pytest.raises(Exception, match="already holds a sharded dataset"):
        shard_corpus([str(comedies[1])], tokenizer_dir, tmp_path / "out", opts)
    assert (tmp_path / "out" / "manifest.json").read_bytes() == before
    shard_corpus(
        [str(comedies[1])],
        tokenizer_dir,
        tmp_path / "out",
        ShardOptions(seq_len=32, overwrite=True, val_fraction=0.0),
    )
    assert (tmp_path / "out" / "manifest.json").read_bytes() != before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folders left behind


def test_cleaning_counts_and_pii_masking(tmp_path, tokenizer_dir):
    docs = [
        {"text": "Cafe\u0301 au lait\x07 with bell"},  # NFD accent and a control character
        {"text": "Write to jane.doe@example.org or call +1 415-555-0132 from 192.168.0.17."},
        {"text": "Genesis 1:1 and 3:16 stay; so does 2024-05-01."},
        {"text": "   "},
        {"text": "Genesis 1:1 and 3:16 stay; so does 2024-05-01."},
        {"other": "no text field"},
    ]
    src = tmp_path / "in.jsonl.gz"
    with gzip.open(src, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs)
    read = ReadOptions(on_error="skip")
    out = tmp_path / "out"
    manifest = shard_corpus(
        [str(src)], tokenizer_dir, out, ShardOptions(seq_len=8, val_fraction=0.0, mask_pii=True, read=read)
    )
    cleaning = manifest["cleaning"]
    assert cleaning["documents_nfc_changed"] == 1 and cleaning["control_chars_removed"] == 1
    assert cleaning["empty_documents_dropped"] == 1 and cleaning["duplicate_documents_dropped"] == 1
    assert cleaning["lines_missing_field"] == 1
    assert (cleaning["emails_masked"], cleaning["ips_masked"], cleaning["phones_masked"]) == (1, 1, 1)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"))
    texts = documents_of(read_split(out, "train"), manifest["tokenizer"]["eot_id"], hf)
    assert texts[0] == "Café au lait with bell"
    assert texts[1] == "Write to <EMAIL> or call <PHONE> from <IP>."


def test_pii_regexes_leave_ordinary_numbers():
    counts = Counter()
    text = "Psalm 23:1-6, year 1611, ISBN 978-0-14-143951-8 is a book; 3.14159 is pi"
    assert clean_text(text, mask_pii=True, counts=counts) == text
    assert counts["phones_masked"] == counts["ips_masked"] == 0


def test_doc_split_modes(tmp_path, tokenizer_dir):
    src = tmp_path / "a.txt"
    src.write_text("one line\nsecond line\n\nnew paragraph\n")
    for mode, expected in [("file", 1), ("line", 4), ("blank-line", 2)]:
        manifest = shard_corpus(
            [str(src)],
            tokenizer_dir,
            tmp_path / mode,
            ShardOptions(seq_len=2, val_fraction=0.0, read=ReadOptions(doc_split=mode)),
        )
        kept = manifest["splits"]["train"]["documents"]
        assert kept + manifest["cleaning"].get("empty_documents_dropped", 0) == expected


def test_fine_tuning_data_masks_prompt_tokens(tmp_path, tokenizer_dir):
    src = tmp_path / "sft.jsonl"
    pairs = [("Who wrote Hamlet?", " William Shakespeare."), ("Name a comedy.", " As You Like It.")]
    src.write_text("".join(json.dumps({"q": q, "a": a}) + "\n" for q, a in pairs))
    out = tmp_path / "sft"
    read = ReadOptions(prompt_field="q", response_field="a")
    manifest = shard_corpus(
        [str(src)], tokenizer_dir, out, ShardOptions(seq_len=8, val_fraction=0.0, read=read)
    )
    assert manifest["has_loss_mask"]
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"))
    samples = read_split(out, "train")
    stream = token_stream(samples)
    mask = np.concatenate([samples[0]["loss_mask"]] + [s["loss_mask"][1:] for s in samples[1:]])
    q0, a0 = (hf.encode(x, add_special_tokens=False) for x in pairs[0])
    assert stream[: len(q0) + len(a0) + 1].tolist() == q0 + a0 + [manifest["tokenizer"]["eot_id"]]
    assert mask[: len(q0)].tolist() == [0] * len(q0)
    assert mask[len(q0) : len(q0) + len(a0) + 1].tolist() == [1] * (len(a0) + 1)


def test_cli_shard_and_inspect(tmp_path, comedies, tokenizer_dir, capsys):
    args = [
        "data",
        "shard",
        "--input",
        str(comedies[0].parent / "*.md"),
        "--tokenizer",
        str(tokenizer_dir),
        "--seq-len",
        "128",
        "--out",
        str(tmp_path / "ds"),
        "--val-fraction",
        "0.0",
        "--shard-tokens",
        "20000",
    ]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["train"]["sequences"] > 100
    assert main(["data", "inspect", "--data", str(tmp_path / "ds"), "--verify", "--samples", "1"]) == 0
    out = capsys.readouterr().out
    assert "verified" in out and "--- sample" in out


def test_a_terminated_run_leaves_the_output_as_it_was(tmp_path, tokenizer_dir, plays):
    """SIGTERM (a scheduler's cancel, `kill`) in the middle of sharding: the stage unwinds, its
    hidden staging folder goes, an earlier output folder is untouched, exit 128 + 15."""
    import signal
    import subprocess
    import sys
    import time

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for copy in range(3):  # ~16 MB: several seconds of tokenizing, long enough to be caught at it
        for play in plays:
            (corpus / f"{copy}-{play.name}").write_text(play.read_text(encoding="utf-8"), encoding="utf-8")
    out = tmp_path / "ds"
    out.mkdir()
    (out / "manifest.json").write_text("{}")  # an earlier output (the foreign-folder check is --overwrite's)
    proc = subprocess.Popen(
        [sys.executable, "-m", "dist_llm", "data", "shard", "--input", str(corpus / "*.md"),
         "--tokenizer", str(tokenizer_dir), "--seq-len", "64", "--out", str(out), "--workers", "1",
         "--overwrite"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".ds.staging-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be stopped"
    time.sleep(0.5)  # inside the tokenizing loop
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert stderr.strip().splitlines()[-1].startswith("stopped: SIGTERM")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "ds"]  # no staging folder left
    assert [p.name for p in out.iterdir()] == ["manifest.json"]
    assert (out / "manifest.json").read_text() == "{}"
