"""`dsv3 convert --to gguf`: names, shapes and metadata as llama.cpp's deepseek2 reads them, values
round-tripped through gguf's GGUFReader (f32/bf16 exactly, q8_0 within its rounding bound and
code for code against a plain reference), the tokenizer, the bridged config gaps, the warnings,
bad input refused before work; and, when a llama.cpp build is found (LLAMA_CPP_BIN: its bin/
folder or llama-server itself; else llama-server on PATH), greedy tokens identical to dsv3's."""

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from dsv3 import ModelConfig, Transformer
from dsv3 import gguf as gguf_io
from dsv3 import hf as hf_io
from dsv3.cli import main
from dsv3.errors import ConfigError
from dsv3.infer import convert as conv

gguf = pytest.importorskip("gguf")

# 1 dense + 2 MoE layers, 8 experts top-2 without group limits (exactly representable), 8 [PAD] tokens
MICRO = dict(
    vocab_size=2056,
    hidden_size=64,
    num_hidden_layers=3,
    intermediate_size=96,
    num_attention_heads=2,
    q_lora_rank=32,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    first_k_dense_replace=1,
    moe_intermediate_size=32,
    n_shared_experts=1,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=1,
    topk_group=1,
    num_nextn_predict_layers=1,
    max_position_embeddings=256,
    rope_scaling=None,
    initializer_range=0.1,
)


def _folder(tmp: Path, tokenizer_file: Path, **overrides) -> Path:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", **{**MICRO, **overrides}))
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(-0.05, 0.05)  # a selection bias that matters
    model.save_pretrained(tmp / "src")
    shutil.copyfile(tokenizer_file, tmp / "src" / "tokenizer.json")
    return tmp / "src"


def _convert(folder: Path, gguf_type: str = "f32", log=None) -> Path:
    dst = folder.parent / f"model-{gguf_type}.gguf"
    conv.convert(folder, dst, "gguf", overwrite=True, gguf_type=gguf_type, log=log or (lambda _: None))
    return dst


def _read(path: Path):
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    return reader, tensors


def _field(reader, key: str):
    return reader.fields[key].contents()


def _source(folder: Path) -> dict[str, torch.Tensor]:
    return dict(hf_io.iter_checkpoint(folder))


def test_names_shapes_metadata_and_exact_f32_values(tmp_path, tokenizer_file):
    folder = _folder(tmp_path, tokenizer_file)
    reader, tensors = _read(_convert(folder))
    cfg, src = ModelConfig.from_hf(folder), _source(folder)
    per_layer = {
        "attn_norm",
        "attn_q_a",
        "attn_q_a_norm",
        "attn_q_b",
        "attn_kv_a_mqa",
        "attn_kv_a_norm",
        "attn_kv_b",
        "attn_output",
        "ffn_norm",
    }
    dense, moe = (
        {"ffn_gate", "ffn_up", "ffn_down"},
        {
            "ffn_gate_inp",
            "ffn_gate_exps",
            "ffn_up_exps",
            "ffn_down_exps",
            "ffn_gate_shexp",
            "ffn_up_shexp",
            "ffn_down_shexp",
        },
    )
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"}
    for i in range(cfg.num_hidden_layers):
        expected |= {f"blk.{i}.{n}.weight" for n in per_layer | (dense if i == 0 else moe)}
        expected |= {f"blk.{i}.exp_probs_b.bias"} if i > 0 else set()
    assert set(tensors) == expected  # the MTP layer (blk.3) is not exported
    # ggml dims are torch's reversed; experts stacked as {in, out, E}
    hidden, inter, experts = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts
    assert list(tensors["blk.1.ffn_gate_exps.weight"].shape) == [hidden, inter, experts]
    assert list(tensors["blk.1.ffn_down_exps.weight"].shape) == [inter, hidden, experts]
    assert list(tensors["blk.0.attn_kv_b.weight"].shape) == [cfg.kv_lora_rank, 2 * (16 + 16)]
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in tensors.values())
    # values: exact, experts in expert order
    for e in (0, 5):
        np.testing.assert_array_equal(
            tensors["blk.2.ffn_up_exps.weight"].data[e],
            src[f"model.layers.2.mlp.experts.{e}.up_proj.weight"].numpy(),
        )
    np.testing.assert_array_equal(
        tensors["blk.1.exp_probs_b.bias"].data, src["model.layers.1.mlp.gate.e_score_correction_bias"].numpy()
    )
    np.testing.assert_array_equal(tensors["output.weight"].data, src["lm_head.weight"].numpy())
    np.testing.assert_array_equal(
        tensors["blk.2.attn_q_b.weight"].data, src["model.layers.2.self_attn.q_b_proj.weight"].numpy()
    )
    # metadata llama.cpp's deepseek2 loader reads
    want = {
        "general.architecture": "deepseek2",
        "deepseek2.block_count": 3,
        "deepseek2.leading_dense_block_count": 1,
        "deepseek2.embedding_length": 64,
        "deepseek2.feed_forward_length": 96,
        "deepseek2.attention.head_count": 2,
        "deepseek2.attention.q_lora_rank": 32,
        "deepseek2.attention.kv_lora_rank": 32,
        "deepseek2.attention.key_length": 24,
        "deepseek2.attention.value_length": 16,
        "deepseek2.rope.dimension_count": 8,
        "deepseek2.expert_count": 8,
        "deepseek2.expert_used_count": 2,
        "deepseek2.expert_shared_count": 1,
        "deepseek2.expert_feed_forward_length": 32,
        "deepseek2.expert_weights_norm": True,
        "deepseek2.expert_gating_func": int(gguf.ExpertGatingFuncType.SIGMOID),
        "deepseek2.vocab_size": 2056,
        "deepseek2.context_length": 256,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.add_bos_token": True,
        "general.file_type": int(gguf.LlamaFileType.ALL_F32),
    }
    assert {k: _field(reader, k) for k in want} == want
    assert _field(reader, "deepseek2.expert_weights_scale") == pytest.approx(cfg.routed_scaling_factor)
    assert "deepseek2.expert_group_count" not in reader.fields


