"""`dsv3 generate` as a user runs it: one-shot output equals the engine's greedy answer (with and
without MTP), tokens reach the terminal one piece at a time, chat keeps the conversation through
the template, and bad flags exit 2 with a message."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from dsv3.cli import main
from dsv3.infer.cli import load, sample, stream
from dsv3.infer.sampling import SamplingParams

PROMPT = "def fibonacci(n):"
# the answers are compared with the engine's of this process: one dtype for both (`--dtype auto`
# measures, and may choose differently at the CLI's thread count than at the tests' one thread)
DTYPE = ("--dtype", "float32")


@pytest.fixture(scope="module")
def engine(folder):
    return load(folder, max_batch_size=1, dtype="float32")


def dsv3(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dsv3", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def greedy(engine, ids, n, stop=()) -> str:
    eng, _ = engine
    return eng.generate([ids], SamplingParams(max_tokens=n, temperature=0, stop=stop))[0].text


def test_one_shot_prints_the_engines_greedy_answer_with_and_without_mtp(folder, engine, capsys):
    want = PROMPT + greedy(engine, engine[1].encode(PROMPT), 12) + "\n"
    args = [
        "generate",
        "--checkpoint",
        str(folder),
        "--prompt",
        PROMPT,
        "--max-tokens",
        "12",
        "--temperature",
        "0",
        *DTYPE,
    ]
    plain = dsv3(*args)  # as a user runs it
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == want
    assert "tokens/s" in plain.stderr and "MTP" not in plain.stderr
    for mtp_args in (["--mtp"], ["--mtp", "--mtp-drafts", "3"]):
        assert main([*args, *mtp_args]) == 0
        mtp = capsys.readouterr()
        assert mtp.out == want  # MTP speculation is lossless for greedy decoding, chained drafts too
        assert "MTP acceptance" in mtp.err and "tokens/forward" in mtp.err


class Recorder(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return super().write(s)


def test_tokens_are_written_as_they_are_produced(engine):
    eng, tok = engine
    out = Recorder()
    g = stream(eng, tok.encode(PROMPT), SamplingParams(max_tokens=10, temperature=0, ignore_eos=True), out)
    assert out.getvalue() == g.text == greedy(engine, tok.encode(PROMPT), 10)
    assert len(out.writes) >= 5  # one piece per token or so, not the whole text at the end
    assert g.num_tokens == 10 and g.finish_reason == "length" and 0 < g.first_token_s <= g.total_s


def test_seeded_sampling_is_reproducible_and_sample_returns_prompt_plus_text(folder):
    a = sample(folder, PROMPT, 8, temperature=1.0, top_k=50, seed=3)
    assert a.startswith(PROMPT) and a == sample(folder, PROMPT, 8, temperature=1.0, top_k=50, seed=3)


def _greedy_chat(folder) -> list[str]:
    """`dsv3 generate --chat` answering greedily in 6 tokens."""
    return [
        "generate",
        "--checkpoint",
        str(folder),
        "--chat",
        "--max-tokens",
        "6",
        "--temperature",
        "0",
        *DTYPE,
    ]


def test_chat_keeps_the_conversation(folder, engine):
    _, tok = engine
    turns = ["hello", "and then?"]
    result = dsv3(*_greedy_chat(folder), "--system", "Be brief.", stdin="\n".join(turns) + "\n")
    assert result.returncode == 0, result.stderr
    answers = result.stdout.split("\n")[:-1]
    assert len(answers) == 2 and result.stderr.count("tokens/s") == 2 and result.stderr.count("user> ") == 3
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": turns[0]}]
    first = greedy(engine, tok.encode_chat(history), 6, tok.stop)
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": turns[1]}]
    second = greedy(engine, tok.encode_chat(history), 6, tok.stop)
    assert answers == [first, second]


def test_chat_reset_and_exit(folder, engine, monkeypatch, capsys):
    """--prompt is the first turn; /reset forgets it, so the next answer is a fresh conversation's."""
    _, tok = engine
    monkeypatch.setattr(sys, "stdin", io.StringIO("/reset\nand then?\n/exit\nnever read\n"))
    assert main([*_greedy_chat(folder), "--prompt", "hello"]) == 0
    out = capsys.readouterr()
    fresh = greedy(engine, tok.encode_chat([{"role": "user", "content": "and then?"}]), 6, tok.stop)
    assert out.out.split("\n")[:-1][1] == fresh and out.err.count("tokens/s") == 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--temperature", "-1"], "temperature=-1.0"),
        (["--top-p", "0"], "top_p=0.0"),
        (["--max-tokens", "0"], "max_tokens=0"),
        (["--max-tokens", "300"], "exceeds max_seq_len=256"),
        (["--tokenizer", "/no/such/tokenizer.json"], "does not exist"),
        (["--draft-vocab", "64"], "--draft-vocab 64 is for --mtp's drafts"),
        (["--mtp", "--draft-vocab", "0"], "draft_vocab=0: must be between 1 and vocab_size"),
        (["--mtp-drafts", "2"], "--mtp-drafts 2 is for --mtp's drafts"),
        (["--mtp", "--mtp-drafts", "0"], "mtp_drafts=0: must be an integer between 1 and 8"),
    ],
)
def test_bad_flags_exit_2_with_a_message(folder, capsys, extra, message):
    assert main(["generate", "--checkpoint", str(folder), "--prompt", "x", *extra]) == 2
    assert message in capsys.readouterr().err
