"""The trainer under torchrun: data, expert, pipeline parallelism with the single-process semantics.

    torchrun --nproc-per-node 4 -m dsv3 train --ep 4 ...                  # 4 dp ranks, experts split 4 ways
    torchrun --nproc-per-node 4 -m dsv3 train --dp-shard 2 --ep 2 ...     # HSDP: 2 replicas x 2 shards
    torchrun --nproc-per-node 2 -m dsv3 train --pp 2 --pp-schedule dualpipev ...
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m dsv3 train --ep 16 --ranks-per-node 8 ...                       # multi-node (shared --out)

`DistributedTrainer` is a Trainer whose model is `parallelize()`d (parallel/parallelize.py) and
whose step, evaluation, gradient clipping, router-bias update and checkpoints are collective:

* Data: the Loader draws the same global batch of `batch_size` sequences as one process (same
  seed, same state, so checkpoints are interchangeable across layouts); each dp rank reads only
  its contiguous rows (`RankSlice`); pp ranks of one dp group read the same rows.
* Loss: each rank backpropagates its exact share of the single-process loss
  (parallel/objective.py), so losses and weights match one process up to float rounding.
* Gradient norm: squares of the local shards summed over all ranks (replicas counted once), then
  the same clip as torch.nn.utils.clip_grad_norm_.
* Router balance: expert loads are summed over the dp ranks before `update_router_bias`, so every
  copy of the biases moves as on one process.
* Metrics are reduced over ranks; only rank 0 writes metrics.jsonl, the progress bar and the report
  (the same records as a single process).
* Checkpoints are DCP (parallel/checkpoint.py), loadable into any other layout or one process.
* Bad layouts fail before any process group or data work (ParallelDims.validate).

Test hook for fault tolerance: with DSV3_FAULT_AT_STEP=K (and optionally DSV3_FAULT_RANK=R,
default the last rank) rank R kills itself with SIGKILL after step K on the first attempt
(TORCHELASTIC_RESTART_COUNT=0). Under `torchrun --max-restarts 1` the restarted workers resume
from the latest checkpoint automatically.
"""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dsv3 import checkpoint as ckpt
from dsv3.errors import ConfigError
from dsv3.parallel.mesh import ParallelDims, backend_for, build_mesh
from dsv3.train.trainer import TrainConfig, Trainer

PARALLEL_FIELDS = ("dp_replicate", "dp_shard", "ep", "pp", "pp_schedule", "pp_microbatches", "ranks_per_node")


def wants_distributed(cfg: TrainConfig) -> bool:
    """Under torchrun, with any parallel dimension, or resuming a DCP checkpoint."""
    if "WORLD_SIZE" in os.environ or (dist.is_available() and dist.is_initialized()):
        return True
    if cfg.ep > 1 or cfg.pp > 1 or cfg.dp_shard > 1 or cfg.dp_replicate > 1 or cfg.fp8_dispatch:
        return True
    if cfg.resume:
        found = ckpt.latest_checkpoint(Path(cfg.out) / "checkpoints")
        return found is not None and (found / ".metadata").is_file()
    return False


def build_trainer(cfg: TrainConfig) -> Trainer:
    return DistributedTrainer(cfg) if wants_distributed(cfg) else Trainer(cfg)


def parallel_dims(cfg: TrainConfig) -> ParallelDims:
    return ParallelDims(**{name: getattr(cfg, name) for name in PARALLEL_FIELDS})


class RankSlice:
    """PackedTokens seen by one dp rank: of each global batch of windows, its contiguous rows."""

    def __init__(self, data, rank: int, ranks: int) -> None:
        self.data, self.rank, self.ranks = data, rank, ranks

    def __len__(self) -> int:
        return len(self.data)

    def batch(self, indices: np.ndarray):
        per = len(indices) // self.ranks
        return self.data.batch(indices[self.rank * per : (self.rank + 1) * per])


