"""Every option of a training run, in sections that map to TOML tables and dotted CLI flags.

    out = "runs/tiny"           # the run folder (top level)
    [model]      preset, config_file, overrides
    [data]       sources, text_field, document_masking, tokenizer, cache_dir, max_corpus_mb, val_fraction,
                 seq_len, batch_size, grad_accum
    [optim]      steps, lr, schedule, warmup_steps, min_lr_ratio, weight_decay, beta1, beta2,
                 grad_clip, bf16_moments, mtp_lambda, mtp_lambda_later, bias_gamma
    [run]        seed, dtype, device, compile, fp8, fp8_scales, threads, stop_after, max_minutes, on_nonfinite
    [parallel]   dp_replicate, dp_shard, ep, pp, pp_schedule, pp_microbatches, ranks_per_node,
                 fp8_dispatch, ep_overlap, activation_checkpoint, sdc_check_every
    [checkpoint] save_every, keep, resume
    [logging]    log_every, eval_every, eval_batches, tensorboard, report, peak_tflops

On the command line each field is `--section.field` (`--optim.lr 3e-4`, `--parallel.ep 4`), and the
names users already rely on stay as aliases (`--lr`, `--ep`, `--out`, `--data`, `--model-config`,
...: every field's own name, plus the few that a section renamed). A config file (TOML or JSON) holds
the same sections; flat keys with the alias names are accepted too. Each field's help text and list
of choices live in its metadata, next to its default, and every list of choices is defined once in
the module that owns the concept (dsv3.device.DTYPE_CHOICES, dsv3.parallel.mesh.PP_SCHEDULES, ...).

Validation (`TrainConfig.validate`) names the field as `section.field=value: rule`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsv3.config import ModelConfig
from dsv3.device import DTYPE_CHOICES, default_cache_dir
from dsv3.errors import ConfigError
from dsv3.fp8.quant import ScaleFormat
from dsv3.parallel.mesh import ParallelDims
from dsv3.train.optim import SCHEDULES
from dsv3.train.sources import mixture

NONFINITE_POLICIES = ("stop", "skip", "rollback")


def option(
    default: Any = None,
    help: str | None = None,
    *,
    choices=None,
    alias: str | None = None,
    control: bool = False,
    factory=None,
) -> Any:
    """A config field: `help` and `choices` for the CLI and validation, `alias` a legacy flat
    name, `control=True` for options that may change on resume without changing the trajectory."""
    meta = {"help": help, "choices": choices, "alias": alias, "control": control}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelSection:
    preset: str = option("tiny", "model preset (tiny, small, v2-lite, v3-671b)")
    config_file: str | None = option(
        None, "a config.json (ours or Hugging Face's) instead of the preset", alias="model_config"
    )
    overrides: dict[str, Any] = option(
        help="JSON object of ModelConfig fields to override, e.g. '{\"num_hidden_layers\": 2}'",
        alias="model_overrides",
        factory=dict,
    )
    init_from: str | None = option(
        None,
        "start from the weights, config and tokenizer of a dsv3 run or "
        "checkpoint, a Hugging Face DeepSeek-V2/V3 folder or DeepSeek's FP8 release "
        "(the optimizer starts fresh; overrides may not change any weight's shape)",
    )

    def build(self) -> ModelConfig:
        """The ModelConfig this section describes (ConfigError on a bad preset, file or override)."""
        if not isinstance(self.overrides, dict):
            raise ConfigError(
                f"model.overrides={self.overrides!r}: must be a JSON object of ModelConfig fields"
            )
        if self.init_from is not None:
            return self._over_checkpoint()
        if self.config_file is not None:
            base = ModelConfig.from_hf(self.config_file).to_dict()
            return ModelConfig.from_dict({**base, **self.overrides})
        return ModelConfig.from_preset(self.preset, **self.overrides)

    def init_folder(self) -> Path:
        """The HF-layout folder that init_from designates (a run folder's latest checkpoint, ...)."""
        from dsv3.hf import resolve_model_folder

        return resolve_model_folder(self.init_from)

    def _over_checkpoint(self) -> ModelConfig:
        """The checkpoint's config with the overrides that leave every weight's shape as it is."""
        import torch

        from dsv3.model.transformer import Transformer

        source = ModelConfig.from_hf(self.init_folder())
        cfg = ModelConfig.from_dict({**source.to_dict(), **self.overrides})
        with torch.device("meta"):
            before, after = Transformer(source).state_dict(), Transformer(cfg).state_dict()
        changed = sorted(
            k
            for k in before.keys() | after.keys()
            if k not in before or k not in after or before[k].shape != after[k].shape
        )
        if changed:
            raise ConfigError(
                f"model.overrides={self.overrides}: with --init-from only options that keep every weight's "
                f"shape may change (e.g. aux_loss_alpha, rope_scaling, max_position_embeddings, "
                f"routed_scaling_factor); these change {len(changed)} tensors, e.g. {changed[:3]}"
            )
        return cfg


@dataclass
class DataSection:
    sources: list[str] = option(
        help="sources: 'stdlib', text files or folders, .jsonl (JSON Lines), .parquet, a datasets "
        "save_to_disk folder, 'hf:NAME[:CONFIG]' (cached); records with 'messages' are chats (SFT). "
        "SOURCE:WEIGHT for a weighted mixture (a.jsonl:0.7 b.parquet:0.3)",
        alias="data",
        factory=lambda: ["stdlib"],
    )
    text_field: str = option("text", "the JSON Lines / Parquet / dataset field that holds a document's text")
    document_masking: bool = option(
        False,
        "packed documents attend only within themselves, RoPE positions "
        "restarting at each (always on for chat data)",
    )
    tokenizer: str | None = option(
        None, "a tokenizer.json (default: byte-level BPE trained on the corpus, cached)"
    )
    cache_dir: str = option(
        help="where tokenizers and token caches live (env DSV3_CACHE)",
        control=True,
        factory=default_cache_dir,
    )
    max_corpus_mb: float | None = option(None, "use only the first N MB of files")
    val_fraction: float = option(0.01, "fraction of the documents held out for validation")
    seq_len: int = option(256, "tokens per training sequence")
    batch_size: int = option(8, "sequences per optimizer step (global, over all data-parallel ranks)")
    grad_accum: int = option(1, "micro-batches of batch_size accumulated per optimizer step")


@dataclass
class OptimSection:
    steps: int = option(1000, "optimizer steps of the whole schedule")
    lr: float = option(2.2e-4, "peak learning rate")
    schedule: str = option("v3", "v3 (warm-up, constant, cosine, tail) or cosine", choices=SCHEDULES)
    warmup_steps: int | None = option(None, "default min(2000, steps // 20)")
    min_lr_ratio: float = option(0.1, "cosine floor as a fraction of the peak")
    weight_decay: float = option(0.1, "AdamW decoupled weight decay (matrices only)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    grad_clip: float = option(1.0, "clip the global gradient norm to this")
    bf16_moments: bool = option(False, "store the Adam moments in BF16")
    mtp_lambda: float = option(0.3, "MTP loss weight for the first 10/14.8 of the run")
    mtp_lambda_later: float = option(0.1, "MTP loss weight after that")
    bias_gamma: float = option(0.001, "router-bias update speed (0 disables auxiliary-loss-free balancing)")

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else max(1, min(2000, self.steps // 20))


@dataclass
class RunSection:
    seed: int = option(0, "seed of the weights and the data order")
    dtype: str = option(
        "auto",
        "compute dtype: auto (measured: BF16 only where it is faster), bfloat16 (autocast) or float32",
        choices=DTYPE_CHOICES,
    )
    device: str = option("auto", "auto, cpu or cuda[:N]")
    compile: bool | None = option(
        None,
        "torch.compile each block; unset: only where the run is expected to repay the compile "
        "(one process, no FP8, >= 15 minutes at the measured GEMM rate)",
        control=True,
    )
    fp8: bool = option(
        False,
        "FP8 GEMMs (1x128 activation tiles, 128x128 weight blocks) in attention, "
        "dense and expert projections",
    )
    fp8_scales: str = option(
        "pow2",
        "FP8 scale format: pow2 (exact fast path on CPU), fp32 (the V3 paper's), ue8m0",
        choices=typing.get_args(ScaleFormat),
    )
    threads: int | None = option(None, "torch CPU threads", control=True)
    stop_after: int | None = option(
        None, "end this invocation after K more steps, with a checkpoint", control=True
    )
    max_minutes: float | None = option(
        None, "end this invocation after M minutes of wall time, with a checkpoint", control=True
    )
    on_nonfinite: str = option(
        "stop",
        "when a loss or gradient is NaN/Inf: stop (with a message), skip the step, "
        "or rollback to the last checkpoint",
        choices=NONFINITE_POLICIES,
        control=True,
    )


@dataclass
class ParallelSection(ParallelDims):
    """The parallel dimensions (dsv3.parallel.mesh.ParallelDims) and how the parallel run executes."""

    fp8_dispatch: bool = option(False, "send EP dispatch in FP8 with 1x128 scales (combine stays BF16)")
    ep_overlap: bool = option(
        False, "run each MoE's shared expert while its routed tokens are on the wire (async all-to-all)"
    )
    activation_checkpoint: bool = option(False, "recompute attention (norm + MLA) in backward", control=True)
    sdc_check_every: int = option(
        0,
        "every N steps compare a checksum of the weights across data-parallel "
        "replicas and name a rank that disagrees (0: off)",
        control=True,
    )


@dataclass
class CheckpointSection:
    save_every: int = option(500, "steps between checkpoints", control=True)
    keep: int = option(3, "checkpoints kept (the newest)", control=True)
    resume: bool = option(False, "continue from the latest checkpoint in --out", control=True)


@dataclass
class LoggingSection:
    log_every: int = option(10, "steps between metrics records", control=True)
    eval_every: int = option(100, "steps between validation evaluations", control=True)
    eval_batches: int = option(8, "validation batches per evaluation", control=True)
    tensorboard: bool = option(False, "also write TensorBoard events", control=True)
    report: bool = option(True, "draw report.png at the end", control=True)
    peak_tflops: float | None = option(
        None, "device peak for MFU (default: measured GEMMs of the chosen dtype)", control=True
    )


SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "data": DataSection,
    "optim": OptimSection,
    "run": RunSection,
    "parallel": ParallelSection,
    "checkpoint": CheckpointSection,
    "logging": LoggingSection,
}


@dataclass
class TrainConfig:
    out: str = option("runs/tiny", "run folder: metrics.jsonl, checkpoints/, hf/, report.png", control=True)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "config") -> TrainConfig:
        """From nested sections ({"optim": {"lr": ...}}), dotted keys ("optim.lr") or the flat
        alias names ("lr"), in any mix; unknown keys are a ConfigError naming them."""
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: expected a table of options, got {type(values).__name__}")
        cfg = cls()
        unknown = []
        for key, value in values.items():
            if key in SECTIONS and isinstance(value, dict):
                for sub, v in value.items():
                    if not _set(cfg, f"{key}.{sub}", v):
                        unknown.append(f"{key}.{sub}")
            elif not _set(cfg, ALIASES.get(key, key), value):
                unknown.append(key)
        if unknown:
            raise ConfigError(
                f"{where}: unknown keys {sorted(unknown)}; valid keys are "
                f"{sorted(k for k in ALIASES.values())} (or their sections as tables)"
            )
        return cfg

    @classmethod
    def from_file(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
        """Read a TOML (.toml) or JSON run config; `overrides` (dotted or alias keys) win."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            if path.suffix == ".toml":
                import tomllib

                values = tomllib.loads(path.read_text())
            else:
                values = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            kind = "TOML" if path.suffix == ".toml" else "JSON"
            raise ConfigError(f"config file {path} is not valid {kind}: {e}") from None
        cfg = cls.from_dict(values, where=str(path))
        return cfg.updated(overrides or {}) if overrides else cfg

    def updated(self, values: dict[str, Any]) -> TrainConfig:
        """A copy with `values` (dotted or alias keys) applied."""
        cfg = TrainConfig.from_dict(self.to_dict())
        for key, value in values.items():
            if not _set(cfg, ALIASES.get(key, key), value):
                raise ConfigError(f"unknown option {key!r}")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """{"optim.lr": ..., ...}: every option by its dotted name."""
        return {name: _get(self, name) for name in ALIASES.values()}

    def changes_trajectory(self, name: str) -> bool:
        return not FIELDS[name].metadata.get("control")

    # ------------------------------------------------------------------ checking
    def validate(self) -> None:
        """ConfigError naming the first invalid option (`section.field=value: rule`)."""

        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ConfigError(f"{name}={_get(self, name)!r}: {rule}")

        for name, f in FIELDS.items():  # types and choices, from the declarations
            value, kind = _get(self, name), HINTS[name]
            need(_has_type(value, kind), name, f"must be {_type_name(kind)}")
            if f.metadata.get("choices") and value is not None:
                need(value in f.metadata["choices"], name, f"must be one of {list(f.metadata['choices'])}")
        d, o, r, p, lg = self.data, self.optim, self.run, self.parallel, self.logging
        for name in (
            "data.seq_len",
            "data.batch_size",
            "data.grad_accum",
            "optim.steps",
            "logging.log_every",
            "logging.eval_every",
            "logging.eval_batches",
            "checkpoint.save_every",
            "checkpoint.keep",
            "parallel.ep",
            "parallel.pp",
        ):
            need(_get(self, name) > 0, name, "must be a positive integer")
        for name in (
            "run.stop_after",
            "run.max_minutes",
            "data.max_corpus_mb",
            "run.threads",
            "parallel.pp_microbatches",
            "parallel.ranks_per_node",
        ):
            need(_get(self, name) is None or _get(self, name) > 0, name, "must be > 0 (or unset)")
        need(o.lr > 0 and math.isfinite(o.lr), "optim.lr", "must be a positive number")
        need(0 < o.warmup <= o.steps, "optim.warmup_steps", f"must be in [1, steps={o.steps}]")
        need(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
        need(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        need(0 <= o.beta1 < 1, "optim.beta1", "must be in [0, 1)")
        need(0 <= o.beta2 < 1, "optim.beta2", "must be in [0, 1)")
        need(o.grad_clip > 0, "optim.grad_clip", "must be > 0")
        need(o.mtp_lambda >= 0, "optim.mtp_lambda", "must be >= 0")
        need(o.mtp_lambda_later >= 0, "optim.mtp_lambda_later", "must be >= 0")
        need(o.bias_gamma >= 0, "optim.bias_gamma", "must be >= 0")
        need(0 < d.val_fraction < 1, "data.val_fraction", "must be in (0, 1)")
        need(bool(d.sources), "data.sources", "needs at least one source")
        need(all(isinstance(spec, str) for spec in d.sources), "data.sources", "must be a list of strings")
        mixture(d.sources)  # DataError naming a --data source whose weight is not a positive number
        need(bool(d.text_field), "data.text_field", "must name a field")
        need(
            r.device in ("auto", "cpu") or r.device.startswith("cuda"),
            "run.device",
            "must be auto, cpu or cuda[:N]",
        )
        need(p.sdc_check_every >= 0, "parallel.sdc_check_every", "must be >= 0 (0: off)")
        for name in ("parallel.dp_replicate", "parallel.dp_shard"):
            need(_get(self, name) == -1 or _get(self, name) > 0, name, "must be > 0 or -1 (auto)")
        out = Path(self.out)
        need(not out.exists() or out.is_dir(), "out", "is a file; give a folder for the run")
        if r.device.startswith("cuda"):
            import torch

            need(torch.cuda.is_available(), "run.device", "CUDA is not available on this machine")
        for enabled, name, module in (
            (r.fp8, "run.fp8", "dsv3.fp8.linear"),
            (lg.tensorboard, "logging.tensorboard", "tensorboard"),
        ):
            if enabled and importlib.util.find_spec(module) is None:
                raise ConfigError(f"{name}=True: the module {module} is not installed")


# ---------------------------------------------------------------------------------- the field table
FIELDS: dict[str, dataclasses.Field] = {
    "out": next(f for f in dataclasses.fields(TrainConfig) if f.name == "out")
}
HINTS: dict[str, Any] = {"out": str}
for _section, _cls in SECTIONS.items():
    _hints = typing.get_type_hints(_cls)
    for _f in dataclasses.fields(_cls):
        FIELDS[f"{_section}.{_f.name}"] = _f
        HINTS[f"{_section}.{_f.name}"] = _hints[_f.name]
# legacy flat name (the field's own name, or its alias) -> dotted name
ALIASES: dict[str, str] = {"out": "out"}
for _name, _f in FIELDS.items():
    if "." in _name:
        ALIASES[(_f.metadata or {}).get("alias") or _name.split(".", 1)[1]] = _name
for _name in FIELDS:
    ALIASES.setdefault(_name, _name)


def _get(cfg: TrainConfig, name: str) -> Any:
    obj = cfg
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _set(cfg: TrainConfig, name: str, value: Any) -> bool:
    if name not in FIELDS:
        return False
    *path, last = name.split(".")
    obj = cfg
    for part in path:
        obj = getattr(obj, part)
    setattr(obj, last, value)
    return True


def _has_type(value: Any, kind: Any) -> bool:
    for t in _options(kind):
        if t is type(None) and value is None:
            return True
        origin = typing.get_origin(t) or t
        if origin is bool:
            if isinstance(value, bool):
                return True
        elif origin is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return True
        elif origin is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return True
        elif isinstance(value, origin):
            return True
    return False


def _type_name(kind: Any) -> str:
    names = {
        int: "an integer",
        float: "a number",
        bool: "true or false",
        str: "a string",
        list: "a list",
        dict: "a table (JSON object)",
        type(None): "unset",
    }
    return " or ".join(names.get(typing.get_origin(t) or t, str(t)) for t in _options(kind))


def _options(kind: Any) -> tuple:
    """The members of a union type (int | None -> (int, NoneType)), or (kind,)."""
    return typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)
