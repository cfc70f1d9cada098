"""What this machine is good at, measured once and cached: GEMM throughput per dtype, the dtype
to compute in, and the peak that MFU is reported against.

Nothing here assumes the hardware. torch's BF16 matmul on a CPU is fast only where oneDNN has
BF16 kernels (AVX-512 BF16, AMX): ~400-600 GFLOP/s on 2 such cores against ~100-180 in FP32. On
AVX2-only CPUs (many AMD EPYC and laptop parts) it falls back to a scalar loop
(`cpublas::gemm_transb_impl<BFloat16, float>`) 100x slower than FP32. So `--dtype auto` (the
default of train, generate, serve and the demo) times FP32 and BF16 GEMMs of the model's own
shapes and computes in BF16 only where that is measurably faster:

    choice = choose_dtype("auto", gemm_shapes(cfg, tokens=2048))
    choice.dtype          # torch.bfloat16 or torch.float32
    choice.describe()     # "bfloat16 (measured: bf16 612 GFLOP/s, fp32 104 GFLOP/s)"
    choice.peak_tflops    # the chosen dtype's measured rate: the roof for MFU

Training times its GEMMs as they run there (`measure_gemms`: thousands of rows, weights in cache);
inference (`measure_decode_gemms`) times decode's: a few rows against weights streamed from memory,
packed for oneDNN as the engine packs them, where BF16's half bytes can win even though aten's
in-cache BF16 GEMV loses. Measurements are cached in `<cache_dir>/device.json`, keyed by CPU model,
torch version, thread count, device and measurement, so a machine pays for them once (a second or two). A forced dtype is obeyed,
with a warning when it was measured slower than the other. On CUDA, BF16 is always chosen (tensor
cores); its rate is measured for MFU all the same.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DTYPE_CHOICES = ("auto", *DTYPES)
BF16_MARGIN = 1.1  # BF16 must beat FP32 by this factor to be chosen (a tie keeps FP32's precision)


def default_cache_dir() -> str:
    return os.environ.get("DSV3_CACHE", str(Path.home() / ".cache" / "dsv3"))


def resolve_device(name: str = "auto") -> torch.device:
    """ "auto" -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# what torch.compile needs where `can_compile` is False, for the errors that refuse to compile
COMPILE_NEEDS = "it needs a working C++ compiler on a CPU: install g++ or point CXX at one; Triton on a GPU"


def tensor_stamp(t: torch.Tensor) -> tuple:
    """What tells that t is still the tensor a copy was made from, unchanged: its storage object,
    its place in it and its version (an optimizer step or load_state_dict bumps it). The storage
    object's address is unique only while it lives: whoever keeps the stamp keeps a detached alias
    of t too, or a new tensor allocated where t was could pass for it."""
    return t.untyped_storage()._cdata, t.data_ptr(), t._version