class DistributedTrainer(Trainer):
    def __init__(self, cfg: TrainConfig) -> None:
        cfg.validate()
        world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
        try:  # bad layouts fail here, before any work
            self.dims = parallel_dims(cfg).resolve(world)
            self.dims.validate(cfg.model_cfg(), cfg.batch_size)
        except ConfigError as e:
            if world == 1 and not dist.is_initialized() and "WORLD_SIZE" not in os.environ:
                raise ConfigError(
                    f"{e} (one process: launch with `torchrun --nproc-per-node N -m dsv3 train ...`)"
                ) from None
            raise
        device_type = (
            "cuda"
            if cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
            else "cpu"
        )
        if not dist.is_initialized():
            if device_type == "cuda":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            if "MASTER_ADDR" in os.environ:  # env:// (torchrun)
                store, rank, size = next(dist.rendezvous("env://"))
                # keys per torchrun attempt: a restarted worker must not read the dead attempt's
                # addresses if torchrun's store outlives it
                attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
                store = dist.PrefixStore(f"dsv3/attempt_{attempt}", store)
                dist.init_process_group(backend_for(device_type), store=store, rank=rank, world_size=size)
            else:  # one process without torchrun (e.g. resuming a DCP checkpoint)
                dist.init_process_group(
                    backend_for(device_type), store=dist.HashStore(), rank=0, world_size=1
                )
        self.rank = dist.get_rank()
        self.is_main = self.rank == 0
        if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0 and not cfg.resume:
            if (Path(cfg.out) / "checkpoints" / ckpt.LATEST).exists():
                cfg.resume = True  # a restarted job continues from its last checkpoint
                self._print("restarted by torchrun: resuming from the latest checkpoint")
        self.mesh = build_mesh(self.dims, device_type)
        self.dp_rank = self.mesh["dp"].get_local_rank()
        super().__init__(cfg)

    def _print(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)

    # ------------------------------------------------------------ rank 0 first for shared files
    def _on_rank0(self, fn, *args, then_others: bool = False):
        """Run fn on rank 0 and share its result or its error with every rank (so all fail with
        the same message); with then_others, the other ranks then run fn too (caches built once)."""
        outcome = [None, None]
        if self.is_main:
            try:
                outcome[0] = fn(*args)
            except Exception as e:
                outcome[1] = e
        dist.broadcast_object_list(outcome, src=0)
        if outcome[1] is not None:
            raise outcome[1]
        return fn(*args) if then_others and not self.is_main else outcome[0]

    def _checkpoint_to_resume(self):
        return self._on_rank0(super()._checkpoint_to_resume)

    def _tokenizer_path(self, corpus):
        return self._on_rank0(super()._tokenizer_path, corpus, then_others=True)

    def _build_data(self, corpus, tok) -> None:
        from dsv3.train.data import Loader

        self._on_rank0(super()._build_data, corpus, tok, then_others=True)
        self.loader = Loader(RankSlice(self.train_data, self.dp_rank, self.dims.dp), self.cfg.batch_size,
                             self.cfg.seed)  # fmt: skip

    def _build_model(self) -> None:
        from dsv3.model.transformer import Transformer
        from dsv3.parallel.parallelize import parallelize, reference_weights
        from dsv3.train.optim import Schedule, build_optimizer

        cfg = self.cfg
        if cfg.fp8:
            raise ConfigError(
                "fp8=True (FP8 linears) is not supported with parallelism yet; use --fp8-dispatch"
            )
        with torch.device("meta"):
            self.model = Transformer(self.model_cfg)  # full structure, for FLOP counts only
            structure = Transformer(self.model_cfg)  # parallelized in place below
        self.pm = parallelize(
            structure, self.dims, self.mesh, device=self.device, init=reference_weights(self.model_cfg, cfg.seed),
            param_dtype=self.dtype, activation_checkpoint=cfg.activation_checkpoint, compile=cfg.compile,
            fp8_dispatch=cfg.fp8_dispatch,
            microbatch=(cfg.batch_size // (self.dims.dp * self.dims.microbatches), cfg.seq_len),
        )  # fmt: skip
        self.optimizer = build_optimizer(
            torch.nn.ModuleList(self.pm.modules), cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay,
            bf16_moments=cfg.bf16_moments,
        )  # fmt: skip
        self.schedule = Schedule(cfg.lr, cfg.steps, cfg.warmup, cfg.schedule, cfg.min_lr_ratio)
        self.step = 0

    # ---------------------------------------------------------------------------------- training
    def train_step(self) -> dict[str, Any]:
        from dsv3.model.moe import update_router_bias
        from dsv3.parallel.expert_parallel import all_reduce_expert_loads
        from dsv3.train.optim import bias_gamma_at, mtp_lambda_at

        cfg, step, pm = self.cfg, self.step, self.pm
        lam = mtp_lambda_at(step, cfg.steps, cfg.mtp_lambda, cfg.mtp_lambda_later)
        parts = torch.zeros(3, dtype=torch.float64)  # this rank's shares of loss, mtp_loss, balance_loss
        pm.train()
        for _ in range(cfg.grad_accum):
            x, y = (t.to(self.device) for t in self.loader.next_batch())  # this dp rank's rows
            parts += self._forward_backward(x, y, lam, scale=1.0 / cfg.grad_accum, train=True)
        grad_norm = self._clip_grad_norm(cfg.grad_clip)
        lr = self.schedule.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        gamma = bias_gamma_at(step, cfg.steps, cfg.bias_gamma)
        loads = {}
        for module in pm.modules:
            all_reduce_expert_loads(module, self.mesh["dp"])
            loads.update(update_router_bias(module, gamma))
        dist.all_reduce(parts)  # only the ranks holding the last stage contribute
        self.step += 1
        self._maybe_fault()
        loss, mtp_loss, balance_loss = (parts / cfg.grad_accum).tolist()
        return {"step": self.step, "loss": loss, "mtp_loss": mtp_loss, "balance_loss": balance_loss, "lr": lr,
                "grad_norm": grad_norm, "mtp_lambda": lam, "expert_load": self._gather_loads(loads)}  # fmt: skip

    def _forward_backward(self, x, y, lam: float, scale: float, train: bool) -> torch.Tensor:
        """One global (micro-)batch: this rank's shares [3] of the losses; backward when training."""
        from dsv3.parallel.objective import global_split

        pm, dims = self.pm, self.dims
        mtp_depth = self.model_cfg.num_nextn_predict_layers
        if dims.pp == 1:
            split, counts = global_split([y], mtp_depth, dims.dp, self.mesh["dp"].get_group())
            with self._autocast():
                out = pm.modules[0](x, labels=y)
            terms = split.terms(counts[0], out.loss, out.mtp_loss, out.balance_loss)
            if train:
                (split.objective(terms, lam) * scale).backward()
            return torch.tensor([0.0 if t is None else t.item() for t in terms], dtype=torch.float64)
        from dsv3.parallel.objective import target_counts
        from dsv3.parallel.pipeline import forward_only

        chunks = list(y.chunk(dims.microbatches)) if train else [y]
        split, _ = global_split(chunks, mtp_depth, dims.dp, self.mesh["dp"].get_group())
        if pm.loss is not None:
            pm.loss.split, pm.loss.mtp_lambda, pm.loss.scale, pm.loss.parts = split, lam, scale, []
        args = (x,) if 0 in pm.stage_ids else ()
        target = y if pm.has_last_stage else None
        if not train:  # evaluation: the stages one after another, no schedule
            with self._autocast():
                ce = forward_only(pm, x, y)
            if ce is None:
                return torch.zeros(3, dtype=torch.float64)
            share = split.terms(target_counts(y, mtp_depth), ce, None, None)[0]
            return torch.tensor([share.item(), 0.0, 0.0], dtype=torch.float64)
        with self._autocast():
            pm.schedule.step(*args, target=target, return_outputs=False)
        if pm.loss is None:
            return torch.zeros(3, dtype=torch.float64)
        return torch.tensor(pm.loss.parts, dtype=torch.float64).sum(0)

    @torch.no_grad()
    def _clip_grad_norm(self, max_norm: float) -> float:
        """clip_grad_norm_ over all ranks' shards: sum of squares over the world, replicas once."""
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in self.pm.parameters() if p.grad is not None]
        local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
        sq = torch.stack([g.float().pow(2).sum() for g in local]).sum() if local else torch.zeros(())
        sq = sq.to(torch.float64)
        dist.all_reduce(sq)
        replicas = self.dims.dp_replicate if self.dims.dp > 1 else self.dims.dp  # FSDP shards, or copies
        norm = (sq / replicas).sqrt()
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0).float()
        for g in local:
            g.mul_(coef.to(g.device, g.dtype))
        return norm.item()

    def _gather_loads(self, loads: dict[str, torch.Tensor]) -> torch.Tensor:
        """Expert loads [routers, E] of the whole model in single-process order (main layers, then MTP)."""
        if self.dims.pp > 1:
            everyone = [None] * self.dims.pp
            dist.all_gather_object(
                everyone, {k: v.cpu() for k, v in loads.items()}, group=self.mesh["pp"].get_group()
            )
            loads = {k: v for part in everyone for k, v in part.items()}
        order = sorted(loads, key=lambda n: (n.startswith("mtp"), int(n.split(".")[1])))
        return torch.stack([loads[n].cpu() for n in order]) if order else torch.zeros(0)

    def _maybe_fault(self) -> None:
        at = os.environ.get("DSV3_FAULT_AT_STEP")
        if at is None or int(at) != self.step or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
            return
        if self.rank == int(os.environ.get("DSV3_FAULT_RANK", dist.get_world_size() - 1)):
            print(f"DSV3_FAULT_AT_STEP={at}: rank {self.rank} kills itself (test hook)", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    @torch.no_grad()
    def evaluate(self) -> float:
        from dsv3.model.moe import update_router_bias
        from dsv3.train.data import validation_batches

        self.pm.train(False)
        total, n = 0.0, 0
        for x, y in validation_batches(self.val_data, self.cfg.batch_size, self.cfg.eval_batches):
            if len(x) % (self.dims.dp * self.dims.microbatches):
                break  # a last partial batch that does not split over the ranks is skipped
            rows = len(x) // self.dims.dp
            x, y = (t[self.dp_rank * rows : (self.dp_rank + 1) * rows].to(self.device) for t in (x, y))
            parts = self._forward_backward(x, y, 0.0, 1.0, train=False)
            dist.all_reduce(parts)
            total, n = total + parts[0].item(), n + 1
        for module in self.pm.modules:
            update_router_bias(module, 0.0)  # drop the evaluation tokens from the expert-load counts
        self.pm.reshard()  # a forward without backward leaves the root's parameters gathered
        return total / max(n, 1)

    def _past(self, deadline: float) -> bool:
        """Rank 0's clock decides, so that every rank stops at the same step."""
        flag = [super()._past(deadline)]
        dist.broadcast_object_list(flag, src=0)
        return flag[0]

    # ----------------------------------------------------------------------------- checkpointing
    def save(self) -> Path:
        from dsv3.parallel import checkpoint as dcp_ckpt

        def write(folder: Path) -> None:  # rank 0, inside the atomic folder writer
            shared = [str(folder)]
            dist.broadcast_object_list(shared, src=0)
            dcp_ckpt.save(self.pm, self.optimizer, folder)
            self._write_trainer_files(folder)

        if self.is_main:
            path = ckpt.save_checkpoint(self.ckpt_root, self.step, write, self.cfg.keep)
        else:
            shared = [None]
            dist.broadcast_object_list(shared, src=0)
            dcp_ckpt.save(self.pm, self.optimizer, Path(shared[0]))
            path = self.ckpt_root / ckpt.step_name(self.step)
        dist.barrier()  # the checkpoint is complete and current for everyone
        return path

    def _write_trainer_files(self, folder: Path) -> None:
        import json
        import shutil

        self.model_cfg.save(folder / "config.json")
        shutil.copyfile(self.tokenizer_path, folder / "tokenizer.json")
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        torch.save(
            {"step": self.step, "loader": self.loader.state_dict(), "rng": rng}, folder / "trainer_state.pt"
        )
        (folder / "train_config.json").write_text(json.dumps(self.resolved_config(), indent=2) + "\n")

    def load(self, folder: Path) -> None:
        import json

        from dsv3.parallel import checkpoint as dcp_ckpt

        if not (folder / ".metadata").is_file():
            raise ckpt.CheckpointError(f"{folder} is a single-process checkpoint; resume it without torchrun")
        self._warn_config_changes(json.loads((folder / "train_config.json").read_text())["train"])
        dcp_ckpt.load(self.pm, self.optimizer, folder)
        state = torch.load(folder / "trainer_state.pt")
        self.step = state["step"]
        self.loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        self._print(f"resumed from {folder} at step {self.step}")

    def _warn_config_changes(self, saved: dict[str, Any]) -> None:
        if self.is_main:
            super()._warn_config_changes(saved)

    def export_hf(self, folder: Path) -> None:
        """Gather the full model to rank 0 and write the Hugging Face layout there (collective)."""
        from dsv3.model.transformer import Transformer
        from dsv3.parallel.checkpoint import full_state_dict

        state = full_state_dict(self.pm)
        if self.is_main:
            self.model = Transformer(self.model_cfg)  # the meta twin becomes the gathered model
            self.model.load_state_dict(state)
            super().export_hf(folder)
        dist.barrier()
