"""A micro model (random weights, MTP on) with the tests' BPE tokenizer: fast to serve and generate."""

import shutil
from pathlib import Path

import torch

from dsv3.config import ModelConfig
from dsv3.model.transformer import Transformer

MICRO_VOCAB = 2048  # = the tokenizer_file fixture's vocabulary (tests/conftest.py)
MICRO = dict(vocab_size=MICRO_VOCAB, hidden_size=64, num_hidden_layers=2, intermediate_size=128,
             num_attention_heads=2, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
             v_head_dim=16, first_k_dense_replace=1, moe_intermediate_size=32, n_routed_experts=8,
             num_experts_per_tok=2, n_group=2, topk_group=1, max_position_embeddings=256,
             initializer_range=0.1)  # fmt: skip


def save_micro_model(path: Path, tokenizer_file: Path) -> Path:
    """An HF-layout folder: config.json, model.safetensors and tokenizer.json of the micro model."""
    torch.manual_seed(0)
    Transformer(ModelConfig.from_preset("tiny", **MICRO)).save_pretrained(path)
    shutil.copyfile(tokenizer_file, path / "tokenizer.json")
    return path
