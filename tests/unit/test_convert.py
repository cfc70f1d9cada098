"""`dsv3 convert`: ours -> HF, BF16 <-> FP8 round trips, one shard in memory at a time, atomic
output, and bad input rejected before any work."""

import gc
import json
import shutil
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dsv3 import ModelConfig, Transformer
from dsv3 import hf as hf_io
from dsv3.checkpoint import save_checkpoint
from dsv3.cli import main
from dsv3.hf import write_pretrained
from dsv3.infer import convert as conv
from dsv3.infer.chat import DEFAULT_CHAT_TEMPLATE
from fixtures import FP8_BLOCKS

CFG = FP8_BLOCKS


@pytest.fixture(autouse=True)
def _eager_fp8(monkeypatch):
    monkeypatch.setenv("DSV3_FP8_COMPILE", "0")


def _model():
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset("tiny", **CFG))


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in hf_io.checkpoint_files(folder):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _hf_folder(tmp: Path, tokenizer: Path, max_shard_bytes=None, dtype=None) -> Path:
    m = _model() if dtype is None else _model().to(dtype)
    m.save_pretrained(tmp / "src", max_shard_bytes=max_shard_bytes)
    shutil.copyfile(tokenizer, tmp / "src" / "tokenizer.json")
    return tmp / "src"


def test_training_run_to_hf_keeps_tensors_and_adds_the_chat_template(tmp_path, tokenizer_file):
    m = _model()

    def write(folder: Path) -> None:
        write_pretrained(m, folder)
        shutil.copyfile(tokenizer_file, folder / "tokenizer.json")
        torch.save({"opt": 1}, folder / "optimizer.pt")

    save_checkpoint(tmp_path / "run" / "checkpoints", 3, write, keep=2)
    assert main(["convert", str(tmp_path / "run"), str(tmp_path / "hf"), "--to", "hf"]) == 0  # the CLI
    out = tmp_path / "hf"
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    src = _tensors(tmp_path / "run" / "checkpoints" / "step_00000003")
    dst = _tensors(out)
    assert src.keys() == dst.keys() and all(torch.equal(src[k], dst[k]) for k in src)
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == DEFAULT_CHAT_TEMPLATE
    loaded = Transformer.from_pretrained(out)
    assert torch.equal(loaded.layers["1"].mlp.experts.gate_up_proj, m.layers["1"].mlp.experts.gate_up_proj)


def test_fp8_bf16_fp8_gives_back_the_codes_and_bf16_fp8_bf16_is_within_fp8_error(tmp_path, tokenizer_file):
    src = _hf_folder(tmp_path, tokenizer_file, dtype=torch.bfloat16)
    quiet = dict(log=lambda *_: None)
    fp8 = _tensors(conv.convert(src, tmp_path / "fp8", "fp8", **quiet))
    bf16 = _tensors(conv.convert(tmp_path / "fp8", tmp_path / "bf16", "bf16", **quiet))
    fp8_again = _tensors(conv.convert(tmp_path / "bf16", tmp_path / "fp8_again", "fp8", **quiet))
    original = _tensors(src)

    assert fp8.keys() == fp8_again.keys() and bf16.keys() == original.keys()
    quantized = [k for k, t in fp8.items() if t.dtype == torch.float8_e4m3fn]
    assert len(quantized) == sum(hf_io.is_fp8_weight(k) for k in original) > 0
    for k in quantized:
        assert torch.equal(fp8[k].view(torch.uint8), fp8_again[k].view(torch.uint8)), k
        # the scale is recomputed from a BF16-rounded amax: equal up to BF16 rounding
        torch.testing.assert_close(fp8_again[k + "_scale_inv"], fp8[k + "_scale_inv"], rtol=2**-8, atol=0)
        assert bf16[k].dtype == torch.bfloat16
        err = (bf16[k].float() - original[k].float()).abs()
        # half an E4M3 step: <= 2^-4 x value for normal codes, 2^-10 x scale for subnormal ones; + BF16 rounding
        assert (
            err <= (2**-4 + 2**-8) * original[k].float().abs() + 2**-9 * fp8[k + "_scale_inv"].max()
        ).all(), k
        assert err.max() > 0, k  # it was quantized
    for k, t in original.items():
        if k not in quantized:
            assert torch.equal(bf16[k], t) and torch.equal(fp8[k], t), k  # BF16 tensors pass untouched
    assert json.loads((tmp_path / "fp8" / "config.json").read_text())["quantization_config"]["fmt"] == "e4m3"
    assert "quantization_config" not in json.loads((tmp_path / "bf16" / "config.json").read_text())