def can_compile(device: torch.device) -> bool:
    """Whether torch.compile's default backend (Inductor) can build code for `device`: it needs a
    C++ compiler for a CPU and Triton for a GPU."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return has_triton()
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except RuntimeError:  # InvalidCxxCompiler: none found
        return False
    return True


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a GEMM on x runs in: autocast's if it is enabled, else x's (grouped_mm, custom
    FP8 GEMMs and all-to-all buffers are not on autocast's lists, so they ask here)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


# ---------------------------------------------------------------------------------- measuring
def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def gemm_tflops(dtype_name: str = "bfloat16", n: int = 2048, repeats: int = 5, device: str = "cpu") -> float:
    """Measured dense n x n x n matmul throughput (best of `repeats`), in TFLOP/s."""
    return measure_gemms([(n, n, n)], getattr(torch, dtype_name), torch.device(device), repeats=repeats)


def measure_gemms(
    shapes: Sequence[tuple[int, int, int]],
    dtype: torch.dtype,
    device: torch.device,
    repeats: int = 3,
    budget_s: float = 0.5,
) -> float:
    """TFLOP/s of the (M, K, N) GEMMs run back to back, each weight in cache (`_best_rate`)."""
    operands = [
        (torch.randn(m, k, device=device).to(dtype), torch.randn(n, k, device=device).to(dtype).t())
        for m, k, n in shapes
    ]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def gemm(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for a, b in pairs:
            a @ b
        sync()

    return _best_rate(gemm, operands, [2 * m * k * n for m, k, n in shapes], repeats, budget_s)


def _best_rate(
    run: Callable[[list], None], items: list, flops: list[int], repeats: int, budget_s: float
) -> float:
    """TFLOP/s of run(items): best of `repeats` after a warm-up that runs the items one by one
    and stops once it has taken budget_s (a naive kernel is measured as slow by then, and
    building kernels is not what made it slow)."""
    done, elapsed = 0.0, 0.0
    for item, item_flops in zip(items, flops):
        elapsed += _timed(lambda: run([item]))  # noqa: B023 - called right here
        done += item_flops
        if elapsed > budget_s:
            return done / elapsed / 1e12
    best = min(_timed(lambda: run(items)) for _ in range(repeats))
    return sum(flops) / best / 1e12


STREAM_BYTES = 64 << 20  # FP32 weights a decode measurement cycles through: more than a CPU's caches


def measure_decode_gemms(
    shapes: Sequence[tuple[int, int, int]],
    dtype: torch.dtype,
    device: torch.device,
    repeats: int = 3,
    budget_s: float = 0.5,
) -> float:
    """TFLOP/s of decode's GEMMs, (M, K, N) with M a few rows, as the inference engine runs them.

    Decoding reads every weight once per step, from memory (a model's weights exceed the caches),
    and on a CPU the engine runs its Linears and experts on weights packed for oneDNN (Inductor's
    freezing, model/packed_experts.py). `measure_gemms` times neither: it reuses one weight per
    shape, in cache, through aten's unpacked GEMM, whose BF16 GEMV can be slower than its FP32 one
    where oneDNN's packed BF16 GEMV is faster (a 2-core AMD EPYC with AVX512-BF16: the tiny
    model's decode shapes measured there fp32 17 vs bf16 7 GFLOP/s, while its compiled decode ran
    724 tok/s in BF16 against 529 in FP32). So here each shape cycles through copies of its
    weight, as many as make STREAM_BYTES of FP32 for every dtype (BF16 streams half the bytes,
    as its decode does), packed where this build's oneDNN packs `dtype`."""
    if device.type != "cpu":
        return measure_gemms(shapes, dtype, device, repeats, budget_s)
    from dsv3.model.packed_experts import can_pack, packed_linear

    copies = max(1, -(-STREAM_BYTES // (4 * sum(k * n for _, k, n in shapes))))
    pack = can_pack(torch.empty(0, dtype=dtype))
    operands = []
    for m, k, n in shapes:
        a, w = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype)
        weights = [
            torch.ops.mkldnn._reorder_linear_weight(w.clone(), m) if pack else w.clone()
            for _ in range(copies)
        ]
        operands.append((a, weights))
    linear = packed_linear if pack else torch.nn.functional.linear

    def run(shape_operands) -> None:
        for a, weights in shape_operands:
            for w in weights:
                linear(a, w)

    return _best_rate(run, operands, [2 * m * k * n * copies for m, k, n in shapes], repeats, budget_s)


def gemm_shapes(cfg, tokens: int) -> list[tuple[int, int, int]]:
    """(M, K, N) of the main GEMMs of one forward of `cfg` over `tokens` tokens (M capped at 4096
    to keep the measurement short): the attention projections, a dense FFN and one routed
    expert at its average load."""
    m = max(1, min(tokens, 4096))
    h = cfg.hidden_size
    q_in = cfg.q_lora_rank or h
    per_expert = max(1, min(512, tokens * cfg.num_experts_per_tok // max(1, cfg.n_routed_experts)))
    return [
        (m, h, cfg.kv_lora_rank + cfg.qk_rope_head_dim),
        (m, q_in, cfg.num_attention_heads * cfg.qk_head_dim),
        (m, cfg.num_attention_heads * cfg.v_head_dim, h),
        (m, h, cfg.intermediate_size),
        (per_expert, h, cfg.moe_intermediate_size),
    ]


# ---------------------------------------------------------------------------------- choosing
@dataclass(frozen=True)
class DtypeChoice:
    """The dtype to compute in, and the measured GEMM rates (TFLOP/s) it was chosen from."""

    name: str  # "float32" | "bfloat16"
    rates: dict[str, float]  # dtype name -> TFLOP/s on the model's shapes
    requested: str  # "auto" or the forced dtype
    cached: bool = False

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    @property
    def peak_tflops(self) -> float:
        return self.rates[self.name]

    @property
    def slowdown(self) -> float:
        """How much slower the chosen dtype measured than the faster one (1.0: it is the fastest)."""
        return max(self.rates.values()) / self.rates[self.name]

    def describe(self) -> str:
        figures = ", ".join(f"{_short(k)} {1e3 * v:,.0f} GFLOP/s" for k, v in self.rates.items())
        how = "forced" if self.requested != "auto" else "measured"
        return f"{self.name} ({how}; GEMMs of this model: {figures}{', cached' if self.cached else ''})"

    def warning(self) -> str | None:
        if self.requested != "auto" and self.slowdown > BF16_MARGIN:
            return (
                f"--dtype {self.name} is {self.slowdown:.1f}x slower than "
                f"{max(self.rates, key=self.rates.get)} on this machine (measured); it will work, slowly"
            )
        return None


def choose_dtype(
    requested: str,
    shapes: Sequence[tuple[int, int, int]],
    device: torch.device | str = "cpu",
    cache_dir: str | Path | None = None,
    measure: Callable[[Sequence[tuple[int, int, int]], torch.dtype, torch.device], float] | None = None,
) -> DtypeChoice:
    """Resolve `requested` ("auto", "float32" or "bfloat16") for GEMMs of `shapes` on `device`,
    measuring both dtypes once per machine (cached under cache_dir, default: DSV3_CACHE). BF16 is
    chosen by "auto" where it is at least BF16_MARGIN faster, and always on CUDA."""
    if requested not in DTYPE_CHOICES:
        from dsv3.errors import ConfigError

        raise ConfigError(f"dtype={requested!r}: must be one of {list(DTYPE_CHOICES)}")
    device = torch.device(device)
    cache = Path(cache_dir or default_cache_dir()) / "device.json"
    measure = measure or measure_gemms
    key = f"{machine_key(device)}|{measure.__name__}|{sorted(shapes)}"
    saved = _read_cache(cache)
    cached = key in saved
    rates = saved[key] if cached else {name: measure(shapes, dt, device) for name, dt in DTYPES.items()}
    if not cached:
        _write_cache(cache, {**saved, key: rates})
    if requested != "auto":
        name = requested
    elif device.type == "cuda" or rates["bfloat16"] >= BF16_MARGIN * rates["float32"]:
        name = "bfloat16"
    else:
        name = "float32"
    return DtypeChoice(name, rates, requested, cached)


def machine_key(device: torch.device) -> str:
    """CPU model (or GPU name), torch version, threads: what decides the measured rates."""
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        what = f"{cpu_model()} {torch.backends.cpu.get_cpu_capability()}"
    return f"{what}|torch {torch.__version__}|threads {torch.get_num_threads()}|{device.type}"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def format_mfu(mfu: float) -> str:
    """MFU as a percentage; above 100% the peak was mis-measured (the machine got faster, or the
    measurement ran while another job held the cores), and that is what is shown."""
    return f"MFU {100 * mfu:.1f}%" if mfu <= 1.0 else "MFU n/a (peak mis-measured)"


def _short(name: str) -> str:
    return {"float32": "fp32", "bfloat16": "bf16"}[name]


def _read_cache(path: Path) -> dict[str, dict[str, float]]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache folder only costs a re-measurement next time