def test_tokenizer_round_trip(tmp_path, tokenizer_file):
    folder = _folder(tmp_path, tokenizer_file)
    reader, _ = _read(_convert(folder))
    spec = json.loads(tokenizer_file.read_text())
    vocab = spec["model"]["vocab"]
    tokens, types = _field(reader, "tokenizer.ggml.tokens"), _field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == MICRO["vocab_size"] == len(types)
    assert all(tokens[i] == t for t, i in vocab.items())
    assert tokens[2048:] == [f"[PAD{i}]" for i in range(2048, 2056)]
    assert types[:2] == [gguf.TokenType.CONTROL] * 2 and types[2] == gguf.TokenType.NORMAL
    assert set(types[2048:]) == {gguf.TokenType.UNUSED}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    assert _field(reader, "tokenizer.ggml.merges") == merges
    assert "<|Assistant|>" in _field(reader, "tokenizer.chat_template")


def test_bf16_rounds_like_torch_and_keeps_router_and_norms_f32(tmp_path, tokenizer_file):
    folder = _folder(tmp_path, tokenizer_file)
    reader, tensors = _read(_convert(folder, "bf16"))
    src = _source(folder)
    q_b = tensors["blk.1.attn_q_b.weight"]
    assert q_b.tensor_type == gguf.GGMLQuantizationType.BF16
    as_bf16 = src["model.layers.1.self_attn.q_b_proj.weight"].to(torch.bfloat16)
    np.testing.assert_array_equal(np.asarray(q_b.data).view(np.int16), as_bf16.view(torch.int16).numpy())
    for name in ("blk.1.ffn_gate_inp.weight", "blk.1.attn_norm.weight", "blk.1.exp_probs_b.bias"):
        assert tensors[name].tensor_type == gguf.GGMLQuantizationType.F32
    np.testing.assert_array_equal(
        tensors["blk.1.ffn_gate_inp.weight"].data, src["model.layers.1.mlp.gate.weight"].numpy()
    )
    assert _field(reader, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_BF16)


