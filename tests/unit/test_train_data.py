"""Corpus, tokenizer, token cache and splits (dsv3.train.data); packing and the stateful loader
(dsv3.train.packing)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dsv3.errors import DataError
from dsv3.model.loss import IGNORE_INDEX
from dsv3.tokenizer import load_tokenizer
from dsv3.train.data import Corpus, build_token_cache, cached_tokenizer
from dsv3.train.packing import Loader, PackedTokens, Part, Stream, unigram_entropy
from fixtures import write_corpus


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
    starts = np.cumsum([0] + [len(d) + 2 for d in val_docs[:-1]])
    np.testing.assert_array_equal(cache.stream("val").starts, starts)
    assert cache.stream("val").learned is None  # no chats: every token may be a target


def test_cache_is_reused_and_keyed_by_tokenizer_not_by_mixture_weight(built, tmp_path):
    root, corpus, tok, cache = built
    again = build_token_cache(corpus, tok, 0.25, root / "cache")
    assert again.folder == cache.folder
    weighted = build_token_cache(Corpus([f"{corpus.specs[0]}:2.5"]), tok, 0.25, root / "cache")
    assert weighted.folder == cache.folder and weighted.weights == (2.5,)
    other_tok = load_tokenizer(cached_tokenizer(corpus, 300, tmp_path), max_vocab=512)
    assert build_token_cache(corpus, other_tok, 0.25, root / "cache").folder != cache.folder


def test_packing_shifts_labels_and_cuts_at_document_ends():
    tokens = np.array([0, 5, 6, 1, 0, 7, 8, 9, 1, 0, 4], dtype=np.uint16)
    data = PackedTokens(tokens, seq_len=5, eos_id=1)
    assert len(data) == 2
    batch = data.batch(np.array([0, 1]))
    x, y = batch.input_ids, batch.labels
    assert x.tolist() == [[0, 5, 6, 1, 0], [7, 8, 9, 1, 0]]
    assert y.tolist() == [[5, 6, 1, IGNORE_INDEX, 7], [8, 9, 1, IGNORE_INDEX, 4]]
    assert x.dtype == y.dtype == torch.int64
    assert batch.segments is None  # plain text, no document masking: rows attend across documents


def test_document_masking_numbers_documents_per_row_and_cuts_labels_at_their_ends():
    tokens = np.array([0, 5, 6, 1, 0, 7, 8, 9, 1, 0, 4], dtype=np.uint16)
    stream = Stream(tokens, np.array([0, 4, 9]), None, (Part("all", 0, len(tokens)),))
    masked = PackedTokens(stream, seq_len=5, eos_id=1, document_masking=True).batch(np.array([0, 1]))
    assert masked.segments.tolist() == [[0, 0, 0, 0, 1], [0, 0, 0, 0, 1]]
    assert masked.segments.dtype == torch.int64
    # documents end in <|eos|>: the labels are those of the unmasked packing
    plain = PackedTokens(tokens, seq_len=5, eos_id=1).batch(np.array([0, 1]))
    assert torch.equal(masked.labels, plain.labels) and torch.equal(masked.input_ids, plain.input_ids)
    # a window that starts inside a document: its tokens before the next start are segment 0
    cut = Stream(tokens, np.array([0, 2, 9]), None, (Part("all", 0, len(tokens)),))
    batch = PackedTokens(cut, seq_len=5, eos_id=1, document_masking=True).batch(np.array([1]))
    assert batch.segments.tolist() == [[0, 0, 0, 0, 1]]
    assert batch.labels.tolist() == [[8, 9, 1, IGNORE_INDEX, 4]]  # 0 -> 4 crosses no start: learned


def test_batch_rows_and_device_keep_segments_aligned():
    stream = Stream(np.arange(2, 42, dtype=np.uint16), np.array([0, 7, 20]), None, (Part("all", 0, 40),))
    batch = PackedTokens(stream, seq_len=9, eos_id=1, document_masking=True).batch(np.array([0, 1, 2]))
    part = batch.rows(1, 3).to("cpu")
    assert len(part) == 2 and torch.equal(part.input_ids, batch.input_ids[1:3])
    assert torch.equal(part.labels, batch.labels[1:3]) and torch.equal(part.segments, batch.segments[1:3])


def test_loader_visits_each_window_once_per_epoch_and_resumes_exactly():
    tokens = np.arange(1000, dtype=np.uint16) + 2
    data = PackedTokens(tokens, seq_len=9, eos_id=1)  # 111 windows: epochs do not align with batches
    loader = Loader(data, batch_size=8, seed=3)
    firsts = torch.cat([loader.next_batch().input_ids[:, 0] for _ in range(14)])[: len(data)]  # 112 >= 111
    assert sorted(((firsts - 2) // 9).tolist()) == list(range(len(data)))
    state = loader.state_dict()
    assert state == {"seed": 3, "epoch": 1, "cursor": 1}  # the checkpoint format of a single source
    expected = [loader.next_batch().input_ids for _ in range(20)]
    resumed = Loader(data, batch_size=8, seed=0)
    resumed.load_state_dict(state)
    for want in expected:
        assert torch.equal(resumed.next_batch().input_ids, want)


def test_one_source_keeps_the_order_seeded_by_seed_and_epoch():
    """Without a mixture the window order is the permutations default_rng([seed, epoch]), epoch after
    epoch: the order runs before mixtures saw, so their checkpoints resume onto the same batches."""
    data = PackedTokens(np.arange(2, 302, dtype=np.uint16), seq_len=9, eos_id=1)  # 33 windows
    order = np.concatenate([np.random.default_rng([5, e]).permutation(33) for e in range(3)])
    loader = Loader(data, batch_size=8, seed=5)
    for b in range(10):
        np.testing.assert_array_equal(
            loader.next_batch().input_ids[:, 0].numpy(), 2 + 9 * order[8 * b : 8 * b + 8]
        )


def test_each_rank_gets_its_contiguous_rows_of_the_global_batch():
    data = PackedTokens(np.arange(2, 502, dtype=np.uint16), seq_len=9, eos_id=1)
    whole = Loader(data, batch_size=8, seed=1)
    ranks = [Loader(data, batch_size=8, seed=1, rank=r, ranks=2) for r in range(2)]
    for _ in range(3):
        want = whole.next_batch().input_ids
        assert torch.equal(torch.cat([r.next_batch().input_ids for r in ranks]), want)


def test_loader_order_depends_on_seed():
    data = PackedTokens(np.arange(500, dtype=np.uint16), seq_len=4, eos_id=1)
    a, b = Loader(data, 16, seed=0).next_batch().input_ids, Loader(data, 16, seed=1).next_batch().input_ids
    assert not torch.equal(a, b)


# ----------------------------------------------------------------------------------------- mixtures
def two_part_stream(weights=(0.7, 0.3)) -> Stream:
    """Part "a": 61 windows of tokens 1000..; part "b": 23 windows of tokens 5000.. (seq_len 9)."""
    a, b = np.arange(1000, 1000 + 550), np.arange(5000, 5000 + 208)
    tokens = np.concatenate([a, b]).astype(np.uint16)
    parts = (Part("a", 0, len(a), weights[0]), Part("b", len(a), len(tokens), weights[1]))
    return Stream(tokens, np.array([0, len(a)]), None, parts)


def test_mixture_draws_each_source_by_its_weight_within_one_window_at_every_step():
    data = PackedTokens(two_part_stream(), seq_len=9, eos_id=1)
    assert list(data.counts) == [61, 23]
    loader = Loader(data, batch_size=8, seed=0)
    firsts = torch.cat([loader.next_batch().input_ids[:, 0] for _ in range(100)]).numpy()  # 800 rows
    from_a = np.cumsum(firsts < 5000)  # rows drawn from "a" after 1, 2, ... rows
    assert np.abs(from_a - 0.7 * np.arange(1, 801)).max() < 1
    # within a source, windows never cross into the other one, and each epoch visits every window once
    assert all(w < 1000 + 550 - 9 or w >= 5000 for w in firsts)
    a_windows = (firsts[firsts < 5000] - 1000) // 9
    for epoch in range(len(a_windows) // 61):
        assert sorted(a_windows[61 * epoch : 61 * epoch + 61]) == list(range(61))


def test_mixture_resumes_exactly_and_refuses_another_number_of_sources():
    data = PackedTokens(two_part_stream(), seq_len=9, eos_id=1)
    loader = Loader(data, batch_size=8, seed=4)
    for _ in range(37):  # past the first epoch of "b"
        loader.next_batch()
    state = loader.state_dict()
    assert state["epoch"][1] >= 1 and len(state["cursor"]) == 2
    expected = [loader.next_batch() for _ in range(30)]
    resumed = Loader(data, batch_size=8, seed=0)
    resumed.load_state_dict(state)
    for want in expected:
        got = resumed.next_batch()
        assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.labels, want.labels)
    single = Loader(PackedTokens(np.arange(100, dtype=np.uint16), 9, 1), 8, 0)
    with pytest.raises(DataError, match="for 2 mixture source.* this run reads 1"):
        single.load_state_dict(state)


def test_unigram_baseline_mixes_sources_by_weight_and_counts_learned_tokens_only():
    stream = two_part_stream(weights=(3.0, 1.0))  # 550 distinct tokens and 208 distinct tokens
    p = np.concatenate([np.full(550, 0.75 / 550), np.full(208, 0.25 / 208)])
    assert unigram_entropy(stream, 6000) == pytest.approx(float(-(p * np.log(p)).sum()))
    tokens = np.array([3, 3, 4, 5, 5, 5], dtype=np.uint16)
    learned = np.array([0, 0, 1, 1, 0, 1], dtype=np.uint8)  # targets: 4, 5, 5
    q = np.array([1 / 3, 2 / 3])
    stream = Stream(tokens, np.array([0]), learned, (Part("chat", 0, 6),))
    assert unigram_entropy(stream, 8) == pytest.approx(float(-(q * np.log(q)).sum()))


def test_mixture_of_files_reads_each_source_as_a_part_named_in_the_summary(tmp_path):
    a, b = write_corpus(tmp_path / "a", n_docs=12), write_corpus(tmp_path / "b", n_docs=30)
    corpus = Corpus([f"{a}:0.25", f"{b}:0.75"])
    tok = load_tokenizer(cached_tokenizer(corpus, 300, tmp_path / "cache"), max_vocab=512)
    split = build_token_cache(corpus, tok, 0.1, tmp_path / "cache").split(seq_len=32)
    sources = build_token_cache(corpus, tok, 0.1, tmp_path / "cache").meta["sources"]
    assert [(p.name, p.weight) for p in split.train.parts] == [(str(a), 0.25), (str(b), 0.75)]
    assert split.train.parts[0].end == split.train.parts[1].start == sources[0]["train_tokens"]
    assert (
        f"data {a}:0.25 (12 documents, " in split.summary and f", {b}:0.75 (30 documents, " in split.summary
    )
    assert PackedTokens(split.train, 32, tok.eos_id).weights == [0.25, 0.75]
    assert PackedTokens(split.val, 32, tok.eos_id).weights is None  # validation reads the whole split


def test_mixture_weights_must_be_positive_and_given_to_every_source(built, tmp_path):
    _, corpus, _, _ = built
    path = corpus.specs[0]
    for weight in ("0", "-0.3", "nan", "inf"):
        with pytest.raises(
            DataError, match=rf"--data {path}:{weight}: the mixture weight {weight} must be a positive"
        ):
            Corpus([f"{path}:{weight}"])
    with pytest.raises(DataError, match=rf"give every source a mixture weight .* {path} has none"):
        Corpus([f"{path}:0.5", path])
    from dsv3.train.config import TrainConfig

    with pytest.raises(DataError, match=rf"--data {path}:0: the mixture weight"):
        TrainConfig.from_dict({"data": [f"{path}:0"]}).validate()


def test_a_mixture_source_too_small_for_a_window_is_named(tmp_path):
    big = write_corpus(tmp_path / "big", n_docs=20)
    (tmp_path / "tiny.txt").write_text("hi\n")
    corpus = Corpus([f"{big}:1", f"{tmp_path / 'tiny.txt'}:1"])
    tok = load_tokenizer(cached_tokenizer(corpus, 300, tmp_path / "cache"), max_vocab=512)
    cache = build_token_cache(corpus, tok, 0.1, tmp_path / "cache")
    with pytest.raises(
        DataError, match=rf"data source {tmp_path / 'tiny.txt'}:1 leaves .* fewer than one window"
    ):
        cache.split(seq_len=32)


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
    np.testing.assert_array_equal(split.val.span, stream[-held_out:])
    np.testing.assert_array_equal(split.train.span, stream[:-held_out])
    assert f"the last {held_out:,} tokens" in split.summary and str(corpus) in split.summary
    assert len(PackedTokens(split.val, 64, eos_id=1)) >= 1


def test_enough_documents_keep_the_whole_document_split(built):
    _, _, _, cache = built
    split = cache.split(seq_len=32)
    np.testing.assert_array_equal(split.val.span, cache.tokens("val"))
    np.testing.assert_array_equal(split.train.span, cache.tokens("train"))
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
    assert [p.path.name for p in corpus.sources[0].parts] == ["doc000.txt", "doc001.txt", "doc002.txt"]
    assert corpus.skipped_summary() == (
        f"skipped 2 binary files ({folder / 'controls.txt'}, {folder / 'image.txt'}) "
        f"and 1 empty file ({folder / 'zero.txt'})"
    )
    tok = load_tokenizer(cached_tokenizer(corpus, 300, tmp_path / "cache"), max_vocab=512)
    summary = build_token_cache(corpus, tok, 0.01, tmp_path / "cache").split(32).summary
    assert "skipped 2 binary files" in summary
    with pytest.raises(DataError, match=r"contains no documents \(skipped 1 empty file .*zero.txt\)"):
        Corpus([str(folder / "zero.txt")])
    with pytest.raises(DataError, match=r"contains no documents \(skipped 1 binary file .*image.txt\)"):
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
