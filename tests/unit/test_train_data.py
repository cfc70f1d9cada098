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
