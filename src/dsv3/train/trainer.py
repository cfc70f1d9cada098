"""The training loop, one for every layout: a single process is the world of size 1.

    trainer = Trainer(TrainConfig(...))     # checks everything before any work
    summary = trainer.fit()

The same code runs `dsv3 train` in one process and under torchrun with data (FSDP2 / HSDP),
expert and pipeline parallelism (parallel/parallelize.py applies them to a model built on `meta`;
with every dimension 1 it applies nothing). One optimizer step (`train_step`):

    for each of grad_accum micro-batches:
        every dp rank reads its rows of the same global batch (the Loader draws the batch of one
        process; `RankSlice` keeps this rank's contiguous rows; pp ranks of a dp group read the same)
        forward + backward of this rank's exact share of the single-process objective
            L = CE + lambda * MTP + balance    (parallel/objective.py; a pipeline schedule runs the
            microbatches and its last stage computes the losses)
    clip the global gradient norm (squares of the local shards summed over ranks, replicas once)
    AdamW step at the scheduled learning rate
    balance the experts: sum the routers' expert loads over the dp ranks, then move every router's
        selection bias b_i by gamma against its load (auxiliary-loss-free balancing, V3R eq. 16)

So losses and weights match one process up to float rounding whatever the layout (the
distributed tests hold 1, 2 and 4 processes to 1e-5), and in one process in float32 a resumed run
is bitwise identical to an uninterrupted one: the weights are initialized under the seed, the
loader state, optimizer state, router biases and RNG states are in every checkpoint, and lr /
lambda / gamma are pure functions of the step.

Only rank 0 writes metrics.jsonl, the progress bar and the report; rank 0 decides what all ranks
must agree on (the checkpoint to resume, the tokenizer, when the wall-clock budget is spent).
Checkpoints: parallel/checkpoint.py writes the whole model in the Hugging Face layout when one
process holds it, and DCP shards otherwise; either loads into any layout that can read it.

Failures (train/faults.py): a NaN or Inf loss or gradient stops the run, skips the step, or
rolls back to the last checkpoint (`--on-nonfinite`), naming the step and the tensor; with
`--sdc-check-every N` the data-parallel replicas compare checksums of their weights every N steps
and name a rank that disagrees (silent data corruption).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from dsv3 import checkpoint as ckpt
from dsv3.device import COMPILE_NEEDS, can_compile, choose_dtype, format_mfu, gemm_shapes, resolve_device
from dsv3.errors import CheckpointError, ConfigError
from dsv3.model.moe import update_router_bias
from dsv3.parallel.mesh import build_mesh
from dsv3.parallel.world import World
from dsv3.tokenizer import load_tokenizer
from dsv3.train.config import TrainConfig
from dsv3.train.data import Corpus, build_token_cache, cached_tokenizer
from dsv3.train.faults import NonFiniteError, check_replicas, inject_faults, nonfinite
from dsv3.train.metrics import MetricsLog, Progress, max_violation, write_report
from dsv3.train.optim import Schedule, bias_gamma_at, build_optimizer, mtp_lambda_at
from dsv3.train.packing import Batch, Loader, PackedTokens, unigram_entropy, validation_batches
from dsv3.train.sft import chat_template_for

# torch.compile of each block (run.compile): on two CPU cores in BF16, 1,020 -> 1,160 tok/s on the
# small preset (+14%) and 5,800 -> 7,250 on tiny (+25%), for ~70 s of compiling the first time
# (~8 s once Inductor's on-disk cache holds the graphs). It repays itself after ~10 minutes of
# small's eager training and ~6 of tiny's: unset, it is on for runs expected to last this long.
COMPILE_AFTER_MINUTES = 15
EXPECTED_MFU = 0.5  # of the measured GEMM rate, for the expected length of a run (an eager CPU step)


def expected_minutes(steps: int, flops_per_step: float, peak_tflops: float) -> float:
    """A run's expected wall time: its training FLOPs at EXPECTED_MFU of the GEMM rate."""
    return steps * flops_per_step / (EXPECTED_MFU * peak_tflops * 1e12) / 60


