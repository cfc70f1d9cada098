#!/usr/bin/env bash
# The CUDA paths in one short run, for a machine with a GPU (none in CI): the GPU tests, the FP8
# GEMM benchmark, a short BF16 and FP8 training run of the tiny preset on the bundled corpus,
# and greedy decoding of the trained model on the GPU against the CPU (plain and MTP).
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]     # ~3-5 minutes on one H100/H200
#
# It uses the python3 on PATH with PYTHONPATH=src (no install), so it also runs under a GPU
# image's own torch build. Every stage runs; the exit status says whether any failed.
set -uo pipefail
OUT=${1:-${OUT:-/tmp/dsv3_gpu_check}}
mkdir -p "$OUT"
failed=()
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

echo "== GPU tests"
python3 -m pytest -q -p no:cacheprovider -m gpu tests/gpu 2>&1 | grep -v DEBUG | tee "$OUT/gpu_tests.log" || failed+=(tests)

echo "== FP8 GEMM vs BF16"
python3 benchmarks/fp8_gpu.py --iters 20 2>&1 | tee "$OUT/fp8_gpu.log" || failed+=(fp8_gpu)

for mode in bf16 fp8; do
  echo "== train tiny on cuda ($mode)"
  flag=$([ $mode = fp8 ] && echo --fp8 || echo --no-fp8)
  python3 -m dsv3 train --preset tiny --run.device cuda --run.dtype bfloat16 $flag \
    --optim.steps 150 --logging.log-every 25 --logging.eval-every 75 --no-report \
    --out "$OUT/run_$mode" >"$OUT/train_$mode.log" 2>&1 || failed+=(train_$mode)
  tail -n 12 "$OUT/train_$mode.log"
done

echo "== greedy decode of the trained model, cuda vs cpu, plain and MTP"
python3 - "$OUT/run_bf16" <<'EOF'
import sys, time

import torch
from dsv3.infer.engine import Engine
from dsv3.infer.sampling import SamplingParams

run = sys.argv[1]
greedy = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
from tokenizers import Tokenizer
tok = Tokenizer.from_file(f"{run}/hf/tokenizer.json")
prompts = [tok.encode(t).ids for t in ("import os\nimport sys\n\n", "class Parser:\n    def __init__(self")]
outs = {}
for device in ("cpu", "cuda"):
    for mtp in (False, True):
        engine = Engine.from_pretrained(f"{run}/hf", dtype=torch.float32, device=device, mtp=mtp)
        start = time.perf_counter()
        outs[device, mtp] = [r.token_ids for r in engine.generate(prompts, greedy)]
        print(f"{device} mtp={mtp}: {time.perf_counter() - start:.2f} s", engine.stats() if mtp else "")
ref = outs["cpu", False]
for key, got in outs.items():  # CUDA's other summation order may flip a near-tie: report where
    first = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), None) for x, y in zip(got, ref)]
    print(f"{key}: first token that differs from cpu plain, per prompt: {first}")
EOF
[ $? = 0 ] || failed+=(decode)
echo "== done; failed: ${failed[*]:-none}"
[ ${#failed[@]} = 0 ]
