"""What the tests share: the small model configs and the helpers that build runs, corpora and
checkpoints from them. Importable from every test folder (tests/ is on sys.path through the root
conftest.py, and spawned distributed workers inherit it).

    MICRO       the micro DeepSeek-V3 that trains in milliseconds a step: MLA, 1 dense + 1 MoE
                layer with 8 experts in 2 groups, MTP depth 1 (training, distributed, CLI tests)
    MICRO_SERVE MICRO with the vocabulary of the tests' tokenizer (conftest `tokenizer_file`) and a
                longer context, for serving and generation
    ENGINE      3 layers (1 dense + 2 MoE, 8 experts in 2 groups), MTP depth 1, vocabulary 96: the
                inference engine, speculative decoding, EP serving, overlap and disaggregation tests
    SMALL_MLA   MLA with q-LoRA and YaRN (mscale on the softmax scale), no MTP (attention, cache)
    FP8_BLOCKS  shapes on purpose not multiples of 128, so 128x128 FP8 blocks have partial edges
                (mlp.up_proj [272, 160] is a 3x2 block grid): checkpoint FP8 import/export/convert

and `dsv3_serve(...)`: `dsv3 serve` as a user starts it, a subprocess on a free local port;
`count_compiled_graphs(monkeypatch)`: torch.compile with a backend that only records graphs.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MICRO = dict(
    vocab_size=512,
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=128,
    num_attention_heads=2,
    q_lora_rank=32,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    first_k_dense_replace=1,
    moe_intermediate_size=32,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    max_position_embeddings=128,
)
MICRO_VOCAB = 2048  # = the tokenizer_file fixture's vocabulary (tests/conftest.py)
MICRO_SERVE = {**MICRO, "vocab_size": MICRO_VOCAB, "max_position_embeddings": 256, "initializer_range": 0.1}
ENGINE = dict(
    vocab_size=96,
    hidden_size=64,
    num_hidden_layers=3,
    intermediate_size=96,
    num_attention_heads=4,
    q_lora_rank=48,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=12,
    first_k_dense_replace=1,
    moe_intermediate_size=32,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    num_nextn_predict_layers=1,
    max_position_embeddings=128,
    initializer_range=0.15,
)
SMALL_MLA = dict(
    vocab_size=64,
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=64,
    num_attention_heads=4,
    q_lora_rank=32,
    kv_lora_rank=24,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=12,
    first_k_dense_replace=1,
    moe_intermediate_size=16,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    num_nextn_predict_layers=0,
    max_position_embeddings=128,
    rope_scaling={
        "type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 32,
        "mscale": 0.9,
        "mscale_all_dim": 0.9,
    },
    initializer_range=0.1,
)
FP8_BLOCKS = dict(
    vocab_size=300,
    hidden_size=160,
    num_hidden_layers=2,
    intermediate_size=272,
    num_attention_heads=2,
    q_lora_rank=136,
    kv_lora_rank=72,
    qk_nope_head_dim=24,
    qk_rope_head_dim=8,
    v_head_dim=24,
    moe_intermediate_size=40,
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    first_k_dense_replace=1,
    num_nextn_predict_layers=1,
    initializer_range=0.05,
)


def write_corpus(folder: Path, n_docs: int = 40) -> Path:
    """n_docs real text files (stdlib modules, cut to 4 KB each) in a fresh folder."""
    folder.mkdir(parents=True, exist_ok=True)
    stdlib = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    for i, src in enumerate(stdlib[:n_docs]):
        (folder / f"doc{i:03d}.txt").write_text(src.read_text(errors="replace")[:4000])
    return folder


def micro_config(tmp: Path, corpus: Path, cache: Path, **overrides):
    """A TrainConfig (flat option names) for the MICRO model that runs a step in milliseconds."""
    from dsv3.train.config import TrainConfig

    values = dict(
        out=str(tmp / "run"),
        data=[str(corpus)],
        cache_dir=str(cache),
        model_overrides=dict(MICRO),
        seq_len=32,
        batch_size=4,
        steps=6,
        lr=3e-3,
        dtype="float32",
        val_fraction=0.1,
        log_every=1,
        eval_every=3,
        eval_batches=2,
        save_every=3,
        report=False,
        peak_tflops=1.0,
        threads=1,
    )
    values.update(overrides)
    return TrainConfig.from_dict(values)


def save_micro_model(path: Path, tokenizer_file: Path) -> Path:
    """An HF-layout folder: config.json, model.safetensors and tokenizer.json of MICRO_SERVE."""
    import torch

    from dsv3.config import ModelConfig
    from dsv3.model.transformer import Transformer

    torch.manual_seed(0)
    Transformer(ModelConfig.from_preset("tiny", **MICRO_SERVE)).save_pretrained(path)
    shutil.copyfile(tokenizer_file, path / "tokenizer.json")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def dsv3_serve(*args: str, cwd: Path | None = None, timeout_s: float = 120) -> Iterator[str]:
    """Run `dsv3 serve ARGS --port P` (in `cwd`) until the block ends; yields its base URL,
    http://127.0.0.1:P (a --port in ARGS is overridden: argparse keeps the last)."""
    import httpx

    port = free_port()
    command = [sys.executable, "-m", "dsv3", "serve", *args, "--port", str(port)]
    proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"dsv3 serve exited with {proc.returncode}: {proc.stdout.read()}")
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"dsv3 serve did not answer /health within {timeout_s} s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def count_compiled_graphs(monkeypatch) -> list:
    """Make torch.compile (for the rest of the test) use a backend that records each graph Dynamo
    traces and runs its ops eagerly: Dynamo's guards decide what compiles, in seconds instead of
    Inductor's minutes. Resets Dynamo's caches; returns the list the graphs are appended to."""
    import functools

    import torch
    import torch._dynamo

    graphs = []

    def counting_backend(gm, example_inputs, options=None):  # options: the Engine's Inductor settings
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counting_backend))
    torch._dynamo.reset()
    return graphs
