"""Real tensors for the FP8 benchmarks: a trained dsv3 checkpoint, its validation batches, and
forward hooks that capture (a) the inputs of every Linear / expert projection with its weight
and (b) the residual-branch outputs (attention and MLP/MoE outputs before the residual add).

Without a checkpoint, ``trained_model`` trains the tiny preset for a few steps first.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from torch import nn

from common import TRAINED_RUN

TRAINED = TRAINED_RUN  # a run folder (its latest checkpoint) or a checkpoint folder


def trained_model(checkpoint: Path | None, batches: int, steps_if_missing: int = 30):
    """(model in eval mode, list of validation (x, y) batches of the checkpoint's run)."""
    from dsv3.hf import resolve_model_folder
    from dsv3.model.transformer import Transformer
    from dsv3.tokenizer import load_tokenizer
    from dsv3.train.config import TrainConfig
    from dsv3.train.data import Corpus, build_token_cache
    from dsv3.train.packing import PackedTokens, validation_batches
    from dsv3.train.trainer import Trainer

    if checkpoint is None or not checkpoint.exists():
        out = Path(tempfile.mkdtemp(prefix="dsv3_fp8_"))
        print(
            f"no checkpoint at {checkpoint}: training the tiny preset for {steps_if_missing} steps in {out}"
        )
        cfg = TrainConfig.from_dict(
            {
                "out": str(out),
                "steps": steps_if_missing,
                "lr": 2e-3,
                "schedule": "cosine",
                "warmup_steps": 5,
                "report": False,
                "eval_every": 10**9,
            }
        )
        Trainer(cfg).fit()
        checkpoint = out
    checkpoint = resolve_model_folder(checkpoint)
    cfg = TrainConfig.from_dict(json.loads((checkpoint / "train_config.json").read_text())["train"])
    model = Transformer.from_pretrained(checkpoint).eval()
    tok = load_tokenizer(checkpoint / "tokenizer.json", model.cfg.vocab_size)
    d = cfg.data
    cache = build_token_cache(Corpus(d.sources, None), tok, d.val_fraction, Path(d.cache_dir))
    val = PackedTokens(cache.tokens("val"), d.seq_len, tok.eos_id, "validation")
    return model, [(b.input_ids, b.labels) for b in validation_batches(val, d.batch_size, batches)]


@torch.no_grad()
def capture(model: nn.Module, batches: list) -> tuple[dict, dict]:
    """Run ``batches`` in FP32 and return ({linear name: (inputs [T, K], weight [N, K])},
    {branch name: outputs [T, H]}); expert projections are captured per expert."""
    from dsv3.model.moe import GroupedExperts

    linears: dict[str, tuple[list, torch.Tensor]] = {}
    branches: dict[str, list] = {}
    hooks = []
    for name, module in model.named_modules():
        if type(module) is nn.Linear and not name.endswith(("lm_head", "gate")):
            linears[name] = ([], module.weight.detach())
            hooks.append(
                module.register_forward_hook(
                    lambda m, a, o, n=name: linears[n][0].append(a[0].flatten(0, -2))
                )
            )
        elif isinstance(module, GroupedExperts):
            hooks.append(module.register_forward_hook(lambda m, a, o, n=name: _experts(linears, n, m, *a)))
        elif name.endswith((".self_attn", ".mlp")) and "layers" in name:
            hooks.append(
                module.register_forward_hook(
                    lambda m, a, o, n=name: branches.setdefault(n, []).append(
                        (o[0] if isinstance(o, tuple) else o).flatten(0, -2)
                    )
                )
            )
    try:
        for x, _ in batches:
            model(x)
    finally:
        for h in hooks:
            h.remove()
    inputs = {n: (torch.cat(xs), w) for n, (xs, w) in linears.items() if xs}
    return inputs, {n: torch.cat(v) for n, v in branches.items()}


def _experts(linears: dict, name: str, module: nn.Module, x: torch.Tensor, offs: torch.Tensor) -> None:
    """Per expert: gate_up inputs are the routed tokens; down inputs are silu(gate) * up."""
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            xe = x[start:end].float()
            gate, up = (xe @ module.gate_up_proj[e].t()).chunk(2, dim=-1)
            for proj, inp in (("gate_up_proj", xe), ("down_proj", torch.nn.functional.silu(gate) * up)):
                key = f"{name}.{e}.{proj}"
                entry = linears.setdefault(key, ([], getattr(module, proj)[e].detach()))
                entry[0].append(inp)
        start = end


def outlier_ratio(x: torch.Tensor) -> float:
    """Largest channel amax over the median channel amax: how strong the outlier channels are."""
    amax = x.abs().amax(0)
    return (amax.max() / amax.median().clamp(min=1e-30)).item()
