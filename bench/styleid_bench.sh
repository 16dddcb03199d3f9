#!/usr/bin/env bash
# The cost of StyleID style injection (#22) on one GPU: one style's 25 images with and without inject=styleid,
# torch_fast then jittor_fast (python -m jdiff.bench --sections generate [--inject styleid]), model=sd21_random.
# Wheels in .whl/ as for gpu_bench.sh. JSON in ${OUT:-gpu_out}/. PARTS (default "torch jittor").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${OUT:-gpu_out}"); mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
step() { echo; echo "=== $* ($(date +%T))"; }
bench() { python3 -m jdiff.bench "$@" 2>&1 | grep -v "^\[\|it/s\]\|Compiling" | tail -12; }
step install
. bench/setup.sh
PARTS=${PARTS:-torch jittor}
if [[ " $PARTS " == *" torch "* ]]; then
  step "torch_fast: 25 images without, then with StyleID"
  bench --variants torch-bf16-cudagraphs-triton-cl --sections generate --out "$OUT/styleid_off_torch.json"
  bench --variants torch-bf16-cudagraphs-triton-cl --sections generate --inject styleid --out "$OUT/styleid_on_torch.json"
fi
if [[ " $PARTS " == *" jittor "* ]]; then
  export PYTHONPATH=$JITTOR_PATH
  step "Jittor on CUDA 13: patch"
  python3 -m jdiff.engines.jittor.fast.cuda13 apply > "$OUT/cuda13_apply.txt" 2>&1; grep -E "nothing to change|verified|FAILED" "$OUT/cuda13_apply.txt" | head
  step "jittor_fast: 25 images without, then with StyleID"
  bench --variants jittor-fp16-replay --sections generate --out "$OUT/styleid_off_jittor.json"
  bench --variants jittor-fp16-replay --sections generate --inject styleid --out "$OUT/styleid_on_jittor.json"
fi
step done
