"""`dsv3 train` / `dsv3 generate` as a user runs them: train, stop, resume, sample; bad input exits 2."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from fixtures import MICRO

EMAIL_PACKAGE = str(Path(sysconfig.get_paths()["stdlib"]) / "email")  # ~25 real modules


def dsv3(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dsv3", *args], capture_output=True, text=True, timeout=300, check=False
    )


def train_args(tmp: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--out",
        str(tmp / "run"),
        "--data",
        EMAIL_PACKAGE,
        "--cache-dir",
        str(tmp / "cache"),
        "--model-overrides",
        json.dumps(MICRO),
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--steps",
        "6",
        "--lr",
        "3e-3",
        "--dtype",
        "float32",
        "--val-fraction",
        "0.2",
        "--eval-every",
        "3",
        "--eval-batches",
        "2",
        "--save-every",
        "3",
        "--log-every",
        "1",
        "--peak-tflops",
        "1",
        "--threads",
        "1",
        *extra,
    ]


def test_train_stop_resume_generate(tmp_path):
    first = dsv3(*train_args(tmp_path, "--stop-after", "3", "--no-report"))
    assert first.returncode == 0, first.stderr
    run = tmp_path / "run"
    assert (run / "checkpoints" / "latest").read_text() == "step_00000003"
    second = dsv3(*train_args(tmp_path, "--resume"))
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stdout and "done: step 6/6" in second.stdout
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert (run / "report.png").is_file() and (run / "hf" / "model.safetensors").is_file()
    gen = dsv3("generate", "--checkpoint", str(run), "--prompt", "import ", "--max-new-tokens", "8")
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith("import ") and len(gen.stdout.strip()) > len("import")


def test_hf_export_is_read_by_transformers(tmp_path):
    """The run's hf/ folder loads in transformers' DeepseekV3 with the same logits as dsv3's loader."""
    import torch
    from transformers import AutoModelForCausalLM

    from dsv3 import Transformer

    assert dsv3(*train_args(tmp_path, "--steps", "2", "--no-report")).returncode == 0
    folder = tmp_path / "run" / "hf"
    ours = Transformer.from_pretrained(folder).eval()
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    x = torch.randint(0, MICRO["vocab_size"], (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours(x).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lr", "-1"], "lr=-1.0"),
        (["--preset", "nope", "--model-overrides", "{}"], "unknown preset 'nope'"),
        (["--seq-len", "1000"], "max_position_embeddings=128"),
        (["--resume"], "no checkpoint"),
        (["--data", "/no/such/corpus"], "does not exist"),
    ],
)
def test_bad_options_exit_2_with_a_message(tmp_path, extra, message):
    result = dsv3(*train_args(tmp_path, *extra))
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()


def test_config_file_unknown_key_and_unknown_flag(tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"steps": 3, "warmup": 1}))
    result = dsv3(*train_args(tmp_path, "--config", str(config)))
    assert result.returncode == 2 and "unknown keys ['warmup']" in result.stderr
    result = dsv3(*train_args(tmp_path, "--learning-rate", "1"))
    assert result.returncode == 2 and "unrecognized arguments: --learning-rate" in result.stderr


def test_generate_without_a_model_fails_clearly(tmp_path):
    result = dsv3("generate", "--checkpoint", str(tmp_path), "--prompt", "x")
    assert result.returncode == 2 and "holds no model" in result.stderr
