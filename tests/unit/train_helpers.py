"""Shared fixtures-in-functions for the tests/unit/test_train_*.py files: a micro model and corpus."""

from __future__ import annotations

import sysconfig
from pathlib import Path

from dsv3.train.config import TrainConfig

# A micro DeepSeek-V3 (MLA, 1 dense + 1 MoE layer with 8 experts in 2 groups, MTP depth 1).
MICRO_MODEL = dict(
    vocab_size=512, hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=2,
    q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    first_k_dense_replace=1, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
    n_group=2, topk_group=1, max_position_embeddings=128,
)  # fmt: skip


def write_corpus(folder: Path, n_docs: int = 40) -> Path:
    """n_docs real text files (stdlib modules, cut to 4 KB each) in a fresh folder."""
    folder.mkdir(parents=True, exist_ok=True)
    stdlib = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    for i, src in enumerate(stdlib[:n_docs]):
        (folder / f"doc{i:03d}.txt").write_text(src.read_text(errors="replace")[:4000])
    return folder


def micro_config(tmp: Path, corpus: Path, cache: Path, **overrides) -> TrainConfig:
    """A TrainConfig for the micro model that runs a step in milliseconds."""
    values = dict(
        out=str(tmp / "run"), data=[str(corpus)], cache_dir=str(cache), model_overrides=dict(MICRO_MODEL),
        seq_len=32, batch_size=4, steps=6, lr=3e-3, dtype="float32", val_fraction=0.1, log_every=1,
        eval_every=3, eval_batches=2, save_every=3, report=False, peak_tflops=1.0, threads=1,
    )  # fmt: skip
    values.update(overrides)
    return TrainConfig.from_dict(values)