def test_streaming_holds_one_shard_at_a_time(tmp_path, tokenizer_file, monkeypatch):
    src = _hf_folder(tmp_path, tokenizer_file, max_shard_bytes=300_000)
    n_shards = len(hf_io.checkpoint_files(src))
    assert n_shards >= 4
    alive: list[weakref.ref] = []
    loads, peak = [], {"tensors": 0}
    real_load, real_save = conv._load_shard, conv.save_file

    def load(file):
        gc.collect()
        still = sum(r() is not None for r in alive)
        assert still == 0, f"{still} tensors of earlier shards alive when opening {file.name}"
        shard = real_load(file)
        alive.extend(weakref.ref(t) for t in shard.values())
        loads.append(file.name)
        return shard

    def save(tensors, path, metadata=None):
        alive.extend(weakref.ref(t) for t in tensors.values())
        peak["tensors"] = max(peak["tensors"], sum(r() is not None for r in alive))
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(conv, "_load_shard", load)
    monkeypatch.setattr(conv, "save_file", save)
    out = conv.convert(src, tmp_path / "fp8", "fp8", log=lambda *_: None)
    assert len(loads) == n_shards
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == n_shards
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in _tensors(out).values()
    )
    biggest = max(len(_tensors_of(f)) for f in hf_io.checkpoint_files(src))
    assert peak["tensors"] <= 3 * biggest  # source shard + codes + scales, never the model
    a, b = Transformer.from_pretrained(src), Transformer.from_pretrained(out)
    down_a, down_b = a.layers["1"].mlp.experts.down_proj, b.layers["1"].mlp.experts.down_proj
    rel = (down_a - down_b).norm() / down_a.norm()
    assert 0 < rel < 0.05


def _tensors_of(file: Path) -> dict:
    with safe_open(str(file), "pt") as f:
        return dict.fromkeys(f.keys())


def test_failure_midway_leaves_nothing_and_keeps_an_existing_dst(tmp_path, tokenizer_file, monkeypatch):
    src = _hf_folder(tmp_path, tokenizer_file, max_shard_bytes=300_000)
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    calls = {"n": 0}
    real = conv.save_file

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(conv, "save_file", flaky)
    with pytest.raises(OSError, match="disk full"):
        conv.convert(src, dst, "bf16", overwrite=True, log=lambda *_: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]  # no temporary left
    assert (dst / "keep.txt").read_text() == "old"
    monkeypatch.setattr(conv, "save_file", real)
    conv.convert(src, dst, "bf16", overwrite=True, log=lambda *_: None)
    assert not (dst / "keep.txt").exists() and (dst / "model.safetensors.index.json").is_file()


@pytest.mark.parametrize(
    "case, message",
    [
        ("unknown_format", "--to 'fp16' is not a format; choose one of bf16, fp8, hf"),
        ("missing_src", "is not a folder"),
        ("no_model", "holds no model"),
        ("missing_shard", "shard files that do not exist"),
        ("dst_exists", "exists; pass --overwrite"),
        ("dst_inside_src", "must not be SRC's model folder"),
    ],
)
def test_bad_input_is_a_clear_error_before_work(tmp_path, tokenizer_file, capsys, case, message):
    src = _hf_folder(tmp_path, tokenizer_file, max_shard_bytes=300_000)
    dst, to = tmp_path / "dst", "fp8"
    if case == "unknown_format":
        to = "fp16"
    elif case == "missing_src":
        src = tmp_path / "nope"
    elif case == "no_model":
        src = tmp_path / "empty"
        src.mkdir()
    elif case == "missing_shard":
        next(src.glob("model-00002-*")).unlink()
    elif case == "dst_exists":
        dst.mkdir()
    elif case == "dst_inside_src":
        dst = src / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["convert", str(src), str(dst), "--to", to]) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