def _q8_0_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's quantize_row_q8_0_ref, one block of 32 at a time: d = amax/127 (stored as FP16),
    q = round-half-away-from-zero(x/d)."""
    blocks = x.astype(np.float32).reshape(-1, 32)
    scales, codes = [], []
    for block in blocks:
        d = np.float32(np.abs(block).max() / np.float32(127))
        inv = np.float32(0) if d == 0 else np.float32(1) / d
        codes.append([int(np.sign(v) * np.floor(abs(v) + 0.5)) for v in block * inv])
        scales.append(np.float16(d))
    return np.array(scales, dtype=np.float16), np.array(codes, dtype=np.int8)


def test_q8_0_matches_the_reference_codes_and_its_error_bound(tmp_path, tokenizer_file):
    folder = _folder(tmp_path, tokenizer_file)
    reader, tensors = _read(_convert(folder, "q8_0"))
    src = _source(folder)
    t = tensors["blk.2.attn_output.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
    raw = np.asarray(t.data).reshape(-1, 34)  # per block: FP16 d, 32 int8 codes
    x = src["model.layers.2.self_attn.o_proj.weight"].numpy()
    scales, codes = _q8_0_reference(x)
    np.testing.assert_array_equal(raw[:, :2].copy().view(np.float16).ravel(), scales)
    np.testing.assert_array_equal(raw[:, 2:].copy().view(np.int8), codes)
    deq = gguf.quants.dequantize(np.asarray(t.data), gguf.GGMLQuantizationType.Q8_0).reshape(-1, 32)
    d = np.abs(x.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
    bound = d * (0.5 + 127 * 2.0**-11)  # rounding to the grid + FP16 rounding of d (relative 2^-11)
    assert (np.abs(deq - x.reshape(-1, 32)) <= bound).all()
    assert tensors["blk.1.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert tensors["blk.1.attn_q_b.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert _field(reader, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q8_0)


def test_rows_not_a_multiple_of_32_stay_f32_in_q8_0(tmp_path, tokenizer_file):
    folder = _folder(tmp_path, tokenizer_file, moe_intermediate_size=40)
    _, tensors = _read(_convert(folder, "q8_0"))
    assert tensors["blk.1.ffn_down_exps.weight"].tensor_type == gguf.GGMLQuantizationType.F32  # rows of 40
    assert tensors["blk.1.ffn_up_exps.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0  # rows of 64


def test_group_limited_routing_warns_and_says_why(tmp_path, tokenizer_file):
    folder = _folder(tmp_path, tokenizer_file, n_group=4, topk_group=2)
    lines = []
    reader, _ = _read(_convert(folder, log=lines.append))
    warning = [line for line in lines if line.startswith("warning:")]
    assert len(warning) == 1 and "group-limited routing (n_group=4, topk_group=2)" in warning[0]
    assert "ignore" in warning[0] and "n_group=1" in warning[0]
    assert _field(reader, "deepseek2.expert_group_count") == 4
    assert _field(reader, "deepseek2.expert_group_used_count") == 2
    assert gguf_io.caveats(ModelConfig.from_preset("tiny", **MICRO)) == []
    v2 = ModelConfig.from_preset(
        "tiny", **{**MICRO, "n_group": 4, "topk_group": 2, "topk_method": "group_limited_greedy"}
    )
    assert "top-2" in gguf_io.caveats(v2)[0]


def test_rotate_half_rope_rows_become_interleaved_pairs():
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", **{**MICRO, "rope_interleave": False})
    model = Transformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        reference = model(ids).logits
        for block in model.layers.values():
            attn = block.self_attn
            attn.q_b_proj.weight.copy_(
                gguf_io.rope_rows_to_interleaved(attn.q_b_proj.weight, 8, cfg.qk_head_dim)
            )
            w = attn.kv_a_proj_with_mqa.weight
            w.copy_(gguf_io.rope_rows_to_interleaved(w, 8, w.shape[0]))
            attn.rope_interleave = True
        torch.testing.assert_close(model(ids).logits, reference, rtol=0, atol=0)
    w = torch.arange(2 * 12.0).view(2, 12, 1)  # 2 heads of [4 nope, 8 rope] rows
    out = gguf_io.rope_rows_to_interleaved(w.reshape(24, 1), 8, 12).view(2, 12)
    assert out[0].tolist() == [0, 1, 2, 3, 4, 8, 5, 9, 6, 10, 7, 11]


def test_no_shared_expert_becomes_a_zero_one_and_tied_embeddings_an_output(tmp_path, tokenizer_file):
    folder = _folder(tmp_path, tokenizer_file, n_shared_experts=0, tie_word_embeddings=True)
    reader, tensors = _read(_convert(folder))
    assert _field(reader, "deepseek2.expert_shared_count") == 1
    for proj in ("gate", "up", "down"):
        assert not np.asarray(tensors[f"blk.1.ffn_{proj}_shexp.weight"].data).any()
    np.testing.assert_array_equal(tensors["output.weight"].data, tensors["token_embd.weight"].data)


def test_fp8_release_is_dequantized(tmp_path, tokenizer_file):
    folder = _folder(tmp_path, tokenizer_file, hidden_size=128, q_lora_rank=128, kv_lora_rank=128)
    fp8 = tmp_path / "fp8"
    conv.convert(folder, fp8, "fp8", log=lambda _: None)
    _, tensors = _read(_convert(fp8))
    src = _source(fp8)  # iter_checkpoint dequantizes with the block scales
    np.testing.assert_array_equal(
        tensors["blk.1.attn_kv_b.weight"].data, src["model.layers.1.self_attn.kv_b_proj.weight"].numpy()
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--to", "gguf", "--gguf-type", "q4_k"], "--gguf-type 'q4_k': choose one of f32, bf16, q8_0"),
        (["--to", "hf", "--gguf-type", "bf16"], "applies to --to gguf only"),
    ],
)
def test_bad_flags_are_one_line_errors_before_work(tmp_path, tokenizer_file, capsys, args, message):
    folder = _folder(tmp_path, tokenizer_file)
    dst = tmp_path / "out.gguf"
    assert main(["convert", str(folder), str(dst), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not dst.exists()


def test_bad_inputs_are_refused_before_work(tmp_path, tokenizer_file):
    folder = _folder(tmp_path, tokenizer_file)
    (tmp_path / "a_folder").mkdir()
    with pytest.raises(ConfigError, match="is a folder; --to gguf writes one file"):
        conv.plan(folder, tmp_path / "a_folder", "gguf", overwrite=True)
    with pytest.raises(ConfigError, match="does not exist"):
        conv.plan(folder, tmp_path / "missing" / "m.gguf", "gguf")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match="has no tokenizer.json"):
        conv.plan(folder, tmp_path / "m.gguf", "gguf")
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab={"<|bos|>": 0, "<|eos|>": 1, "a": 2}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    with pytest.raises(ConfigError, match="byte-level BPE"):
        conv.plan(folder, tmp_path / "m.gguf", "gguf")
    biased = _folder(tmp_path / "b", tokenizer_file, attention_bias=True)
    with pytest.raises(ConfigError, match="attention_bias=True"):
        conv.plan(biased, tmp_path / "m.gguf", "gguf")
    assert not (tmp_path / "m.gguf").exists()


# ---------------------------------------------------------------------- against llama.cpp itself
def _llama_server() -> Path | None:
    where = os.environ.get("LLAMA_CPP_BIN")
    if where:
        path = Path(where)
        return path / "llama-server" if path.is_dir() else path
    found = shutil.which("llama-server")
    return Path(found) if found else None


class LlamaServer:
    """llama-server on a free port, F32 KV cache (its default F16 cache rounds K and V)."""

    def __init__(self, binary: Path, model: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        cmd = [
            binary,
            "-m",
            model,
            "--port",
            self.port,
            "-t",
            1,
            "-c",
            512,
            "-np",
            1,
            "-ctk",
            "f32",
            "-ctv",
            "f32",
        ]
        self.proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1)
                return
            except OSError:
                time.sleep(0.1)
        self.close()
        raise RuntimeError(f"llama-server did not start: {self.proc.stderr.read().decode()[-2000:]}")

    def post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        return json.loads(urllib.request.urlopen(req, timeout=120).read())

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()


@pytest.mark.skipif(
    _llama_server() is None, reason="no llama.cpp build (set LLAMA_CPP_BIN to its bin/ folder)"
)
@pytest.mark.parametrize("overrides", [{}, {"rope_interleave": False, "n_shared_experts": 0}])
def test_llama_cpp_decodes_the_same_greedy_tokens(tmp_path, tokenizer_file, overrides):
    from dsv3.infer.chat import ChatTokenizer
    from dsv3.infer.engine import Engine, SamplingParams

    folder = _folder(tmp_path, tokenizer_file, **overrides)
    server = LlamaServer(_llama_server(), _convert(folder))
    try:
        engine = Engine.from_pretrained(folder, dtype=torch.float32, max_batch_size=1, max_seq_len=256)
        tok = ChatTokenizer.from_folder(folder, engine.cfg.vocab_size)
        text = "def fib(n):\n    return n if n < 2 else fib(n - 1)  # héllo wörld 123 4567\n\tx  =  'it''s'"
        prompt = tok.encode(text)
        assert server.post("/tokenize", {"content": text, "add_special": True})["tokens"] == prompt
        ours = engine.generate([prompt], SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))[
            0
        ].token_ids
        theirs = server.post(
            "/completion",
            {
                "prompt": prompt,
                "n_predict": 32,
                "temperature": 0,
                "top_k": 1,
                "ignore_eos": True,
                "return_tokens": True,
                "cache_prompt": False,
            },
        )["tokens"]
        assert theirs == ours
    finally:
        server.close()
