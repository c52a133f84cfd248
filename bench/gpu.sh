#!/usr/bin/env bash
# Every GPU path of toucan, checked and timed in ONE call (each step has its own time limit, so
# the whole run fits in about 15 minutes of a GPU). Run from the repo root on a CUDA machine:
#     bash bench/gpu.sh            # figures to stdout and, if $OUT is set, $OUT/gpu-*.log
# It uses the machine's own python3/torch with toucan from src/ (no install, no downloads).
# Python packages that machine lacks (peft, gptqmodel, fastapi, ...) can be brought as wheels in
# .whl/ (e.g. `pip download --no-deps -d .whl peft==VERSION`, the versions pyproject.toml pins);
# they are installed to /tmp/site first when present.
#     bash bench/gpu.sh --dry-run  # on a CPU: runs the GPU decode and scale-out steps on tiny shapes
#                                  # (toucan serve stands in for vllm), to check the script itself
set -uo pipefail
DRY=0; [ "${1:-}" = "--dry-run" ] && DRY=1
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/toucan-gpu}; mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
PY=${PY:-python3}
[ $DRY = 1 ] && [ -x .venv/bin/python ] && PY=${PY_DRY:-.venv/bin/python}  # the dev box's venv
export PY OUT

step() {  # step NAME SECONDS CMD...: run with a time limit, keep going on failure
  local name=$1 limit=$2; shift 2
  # ONLY="decode scale-out" runs just those steps: all of them take up to ~24 min, more than one
  # 15-minute GPU lease
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then echo "=== $name: skipped (ONLY=$ONLY)"; return; fi
  echo "=== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/gpu-$name.log" | tail -n 25
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s"
}

[ $DRY = 1 ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY - <<'PY'
import importlib
for m in ("torch", "transformers", "peft", "accelerate", "deepspeed", "gptqmodel", "optimum", "fastapi", "uvicorn", "openai", "gradio", "vllm"):
    try:
        mod = importlib.import_module(m); print(f"{m:13s} {getattr(mod, '__version__', '?')}")
    except Exception as e:
        print(f"{m:13s} MISSING ({type(e).__name__})")
import torch; print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
PY

# The scale-out path end to end: a toucan output directory (random LLaMA, hidden 1024 x 8 layers,
# toucan's tokenizer files and toucan.json) served by `vllm serve` (dry run: `toucan serve`), and
# `toucan eval generate --api-url` against it, greedy, compared with in-process answers.
scale_out() {  # scale_out SERVER(vllm|toucan) DEVICE
  local server=$1 device=$2 work port=$((20000 + RANDOM % 20000)) pid
  work=$(mktemp -d)
  export TOUCAN_BENCH_KEY=sk-bench-$RANDOM
  $PY - "$work" <<'PY' || return 1
import json, sys
from pathlib import Path
sys.path.insert(0, "bench")
from serve import make_model
from toucan.eval.items import CLASSES
work = Path(sys.argv[1])
make_model(work / "model", 1024, 8)
rows = [{"question": f"第{k}个问题：请介绍一下{c}。", "class": c, "std_answer": "参考答案"} for c in CLASSES for k in range(2)]
(work / "set.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
PY
  if [ "$server" = vllm ]; then
    $PY -c "import vllm" 2>/dev/null || { echo "vllm is not installed here: skipped"; return 1; }
    $PY -m vllm.entrypoints.openai.api_server --model "$work/model" --host 127.0.0.1 --port $port \
      --api-key "$TOUCAN_BENCH_KEY" --served-model-name toucan --dtype bfloat16 --max-model-len 1024 \
      >"$OUT/gpu-vllm-server.log" 2>&1 &
  else
    $PY -m toucan.cli -q serve --model "$work/model" --port $port --api-key "$TOUCAN_BENCH_KEY" --model-name toucan \
      --device "$device" --threads 1 >"$OUT/gpu-toucan-server.log" 2>&1 &
  fi
  pid=$!
  for _ in $(seq 240); do
    curl -sf -H "Authorization: Bearer $TOUCAN_BENCH_KEY" http://127.0.0.1:$port/v1/models >/dev/null && break
    kill -0 $pid 2>/dev/null || { echo "server exited"; return 1; }
    sleep 1
  done
  local t0=$SECONDS
  $PY -m toucan.cli eval generate --api-url http://127.0.0.1:$port/v1 --api-key-env TOUCAN_BENCH_KEY \
    --eval-set "$work/set.jsonl" --output "$work/api.jsonl" --max-new-tokens 32 --repetition-penalty 1.0 --concurrency 16
  local rc=$? t_api=$((SECONDS - t0))
  kill $pid; wait $pid 2>/dev/null
  $PY -m toucan.cli eval generate --model "$work/model" --device "$device" --eval-set "$work/set.jsonl" \
    --output "$work/local.jsonl" --max-new-tokens 32 --repetition-penalty 1.0 --batch-size 16
  $PY - "$work" "$server" "$t_api" <<'PY'
import json, sys
from pathlib import Path
def answers(p):
    return {r["id"]: r["answer"] for r in map(json.loads, Path(p).read_text(encoding="utf-8").splitlines()[1:])}
api, local = answers(Path(sys.argv[1]) / "api.jsonl"), answers(Path(sys.argv[1]) / "local.jsonl")
same = sum(api.get(k) == v for k, v in local.items())
print(f"scale-out via {sys.argv[2]}: {len(api)}/{len(local)} questions answered through --api-url in {sys.argv[3]} s; "
      f"{same}/{len(local)} greedy answers equal the in-process ones (another server's kernels may differ)")
PY
  rm -rf "$work"
  return $rc
}
export -f scale_out  # step runs it under timeout, in a child bash

if [ $DRY = 1 ]; then
  step decode-dry 600 $PY bench/decode.py --dry-run
  step scale-out-dry 600 bash -c "scale_out toucan cpu"
  echo "logs in $OUT"
  exit 0
fi

# 0. The GPU decode path: static KV cache + torch.compile (CUDA graphs) for greedy decode,
#    LLaMA-7B shape bf16, batch 1 and 16, vs HF generate (anchor 12-14 tok/s) and the bandwidth
#    floor (~311 tok/s on an H200; target >= 70 %), then the scale-out path through vLLM.
step decode 300 $PY bench/decode.py --device cuda
step scale-out 300 bash -c "scale_out vllm cuda"

# 1. Full SFT, LLaMA-7B shape, random bf16 weights: tokens/s and model TFLOP/s
#    (reference: plain HF Trainer 6,444 tok/s = 277 TFLOP/s on one H200; see bench/RESULTS.md).
step train 240 $PY bench/train.py --device cuda
# 2. Generation engine vs plain model.generate, and the API under load, on the GPU.
step serve 150 $PY bench/serve.py --device cuda --hidden_size 1024 --layers 8 --requests_per_client 4 --repeats 2
# 3. GPTQ 4-bit g128 vs RTN on the GPU (GPTQModel's CUDA kernels), KL and ppl.
step quant 150 $PY bench/quant.py --device cuda --layers 4
# 4. 2:4 sparsity: SparseGPT-prune a LLaMA-7B-shaped 4-layer stack on the GPU, then time its forward
#    pass with torch's semi-structured sparse kernels vs the same weights dense (prefill and decode
#    shapes), and check both give the same output. (`bench/sparse_kernels.py --dry-run` checks the
#    script on a CPU.) Then bench/prune.py's quality table on the GPU.
step sparse24 150 $PY bench/sparse_kernels.py --layers 4
step prune 150 $PY bench/prune.py --device cuda
echo "logs in $OUT"
