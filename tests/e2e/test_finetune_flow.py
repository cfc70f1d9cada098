"""The README's "Fine-tune your own model" section, run as written on a tiny model: a base model,
supervised fine-tuning on a chat JSONL with --init-from, dsv3 eval on held-out chats, dsv3 serve
answering a chat request, and conversion to DeepSeek's FP8 format and to GGUF.

Each command is the README's (COMMANDS, which README.md must show verbatim) with flags appended
that only shrink the run to a tiny model (argparse keeps the last value of a repeated flag). They
run in-process through dsv3's command line (`dsv3.cli.main`: the same parsing and code), but for
`dsv3 serve`, which runs as a subprocess."""

from __future__ import annotations

import json
import random
import shlex
from pathlib import Path

import httpx
import pytest

from dsv3.cli import main
from fixtures import MICRO, dsv3_serve

REPO = Path(__file__).resolve().parents[2]
COMMANDS = {
    "base": "dsv3 train --out runs/base",
    "sft": "dsv3 train --init-from runs/base --data chats.jsonl --out runs/sft --steps 300 --lr 1e-4",
    "eval": "dsv3 eval --checkpoint runs/sft --data heldout.jsonl",
    "serve": "dsv3 serve --checkpoint runs/sft --port 8000",
    "fp8": "dsv3 convert runs/sft sft-fp8 --to fp8",
    "gguf": "dsv3 convert runs/sft sft.gguf --to gguf --gguf-type q8_0",
}
CHAT_REQUEST = {
    "model": "sft",
    "messages": [{"role": "user", "content": "What is 2 plus 3?"}],
    "max_tokens": 16,
}
SMALL_RUN = shlex.split(
    "--seq-len 32 --batch-size 4 --dtype float32 --peak-tflops 1 --threads 1 --val-fraction 0.2 "
    "--eval-batches 2 --log-every 5 --cache-dir cache"
)
TINY = {  # appended to the README's command
    "base": [
        "--model-overrides",
        json.dumps(MICRO),
        *shlex.split("--max-corpus-mb 0.3 --steps 4"),
        *SMALL_RUN,
    ],
    "sft": shlex.split("--steps 24 --lr 3e-3 --warmup-steps 2 --eval-every 12 --save-every 24") + SMALL_RUN,
}


def chats(n: int, seed: int) -> str:
    """A JSONL of n arithmetic chats, some with a system prompt: a format to learn in a few steps."""
    rng, lines = random.Random(seed), []
    for i in range(n):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        messages = [{"role": "system", "content": "Answer in one sentence."}] if i % 3 == 0 else []
        messages += [
            {"role": "user", "content": f"What is {a} plus {b}?"},
            {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
        ]
        lines.append(json.dumps({"messages": messages}))
    return "\n".join(lines) + "\n"


def run(capsys, name: str, *extra: str) -> str:
    """A README command with the tiny flags and `extra` appended; what it printed on stdout."""
    args = shlex.split(COMMANDS[name])[1:] + TINY.get(name, []) + list(extra)
    code = main(args)
    out, err = capsys.readouterr()
    assert code == 0, f"{COMMANDS[name]}\n{out[-2000:]}\n{err[-2000:]}"
    return out


@pytest.mark.slow
def test_the_readme_fine_tuning_flow(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "chats.jsonl").write_text(chats(60, seed=0))
    (tmp_path / "heldout.jsonl").write_text(chats(10, seed=1))
    run(capsys, "base")
    assert "initialized from" in run(capsys, "sft") and (tmp_path / "runs/sft/hf/model.safetensors").is_file()

    shown = run(capsys, "eval")
    assert "loss" in shown and "perplexity" in shown and "bits per byte" in shown
    after = json.loads(run(capsys, "eval", "--json"))
    before = json.loads(run(capsys, "eval", "--json", "--checkpoint", "runs/base"))
    assert after["documents"] == before["documents"] == 10 and after["tokens"] == before["tokens"]
    assert after["loss"] < before["loss"] - 0.5  # fine-tuning learned the answers' format

    with dsv3_serve(*shlex.split(COMMANDS["serve"])[2:], cwd=tmp_path) as url:
        answer = httpx.post(url + "/v1/chat/completions", json=CHAT_REQUEST, timeout=60).json()
    assert answer["model"] == "sft" and answer["choices"][0]["finish_reason"] in ("stop", "length")
    assert isinstance(answer["choices"][0]["message"]["content"], str)

    run(capsys, "fp8")
    config = json.loads((tmp_path / "sft-fp8/config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "fp8"
    run(capsys, "gguf")
    assert (tmp_path / "sft.gguf").read_bytes()[:4] == b"GGUF"


def test_the_readme_shows_these_commands():
    readme = (REPO / "README.md").read_text()
    missing = [command for command in COMMANDS.values() if command not in readme]
    assert not missing, f"README.md's fine-tuning section should show: {missing}"