def choose_compile(
    asked: bool | None, minutes: float, parallel_or_fp8: bool, compilable: bool = True
) -> tuple[bool, str]:
    """Whether to torch.compile each block, and why: as asked (`run.compile`; asked where
    torch.compile cannot build code, a ConfigError); unset, where it can (`compilable`), in one
    process without FP8, for a run expected to take `minutes` >= COMPILE_AFTER_MINUTES."""
    if asked and not compilable:
        raise ConfigError(
            f"run.compile=True: torch.compile cannot build code on this machine ({COMPILE_NEEDS}); "
            "drop --run.compile (unset, training compiles only where it can)"
        )
    if asked is not None:
        return asked, "on (asked)" if asked else "off (asked)"
    if not compilable:
        return False, "off (automatic: torch.compile cannot build code here: no C++ compiler, or no Triton)"
    if parallel_or_fp8:
        return False, "off (automatic: not with parallelism or FP8 unless asked, --run.compile)"
    on = minutes >= COMPILE_AFTER_MINUTES
    return on, (
        f"{'on' if on else 'off'} (automatic: the run is expected to take ~{minutes:,.0f} min, "
        f"compiling repays itself from ~{COMPILE_AFTER_MINUTES})"
    )


class Trainer:
    """Builds everything a run needs from a TrainConfig (checking it first), then `fit()`s."""

    def __init__(self, cfg: TrainConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self.model_config = cfg.model.build()
        if cfg.data.seq_len > self.model_config.max_position_embeddings:
            raise ConfigError(
                f"data.seq_len={cfg.data.seq_len}: beyond the model's max_position_embeddings="
                f"{self.model_config.max_position_embeddings}"
            )
        self.dims = self._parallel_dims(World.expected_size())
        self.world = World.join(resolve_device(cfg.run.device))
        self.device = self.world.device
        self.is_main = self.world.is_main
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        self.out = Path(cfg.out).resolve()
        self.ckpt_root = self.out / "checkpoints"
        if self.world.restart_count and not cfg.checkpoint.resume and (self.ckpt_root / ckpt.LATEST).exists():
            cfg.checkpoint.resume = True  # a job restarted by torchrun continues from its last checkpoint
            self._print("restarted by torchrun: resuming from the latest checkpoint")
        self.resume_from = self.world.on_rank0(self._checkpoint_to_resume)
        self.mesh = build_mesh(self.dims, self.device.type)
        self.dp_rank = self.mesh["dp"].get_local_rank()
        self.dtype_choice = choose_dtype(
            cfg.run.dtype,
            gemm_shapes(self.model_config, cfg.data.batch_size * cfg.data.seq_len),
            self.device,
            cfg.data.cache_dir,
        )
        self.dtype = self.dtype_choice.dtype
        corpus = Corpus(
            cfg.data.sources,
            None if cfg.data.max_corpus_mb is None else int(cfg.data.max_corpus_mb * 1e6),
            text_field=cfg.data.text_field,
        )
        self.tokenizer_path = self.world.on_rank0(self._tokenizer_path, corpus, then_others=True)
        self.tok = load_tokenizer(self.tokenizer_path, self.model_config.vocab_size)
        self.model_config = dataclasses.replace(
            self.model_config, bos_token_id=self.tok.bos_id, eos_token_id=self.tok.eos_id
        )
        self.world.on_rank0(self._build_data, corpus, then_others=True)
        self.loader = Loader(
            self.train_data, cfg.data.batch_size, cfg.run.seed, rank=self.dp_rank, ranks=self.dims.dp
        )
        self._build_model()

    # ------------------------------------------------------------------------ construction steps
    def _parallel_dims(self, world_size: int):
        from dsv3.parallel.mesh import ParallelDims

        cfg = self.cfg
        try:  # bad layouts fail here, before any work
            dims = cfg.parallel.resolve(world_size)
            dims.validate(self.model_config, cfg.data.batch_size)
        except ConfigError as e:
            if "WORLD_SIZE" not in os.environ:
                raise ConfigError(
                    f"{e} (one process: launch with `torchrun --nproc-per-node N -m dsv3 train ...`)"
                ) from None
            raise
        if cfg.run.fp8 and dims.world_size > 1:
            raise ConfigError(
                "run.fp8=True (FP8 linears) is not supported with parallelism yet; use "
                "--fp8-dispatch for FP8 expert-parallel dispatch"
            )
        if cfg.parallel.fp8_dispatch and dims.ep == 1:
            raise ConfigError("parallel.fp8_dispatch=True needs expert parallelism (--ep > 1)")
        if cfg.parallel.ep_overlap and dims.ep == 1:
            raise ConfigError("parallel.ep_overlap=True needs expert parallelism (--ep > 1)")
        return ParallelDims(**{f.name: getattr(dims, f.name) for f in dataclasses.fields(ParallelDims)})

    def _checkpoint_to_resume(self) -> Path | None:
        if self.cfg.checkpoint.resume:
            found = ckpt.latest_checkpoint(self.ckpt_root)
            if found is None:
                raise CheckpointError(f"--resume: no checkpoint under {self.ckpt_root}")
            return found
        if (self.ckpt_root / ckpt.LATEST).exists():
            raise ConfigError(
                f"out={self.cfg.out!r} ({self.out}) already holds a run; pass --resume or choose a new --out"
            )
        return None

    def _tokenizer_path(self, corpus: Corpus) -> Path:
        if self.cfg.data.tokenizer is not None:
            return Path(self.cfg.data.tokenizer)
        if self.resume_from is not None:
            return self.resume_from / "tokenizer.json"
        if self.cfg.model.init_from is not None:
            return self.cfg.model.init_folder() / "tokenizer.json"
        return cached_tokenizer(corpus, self.model_config.vocab_size, Path(self.cfg.data.cache_dir))

    def _build_data(self, corpus: Corpus) -> None:
        d = self.cfg.data
        template = chat_template_for(self.tokenizer_path)  # chats are rendered as the model will be served
        split = build_token_cache(corpus, self.tok, d.val_fraction, Path(d.cache_dir), template).split(
            d.seq_len
        )
        self._print(split.summary)  # sources, documents, tokens, skipped files, bad records, validation
        self.train_data = PackedTokens(split.train, d.seq_len, self.tok.eos_id, "train", d.document_masking)
        self.val_data = PackedTokens(split.val, d.seq_len, self.tok.eos_id, "validation", d.document_masking)
        if self.train_data.segmented and self.dims.pp > 1:
            raise ConfigError(
                f"parallel.pp={self.dims.pp}: packed documents kept apart (chat data, or "
                "data.document_masking) are not sent through pipeline stages yet; use pp=1"
            )
        self.unigram_loss = unigram_entropy(split.train, self.tok.vocab_size)

    def _build_model(self) -> None:
        from dsv3.model.transformer import Transformer
        from dsv3.parallel.parallelize import parallelize, reference_weights, weights_of

        cfg, dims = self.cfg, self.dims
        with torch.device("meta"):
            self.model_shape = Transformer(self.model_config)  # the full structure, for FLOP counts
            structure = Transformer(self.model_config)  # this rank's part, parallelized in place
        self.tokens_per_step = cfg.data.batch_size * cfg.data.grad_accum * cfg.data.seq_len
        self.flops_per_step = (
            self.model_shape.training_flops_per_token(cfg.data.seq_len) * self.tokens_per_step
        )
        # the GEMM rate MFU is reported against: as told (logging.peak_tflops), or as measured
        self.peak_tflops = cfg.logging.peak_tflops or self.dtype_choice.peak_tflops
        self.compile, self.compile_reason = self._compile_choice()
        if cfg.model.init_from is not None:  # the source model's weights (dequantized if FP8)
            init = weights_of(Transformer.from_pretrained(cfg.model.init_folder()))
            self._print(f"initialized from {cfg.model.init_folder()}")
        else:
            init = reference_weights(self.model_config, cfg.run.seed)
        self.pm = parallelize(
            structure,
            dims,
            self.mesh,
            device=self.device,
            init=init,
            param_dtype=self.dtype,
            activation_checkpoint=cfg.parallel.activation_checkpoint,
            compile=self.compile,
            fp8=cfg.run.fp8_scales if cfg.run.fp8 else None,
            fp8_dispatch=cfg.parallel.fp8_dispatch,
            ep_overlap=cfg.parallel.ep_overlap,
            microbatch=(cfg.data.batch_size // (dims.dp * dims.microbatches), cfg.data.seq_len),
        )
        self.optimizer = build_optimizer(
            torch.nn.ModuleList(self.pm.modules),
            cfg.optim.lr,
            (cfg.optim.beta1, cfg.optim.beta2),
            cfg.optim.weight_decay,
            bf16_moments=cfg.optim.bf16_moments,
        )
        o = cfg.optim
        self.schedule = Schedule(o.lr, o.steps, o.warmup, o.schedule, o.min_lr_ratio)
        self.step = 0
        self.last_checkpoint: Path | None = None

    @property
    def model(self) -> torch.nn.Module:
        """The model of a one-process run (the whole Transformer)."""
        if len(self.pm.modules) != 1 or self.dims.world_size != 1:
            raise AttributeError("Trainer.model: this rank holds only part of the model (use .pm)")
        return self.pm.modules[0]

    def _print(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)

    def _compile_choice(self) -> tuple[bool, str]:
        run = self.cfg.run
        steps = self.cfg.optim.steps if run.stop_after is None else min(self.cfg.optim.steps, run.stop_after)
        minutes = expected_minutes(steps, self.flops_per_step, self.peak_tflops)
        if run.max_minutes is not None:
            minutes = min(minutes, run.max_minutes)
        return choose_compile(
            run.compile,
            minutes,
            parallel_or_fp8=self.dims.world_size > 1 or run.fp8,
            compilable=run.compile is False or can_compile(self.device),
        )

    # ---------------------------------------------------------------------------------- training
    def train_step(self) -> dict[str, Any]:
        """One optimizer step over grad_accum micro-batches (collective); returns its metrics."""
        cfg, step = self.cfg, self.step
        lam = mtp_lambda_at(step, cfg.optim.steps, cfg.optim.mtp_lambda, cfg.optim.mtp_lambda_later)
        parts = torch.zeros(3, dtype=torch.float64)  # this rank's shares of loss, mtp_loss, balance_loss
        self.pm.train()
        for _ in range(cfg.data.grad_accum):
            batch = self.loader.next_batch().to(self.device)  # this dp rank's rows
            parts += self._forward_backward(batch, lam, scale=1.0 / cfg.data.grad_accum, train=True)
        self.world.all_reduce(parts)  # only the ranks holding the last stage contribute
        loss, mtp_loss, balance_loss = (parts / cfg.data.grad_accum).tolist()
        grad_norm = self._grad_norm()
        losses = {"loss": loss, "mtp_loss": mtp_loss, "balance_loss": balance_loss}
        bad = nonfinite(losses, grad_norm.item(), self.pm.modules)
        lr = self.schedule.lr_at(step)
        if bad is None:
            self._clip_grads(grad_norm, cfg.optim.grad_clip)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loads = self._balance_experts(
            bias_gamma_at(step, cfg.optim.steps, cfg.optim.bias_gamma) if bad is None else 0.0
        )
        self.step += 1
        inject_faults(self.step, self.world, self.pm)
        record = {
            "step": self.step,
            "loss": loss,
            "mtp_loss": mtp_loss,
            "balance_loss": balance_loss,
            "lr": lr,
            "grad_norm": grad_norm.item(),
            "mtp_lambda": lam,
            "expert_load": loads,
        }
        if bad is not None:
            record["nonfinite"] = bad
        return record

    def _forward_backward(self, batch: Batch, lam: float, scale: float, train: bool) -> torch.Tensor:
        """One global (micro-)batch: this rank's shares [3] of the losses; backward when training."""
        from dsv3.parallel.objective import global_split, target_counts

        x, y = batch.input_ids, batch.labels

        pm, dims = self.pm, self.dims
        mtp_depth = self.model_config.num_nextn_predict_layers
        dp_group = self.mesh["dp"].get_group()
        if dims.pp == 1:
            split, counts = global_split([y], mtp_depth, dims.dp, dp_group)
            with self._autocast():
                out = pm.modules[0](x, labels=y, segments=batch.segments)
            terms = split.terms(counts[0], out.loss, out.mtp_loss, out.balance_loss)
            if train:
                (split.objective(terms, lam) * scale).backward()
            return torch.tensor([0.0 if t is None else t.item() for t in terms], dtype=torch.float64)
        from dsv3.parallel.pipeline import forward_only

        chunks = list(y.chunk(dims.microbatches)) if train else [y]
        split, _ = global_split(chunks, mtp_depth, dims.dp, dp_group)
        if not train:  # evaluation: the stages one after another, no schedule
            with self._autocast():
                ce = forward_only(pm, x, y)
            if ce is None:
                return torch.zeros(3, dtype=torch.float64)
            share = split.terms(target_counts(y, mtp_depth), ce, None, None)[0]
            return torch.tensor([share.item(), 0.0, 0.0], dtype=torch.float64)
        if pm.loss is not None:
            pm.loss.split, pm.loss.mtp_lambda, pm.loss.scale, pm.loss.parts = split, lam, scale, []
        args = (x,) if 0 in pm.stage_ids else ()
        with self._autocast():
            pm.schedule.step(*args, target=y if pm.has_last_stage else None, return_outputs=False)
        if pm.loss is None:
            return torch.zeros(3, dtype=torch.float64)
        return torch.tensor(pm.loss.parts, dtype=torch.float64).sum(0)

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16)

    def _local_grads(self) -> list[torch.Tensor]:
        """This rank's gradient tensors (the local shards of FSDP's DTensors)."""
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in self.pm.parameters() if p.grad is not None]
        return [g.to_local() if isinstance(g, DTensor) else g for g in grads]

    @torch.no_grad()
    def _grad_norm(self) -> torch.Tensor:
        """The global gradient norm, as torch.nn.utils.clip_grad_norm_ computes it on one process:
        the local norm as torch computes it, squares summed over the world (replicas once). In one
        process this is clip_grad_norm_'s to the bit (a float32 norm squared and rooted in float64
        is exact)."""
        local = self._local_grads()
        norm = torch.nn.utils.get_total_norm(local) if local else torch.zeros(())
        sq = self.world.all_reduce(norm.to(torch.float64).square())
        replicas = self.dims.dp_replicate if self.dims.dp > 1 else self.dims.dp  # FSDP shards, or copies
        return (sq / replicas).sqrt().to(norm.dtype)

    @torch.no_grad()
    def _clip_grads(self, total: torch.Tensor, max_norm: float) -> None:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # as torch.nn.utils.clip_grad_norm_
        for g in self._local_grads():
            g.mul_(coef.to(g.device, g.dtype))

    @torch.no_grad()
    def _balance_experts(self, gamma: float) -> torch.Tensor:
        """The auxiliary-loss-free balancing phase of a step: expert loads summed over the dp ranks,
        then every router's bias moved by gamma (0: only read and reset the counters). Returns the
        loads [routers, E] of the whole model in single-process order (main layers, then MTP)."""
        from dsv3.parallel.expert_parallel import all_reduce_expert_loads

        loads = {}
        for module in self.pm.modules:
            if self.world.size > 1:
                all_reduce_expert_loads(module, self.mesh["dp"])
            loads.update(update_router_bias(module, gamma))
        if self.dims.pp > 1:
            import torch.distributed as dist

            everyone = [None] * self.dims.pp
            dist.all_gather_object(
                everyone, {k: v.cpu() for k, v in loads.items()}, group=self.mesh["pp"].get_group()
            )
            loads = {k: v for part in everyone for k, v in part.items()}
        order = sorted(loads, key=lambda n: (n.startswith("mtp"), int(n.split(".")[1])))
        return torch.stack([loads[n].cpu() for n in order]) if order else torch.zeros(0)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean next-token loss over the fixed validation batches (collective; not counted as expert load)."""
        self.pm.train(False)
        total, n = 0.0, 0
        rows_per_batch = self.dims.dp * self.dims.microbatches
        for batch in validation_batches(
            self.val_data, self.cfg.data.batch_size, self.cfg.logging.eval_batches
        ):
            if len(batch) % rows_per_batch:
                break  # a last partial batch that does not split over the ranks is skipped
            rows = len(batch) // self.dims.dp
            batch = batch.rows(self.dp_rank * rows, (self.dp_rank + 1) * rows).to(self.device)
            parts = self.world.all_reduce(self._forward_backward(batch, 0.0, 1.0, train=False))
            total, n = total + parts[0].item(), n + 1
        self._balance_experts(0.0)  # drop the evaluation tokens from the expert-load counts
        self.pm.reshard()  # a forward without backward leaves FSDP's root parameters gathered
        return total / max(n, 1)

    def fit(self) -> dict[str, Any]:
        """Train to `steps` (or `stop_after` more steps, or `max_minutes`), logging, evaluating and
        checkpointing (collective); the report is drawn at the end of every invocation, the HF
        export at the end of the schedule."""
        cfg = self.cfg
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        if self.resume_from is not None:
            self.load(self.resume_from)
        if self.is_main:  # the run's own copy: checkpoints are pruned, this file stays
            if self.tokenizer_path.resolve() != (self.out / "tokenizer.json").resolve():
                self._copy_tokenizer(self.out)
            (self.out / "train_config.json").write_text(json.dumps(self.resolved_config(), indent=2) + "\n")
        self.tokenizer_path = self.out / "tokenizer.json"
        self.world.barrier()
        end = (
            cfg.optim.steps
            if cfg.run.stop_after is None
            else min(cfg.optim.steps, self.step + cfg.run.stop_after)
        )
        log = (
            MetricsLog(
                self.out / "metrics.jsonl",
                self.step if self.resume_from else None,
                self.out / "tensorboard" if cfg.logging.tensorboard else None,
            )
            if self.is_main
            else None
        )
        progress = Progress(cfg.optim.steps, self.step, live=None if self.is_main else False)
        summary: dict[str, Any] = {"start_step": self.step, "unigram_loss": self.unigram_loss}
        window_seconds, window_steps = 0.0, 0  # training time only: evaluation and saving excluded
        deadline = time.monotonic() + 60 * cfg.run.max_minutes if cfg.run.max_minutes else math.inf
        if self.compile and self.step < end:
            self._print(
                "compiling each block in the first steps (about a minute the first time, seconds once cached)"
            )
        try:
            while self.step < end:
                step_start = time.perf_counter()
                record = self.train_step()
                window_seconds += time.perf_counter() - step_start
                window_steps += 1
                if "nonfinite" in record and self._recover(record):
                    continue
                if cfg.parallel.sdc_check_every and self.step % cfg.parallel.sdc_check_every == 0:
                    check_replicas(self.pm, self.mesh, self.step)
                last = self.step == end or self.world.broadcast(time.monotonic() > deadline)
                evaluate = self.step % cfg.logging.eval_every == 0 or last
                if evaluate:
                    record["val_loss"] = self.evaluate()
                    record["unigram_loss"] = self.unigram_loss
                logged = self.step % cfg.logging.log_every == 0 or evaluate or self.step == 1
                if logged:
                    record["tokens_per_s"] = self.tokens_per_step * window_steps / window_seconds
                    record["mfu"] = (
                        self.flops_per_step * window_steps / window_seconds / (1e12 * self.peak_tflops)
                    )
                    window_seconds, window_steps = 0.0, 0
                    record = self._loggable(record)
                    if log is not None:
                        log.log(record)
                    summary.setdefault("first", record)
                    summary["last"] = record
                if self.is_main:
                    progress.update(self.step, _progress_info(record) if logged else "", logged)
                if self.step % cfg.checkpoint.save_every == 0 or last:
                    self.save()
                if last:
                    break
        finally:
            progress.close()
            if log is not None:
                log.close()
        if self.step == cfg.optim.steps:
            self.export_hf(self.out / "hf")
        if cfg.logging.report and summary.get("last") and self.is_main:
            summary["report"] = str(self._report())
        return summary

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
        return {"train": self.cfg.to_dict(), "model": self.model_config.to_dict()}

    # ------------------------------------------------------------------------------ failures
    def _recover(self, record: dict[str, Any]) -> bool:
        """Apply --on-nonfinite to a non-finite step; True when the step was dropped (skip/rollback)."""
        policy, what = self.cfg.run.on_nonfinite, record["nonfinite"]
        message = f"step {record['step']}: {what} is not finite"
        if policy == "stop":
            self._print(f"error: {message}; stopping (--on-nonfinite skip or rollback continue instead)")
            raise NonFiniteError(message)
        if policy == "skip":
            self._print(f"warning: {message}; the step was skipped (weights and optimizer unchanged)")
            return False
        found = ckpt.latest_checkpoint(self.ckpt_root) if self.is_main else None
        found = self.world.broadcast(found)
        if found is None:
            raise NonFiniteError(f"{message}; no checkpoint to roll back to")
        position = self.loader.state_dict()
        self.load(found)
        self.loader.load_state_dict(position)  # go on with the batches after the bad one
        self._print(
            f"warning: {message}; rolled back to {found} (step {self.step}), continuing with new data"
        )
        return True

    # ----------------------------------------------------------------------------- checkpointing
    def save(self) -> Path:
        """Write a checkpoint of this step (collective): rank 0 makes the folder atomically, every
        rank writes its part of model and optimizer into it (parallel/checkpoint.py)."""
        from dsv3.parallel import checkpoint as state_io

        def write(folder: Path) -> None:  # rank 0, inside the atomic folder writer
            self.world.broadcast(str(folder))
            state_io.save(self.pm, self.optimizer, folder, self.model_config)
            self._write_trainer_files(folder)

        if self.is_main:
            previous = (
                self.last_checkpoint if self.last_checkpoint and self.last_checkpoint.is_dir() else None
            )
            needed = ckpt.folder_bytes(previous) if previous is not None else None  # about the same again
            path = ckpt.save_checkpoint(self.ckpt_root, self.step, write, self.cfg.checkpoint.keep, needed)
        else:
            state_io.save(self.pm, self.optimizer, Path(self.world.broadcast(None)), self.model_config)
            path = self.ckpt_root / ckpt.step_name(self.step)
        self.world.barrier()  # the checkpoint is complete and current for everyone
        self.last_checkpoint = path
        return path

    def _write_trainer_files(self, folder: Path) -> None:
        self._copy_tokenizer(folder)
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        state = {"step": self.step, "loader": self.loader.state_dict(), "rng": rng}
        torch.save(state, folder / "trainer_state.pt")
        (folder / "train_config.json").write_text(json.dumps(self.resolved_config(), indent=2) + "\n")

    def _copy_tokenizer(self, folder: Path) -> None:
        """tokenizer.json, and its tokenizer_config.json (the chat template) where it has one."""
        shutil.copyfile(self.tokenizer_path, folder / "tokenizer.json")
        config = self.tokenizer_path.with_name("tokenizer_config.json")
        if config.is_file():
            shutil.copyfile(config, folder / "tokenizer_config.json")

    def load(self, folder: Path) -> None:
        """Restore model, optimizer, loader, step and RNG states from a verified checkpoint (collective)."""
        from dsv3.parallel import checkpoint as state_io

        if self.is_main:
            ckpt.verify_checkpoint(folder)
            self._warn_config_changes(json.loads((folder / "train_config.json").read_text())["train"])
        state_io.load(self.pm, self.optimizer, folder)
        state = torch.load(folder / "trainer_state.pt", weights_only=False)
        self.step = state["step"]
        self.loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.last_checkpoint = folder
        self._print(f"resumed from {folder} at step {self.step}")

    def _warn_config_changes(self, saved: dict[str, Any]) -> None:
        try:
            before = TrainConfig.from_dict(saved).flat()
        except ConfigError:
            print(
                "warning: the checkpoint's train_config.json is from another version; not comparing options"
            )
            return
        now = self.cfg.flat()
        for key in sorted(k for k in now if self.cfg.changes_trajectory(k) and now[k] != before[k]):
            print(
                f"warning: {key} changed since the checkpoint ({before[key]!r} -> {now[key]!r}); "
                "the resumed run will differ from an uninterrupted one"
            )

    def export_hf(self, folder: Path) -> None:
        """Gather the full model to rank 0 and write the Hugging Face layout there (collective)."""
        from dsv3.hf import write_pretrained
        from dsv3.model.transformer import Transformer
        from dsv3.parallel.checkpoint import full_state_dict

        state = full_state_dict(self.pm)
        if self.is_main:
            model = Transformer(self.model_config) if self.dims.world_size > 1 else self.model
            if self.dims.world_size > 1:
                model.load_state_dict(state)

            def write(tmp: Path) -> None:
                write_pretrained(model, tmp)
                self._copy_tokenizer(tmp)

            ckpt.write_folder_atomically(folder, write)
        self.world.barrier()


def _progress_info(record: dict[str, Any]) -> str:
    parts = [f"loss {record['loss']:.3f}"]
    if "val_loss" in record:
        parts.append(f"val {record['val_loss']:.3f}")
    parts += [f"lr {record['lr']:.2e}", f"{record['tokens_per_s']:,.0f} tok/s", format_mfu(record["mfu"])]
    if "maxvio" in record:
        parts.append(f"MaxVio {record['maxvio']:.2f}")
    return "  ".join(parts)
