"""Every kind of bad input gets an error naming the file and what to do, or is skipped and counted."""

import io
import json
import logging
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from dist_llm.cli import main
from dist_llm.data.documents import InputError, ReadOptions
from dist_llm.data.manifest import DataError, open_split
from dist_llm.data.shard import ShardOptions, shard_corpus
from dist_llm.data.stream import TokenLoader
from dist_llm.files import sha256_file


@pytest.fixture
def dataset(tmp_path, comedies, tokenizer_dir) -> Path:
    out = tmp_path / "ds"
    opts = ShardOptions(
        seq_len=16, val_fraction=0.0, shard_tokens=16 * 100, read=ReadOptions(doc_split="blank-line")
    )
    shard_corpus([str(comedies[0])], tokenizer_dir, out, opts)
    return out


def first_batches(location, n=10**6, **kw):
    loader = TokenLoader([(open_split(str(location)), 1.0)], batch_size=64, seed=0, shuffle_shards=1, **kw)
    spec = loader.plan.sources[0]
    out, it = [], iter(loader)
    while sum(len(b["input_ids"]) for b in out) < min(n, spec.sequences):
        out.append(next(it))
    return loader, out


def rewrite_sample(folder: Path, shard: str, key_index: int, name: str, array: np.ndarray) -> str:
    """Replace one member of one sample and fix the manifest's hash, as a buggy writer would."""
    path = folder / shard
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    keys = sorted({m.name.split(".")[0] for m, _ in members})
    target = f"{keys[key_index]}.{name}"
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    with tarfile.open(path, "w") as tar:
        for member, data in members:
            data = buf.getvalue() if member.name == target else data
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in manifest["splits"]["train"]["shards"]:
        if entry["name"] == shard:
            entry["sha256"] = sha256_file(path)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return keys[key_index]


# ---------------------------------------------------------------- sharding inputs


def test_no_input_and_glob_matching_nothing(tmp_path, tokenizer_dir):
    opts = ShardOptions(seq_len=8)
    with pytest.raises(InputError, match="no input given"):
        shard_corpus([], tokenizer_dir, tmp_path / "o", opts)
    with pytest.raises(InputError, match=r"input '.*nothing-\*\.txt' matches no file"):
        shard_corpus([str(tmp_path / "nothing-*.txt")], tokenizer_dir, tmp_path / "o", opts)
    bad = tmp_path / "data.csv"
    bad.write_text("a,b")
    with pytest.raises(InputError, match=r"data\.csv: unsupported input type"):
        shard_corpus([str(bad)], tokenizer_dir, tmp_path / "o", opts)


