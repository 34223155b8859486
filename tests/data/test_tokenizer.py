import pytest
from transformers import PreTrainedTokenizerFast

from dist_llm.cli import main
from dist_llm.data.documents import InputError
from dist_llm.data.tokenizer import EOT, PAD, load_tokenizer, load_tokenizer_info, train_tokenizer

from ..output_util import snapshot, staging_left, unrelated_folder

SAMPLES = [
    "人工智能是计算机科学的一个分支。机器学习、深度学习！",  # Chinese, full-width punctuation
    "Ünïcödé: e\u0301 (decomposed) vs é; emoji 🧪🚀; Greek αβγ; Arabic مرحبا",
    "tabs\tand  double  spaces\n\n\nnewlines\r\nCRLF   trailing   ",
    "code: def f(x):\n    return x ** 2  # comment",
    "",
    " leading space and literal <|endoftext|> in the text",
]


def test_round_trip_on_real_and_foreign_text(tokenizer_dir, plays):
    tokenizer = load_tokenizer(tokenizer_dir)
    texts = SAMPLES + [p.read_text(encoding="utf-8")[:20_000] for p in plays[:5]]
    for text in texts:
        ids = tokenizer.encode(text).ids
        assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_special_tokens_and_vocab(tokenizer_dir):
    info = load_tokenizer_info(tokenizer_dir)
    assert info.vocab_size == 2048 and (info.eot_id, info.pad_id) == (0, 1)
    # Data encoding never turns a literal "<|endoftext|>" into the document separator.
    assert info.eot_id not in load_tokenizer(tokenizer_dir).encode("a <|endoftext|> b").ids


def test_transformers_loads_it_and_agrees(tokenizer_dir, plays):
    ours = load_tokenizer(tokenizer_dir)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"))
    from_dir = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
    assert from_dir.eos_token == EOT and from_dir.pad_token == PAD
    text = plays[0].read_text(encoding="utf-8")[:5000] + SAMPLES[0]
    assert hf.encode(text, add_special_tokens=False) == ours.encode(text).ids
    assert from_dir.encode(text, add_special_tokens=False) == ours.encode(text).ids
    assert hf.decode(ours.encode(text).ids) == text


def test_bpe_learned_real_merges(tokenizer_dir, plays):
    text = plays[1].read_text(encoding="utf-8")[:50_000]
    ids = load_tokenizer(tokenizer_dir).encode(text).ids
    assert len(text.encode()) / len(ids) > 2.5  # bytes per token (measured 2.8 at vocab 2048)


def test_bad_arguments(tmp_path, plays):
    with pytest.raises(InputError, match="below the 256 byte symbols"):
        train_tokenizer([str(plays[0])], vocab_size=100, out_dir=tmp_path)
    with pytest.raises(InputError, match="matches no file"):
        train_tokenizer([str(tmp_path / "*.txt")], vocab_size=1000, out_dir=tmp_path)
    with pytest.raises(InputError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "missing")


def test_out_folder_is_replaced_only_when_it_holds_a_tokenizer_and_with_overwrite(tmp_path, plays, capsys):
    def train(out, vocab, *extra):
        return main(
            [
                "tokenizer",
                "train",
                "--input",
                str(plays[0]),
                "--vocab-size",
                str(vocab),
                "--out",
                str(out),
                *extra,
            ]
        )

    victim = unrelated_folder(tmp_path / "victim")
    before = snapshot(victim)
    for extra in ([], ["--overwrite"]):
        assert train(victim, 300, *extra) == 2
        assert capsys.readouterr().err.startswith(f"error: {victim} exists and is not a tokenizer folder")
    assert snapshot(victim) == before
    out = tmp_path / "tok"
    assert train(out, 300) == 0
    first = snapshot(out)
    assert train(out, 400) == 2
    assert f"{out} already holds a tokenizer folder: pass --overwrite" in capsys.readouterr().err
    assert snapshot(out) == first
    assert train(out, 400, "--overwrite") == 0
    assert load_tokenizer_info(out).vocab_size == 400 and staging_left(out) == []


def test_a_corpus_too_small_for_the_vocabulary_is_a_warning_with_counts(tmp_path, caplog):
    src = tmp_path / "tiny.txt"
    src.write_text("to be or not to be, that is the question\n")
    with caplog.at_level("WARNING"):
        info = train_tokenizer([str(src)], vocab_size=512, out_dir=tmp_path / "tok")
    assert info.vocab_size < 512
    assert f"the corpus gave only {info.vocab_size} of the 512 tokens asked for" in caplog.text
    assert "in 1 input files" in caplog.text


def test_unsupported_files_in_a_folder_are_named_and_counted(tmp_path, caplog, plays):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "play.md").write_text(plays[0].read_text(encoding="utf-8"), encoding="utf-8")
    (folder / "cover.pdf").write_bytes(b"%PDF-1.4")
    (folder / "notes.html").write_text("<p>x</p>")
    with caplog.at_level("WARNING"):
        train_tokenizer([str(folder)], vocab_size=300, out_dir=tmp_path / "tok")
    assert "skipped 2 of the 3 files under" in caplog.text and "cover.pdf, notes.html" in caplog.text
    (folder / "play.md").unlink()
    with pytest.raises(
        InputError, match=r"2 of the 2 files under .* none can be read \(cover\.pdf, notes\.html\)"
    ):
        train_tokenizer([str(folder)], vocab_size=300, out_dir=tmp_path / "tok2")
