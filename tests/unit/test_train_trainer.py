"""The training loop (dsv3.train.trainer): exact resume, balancing, metrics, and checks before work."""

from __future__ import annotations

import json

import pytest
import torch

from dsv3.errors import CheckpointError, ConfigError, DataError
from dsv3.model.block import Block
from dsv3.train.config import TrainConfig
from dsv3.train.metrics import read_metrics, write_report
from dsv3.train.trainer import Trainer
from fixtures import MICRO, micro_config, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    return write_corpus(root / "corpus"), root / "cache"


def losses(run) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl")]


def test_resume_continues_bitwise_exactly(corpus, tmp_path):
    data, cache = corpus
    full = Trainer(micro_config(tmp_path / "a", data, cache, steps=6))
    full.fit()
    part = Trainer(micro_config(tmp_path / "b", data, cache, steps=6, stop_after=3))
    part.fit()
    assert part.step == 3 and not (tmp_path / "b" / "run" / "hf").exists()
    resumed = Trainer(micro_config(tmp_path / "b", data, cache, steps=6, resume=True))
    resumed.fit()
    a, b = losses(tmp_path / "a" / "run"), losses(tmp_path / "b" / "run")
    assert [s for s, _ in a] == list(range(1, 7)) and a == b  # exact float equality, every step
    sa, sb = full.model.state_dict(), resumed.model.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert any("e_score_correction_bias" in k and sa[k].abs().sum() > 0 for k in sa), (
        "router biases never moved"
    )


def test_time_budget_stops_with_a_checkpoint_and_resumes(corpus, tmp_path):
    data, cache = corpus
    first = Trainer(micro_config(tmp_path, data, cache, steps=6, max_minutes=1e-9))
    first.fit()
    assert first.step == 1 and (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_00000001"
    resumed = Trainer(micro_config(tmp_path, data, cache, steps=6, resume=True))
    resumed.fit()
    assert resumed.step == 6 and [s for s, _ in losses(tmp_path / "run")] == list(range(1, 7))


def test_metrics_records_and_exports(corpus, tmp_path):
    data, cache = corpus
    trainer = Trainer(micro_config(tmp_path, data, cache, steps=4, eval_every=2, report=True))
    summary = trainer.fit()
    run = tmp_path / "run"
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert {
            "loss",
            "lr",
            "mtp_loss",
            "balance_loss",
            "grad_norm",
            "tokens_per_s",
            "mfu",
            "maxvio",
        } <= r.keys()
        assert len(r["expert_load"]) == len(r["maxvio_per_layer"]) == 2  # 1 MoE layer + 1 MTP block
        assert sum(r["expert_load"][0]) == 4 * 32 * 2  # batch x seq x top-k routed tokens
    assert "val_loss" in records[1] and "val_loss" not in records[2]
    assert (run / "report.png").stat().st_size > 10_000 and summary["report"] == str(run / "report.png")
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["train"]["optim"]["steps"] == 4 and saved["model"]["hidden_size"] == 64
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (run / "hf" / name).is_file()
    from dsv3 import Transformer

    reloaded = Transformer.from_pretrained(run / "hf")
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key


def test_tensorboard_mirrors_the_scalars(corpus, tmp_path):
    pytest.importorskip("tensorboard")  # an optional extra: dsv3[tensorboard]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data, cache = corpus
    Trainer(micro_config(tmp_path, data, cache, steps=3, tensorboard=True)).fit()
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]
    assert {"lr", "grad_norm", "maxvio", "val_loss"} <= set(events.Tags()["scalars"])


