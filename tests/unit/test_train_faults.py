"""What goes wrong around a training run, and what dsv3 does about it: pruned, corrupt and interrupted
checkpoints, a full disk, paths that hide an existing run, NaN steps, and bad input anywhere, which
is always a one-line error (exit 2) before any work."""

from __future__ import annotations

import errno
import json
import math
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dsv3.checkpoint import LATEST, step_name
from dsv3.cli import main
from dsv3.errors import CheckpointError, ConfigError
from dsv3.train.config import TrainConfig
from dsv3.train.faults import NonFiniteError
from dsv3.train.metrics import read_metrics
from dsv3.train.trainer import Trainer
from fixtures import micro_config, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    return write_corpus(root / "corpus", n_docs=20), root / "cache"


def run(tmp: Path, corpus, **overrides) -> Trainer:
    data, cache = corpus
    trainer = Trainer(micro_config(tmp, data, cache, **overrides))
    trainer.fit()
    return trainer


def test_resume_after_the_resumed_from_checkpoint_was_pruned(corpus, tmp_path):
    """keep=1 deletes the checkpoint a resumed run started from: the run's own tokenizer copy serves."""
    run(tmp_path, corpus, steps=6, save_every=1, keep=1, stop_after=2)
    resumed = run(tmp_path, corpus, steps=6, save_every=1, keep=1, resume=True)
    assert resumed.step == 6
    assert (tmp_path / "run" / "hf" / "tokenizer.json").is_file()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [LATEST, step_name(6)]


def test_corrupt_latest_checkpoint_falls_back_to_the_newest_intact_one(corpus, tmp_path, capsys):
    run(tmp_path, corpus, steps=6, save_every=1, keep=3, stop_after=4)
    ckpts = tmp_path / "run" / "checkpoints"
    with open(ckpts / step_name(4) / "model.safetensors", "r+b") as f:  # a flipped byte
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    (ckpts / step_name(3) / "manifest.json").write_text("[1, 2]")  # a manifest that is a JSON list
    resumed = run(tmp_path, corpus, steps=6, save_every=1, keep=3, resume=True)
    out = capsys.readouterr().out
    assert "model.safetensors is corrupt" in out and "manifest.json is corrupt" in out
    assert f"Falling back to {ckpts / step_name(2)}" in out and resumed.step == 6
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == list(range(1, 7))


def test_unreadable_latest_pointer_falls_back(corpus, tmp_path, capsys):
    run(tmp_path, corpus, steps=4, save_every=1, stop_after=2)
    (tmp_path / "run" / "checkpoints" / LATEST).write_bytes(b"\xff\xfe")
    resumed = run(tmp_path, corpus, steps=4, save_every=1, resume=True)
    assert "latest is unreadable" in capsys.readouterr().out and resumed.step == 4


def test_no_intact_checkpoint_is_one_clear_error(corpus, tmp_path):
    run(tmp_path, corpus, steps=4, save_every=2, keep=1, stop_after=2)
    (tmp_path / "run" / "checkpoints" / step_name(2) / "trainer_state.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="no intact checkpoint .* trainer_state.pt is corrupt"):
        Trainer(micro_config(tmp_path, *corpus, steps=4, resume=True))


def test_disk_full_is_named_and_the_previous_checkpoint_survives(corpus, tmp_path, monkeypatch):
    data, cache = corpus
    trainer = Trainer(micro_config(tmp_path, data, cache, steps=4, save_every=1))
    trainer.train_step()
    first = trainer.save()
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.pt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    trainer.train_step()
    with pytest.raises(
        CheckpointError, match=r"no space left on .*checkpoints: needs ~\d+ MB, [\d,]+ MB free"
    ):
        trainer.save()
    monkeypatch.undo()
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / LATEST).read_text() == first.name and not list(ckpts.glob(".tmp-*"))
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12, 1000))
    with pytest.raises(CheckpointError, match="no space left"):  # refused before writing anything
        trainer.save()
    assert sorted(p.name for p in ckpts.iterdir()) == [LATEST, first.name]


