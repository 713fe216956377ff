#!/usr/bin/env bash
# Prepares benchmarks/gpu/.carry/ on a CPU machine, so the GPU run spends its minutes measuring:
#   .carry/data/               the Scientific dataset (from ../shared/data beside the checkout)
#   .carry/models/{direct,pause,cot}   small-preset checkpoints trained MINUTES each (default 3)
#   .carry/engines/{direct,pause,cot}  their fp32 engines
# The folder is git-ignored; name it in the device call's `carry` (about 25 MB in all).
#   bash benchmarks/gpu/prepare_carry.sh            # MINUTES=3 THREADS=2 by default
set -euo pipefail
cd "$(dirname "$0")/../.."
C=benchmarks/gpu/.carry
DATA=../shared/data/amazon18-scientific-lcrec
MINUTES=${MINUTES:-3}
THREADS=${THREADS:-2}
mkdir -p "$C/models" "$C/engines"
if [ -d "$DATA" ] && [ ! -d "$C/data" ]; then cp -r "$DATA" "$C/data"; fi
DATA_ARGS=()
[ -d "$C/data" ] && DATA_ARGS=(--data "$C/data" --index rkmeans_zcr)
if [ ${#DATA_ARGS[@]} -eq 0 ]; then
  python -c "from pauserec.data.synthetic import write_synthetic; write_synthetic('$C/synthetic', n_items=2000, codebook=256, seed=0)"
  DATA_ARGS=(--data "$C/synthetic")
fi
for kind in direct pause cot; do
  [ -f "$C/models/$kind/config.json" ] || pauserec train "${DATA_ARGS[@]}" --kind "$kind" --out "$C/models/$kind" \
    --preset small --pause-k 5 --max-minutes "$MINUTES" --epochs 100 --seed 0 --threads "$THREADS"
  [ -f "$C/engines/$kind/manifest.json" ] || pauserec-export "$C/models/$kind" --out "$C/engines/$kind" --threads "$THREADS"
done
du -sh "$C"
