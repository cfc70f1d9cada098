"""The training loop: configuration, checks before work, steps, evaluation, checkpoints, resume.

One optimizer step (`Trainer.train_step`):
    for each of grad_accum micro-batches:
        out  = model(input_ids, labels=labels)                   # under bf16 autocast unless fp32
        loss = out.loss + lambda * out.mtp_loss + out.balance_loss   (balance loss already has alpha)
        (loss / grad_accum).backward()
    clip the global gradient norm to 1.0; set the scheduled lr; AdamW step
    update_router_bias(model, gamma)   # auxiliary-loss-free balancing: b_i -= gamma * sign(load_i - mean)

Everything that decides the trajectory is seeded or saved: the model is initialized under the seed,
the loader's state, the optimizer state, router biases (buffers in the model's state dict) and the
RNG states are in every checkpoint, and lr / lambda / gamma are pure functions of the step. So
`--resume` continues exactly: on CPU in float32 the losses and weights are bitwise identical to an
uninterrupted run (tests/unit/test_train_trainer.py holds this).

`TrainConfig` holds every run option; `TrainConfig.validate` and `Trainer.__init__` reject bad input
(unknown preset, negative lr, seq_len beyond the model's positions, missing data, a tokenizer bigger
than the vocabulary, resume without a checkpoint) before any tokenizing or training starts.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsv3 import checkpoint as ckpt
from dsv3.config import ModelConfig
from dsv3.device import gemm_tflops
from dsv3.errors import ConfigError
from dsv3.tokenizer import TokenizerInfo, load_tokenizer
from dsv3.train.data import (
    Corpus,
    Loader,
    PackedTokens,
    build_token_cache,
    cached_tokenizer,
    unigram_entropy,
    validation_batches,
)  # fmt: skip
from dsv3.train.metrics import (
    MetricsLog,
    Progress,
    max_violation,
    write_report,
)  # fmt: skip
from dsv3.train.optim import Schedule, bias_gamma_at, build_optimizer, mtp_lambda_at

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
FP8_SCALES = ("pow2", "fp32", "ue8m0")  # dsv3.fp8.quant.ScaleFormat


def default_cache_dir() -> str:
    return os.environ.get("DSV3_CACHE", str(Path.home() / ".cache" / "dsv3"))


@dataclass
class TrainConfig:
    """Every option of a training run (CLI flags and config-file keys have these names)."""

    out: str = "runs/tiny"
    # model
    preset: str = "tiny"
    model_config: str | None = None  # a config.json (ours or HF's) instead of the preset
    model_overrides: dict[str, Any] = field(default_factory=dict)
    # data
    data: list[str] = field(default_factory=lambda: ["stdlib"])
    tokenizer: str | None = None  # a tokenizer.json; default: BPE trained on the corpus and cached
    cache_dir: str = field(default_factory=default_cache_dir)
    max_corpus_mb: float | None = None
    val_fraction: float = 0.01
    seq_len: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    # schedule and optimizer (V3R section 4.2)
    steps: int = 1000
    stop_after: int | None = None
    max_minutes: float | None = None  # also stop (with a checkpoint) after this much wall time
    lr: float = 2.2e-4
    schedule: str = "v3"
    warmup_steps: int | None = None  # default: min(2000, steps // 20)
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    bf16_moments: bool = False
    mtp_lambda: float = 0.3
    mtp_lambda_later: float = 0.1
    bias_gamma: float = 0.001
    # execution
    dtype: str = "bfloat16"
    device: str = "auto"
    compile: bool = False
    fp8: bool = False
    fp8_scales: str = "pow2"  # pow2 (fast exact CPU path, UE8M0-valued) | fp32 (the V3 paper's) | ue8m0
    threads: int | None = None
    seed: int = 0
    # parallelism under torchrun (train/distributed.py; world = pp x dp_replicate x dp_shard)
    dp_replicate: int = -1  # -1: automatic (1, or the ranks left after pp and an explicit dp_shard)
    dp_shard: int = -1  # -1: the ranks left after pp and dp_replicate
    ep: int = 1  # expert parallelism, carved from dp_shard
    pp: int = 1
    pp_schedule: str = "1f1b"
    pp_microbatches: int | None = None  # default: one per stage
    ranks_per_node: int | None = None  # node-limited routing: EP ranks per node
    fp8_dispatch: bool = False
    activation_checkpoint: bool = False
    # observability and checkpoints
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 500
    keep: int = 3
    tensorboard: bool = False
    report: bool = True
    peak_tflops: float | None = None  # default: measured with a GEMM at start
    resume: bool = False

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """Read a JSON (or .toml) run config; unknown keys are errors; `overrides` win."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        if path.suffix == ".toml":
            import tomllib

            values = tomllib.loads(path.read_text())
        else:
            values = json.loads(path.read_text())
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"{path}: unknown keys {unknown}; valid keys are {sorted(names)}")
        return cls(**{**values, **overrides})

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else max(1, min(2000, self.steps // 20))

    def validate(self) -> None:
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ConfigError(f"{name}={getattr(self, name)!r}: {rule}")

        for name in ("seq_len", "batch_size", "grad_accum", "steps", "log_every", "eval_every",
                     "eval_batches", "save_every", "keep"):  # fmt: skip
            value = getattr(self, name)
            need(
                isinstance(value, int) and not isinstance(value, bool) and value > 0,
                name,
                "must be a positive integer",
            )
        need(self.stop_after is None or self.stop_after > 0, "stop_after", "must be a positive integer")
        need(self.max_minutes is None or self.max_minutes > 0, "max_minutes", "must be > 0")
        need(self.lr > 0 and math.isfinite(self.lr), "lr", "must be a positive number")
        need(self.schedule in ("v3", "cosine"), "schedule", "must be 'v3' or 'cosine'")
        need(0 < self.warmup <= self.steps, "warmup_steps", f"must be in [1, steps={self.steps}]")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(0 <= self.beta1 < 1, "beta1", "must be in [0, 1)")
        need(0 <= self.beta2 < 1, "beta2", "must be in [0, 1)")
        need(self.grad_clip > 0, "grad_clip", "must be > 0")
        need(self.mtp_lambda >= 0 and self.mtp_lambda_later >= 0, "mtp_lambda", "MTP weights must be >= 0")
        need(self.bias_gamma >= 0, "bias_gamma", "must be >= 0")
        need(0 < self.val_fraction < 1, "val_fraction", "must be in (0, 1)")
        need(self.max_corpus_mb is None or self.max_corpus_mb > 0, "max_corpus_mb", "must be > 0")
        need(self.dtype in DTYPES, "dtype", f"must be one of {sorted(DTYPES)}")
        need(
            self.device in ("auto", "cpu") or self.device.startswith("cuda"),
            "device",
            "must be auto, cpu or cuda[:N]",
        )
        need(self.threads is None or self.threads > 0, "threads", "must be a positive integer")
        need(self.fp8_scales in FP8_SCALES, "fp8_scales", f"must be one of {list(FP8_SCALES)}")
        for name in ("dp_replicate", "dp_shard"):
            need(getattr(self, name) in (-1,) or getattr(self, name) > 0, name, "must be > 0 or -1 (auto)")
        for name in ("ep", "pp"):
            need(getattr(self, name) > 0, name, "must be a positive integer")
        need(self.pp_schedule in ("1f1b", "dualpipev"), "pp_schedule", "must be '1f1b' or 'dualpipev'")
        need(self.pp_microbatches is None or self.pp_microbatches > 0, "pp_microbatches", "must be > 0")
        need(self.ranks_per_node is None or self.ranks_per_node > 0, "ranks_per_node", "must be > 0")
        need(bool(self.data), "data", "needs at least one source")
        if self.device.startswith("cuda"):
            need(torch.cuda.is_available(), "device", "CUDA is not available on this machine")
        for enabled, name, module in (
            (self.fp8, "fp8", "dsv3.fp8.linear"),
            (self.tensorboard, "tensorboard", "tensorboard"),
        ):
            if enabled and importlib.util.find_spec(module) is None:
                raise ConfigError(f"{name}=True: the module {module} is not installed")

    def model_cfg(self) -> ModelConfig:
        if self.model_config is not None:
            base = ModelConfig.from_hf(self.model_config).to_dict()
            return ModelConfig.from_dict({**base, **self.model_overrides})
        return ModelConfig.from_preset(self.preset, **self.model_overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Options that may change between a run and its resumption without changing the trajectory.
RUN_CONTROL = {"out", "resume", "stop_after", "max_minutes", "log_every", "eval_every", "eval_batches", "save_every",
               "keep", "tensorboard", "report", "peak_tflops", "threads", "cache_dir",
               "dp_replicate", "dp_shard", "ep", "pp", "pp_schedule", "pp_microbatches", "ranks_per_node",
               "activation_checkpoint"}  # fmt: skip


class Trainer:
    """Builds everything a run needs from a TrainConfig (checking it first), then `fit()`s."""

    is_main = True  # the rank that writes metrics, progress and report (train/distributed.py)

    def __init__(self, cfg: TrainConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self.model_cfg = cfg.model_cfg()
        if cfg.seq_len > self.model_cfg.max_position_embeddings:
            raise ConfigError(
                f"seq_len={cfg.seq_len}: beyond the model's max_position_embeddings="
                f"{self.model_cfg.max_position_embeddings}"
            )
        self.out = Path(cfg.out)
        self.ckpt_root = self.out / "checkpoints"
        self.resume_from = self._checkpoint_to_resume()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                                   "cpu" if cfg.device == "auto" else cfg.device)  # fmt: skip
        self.dtype = DTYPES[cfg.dtype]
        corpus = Corpus(cfg.data, None if cfg.max_corpus_mb is None else int(cfg.max_corpus_mb * 1e6))
        self.tokenizer_path = self._tokenizer_path(corpus)
        self.tok = load_tokenizer(self.tokenizer_path, self.model_cfg.vocab_size)
        self.model_cfg = dataclasses.replace(
            self.model_cfg, bos_token_id=self.tok.bos_id, eos_token_id=self.tok.eos_id
        )
        self._build_data(corpus, self.tok)
        self._build_model()

    # ------------------------------------------------------------------------ construction steps
    def _checkpoint_to_resume(self) -> Path | None:
        if self.cfg.resume:
            found = ckpt.latest_checkpoint(self.ckpt_root)
            if found is None:
                raise ckpt.CheckpointError(f"--resume: no checkpoint under {self.ckpt_root}")
            return found
        if (self.ckpt_root / ckpt.LATEST).exists():
            raise ConfigError(
                f"out={self.cfg.out!r} already holds a run; pass --resume or choose a new --out"
            )
        return None

    def _tokenizer_path(self, corpus: Corpus) -> Path:
        if self.cfg.tokenizer is not None:
            return Path(self.cfg.tokenizer)
        if self.resume_from is not None:
            return self.resume_from / "tokenizer.json"
        return cached_tokenizer(corpus, self.model_cfg.vocab_size, Path(self.cfg.cache_dir))

    def _build_data(self, corpus: Corpus, tok: TokenizerInfo) -> None:
        cache = build_token_cache(corpus, tok, self.cfg.val_fraction, Path(self.cfg.cache_dir))
        self.train_data = PackedTokens(cache.tokens("train"), self.cfg.seq_len, tok.eos_id, "train")
        self.val_data = PackedTokens(cache.tokens("val"), self.cfg.seq_len, tok.eos_id, "validation")
        self.loader = Loader(self.train_data, self.cfg.batch_size, self.cfg.seed)
        self.unigram_loss = unigram_entropy(cache.tokens("train"), tok.vocab_size)

    def _build_model(self) -> None:
        from dsv3.model.transformer import Transformer

        torch.manual_seed(self.cfg.seed)
        self.model = Transformer(self.model_cfg).to(self.device)
        if self.cfg.fp8:
            from dsv3.fp8.linear import convert_to_fp8

            convert_to_fp8(self.model, fmt=self.cfg.fp8_scales)
        self.forward = torch.compile(self.model) if self.cfg.compile else self.model
        self.optimizer = build_optimizer(
            self.model, self.cfg.lr, (self.cfg.beta1, self.cfg.beta2), self.cfg.weight_decay,
            bf16_moments=self.cfg.bf16_moments,
        )  # fmt: skip
        self.schedule = Schedule(
            self.cfg.lr, self.cfg.steps, self.cfg.warmup, self.cfg.schedule, self.cfg.min_lr_ratio
        )
        self.step = 0

    # ---------------------------------------------------------------------------------- training
    def train_step(self) -> dict[str, Any]:
        """One optimizer step over grad_accum micro-batches; returns its metrics."""
        from dsv3.model.moe import update_router_bias

        cfg, step = self.cfg, self.step
        lam = mtp_lambda_at(step, cfg.steps, cfg.mtp_lambda, cfg.mtp_lambda_later)
        sums = {"loss": 0.0, "mtp_loss": 0.0, "balance_loss": 0.0}
        self.model.train()
        for _ in range(cfg.grad_accum):
            x, y = (t.to(self.device) for t in self.loader.next_batch())
            with self._autocast():
                out = self.forward(x, labels=y)
            total = out.loss
            for key, weight in (("mtp_loss", lam), ("balance_loss", 1.0)):
                part = getattr(out, key)
                if part is not None:
                    total = total + weight * part
                    sums[key] += part.item() / cfg.grad_accum
            (total / cfg.grad_accum).backward()
            sums["loss"] += out.loss.item() / cfg.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        lr = self.schedule.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loads = update_router_bias(self.model, bias_gamma_at(step, cfg.steps, cfg.bias_gamma))
        load = torch.stack(list(loads.values())) if loads else torch.zeros(0)
        self.step += 1
        return {"step": self.step, **sums, "lr": lr, "grad_norm": grad_norm.item(), "mtp_lambda": lam,
                "expert_load": load.cpu()}  # fmt: skip

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean next-token loss over the fixed validation batches (not counted as expert load)."""
        from dsv3.model.moe import update_router_bias

        self.model.eval()
        losses = []
        for x, y in validation_batches(self.val_data, self.cfg.batch_size, self.cfg.eval_batches):
            with self._autocast():
                losses.append(self.forward(x.to(self.device), labels=y.to(self.device)).loss.item())
        update_router_bias(self.model, 0.0)  # drop the evaluation tokens from the expert-load counts
        return sum(losses) / len(losses)

    def fit(self) -> dict[str, Any]:
        """Train to `steps` (or `stop_after` more steps, or `max_minutes`), logging, evaluating and
        checkpointing; the report is drawn at the end of every invocation, the HF export at the end
        of the schedule."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        if self.resume_from is not None:
            self.load(self.resume_from)
        elif self.is_main:
            shutil.copyfile(self.tokenizer_path, self.out / "tokenizer.json")
        if self.is_main:
            (self.out / "train_config.json").write_text(json.dumps(self.resolved_config(), indent=2) + "\n")
        end = cfg.steps if cfg.stop_after is None else min(cfg.steps, self.step + cfg.stop_after)
        log = MetricsLog(self.out / "metrics.jsonl", self.step if self.resume_from else None,
                         self.out / "tensorboard" if cfg.tensorboard else None) if self.is_main else None  # fmt: skip
        tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
        flops_per_step = self.model.training_flops_per_token(cfg.seq_len) * tokens_per_step
        peak = 1e12 * (
            cfg.peak_tflops or gemm_tflops(str(self.dtype).removeprefix("torch."), device=self.device.type)
        )
        progress = Progress(cfg.steps, self.step, live=None if self.is_main else False)
        summary: dict[str, Any] = {"start_step": self.step, "unigram_loss": self.unigram_loss}
        window_seconds, window_steps = 0.0, 0  # training time only: evaluation and saving excluded
        deadline = time.monotonic() + 60 * cfg.max_minutes if cfg.max_minutes else math.inf
        try:
            while self.step < end:
                step_start = time.perf_counter()
                record = self.train_step()
                window_seconds += time.perf_counter() - step_start
                window_steps += 1
                last = self.step == end or self._past(deadline)
                evaluate = self.step % cfg.eval_every == 0 or last
                if evaluate:
                    record["val_loss"] = self.evaluate()
                    record["unigram_loss"] = self.unigram_loss
                logged = self.step % cfg.log_every == 0 or evaluate or self.step == 1
                if logged:
                    record["tokens_per_s"] = tokens_per_step * window_steps / window_seconds
                    record["mfu"] = flops_per_step * window_steps / window_seconds / peak
                    window_seconds, window_steps = 0.0, 0
                    record = self._loggable(record)
                    if log is not None:
                        log.log(record)
                    summary.setdefault("first", record)
                    summary["last"] = record
                if self.is_main:
                    progress.update(self.step, _progress_info(record) if logged else "", logged)
                if self.step % cfg.save_every == 0 or last:
                    self.save()
                if last:
                    break
        finally:
            progress.close()
            if log is not None:
                log.close()
        if self.step == cfg.steps:
            self.export_hf(self.out / "hf")
        if cfg.report and summary.get("last") and self.is_main:
            summary["report"] = str(self._report())
        return summary

    def _past(self, deadline: float) -> bool:
        return time.monotonic() > deadline

    def _loggable(self, record: dict[str, Any]) -> dict[str, Any]:
        load = record.pop("expert_load")
        if load.numel():
            vio = max_violation(load)
            record.update(maxvio=sum(vio) / len(vio), maxvio_per_layer=vio, expert_load=load.tolist())
        return record

    def _report(self) -> Path:
        try:
            return write_report(
                self.out / "metrics.jsonl", self.out / "report.png", title=f"dsv3 {self.cfg.out}"
            )
        except ImportError:
            print("matplotlib is not installed: skipping report.png (pip install 'dsv3[plots]')")
            return Path()

    def resolved_config(self) -> dict[str, Any]:
        return {"train": self.cfg.to_dict(), "model": self.model_cfg.to_dict()}

    # ----------------------------------------------------------------------------- checkpointing
    def save(self) -> Path:
        return ckpt.save_checkpoint(self.ckpt_root, self.step, self._write_checkpoint, self.cfg.keep)

    def _write_checkpoint(self, folder: Path) -> None:
        self._write_hf(folder)
        torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(
            {"step": self.step, "loader": self.loader.state_dict(), "rng": rng}, folder / "trainer_state.pt"
        )
        (folder / "train_config.json").write_text(json.dumps(self.resolved_config(), indent=2) + "\n")

    def _write_hf(self, folder: Path) -> None:
        from dsv3.hf import write_pretrained

        write_pretrained(self.model, folder)
        shutil.copyfile(self.tokenizer_path, folder / "tokenizer.json")

    def export_hf(self, folder: Path) -> None:
        """A Hugging Face-layout folder (config.json, model.safetensors, tokenizer.json)."""
        ckpt.write_folder_atomically(folder, self._write_hf)

    def load(self, folder: Path) -> None:
        """Restore model, optimizer, loader, step and RNG states from a verified checkpoint."""
        from dsv3.model.transformer import Transformer

        ckpt.verify_checkpoint(folder)
        self._warn_config_changes(json.loads((folder / "train_config.json").read_text())["train"])
        saved = Transformer.from_pretrained(folder)
        self.model.load_state_dict(saved.state_dict())
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location=self.device))
        state = torch.load(folder / "trainer_state.pt")
        self.step = state["step"]
        self.loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        print(f"resumed from {folder} at step {self.step}", flush=True)

    def _warn_config_changes(self, saved: dict[str, Any]) -> None:
        now = self.cfg.to_dict()
        changed = sorted(k for k in now if k not in RUN_CONTROL and now[k] != saved.get(k))
        for key in changed:
            print(f"warning: {key} changed since the checkpoint ({saved.get(key)!r} -> {now[key]!r}); "
                  "the resumed run will differ from an uninterrupted one")  # fmt: skip


def _progress_info(record: dict[str, Any]) -> str:
    parts = [f"loss {record['loss']:.3f}"]
    if "val_loss" in record:
        parts.append(f"val {record['val_loss']:.3f}")
    parts += [
        f"lr {record['lr']:.2e}",
        f"{record['tokens_per_s']:,.0f} tok/s",
        f"MFU {100 * record['mfu']:.1f}%",
    ]
    if "maxvio" in record:
        parts.append(f"MaxVio {record['maxvio']:.2f}")
    return "  ".join(parts)
