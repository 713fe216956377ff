#!/usr/bin/env bash
# One GPU run of everything pauserec cannot check on a CPU: install, build the CUDA kernel, run the GPU
# tests, the kernel benchmark and the recommend-latency benchmarks; collect the results.
#
#   bash benchmarks/gpu/run_gpu.sh          # from the repository root, on the GPU machine
#
# Robust by design: every step runs under its own time cap inside one overall budget, its output goes
# to a log, a failing or skipped step is recorded and the script goes on. Nothing here needs the
# network: optional packages come from pip only if a registry answers within seconds, or from wheels
# carried in .whl/ (pip install --no-index). Prepared inputs (models, engines, data) are taken from
# benchmarks/gpu/.carry/ when present (benchmarks/gpu/prepare_carry.sh makes it on a CPU machine).
#
# Environment: PYTHON (default python3), PAUSEREC_GPU_BUDGET_S (default 450 s for the whole run),
# PAUSEREC_GPU_NO_PIP (never ask a registry), PAUSEREC_GPU_THREADS, PAUSEREC_GPU_TRAIN_STEPS (150),
# PAUSEREC_GPU_SKIP_QWEN,
# PAUSEREC_CUDA_ARCHS (default: this GPU's compute capability), PAUSEREC_GPU_SKIP_BUILD, RESULTS (default
# benchmarks/results/gpu/run-<date>), OUT (when set, the summary, JSON results and a tarball of every
# log are copied there: at most 8 files).
set -u
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
START=$(date +%s)
DEADLINE=$((START + ${PAUSEREC_GPU_BUDGET_S:-450}))
RESULTS=${RESULTS:-benchmarks/results/gpu/run-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$RESULTS/logs"
RESULTS=$(cd "$RESULTS" && pwd)
CARRY=$ROOT/benchmarks/gpu/.carry
WORK=${TMPDIR:-/tmp}/pauserec-gpu
mkdir -p "$WORK"
STEPS=$RESULTS/steps.tsv
printf 'step\trc\tseconds\tnote\n' > "$STEPS"
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) PIP_DISABLE_PIP_VERSION_CHECK=1
THREADS=${PAUSEREC_GPU_THREADS:-$(( $(nproc) > 2 ? $(nproc) / 2 : 1 ))}

left() { echo $((DEADLINE - $(date +%s))); }

# step NAME CAP_S COMMAND...: runs COMMAND under min(CAP_S, time left), output to logs/NAME.log
step() {
  local name=$1 cap=$2 t0 rc limit
  shift 2
  limit=$(left)
  if [ "$limit" -lt 15 ]; then
    printf '%s\tskipped\t0\tno time left in the budget\n' "$name" >> "$STEPS"
    echo "== $name: skipped (budget used up)"
    return 99
  fi
  [ "$cap" -lt "$limit" ] && limit=$cap
  echo "== $name (up to ${limit}s)"
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$RESULTS/logs/$name.log" 2>&1
  rc=$?
  local note=""
  [ $rc -eq 124 ] && note="timed out after ${limit}s"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - t0))" "$note" >> "$STEPS"
  tail -n 3 "$RESULTS/logs/$name.log" | sed 's/^/   /'
  return $rc
}

note() { printf '%s\tinfo\t0\t%s\n' "$1" "$2" >> "$STEPS"; }

# ---- 0. what machine this is ------------------------------------------------------------------------
step env 30 bash -c "nvidia-smi; nvcc --version; $PY --version; $PY -m pip list 2>/dev/null | grep -i -E \
'onnx|torch|transformers|tensorrt|cuda|numpy|pybind|scikit|hypothesis|pytest'; nproc; free -g"
CC=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
export PAUSEREC_CUDA_ARCHS=${PAUSEREC_CUDA_ARCHS:-${CC:-90}}
note archs "building for PAUSEREC_CUDA_ARCHS=$PAUSEREC_CUDA_ARCHS (device reports ${CC:-nothing})"

