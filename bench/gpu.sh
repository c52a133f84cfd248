#!/usr/bin/env bash
# Every GPU path of toucan, checked and timed in ONE call (each step has its own time limit, so
# the whole run fits in about 15 minutes of a GPU). Run from the repo root on a CUDA machine:
#     bash bench/gpu.sh            # figures to stdout and, if $OUT is set, $OUT/gpu-*.log
# It uses the machine's own python3/torch with toucan from src/ (no install, no downloads).
# Python packages that machine lacks (peft, gptqmodel, fastapi, ...) can be brought as wheels in
# .whl/ (e.g. `pip download --no-deps -d .whl peft==VERSION`, the versions pyproject.toml pins);
# they are installed to /tmp/site first when present.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/toucan-gpu}; mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
PY=${PY:-python3}

step() {  # step NAME SECONDS CMD...: run with a time limit, keep going on failure
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/gpu-$name.log" | tail -n 25
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY - <<'PY'
import importlib
for m in ("torch", "transformers", "peft", "accelerate", "deepspeed", "gptqmodel", "optimum", "fastapi", "uvicorn", "openai", "gradio"):
    try:
        mod = importlib.import_module(m); print(f"{m:13s} {getattr(mod, '__version__', '?')}")
    except Exception as e:
        print(f"{m:13s} MISSING ({type(e).__name__})")
import torch; print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
PY

# 1. Full SFT, LLaMA-7B shape, random bf16 weights: tokens/s and model TFLOP/s
#    (reference: plain HF Trainer 6,444 tok/s = 277 TFLOP/s on one H200; see bench/RESULTS.md).
step train 240 $PY bench/train.py --device cuda
# 2. Generation engine vs plain model.generate, and the API under load, on the GPU.
step serve 150 $PY bench/serve.py --device cuda --hidden_size 1024 --layers 8 --requests 100 --skip_queue
# 3. GPTQ 4-bit g128 vs RTN on the GPU (GPTQModel's CUDA kernels), KL and ppl.
step quant 150 $PY bench/quant.py --device cuda --layers 4
# 4. 2:4 sparsity: SparseGPT-prune a LLaMA-7B-shaped 4-layer stack on the GPU, then time its forward
#    pass with torch's semi-structured sparse kernels vs the same weights dense (prefill and decode
#    shapes), and check both give the same output. (`bench/sparse_kernels.py --dry-run` checks the
#    script on a CPU.) Then bench/prune.py's quality table on the GPU.
step sparse24 150 $PY bench/sparse_kernels.py --layers 4
step prune 150 $PY bench/prune.py --device cuda
echo "logs in $OUT"