def test_empty_input(tmp_path, tokenizer_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n \t\n")
    with pytest.raises(InputError, match="no training sequence could be packed from 1 file"):
        shard_corpus([str(empty)], tokenizer_dir, tmp_path / "o", ShardOptions(seq_len=8, val_fraction=0.0))
    assert not (tmp_path / "o").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["empty.txt"]  # no staging folder left


def test_non_utf8_is_named_or_skipped_and_counted(tmp_path, tokenizer_dir, comedies):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Fran\u00e7ais na\u00efve caf\u00e9".encode("latin-1"))
    inputs = [str(latin1), str(comedies[0])]
    with pytest.raises(InputError, match=r"latin1\.txt \(byte 4\): not valid UTF-8.*iconv.*--on-error skip"):
        shard_corpus(inputs, tokenizer_dir, tmp_path / "o", ShardOptions(seq_len=8, val_fraction=0.0))
    skip = ShardOptions(seq_len=8, val_fraction=0.0, read=ReadOptions(on_error="skip"))
    manifest = shard_corpus(inputs, tokenizer_dir, tmp_path / "o", skip)
    assert manifest["cleaning"]["files_not_utf8"] == 1
    documents = {s["path"]: s["documents"] for s in manifest["sources"]}
    assert documents == {str(latin1): 0, str(comedies[0]): 1}


def test_bad_jsonl_lines_are_named(tmp_path, tokenizer_dir):
    src = tmp_path / "d.jsonl"
    src.write_bytes(b'{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(InputError, match=r"d\.jsonl:2: not valid JSON"):
        shard_corpus([str(src)], tokenizer_dir, tmp_path / "o", ShardOptions(seq_len=2, val_fraction=0.0))
    src.write_bytes(b'{"text": "fine"}\n{"body": "x"}\n')
    with pytest.raises(InputError, match=r"d\.jsonl:2: record has no string field text; set --text-field"):
        shard_corpus([str(src)], tokenizer_dir, tmp_path / "o", ShardOptions(seq_len=2, val_fraction=0.0))


def test_truncated_gzip_input(tmp_path, tokenizer_dir, comedies):
    import gzip

    src = tmp_path / "play.txt.gz"
    src.write_bytes(gzip.compress(comedies[0].read_bytes())[:5000])
    with pytest.raises(InputError, match=r"play\.txt\.gz: cannot read .*check that the file is complete"):
        shard_corpus([str(src)], tokenizer_dir, tmp_path / "o", ShardOptions(seq_len=8))


# ---------------------------------------------------------------- loading shards


def test_shard_whose_sha256_disagrees(dataset):
    path = dataset / "train-000002.tar"
    data = bytearray(path.read_bytes())
    data[3000] ^= 0xFF  # flip bits inside a token array
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"train-000002\.tar: sha256 .* disagrees with the manifest"):
        first_batches(dataset)


def test_truncated_tar(dataset):
    path = dataset / "train-000001.tar"
    path.write_bytes(path.read_bytes()[:10_000])
    with pytest.raises(DataError, match=r"train-000001\.tar: sha256"):
        first_batches(dataset)
    with pytest.raises(DataError, match=r"train-000001\.tar: truncated tar \(ends inside a member"):
        first_batches(dataset, verify=False)


def test_token_outside_vocabulary(dataset, caplog):
    ids = np.full(17, 5000, dtype=np.uint16)  # the tokenizer has 2048 ids
    key = rewrite_sample(dataset, "train-000000.tar", 3, "input_ids.npy", ids)
    with pytest.raises(
        DataError, match=rf"train-000000\.tar: sample {key}: token id 5000 outside the vocabulary"
    ):
        first_batches(dataset)
    with caplog.at_level(logging.WARNING):
        loader, batches = first_batches(dataset, on_error="skip")
    assert loader.skipped == 1
    assert "skipped 1 bad samples of" in caplog.text
    assert all(int(b["input_ids"].max()) < 2048 for b in batches)


def test_sequence_of_wrong_length(dataset):
    key = rewrite_sample(dataset, "train-000001.tar", 0, "input_ids.npy", np.ones(12, dtype=np.uint16))
    with pytest.raises(DataError, match=rf"sample {key}: sequence of shape \(12,\), expected \(17,\)"):
        first_batches(dataset)


def test_pickled_arrays_are_never_loaded(dataset):
    payload = np.array([{"evil": "object"}], dtype=object)  # .npy of an object array holds a pickle
    key = rewrite_sample(dataset, "train-000000.tar", 0, "input_ids.npy", payload)
    with pytest.raises(DataError, match=rf"sample {key}: input_ids\.npy is not a plain \.npy array"):
        first_batches(dataset)


def test_whole_bad_shard_is_skipped_and_counted(dataset, caplog):
    spec = open_split(str(dataset))
    (dataset / "train-000001.tar").write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING):
        loader, batches = first_batches(dataset, on_error="skip")
    assert loader.skipped == spec.shards[1].sequences
    assert "skipping all" in caplog.text and "train-000001.tar" in caplog.text
    seen = {tuple(x) for b in batches for x in b["sample_ids"][:, 2:].tolist()}
    assert not any(shard == 1 for shard, _ in seen)


