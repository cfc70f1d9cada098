"""`dsv3 eval`: every target scored once in windows, each document read as if alone, against a
plain reference that runs the model on each target's context by itself; the data read as training
reads it (bos + text + eos, chats learned on their assistant turns); the CLI's numbers and errors."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from dsv3 import ModelConfig, Transformer
from dsv3.cli import main
from dsv3.eval import read_documents, score, summary, targets, windows
from dsv3.tokenizer import load_tokenizer
from dsv3.train.packing import Part, Stream
from dsv3.train.sft import chat_template_for
from fixtures import MICRO_SERVE, MICRO_VOCAB


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset("tiny", **MICRO_SERVE)).double().eval()


def random_stream(lengths, chat_rows=(), seed=0) -> Stream:
    """Documents of the given lengths; in those listed in chat_rows only every other token is learned."""
    g = np.random.default_rng(seed)
    tokens = g.integers(2, MICRO_SERVE["vocab_size"], sum(lengths))
    starts = np.cumsum([0, *lengths[:-1]])
    learned = np.ones(len(tokens), np.uint8)
    for d in chat_rows:
        learned[starts[d] : starts[d] + lengths[d]] = np.arange(lengths[d]) % 2
    return Stream(tokens, starts, learned, (Part("eval", 0, len(tokens)),))


def reference_nats(model, stream: Stream, seq_len: int, stride: int) -> np.ndarray:
    """Each target j alone: the window that scores it is the first reaching it (k = ceil((j - L) / S),
    at least 0); its context is the tokens from that window's start (or its document's) to j - 1."""
    tokens, starts = stream.tokens, stream.starts
    nats = np.zeros(len(starts))
    for j in np.flatnonzero(targets(stream)):
        doc = np.searchsorted(starts, j, side="right") - 1
        k = max(0, math.ceil((j - seq_len) / stride))
        context = torch.tensor(tokens[max(starts[doc], k * stride) : j])[None]
        with torch.no_grad():
            logprobs = model(context).logits[0, -1].log_softmax(-1)
        nats[doc] -= float(logprobs[tokens[j]])
    return nats


@pytest.mark.parametrize("seq_len, stride", [(8, 8), (8, 3), (5, 1), (64, 64)])
def test_windows_score_every_target_once(seq_len, stride):
    for n in range(2, 40):
        seen = []
        for a, b, first in windows(n, seq_len, stride):
            assert b - a <= seq_len and a <= first - 1  # the window feeds the position predicting `first`
            seen += range(first, b + 1)
            assert first == 1 or first - a >= seq_len - stride + 1  # at least L - S tokens of context
        assert seen == list(range(1, n))


@pytest.mark.parametrize("seq_len, stride, batch", [(8, 8, 1), (8, 3, 4), (5, 1, 3), (64, 64, 2)])
def test_scores_equal_each_target_scored_alone(model, seq_len, stride, batch):
    """Documents shorter and longer than a window, packed back to back (so windows start inside
    documents and hold several), two of them chats learned on half their tokens."""
    stream = random_stream([5, 19, 3, 11, 2, 27], chat_rows=(1, 4))
    got = score(model, stream, seq_len, stride, batch)
    np.testing.assert_allclose(got.nats, reference_nats(model, stream, seq_len, stride), rtol=1e-10)
    mask = targets(stream)
    assert got.tokens.tolist() == [int(m.sum()) for m in np.split(mask, stream.starts[1:])]
    assert got.tokens.sum() == 5 - 1 + 9 + 3 - 1 + 11 - 1 + 1 + 27 - 1  # learned odd positions in the chats


def test_the_stride_changes_the_contexts_not_what_is_scored(model):
    stream = random_stream([60])
    full, strided = score(model, stream, 8, 8), score(model, stream, 8, 2)
    assert full.tokens.tolist() == strided.tokens.tolist() == [59]
    assert full.nats[0] != pytest.approx(strided.nats[0], rel=1e-6)


def test_read_documents_as_training_reads_them(tokenizer_file, tmp_path):
    tok = load_tokenizer(tokenizer_file, MICRO_VOCAB)
    texts = ["def f(x):\n    return x\n", "naïve café — 漢字"]
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "A color?"},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Rouge ✓"},
    ]
    data = tmp_path / "held.jsonl"
    rows = [{"text": t} for t in texts] + [{"messages": chat}, {"oops": 1}, {"text": ""}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    docs = read_documents([str(data)], tok, chat_template_for(tokenizer_file))
    s = docs.stream
    assert len(s.starts) == 3 and len(docs.bad) == 1 and docs.bad[0].startswith(f"{data}:4: no 'text' field")
    for text, start, end in zip(texts, s.starts, s.starts[1:]):
        ids = tok.tokenizer.encode(text, add_special_tokens=False).ids
        assert s.tokens[start:end].tolist() == [tok.bos_id, *ids, tok.eos_id]
        assert s.learned[start:end].all()
    scored = s.tokens[s.starts[2] :][targets(s)[s.starts[2] :]].tolist()
    assert tok.tokenizer.decode(scored, skip_special_tokens=True) == "Blue.Rouge ✓"
    assert scored.count(tok.eos_id) == 2  # each assistant turn ends with <|eos|>, a target
    assert docs.bytes == sum(len(t.encode()) for t in texts) + len("Blue.Rouge ✓".encode())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_file):
    folder = tmp_path_factory.mktemp("eval") / "model"
    torch.manual_seed(0)
    Transformer(ModelConfig.from_preset("tiny", **MICRO_SERVE)).save_pretrained(folder)
    shutil.copyfile(tokenizer_file, folder / "tokenizer.json")
    return folder


def test_cli_prints_what_score_computes(checkpoint, tokenizer_file, tmp_path, capsys):
    text = tmp_path / "held.txt"
    text.write_text("import os\nprint(os.getcwd())\n" * 6)
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(checkpoint),
                "--data",
                str(text),
                "--seq-len",
                "16",
                "--stride",
                "8",
                "--json",
            ]
        )
        == 0
    )
    got = json.loads(capsys.readouterr().out)  # stdout holds the JSON alone; progress goes to stderr
    tok = load_tokenizer(tokenizer_file, MICRO_VOCAB)
    docs = read_documents([str(text)], tok, chat_template_for(tokenizer_file))
    want = summary(score(Transformer.from_pretrained(checkpoint).eval(), docs.stream, 16, 8), docs.bytes)
    assert got["bytes"] == len(text.read_text().encode()) and got["documents"] == 1
    assert got["tokens"] == want["tokens"] == len(docs.stream.tokens) - 1
    for key in ("loss", "perplexity", "bits_per_byte"):
        assert got[key] == pytest.approx(want[key], rel=1e-12)
    assert got["perplexity"] == pytest.approx(math.exp(got["loss"]))
    assert got["bits_per_byte"] == pytest.approx(got["loss"] * got["tokens"] / math.log(2) / got["bytes"])
    assert (got["seq_len"], got["stride"]) == (16, 8)
    assert main(["eval", "--checkpoint", str(checkpoint), "--data", str(text)]) == 0
    out = capsys.readouterr().out
    assert "tokens scored" in out and f"windows of {MICRO_SERVE['max_position_embeddings']} tokens" in out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--data", "missing.txt"], "data path missing.txt does not exist"),
        (
            ["--data", "{text}", "--seq-len", "257"],
            "--seq-len 257: must be in [1, max_position_embeddings=256]",
        ),
        (["--data", "{text}", "--seq-len", "8", "--stride", "9"], "--stride 9: must be in [1, --seq-len 8]"),
        (["--data", "{text}", "--batch-size", "0"], "--batch-size 0: must be >= 1"),
        (["--data", "{text}", "--device", "tpu"], "--device tpu: must be auto, cpu or cuda[:N]"),
        (["--data", "{empty}"], "holds no documents to score"),
    ],
)
def test_bad_input_exits_2_with_one_line(checkpoint, tmp_path, capsys, extra, message):
    (tmp_path / "held.txt").write_text("x = 1\n")
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n')
    extra = [e.format(text=tmp_path / "held.txt", empty=tmp_path / "empty.jsonl") for e in extra]
    assert main(["eval", "--checkpoint", str(checkpoint), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_a_folder_without_a_model_exits_2(tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path), "--data", "x.txt"]) == 2
    assert "holds no model" in capsys.readouterr().err