def test_bias_update_lowers_expert_load_violation_and_report_shows_both(corpus, tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    data, cache = corpus
    ungrouped = {**MICRO, "n_group": 1, "topk_group": 1}

    def final_maxvio(name: str, gamma: float) -> float:
        cfg = micro_config(
            tmp_path / name,
            data,
            cache,
            steps=60,
            batch_size=16,
            lr=1e-3,
            bias_gamma=gamma,
            eval_every=60,
            save_every=60,
            schedule="cosine",
            min_lr_ratio=1.0,
            model_overrides=ungrouped,
        )
        Trainer(cfg).fit()
        tail = read_metrics(tmp_path / name / "run" / "metrics.jsonl")[-10:]
        return sum(r["maxvio"] for r in tail) / len(tail)

    off, on = final_maxvio("off", 0.0), final_maxvio("on", 0.003)
    assert on < 0.6 * off, (on, off)
    # the balancing report (benchmarks/balance.py): the on-run with the off-run as baseline in one PNG
    on_log, off_log = (tmp_path / n / "run" / "metrics.jsonl" for n in ("on", "off"))
    single = write_report(on_log, tmp_path / "single.png")
    both = write_report(on_log, tmp_path / "both.png", baseline=off_log, label="on", baseline_label="off")
    (w1, h1), (w2, h2) = Image.open(single).size, Image.open(both).size
    assert w2 == w1 and h2 > 1.4 * h1, ((w1, h1), (w2, h2))  # a third row: losses, off-run load, MaxVio
    with pytest.raises(ValueError, match="no records"):
        write_report(on_log, tmp_path / "bad.png", baseline=tmp_path / "missing.jsonl")


def test_bad_options_fail_before_any_work(corpus, tmp_path):
    data, cache = corpus
    cases = [
        (dict(preset="huge"), ConfigError, "unknown preset"),
        (dict(lr=-1.0), ConfigError, "lr=-1.0"),
        (dict(seq_len=4096), ConfigError, "max_position_embeddings=128"),
        (dict(steps=0), ConfigError, "steps=0"),
        (dict(data=[str(tmp_path / "missing")]), DataError, "does not exist"),
        (dict(resume=True), CheckpointError, "no checkpoint"),
        (dict(model_overrides={"vocab_size": 100}), DataError, "vocab_size=100"),
    ]
    for overrides, error, message in cases:
        with pytest.raises(error, match=message):
            Trainer(micro_config(tmp_path, data, cache, **overrides))
    assert not (tmp_path / "run").exists()


def test_existing_run_needs_resume_and_config_file_rejects_unknown_keys(corpus, tmp_path):
    data, cache = corpus
    Trainer(micro_config(tmp_path, data, cache, steps=1)).fit()
    with pytest.raises(ConfigError, match="already holds a run"):
        Trainer(micro_config(tmp_path, data, cache, steps=2))
    bad = tmp_path / "run.json"
    bad.write_text(json.dumps({"steps": 5, "learning_rate": 1e-3}))
    with pytest.raises(ConfigError, match=r"unknown keys \['learning_rate'\]"):
        TrainConfig.from_file(bad)


def test_compile_is_chosen_by_the_runs_expected_length():
    """Unset, run.compile compiles a one-process run without FP8 expected to take
    COMPILE_AFTER_MINUTES or more (its FLOPs at EXPECTED_MFU of the measured GEMM rate); asked, as asked."""
    from dsv3.train.trainer import COMPILE_AFTER_MINUTES, EXPECTED_MFU, choose_compile, expected_minutes

    assert expected_minutes(100, 6e12, 1.0) == pytest.approx(100 * 6 / EXPECTED_MFU / 60)
    assert choose_compile(None, COMPILE_AFTER_MINUTES, parallel_or_fp8=False)[0]
    assert not choose_compile(None, 0.99 * COMPILE_AFTER_MINUTES, parallel_or_fp8=False)[0]
    assert not choose_compile(None, 1e6, parallel_or_fp8=True)[0]
    assert not choose_compile(None, 1e6, parallel_or_fp8=False, compilable=False)[0]
    assert choose_compile(True, 0.0, parallel_or_fp8=True) == (True, "on (asked)")
    assert choose_compile(False, 1e6, parallel_or_fp8=False) == (False, "off (asked)")
    assert choose_compile(False, 1e6, parallel_or_fp8=False, compilable=False) == (False, "off (asked)")
    with pytest.raises(ConfigError, match="run.compile=True: torch.compile cannot build code"):
        choose_compile(True, 0.0, parallel_or_fp8=False, compilable=False)


def test_a_compiled_run_trains_as_the_eager_one(corpus, tmp_path, monkeypatch):
    """--run.compile compiles every block (what a long run gets unasked) and the losses and
    validation losses stay the eager run's; a short run is left eager unless asked. Traced by
    Dynamo and AOTAutograd as in a real compile, run without Inductor's code generation (a
    minute on two cores, for what is torch's to test)."""
    data, cache = corpus
    compile_block = Block.compile
    monkeypatch.setattr(Block, "compile", lambda self: compile_block(self, backend="aot_eager"))
    monkeypatch.setattr("dsv3.train.trainer.can_compile", lambda device: True)  # aot_eager builds no code
    eager = Trainer(micro_config(tmp_path / "a", data, cache, steps=3))
    assert not eager.compile and eager.compile_reason.startswith("off (automatic")
    compiled = Trainer(micro_config(tmp_path / "b", data, cache, steps=3, compile=True))
    blocks = [m for m in compiled.model.modules() if isinstance(m, Block)]
    assert len(blocks) == 3 and all(b._compiled_call_impl is not None for b in blocks)  # 2 layers + MTP
    eager.fit(), compiled.fit()
    a, b = (read_metrics(tmp_path / run / "run" / "metrics.jsonl") for run in "ab")
    for key in ("loss", "mtp_loss", "val_loss"):
        got, want = [r[key] for r in b if key in r], [r[key] for r in a if key in r]
        assert len(got) == len(want) > 0 and got == pytest.approx(want, rel=1e-5), key
