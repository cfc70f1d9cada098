"""Corpus, tokenizer, token cache, packing and the stateful loader (dsv3.train.data)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from train_helpers import write_corpus

from dsv3.errors import DataError
from dsv3.model.loss import IGNORE_INDEX
from dsv3.tokenizer import load_tokenizer
from dsv3.train.data import Corpus, Loader, PackedTokens, build_token_cache, cached_tokenizer, unigram_entropy


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    corpus = Corpus([str(write_corpus(root / "corpus", n_docs=20))])
    tok = load_tokenizer(cached_tokenizer(corpus, 400, root / "cache"), max_vocab=512)
    cache = build_token_cache(corpus, tok, val_fraction=0.25, cache_dir=root / "cache")
    return root, corpus, tok, cache


def test_tokenizer_roundtrips_text_and_has_the_model_special_ids(built):
    _, _, tok, _ = built
    text = "def f(x):\n    return x ** 2  # ünïcode ✓\n"
    assert tok.tokenizer.decode(tok.tokenizer.encode(text).ids) == text
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 400)


def test_cache_holds_every_document_once_split_by_whole_documents(built):
    _, corpus, tok, cache = built
    train, val = cache.tokens("train"), cache.tokens("val")
    docs = [tok.tokenizer.encode(t, add_special_tokens=False).ids for t in corpus]
    assert cache.meta["documents"] == len(docs) == 20
    assert len(train) + len(val) == sum(len(d) + 2 for d in docs)
    # every 4th document (val_fraction 0.25) is held out whole, framed by <|bos|> ... <|eos|>
    val_docs = [d for i, d in enumerate(docs) if i % 4 == 3]
    expected = np.concatenate([[0, *d, 1] for d in val_docs])
    np.testing.assert_array_equal(val, expected)


def test_cache_is_reused_and_keyed_by_tokenizer(built, tmp_path):
    root, corpus, tok, cache = built
    again = build_token_cache(corpus, tok, 0.25, root / "cache")
    assert again.folder == cache.folder
    other_tok = load_tokenizer(cached_tokenizer(corpus, 300, tmp_path), max_vocab=512)
    assert build_token_cache(corpus, other_tok, 0.25, root / "cache").folder != cache.folder


def test_packing_shifts_labels_and_cuts_at_document_ends():
    tokens = np.array([0, 5, 6, 1, 0, 7, 8, 9, 1, 0, 4], dtype=np.uint16)
    data = PackedTokens(tokens, seq_len=5, eos_id=1)
    assert len(data) == 2
    x, y = data.batch(np.array([0, 1]))
    assert x.tolist() == [[0, 5, 6, 1, 0], [7, 8, 9, 1, 0]]
    assert y.tolist() == [[5, 6, 1, IGNORE_INDEX, 7], [8, 9, 1, IGNORE_INDEX, 4]]
    assert x.dtype == y.dtype == torch.int64


def test_loader_visits_each_window_once_per_epoch_and_resumes_exactly():
    tokens = np.arange(1000, dtype=np.uint16) + 2
    data = PackedTokens(tokens, seq_len=9, eos_id=1)  # 111 windows: epochs do not align with batches
    loader = Loader(data, batch_size=8, seed=3)
    firsts = torch.cat([loader.next_batch()[0][:, 0] for _ in range(14)])[: len(data)]  # 112 >= 111
    assert sorted(((firsts - 2) // 9).tolist()) == list(range(len(data)))
    state = loader.state_dict()
    expected = [loader.next_batch()[0] for _ in range(20)]
    resumed = Loader(data, batch_size=8, seed=0)
    resumed.load_state_dict(state)
    for want in expected:
        assert torch.equal(resumed.next_batch()[0], want)


def test_loader_order_depends_on_seed():
    data = PackedTokens(np.arange(500, dtype=np.uint16), seq_len=4, eos_id=1)
    a, b = Loader(data, 16, seed=0).next_batch()[0], Loader(data, 16, seed=1).next_batch()[0]
    assert not torch.equal(a, b)


def test_unigram_entropy_of_uniform_and_constant_streams():
    assert unigram_entropy(np.arange(8).repeat(5), 8) == pytest.approx(np.log(8))
    assert unigram_entropy(np.zeros(10, dtype=np.int64), 8) == 0.0


def test_bad_inputs_fail_with_clear_messages(built, tmp_path):
    root, corpus, _, _ = built
    with pytest.raises(DataError, match="does not exist"):
        Corpus([str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no text files"):
        Corpus([str(tmp_path / "empty")])
    big = cached_tokenizer(corpus, 400, root / "cache")
    with pytest.raises(DataError, match="more than the model's vocab_size=300"):
        load_tokenizer(big, max_vocab=300)
    with pytest.raises(DataError, match="fewer than seq_len"):
        PackedTokens(np.arange(10, dtype=np.uint16), seq_len=16, eos_id=1, split="validation")


# ------------------------------------------------------------------------ small and odd corpora
def small_cache(tmp_path, corpus_path, val_fraction=0.01):
    corpus = Corpus([str(corpus_path)])
    tok = load_tokenizer(cached_tokenizer(corpus, 300, tmp_path / "cache"), max_vocab=512)
    return build_token_cache(corpus, tok, val_fraction, tmp_path / "cache")


@pytest.mark.parametrize("n_files", [1, 99])
def test_too_few_documents_hold_out_the_tail_of_the_stream(tmp_path, n_files):
    corpus = write_corpus(tmp_path / "corpus", n_docs=n_files)
    if n_files == 1:
        corpus = corpus / "doc000.txt"  # `--data` naming one file
    cache = small_cache(tmp_path, corpus)
    assert len(cache.tokens("val")) == 0  # fewer than 1/0.01 documents: none held out whole
    stream = np.asarray(cache.tokens("train"))
    split = cache.split(seq_len=64)
    held_out = max(int(np.ceil(0.01 * len(stream))), 65)
    np.testing.assert_array_equal(split.val, stream[-held_out:])
    np.testing.assert_array_equal(split.train, stream[:-held_out])
    assert f"the last {held_out:,} tokens" in split.summary and str(corpus) in split.summary
    assert len(PackedTokens(split.val, 64, eos_id=1)) >= 1


def test_enough_documents_keep_the_whole_document_split(built):
    _, _, _, cache = built
    split = cache.split(seq_len=32)
    np.testing.assert_array_equal(split.val, cache.tokens("val"))
    np.testing.assert_array_equal(split.train, cache.tokens("train"))
    assert "5 whole documents held out (val_fraction 0.25)" in split.summary


def test_data_too_small_for_seq_len_names_source_tokens_and_window(tmp_path):
    (tmp_path / "tiny.txt").write_text("hello world\n")
    cache = small_cache(tmp_path, tmp_path / "tiny.txt")
    n = len(cache.tokens("train"))
    message = rf"{tmp_path / 'tiny.txt'} \(1 document, {n} tokens\) is too small for seq_len 64: .*seq_len \+ 1 = 65"
    with pytest.raises(DataError, match=message):
        cache.split(seq_len=64)


def test_empty_and_binary_files_are_skipped_and_named(tmp_path):
    folder = write_corpus(tmp_path / "corpus", n_docs=3)
    (folder / "zero.txt").write_bytes(b"")
    (folder / "image.txt").write_bytes(bytes(range(256)) * 40)  # NUL bytes
    (folder / "controls.txt").write_bytes(b"abc\x01\x02\x03\x04" * 100)  # no NUL, 57% control codes
    corpus = Corpus([str(folder)])
    assert [p.name for p in corpus.files] == ["doc000.txt", "doc001.txt", "doc002.txt"]
    assert corpus.skipped_summary() == (
        f"skipped 2 binary files ({folder / 'controls.txt'}, {folder / 'image.txt'}) "
        f"and 1 empty file ({folder / 'zero.txt'})"
    )
    tok = load_tokenizer(cached_tokenizer(corpus, 300, tmp_path / "cache"), max_vocab=512)
    summary = build_token_cache(corpus, tok, 0.01, tmp_path / "cache").split(32).summary
    assert "skipped 2 binary files" in summary
    with pytest.raises(DataError, match=r"contain no documents \(skipped 1 empty file .*zero.txt\)"):
        Corpus([str(folder / "zero.txt")])
    with pytest.raises(DataError, match=r"contain no documents \(skipped 1 binary file .*image.txt\)"):
        Corpus([str(folder / "image.txt")])


def test_latin1_and_stray_bytes_are_read_as_latin1_characters(tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café naïve, 1½ and ±\n".encode("latin-1"))
    mixed = tmp_path / "mixed.txt"
    mixed.write_bytes(b"\xef\xbb\xbf" + "ünïcode ✓ ".encode() + b"stray \xff byte")
    assert list(Corpus([str(latin1), str(mixed)])) == ["café naïve, 1½ and ±\n", "ünïcode ✓ stray ÿ byte"]


# ------------------------------------------------------------------------------ concurrent runs
def build_concurrently(build, count_calls_of: str, monkeypatch, tmp_path) -> tuple[list, int]:
    """Run build() in two forked processes released together; their results and how many times
    the function data.<count_calls_of> ran in all (each call is held 0.5 s, so the builds overlap)."""
    import multiprocessing
    import time

    import dsv3.train.data as data

    calls = tmp_path / "calls"
    calls.touch()
    inner = getattr(data, count_calls_of)

    def counted(*args, **kwargs):
        with open(calls, "a") as f:
            f.write("call\n")
        time.sleep(0.5)
        return inner(*args, **kwargs)

    monkeypatch.setattr(data, count_calls_of, counted)
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()

    def worker():
        barrier.wait()
        results.put(str(build()))

    procs = [ctx.Process(target=worker) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    return sorted(results.get(timeout=1) for _ in procs), len(calls.read_text().splitlines())


def test_two_first_runs_share_one_token_cache(built, tmp_path, monkeypatch):
    _, corpus, tok, _ = built
    build = lambda: build_token_cache(corpus, tok, 0.25, tmp_path / "cache").folder  # noqa: E731
    folders, tokenizations = build_concurrently(build, "_tokenize_into", monkeypatch, tmp_path)
    assert folders[0] == folders[1] and tokenizations == 1
    assert build_token_cache(corpus, tok, 0.25, tmp_path / "cache").meta["documents"] == 20


def test_two_first_runs_share_one_tokenizer(built, tmp_path, monkeypatch):
    _, corpus, _, _ = built
    paths, trainings = build_concurrently(
        lambda: cached_tokenizer(corpus, 300, tmp_path / "cache"), "train_tokenizer", monkeypatch, tmp_path
    )
    assert paths[0] == paths[1] and trainings == 1
    assert load_tokenizer(paths[0], max_vocab=512).vocab_size == 300