def test_out_path_through_a_missing_folder_still_finds_the_existing_run(corpus, tmp_path):
    run(tmp_path, corpus, steps=1)
    sneaky = tmp_path / "missing_dir" / ".." / "run"  # == tmp_path / "run", spelled another way
    with pytest.raises(ConfigError, match="already holds a run"):
        Trainer(micro_config(tmp_path, *corpus, steps=2).updated({"out": str(sneaky)}))


def test_leftovers_of_killed_saves_are_removed(corpus, tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    dead = 2**22 + 12345  # beyond pid_max: no such process
    for leftover in (ckpts / f".tmp-{step_name(5)}-{dead}", tmp_path / "run" / f".tmp-hf-{dead}"):
        leftover.mkdir(parents=True)
    run(tmp_path, corpus, steps=2, save_every=1)
    assert not list(ckpts.glob(".tmp-*")) and not list((tmp_path / "run").glob(".tmp-*"))


@pytest.mark.parametrize("policy", ["stop", "skip", "rollback"])
def test_a_nan_loss_follows_the_policy(corpus, tmp_path, policy):
    """A NaN injected into the forward at step 4 (after the checkpoint of step 3)."""
    data, cache = corpus
    trainer = Trainer(micro_config(tmp_path, data, cache, steps=6, save_every=3, on_nonfinite=policy))
    model, calls = trainer.model, {"n": 0}

    def poison(module, args, output):
        calls["n"] += module.training  # training forwards only (evaluation runs forwards too)
        if module.training and calls["n"] == 4:
            return output.__class__(**{**output.__dict__, "loss": output.loss * float("nan")})
        return output

    model.register_forward_hook(poison)
    if policy == "stop":
        with pytest.raises(NonFiniteError, match="step 4: loss=nan is not finite"):
            trainer.fit()
        return
    before = {k: v.clone() for k, v in model.state_dict().items()}
    summary = trainer.fit()
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert trainer.step == 6 and math.isfinite(summary["last"]["loss"])
    if policy == "skip":
        assert [r.get("nonfinite") for r in records][3] == "loss=nan"
    else:  # rolled back to step 3, then steps 4-6 on the batches after the poisoned one
        assert [r["step"] for r in records] == list(range(1, 7)) and "nonfinite" not in str(records)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_nonfinite_gradient_names_the_parameter(corpus, tmp_path):
    data, cache = corpus
    trainer = Trainer(micro_config(tmp_path, data, cache, steps=2))
    head = trainer.model.lm_head.weight
    head.register_hook(lambda g: g * float("inf"))
    with pytest.raises(NonFiniteError, match="the gradient of lm_head.weight"):
        trainer.fit()


# ------------------------------------------------------------------------- one-line errors
def bad_input_cases(tmp: Path) -> list[tuple[list[str], str]]:
    garbage = tmp / "garbage.toml"
    garbage.write_text("lr = = 3\n[optim\n")
    fast = tmp / "fast.json"
    fast.write_text(json.dumps({"lr": "fast"}))
    array = tmp / "config.json"
    array.write_text("[1, 2]")
    a_file = tmp / "a_file"
    a_file.write_text("x")
    return [
        (["--config", str(garbage)], "garbage.toml is not valid TOML"),
        (["--config", str(fast)], "optim.lr='fast': must be a number"),
        (["--model-overrides", "[1]"], "must be a JSON object"),
        (["--model-config", str(array)], "config.json"),
        (["--out", str(a_file)], "is a file; give a folder"),
        (["--optim.lr", "-1"], "optim.lr=-1.0: must be a positive number"),
        (["--run.dtype", "float16"], "invalid choice: 'float16'"),
    ]


def test_train_bad_input_is_one_line_and_exit_2(corpus, tmp_path, capsys):
    data, cache = corpus
    base = ["train", "--data", str(data), "--cache-dir", str(cache), "--out", str(tmp_path / "run")]
    for extra, message in bad_input_cases(tmp_path):
        with (
            pytest.raises(SystemExit)
            if "invalid choice" in message or "JSON object" in message
            else _nothing()
        ):
            assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (extra, err)
    assert not (tmp_path / "run").exists()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_generate_on_a_truncated_checkpoint_is_one_line(corpus, tmp_path, capsys):
    run(tmp_path, corpus, steps=1)
    weights = tmp_path / "run" / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert main(["generate", "--checkpoint", str(tmp_path / "run" / "hf"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "Traceback" not in err


def test_dotted_flags_toml_sections_and_legacy_aliases_agree(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('out = "runs/x"\nlr = 1e-3\n[optim]\nsteps = 7\n[parallel]\nep = 2\n')
    cfg = TrainConfig.from_file(toml, {"run.seed": 5, "batch_size": 16})
    assert (cfg.out, cfg.optim.lr, cfg.optim.steps, cfg.parallel.ep) == ("runs/x", 1e-3, 7, 2)
    assert (cfg.run.seed, cfg.data.batch_size) == (5, 16)
    assert TrainConfig.from_dict({"optim.lr": 2e-3}).optim.lr == TrainConfig.from_dict({"lr": 2e-3}).optim.lr


# ------------------------------------------------------------------------- kill at random moments
def test_sigkill_at_random_moments_resumes_to_the_uninterrupted_result(corpus, tmp_path):
    """`dsv3 train` killed (SIGKILL) at random times, including inside a save, then resumed: the
    final losses equal an uninterrupted run's, bit for bit."""
    data, cache = corpus
    reference = micro_config(tmp_path / "ref", data, cache)
    flags = (
        "--seq-len 32 --batch-size 4 --steps 40 --lr 3e-3 --dtype float32 --val-fraction 0.1 --eval-every 10"
    )
    flags += " --eval-batches 2 --save-every 1 --log-every 1 --peak-tflops 1 --threads 1 --no-report"
    overrides = json.dumps(reference.model.overrides)
    args = ["--data", str(data), "--cache-dir", str(cache), "--model-overrides", overrides, *flags.split()]
    started = time.monotonic()
    ref = subprocess.run(
        [sys.executable, "-m", "dsv3", "train", "--out", str(tmp_path / "ref"), *args],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "done: step 40/40" in ref.stdout
    step_s = (time.monotonic() - started) / 40  # an upper bound of one step with its save
    out = tmp_path / "killed"
    rng, kills = random.Random(0), 0

    def command():  # resume once a checkpoint exists
        resume = ["--resume"] if (out / "checkpoints" / LATEST).exists() else []
        return [sys.executable, "-m", "dsv3", "train", "--out", str(out), *args, *resume]

    for _ in range(6):  # each kill: a random time into the step after a random step's log line
        proc = subprocess.Popen(command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        target, output = rng.randint(1, 39), []
        for line in proc.stdout:  # counted in steps, not seconds: however loaded the machine is
            output.append(line)
            if line.startswith("step ") and int(line.split()[1].split("/")[0]) >= target:
                break
        time.sleep(rng.uniform(0, 1.5) * step_s)
        proc.send_signal(signal.SIGKILL)
        if "done: step 40/40" in "".join(output) + proc.communicate()[0]:
            break
        kills += 1
    else:
        subprocess.run(command(), check=True, capture_output=True)
    assert kills >= 1, "no kill landed before the end"
    want = [
        (r["step"], r["loss"], r.get("val_loss")) for r in read_metrics(tmp_path / "ref" / "metrics.jsonl")
    ]
    got = [(r["step"], r["loss"], r.get("val_loss")) for r in read_metrics(out / "metrics.jsonl")]
    assert got == want
