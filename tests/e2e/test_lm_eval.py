"""lm-evaluation-harness against `dsv3 serve`: its `local-completions` model runs a small local
multiple-choice task (tests/data/lm_eval: a YAML task and its JSONL, nothing downloaded) and
gets, for every choice, the log-likelihood that dsv3.eval's scoring computes with the model
directly on the same tokens.

The same run by hand, from the repository root (pip install 'lm-eval[api]'):

    dsv3 serve --checkpoint runs/sft --port 8000 &
    lm-eval run --model local-completions --include_path tests/data/lm_eval --tasks dsv3_tiny_mc \\
        --model_args model=sft,base_url=http://127.0.0.1:8000/v1/completions,tokenizer=runs/sft,tokenizer_backend=huggingface

`tokenizer` names a folder holding the model's tokenizer.json (the run folder, a checkpoint or an
export), which lm-eval loads with transformers' AutoTokenizer, offline. For a log-likelihood
request lm-eval encodes context + continuation together, splits at the length of the encoded
context, without special tokens (no <|bos|>), and sends the token ids (`prompt: [[ids]]`,
max_tokens 1, logprobs 1, echo): the server scores them as sent. The log-likelihood is the sum
of token_logprobs over the continuation, which lm-eval reads as token_logprobs[ctxlen:-1] (the
last entry is the generated token's).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dsv3.eval import score
from dsv3.model.transformer import Transformer
from dsv3.tokenizer import load_tokenizer
from dsv3.train.packing import Part, Stream
from fixtures import MICRO_VOCAB, dsv3_serve

pytest.importorskip("lm_eval")
REPO = Path(__file__).resolve().parents[2]
TASK = "dsv3_tiny_mc"


def lm_eval_pairs(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of a request into context and continuation ids (TemplateLM._encode_pair)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tok.tokenizer.encode(context + continuation, add_special_tokens=False).ids
    context_ids = tok.tokenizer.encode(context, add_special_tokens=False).ids
    return context_ids, whole[len(context_ids) :]


@pytest.mark.slow
def test_local_completions_gets_the_log_likelihoods_dsv3_eval_computes(folder, tmp_path):
    with dsv3_serve("--checkpoint", str(folder), "--model-name", "micro", "--dtype", "float32") as url:
        model_args = (
            f"model=micro,base_url={url}/v1/completions,tokenizer={folder},tokenizer_backend=huggingface"
        )
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "HF_DATASETS_CACHE": str(tmp_path / "datasets"),
            "TOKENIZERS_PARALLELISM": "false",
        }
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "lm_eval",
                "run",
                "--model",
                "local-completions",
                "--model_args",
                model_args,
                "--include_path",
                "tests/data/lm_eval",
                "--tasks",
                TASK,
                "--output_path",
                str(tmp_path / "out"),
                "--log_samples",
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    samples = [
        json.loads(line) for f in (tmp_path / "out").rglob(f"samples_{TASK}_*.jsonl") for line in open(f)
    ]
    assert len(samples) == 5

    tok = load_tokenizer(folder, MICRO_VOCAB)
    pieces, learned, harness = [], [], []
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        for args, resp in zip(sample["arguments"].values(), sample["resps"]):
            context_ids, continuation_ids = lm_eval_pairs(tok, args["arg_0"], args["arg_1"])
            pieces.append(context_ids + continuation_ids)
            learned.append([0] * len(context_ids) + [1] * len(continuation_ids))
            harness.append(float(resp[0][0]))
    tokens = np.concatenate(pieces)
    starts = np.cumsum([0] + [len(p) for p in pieces[:-1]])
    stream = Stream(
        tokens, starts, np.concatenate(learned).astype(np.uint8), (Part("items", 0, len(tokens)),)
    )
    # items are at most 26 tokens: with a stride of 32, each is scored with all of its context
    direct = -score(Transformer.from_pretrained(folder).eval(), stream, seq_len=256, stride=32).nats
    np.testing.assert_allclose(harness, direct, atol=2e-4, rtol=0)
    accuracy = np.mean(
        [
            int(np.argmax(direct[3 * i : 3 * i + 3]) == s["doc"]["answer"])
            for i, s in enumerate(sorted(samples, key=lambda s: s["doc_id"]))
        ]
    )
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert results["results"][TASK]["acc,none"] == pytest.approx(accuracy)