# ---- 1. optional packages: carried wheels, else a registry if one answers -----------------------------
if ls .whl/*.whl > /dev/null 2>&1; then
  step wheels 120 $PY -m pip install --no-index --no-deps --no-compile --target "$WORK/site" .whl/*.whl
  export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
fi
has_cuda_ep() { $PY -c "import onnxruntime as o, sys; sys.exit(0 if 'CUDAExecutionProvider' in o.get_available_providers() else 1)" 2>/dev/null; }
if ! has_cuda_ep && [ -z "${PAUSEREC_GPU_NO_PIP:-}" ]; then
  # onnxruntime-gpu installs the module onnxruntime too: put it in its own folder, never replace the CPU one
  if step ort-gpu 90 $PY -m pip install --no-deps --timeout 5 --retries 0 --target "$WORK/ortgpu" onnxruntime-gpu; then
    PYTHONPATH=$WORK/ortgpu:${PYTHONPATH:-} has_cuda_ep && export PYTHONPATH=$WORK/ortgpu${PYTHONPATH:+:$PYTHONPATH}
  fi
fi
has_cuda_ep && note ort "CUDAExecutionProvider available" || note ort "no CUDAExecutionProvider: CUDA EP steps will skip"
if ! $PY -c "import tensorrt" 2>/dev/null && [ -z "${PAUSEREC_GPU_NO_PIP:-}" ]; then  # TensorRT: NVIDIA's index
  step tensorrt 90 $PY -m pip install --timeout 5 --retries 0 --target "$WORK/trt" \
    --extra-index-url https://pypi.nvidia.com tensorrt-cu13 \
    && export PYTHONPATH=$WORK/trt${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -c "import cuda.bindings" 2>/dev/null || $PY -c "import cuda.cudart" 2>/dev/null || [ -n "${PAUSEREC_GPU_NO_PIP:-}" ] \
  || step cuda-python 60 $PY -m pip install --timeout 5 --retries 0 --target "$WORK/cudapy" cuda-python
[ -d "$WORK/cudapy" ] && export PYTHONPATH=$WORK/cudapy${PYTHONPATH:+:$PYTHONPATH}

# ---- 2. build (nvcc) and install pauserec into this Python ------------------------------------------
if [ -z "${PAUSEREC_GPU_SKIP_BUILD:-}" ]; then  # set it to test this script against an installed pauserec
  step build 240 $PY -m pip install --no-deps --no-build-isolation -v .
fi
# the CLIs, run by this Python whatever PATH holds
mkdir -p "$WORK/bin"
cli() {
  printf '#!/bin/sh\nexec "%s" -c '"'"'import sys; from %s import app; sys.argv[0] = "%s"; app()'"'"' "$@"\n' \
    "$PY" "$2" "$1" > "$WORK/bin/$1"
  chmod +x "$WORK/bin/$1"
}
cli pauserec pauserec.cli.main
cli pauserec-export pauserec.cli.export
cli pauserec-bench pauserec.cli.bench
export PATH=$WORK/bin:$PATH
step cuda-check 60 $PY - <<'EOF'
import glob, importlib, subprocess, sys
from pauserec.runtime.trie_topk import available_impls, built_cuda_archs, _load
print("impls", available_impls(), "built", built_cuda_archs(), "cuda:", _load("cuda")[1] or "usable")
mod = importlib.import_module("pauserec._trie_topk_cuda")
print("device compute capability x10:", mod.device_capability())
try:  # which SASS / PTX the module holds
    subprocess.run(["cuobjdump", "--list-elf", "--list-ptx", mod.__file__], timeout=30)
except (OSError, subprocess.TimeoutExpired) as e:
    print("cuobjdump:", e)
sys.exit(0 if "cuda" in available_impls() else 1)
EOF

# ---- 3. GPU tests: kernel parity (fuzz, K up to 256, V 256 and 1024), CUDA EP and TensorRT parity ----
step test-kernel 150 $PY -m pytest -q -rs -p no:cacheprovider tests/test_trie_topk.py tests/test_native_build.py
step kernel-bench 120 $PY benchmarks/gpu/kernel_bench.py --out "$RESULTS/kernel.json"
step test-engines 240 $PY -m pytest -q -rs -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_export_trt.py

# ---- 4. small models: carried (prepare_carry.sh), else trained here briefly (latency needs no quality) --
DATA_ARGS=()
if [ -d "$CARRY/data" ]; then DATA_ARGS=(--data "$CARRY/data" --index rkmeans_zcr); fi
if [ ${#DATA_ARGS[@]} -eq 0 ]; then
  $PY -c "from pauserec.data.synthetic import write_synthetic; write_synthetic('$WORK/synthetic', n_items=2000, codebook=256, seed=0)" \
    > "$RESULTS/logs/synthetic.log" 2>&1 && DATA_ARGS=(--data "$WORK/synthetic")
fi
SMALL_ENGINES=() SMALL_CKPTS=()
for kind in direct pause cot; do
  ck=$CARRY/models/$kind eng=$CARRY/engines/$kind
  if [ ! -f "$ck/config.json" ]; then
    ck=$WORK/models/$kind
    step "train-$kind" 90 pauserec train "${DATA_ARGS[@]}" --kind $kind --out "$ck" --preset small \
      --max-steps "${PAUSEREC_GPU_TRAIN_STEPS:-150}" --threads "$THREADS" --seed 0 || continue
  fi
  if [ ! -f "$eng/manifest.json" ]; then
    eng=$WORK/engines/$kind
    step "export-$kind" 120 pauserec-export "$ck" --out "$eng" --force --threads "$THREADS" || continue
  fi
  SMALL_ENGINES+=("$eng") SMALL_CKPTS+=("$ck")
done
if [ ${#SMALL_ENGINES[@]} -gt 0 ]; then
  step latency-small 200 $PY benchmarks/gpu/latency_gpu.py --label small --engines "${SMALL_ENGINES[@]}" \
    --hf "${SMALL_CKPTS[@]}" --providers cuda,tensorrt,cpu --hf-device cuda --batch-sizes 1,16,64 --beams 20 \
    --iters 5 --budget-s 150 --out "$RESULTS/latency-small.json"
fi

# ---- 5. a Qwen3-0.6B-shaped model (random weights: real sizes and speed) -------------------------------
Q=$WORK/qwen3-0.6b
if [ -n "${PAUSEREC_GPU_SKIP_QWEN:-}" ]; then
  note qwen3 "skipped: PAUSEREC_GPU_SKIP_QWEN is set"
elif [ "$(left)" -gt 200 ]; then
  step shape-qwen3 90 pauserec-bench shape qwen3-0.6b --out "$Q/ckpt" --kind pause \
    && step export-qwen3 200 pauserec-export "$Q/ckpt" --out "$Q/engine" --force --threads "$(nproc)" \
    && step latency-qwen3 200 $PY benchmarks/gpu/latency_gpu.py --label qwen3-0.6b --engines "$Q/engine" \
      --hf "$Q/ckpt" --providers cuda,tensorrt --hf-device cuda --batch-sizes 1,16,64 --beams 20 --iters 3 \
      --budget-s 150 --out "$RESULTS/latency-qwen3-0.6b.json"
else
  note qwen3 "skipped: $(left)s left of the budget (needs ~200 s: shape, export, latency)"
fi

# ---- 6. collect ---------------------------------------------------------------------------------------
{
  echo "pauserec GPU run, $(date -u +%FT%TZ), $(($(date +%s) - START)) s; git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader 2>/dev/null
  column -t -s $'\t' "$STEPS" 2>/dev/null || cat "$STEPS"
  for f in test-kernel test-engines; do
    [ -f "$RESULTS/logs/$f.log" ] && echo "$f: $(grep -E '(passed|failed|skipped|error)' "$RESULTS/logs/$f.log" | tail -1)"
  done
  $PY - "$RESULTS" <<'EOF'
import json, sys
from pathlib import Path
root = Path(sys.argv[1])
k = root / "kernel.json"
if k.is_file():
    d = json.loads(k.read_text())
    print("kernel parity everywhere:", d["all_parity"])
    for c in d["cells"]:
        if c["B"] in (16, 64) and c["K"] in (20, 256):
            t = c["timings"]
            print(f"  {c['scenario']:9s} B={c['B']:3d} K={c['K']:3d}: cpu {t['cpu']['median_us']:8.1f} us, device "
                  f"{t['cuda-device']['median_us']:7.1f} us, one-shot {t['cuda-oneshot']['median_us']:8.1f} us")
for name in ("latency-small.json", "latency-qwen3-0.6b.json"):
    f = root / name
    if not f.is_file():
        continue
    d = json.loads(f.read_text())
    print(name, "skipped:", [s["system"] for s in d.get("skipped", [])])
    for s in d.get("systems", []):
        cells = {bs: round(c["batch_latency_s"]["p50"] * 1e3, 1) for bs, c in s["by_batch"].items() if "batch_latency_s" in c}
        print(f"  {s['name']}: p50 ms {cells}")
    for label, cells in d.get("reductions", {}).items():
        print(f"  {label}: " + ", ".join(f"batch {bs} {c['text']}" for bs, c in cells.items()))
EOF
} > "$RESULTS/summary.txt" 2>&1
cat "$RESULTS/summary.txt"
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  cp "$RESULTS/summary.txt" "$RESULTS/steps.tsv" "$OUT/" 2>/dev/null
  for f in kernel.json latency-small.json latency-qwen3-0.6b.json; do [ -f "$RESULTS/$f" ] && cp "$RESULTS/$f" "$OUT/"; done
  tar -C "$RESULTS" -czf "$OUT/logs.tgz" logs
fi
exit 0