def test_missing_or_foreign_manifest(tmp_path, dataset):
    with pytest.raises(
        DataError, match=r"manifest\.json: cannot read .*folder written by `dist-llm data shard`"
    ):
        open_split(str(tmp_path / "nowhere"))
    shutil.copytree(dataset, tmp_path / "copy")
    (tmp_path / "copy" / "manifest.json").write_text('{"format": "something-else"}')
    with pytest.raises(DataError, match="not a dist-llm manifest"):
        open_split(str(tmp_path / "copy"))
    with pytest.raises(DataError, match="split 'val' has no shards"):
        open_split(str(dataset), "val")  # sharded with --val-fraction 0
    with pytest.raises(DataError, match=r"no split 'test' \(has \['train', 'val'\]\)"):
        open_split(str(dataset), "test")


def test_cli_reports_errors_without_a_traceback(tmp_path, capsys):
    assert main(["data", "inspect", "--data", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "manifest.json" in err and "Traceback" not in err


def test_out_folder_that_is_not_a_dataset_is_never_replaced(tmp_path, tokenizer_dir, comedies):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "notes.bin").write_bytes(b"x")
    for overwrite in (False, True):
        with pytest.raises(InputError, match="is not a sharded dataset; it is never replaced"):
            shard_corpus(
                [str(comedies[0])], tokenizer_dir, victim, ShardOptions(seq_len=8, overwrite=overwrite)
            )
    assert (victim / "notes.bin").read_bytes() == b"x"


def test_line_endings_and_byte_order_marks(tmp_path, tokenizer_dir):
    text = "first paragraph\nstill first\n\nsecond\n\n  \nthird\n"
    lf, crlf, bom = tmp_path / "lf.txt", tmp_path / "crlf.txt", tmp_path / "bom.jsonl"
    lf.write_bytes(text.encode())
    crlf.write_bytes(text.replace("\n", "\r\n").encode())
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "with a byte-order mark"}).encode() + b"\n")
    counts = []
    for src in (lf, crlf):
        manifest = shard_corpus(
            [str(src)],
            tokenizer_dir,
            tmp_path / src.stem,
            ShardOptions(seq_len=2, val_fraction=0.0, read=ReadOptions(doc_split="blank-line")),
        )
        counts.append(manifest["splits"]["train"]["documents"])
    assert counts == [3, 3]
    manifest = shard_corpus(
        [str(bom)], tokenizer_dir, tmp_path / "bom", ShardOptions(seq_len=2, val_fraction=0.0)
    )
    assert manifest["splits"]["train"]["documents"] == 1


def test_member_shorter_than_its_header_says(dataset):
    path = dataset / "train-000000.tar"
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for i, (member, data) in enumerate(members):
            data = data[:-2] if i == 0 else data  # first input_ids/doc_starts member loses 2 bytes
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    manifest = json.loads((dataset / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["sha256"] = sha256_file(path)
    (dataset / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"train-000000\.tar: sample \d+: .*(data bytes|not a plain \.npy)"):
        first_batches(dataset)
    loader, _ = first_batches(dataset, on_error="skip")
    assert loader.skipped == 1


def test_skip_mode_stops_when_nothing_is_readable(dataset):
    for shard in dataset.glob("train-*.tar"):
        shard.unlink()
    with pytest.raises(DataError, match="no readable sample in"):
        first_batches(dataset, on_error="skip")


def test_inspect_verify_reports_every_bad_shard_in_one_pass(dataset, capsys):
    for name in ("train-000001.tar", "train-000002.tar"):
        path = dataset / name
        data = bytearray(path.read_bytes())
        data[3000] ^= 0xFF
        path.write_bytes(bytes(data))
    assert main(["data", "inspect", "--data", str(dataset), "--verify", "--samples", "0"]) == 2
    err = capsys.readouterr().err
    assert "error: 2 of " in err and " shards failed verification" in err
    assert "train-000001.tar: sha256" in err and "train-000002.tar: sha256" in err
