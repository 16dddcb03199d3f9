#!/usr/bin/env bash
# Packed training on one GPU (#20): run-steps/s at K runs a pack against sweep.pack=1, torch_fast then jittor_fast
# (python -m jdiff.bench.pack), on model=sd21_random at 512 px. Wheels in .whl/ as for gpu_bench.sh. Logs in
# ${OUT:-gpu_out}/. Choose with PARTS (default "torch jittor"), TORCH_PACKS (default 4,8,16), JITTOR_PACKS (4,8).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${OUT:-gpu_out}"); mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
step() { echo; echo "=== $* ($(date +%T))"; }
step install
. bench/setup.sh
PARTS=${PARTS:-torch jittor}
if [[ " $PARTS " == *" torch "* ]]; then
  step "packed training: torch_fast"
  python3 -m jdiff.bench.pack --variant torch-bf16-cudagraphs-triton-cl --packs ${TORCH_PACKS:-4,8,16} \
    --out "$OUT/pack_torch.json" 2>&1 | grep -v "^\[\|it/s\]" | tail -14
fi
if [[ " $PARTS " == *" jittor "* ]]; then
  export PYTHONPATH=$JITTOR_PATH
  step "Jittor on CUDA 13: patch"
  python3 -m jdiff.engines.jittor.fast.cuda13 apply > "$OUT/cuda13_apply.txt" 2>&1; grep -E "nothing to change|verified|FAILED" "$OUT/cuda13_apply.txt" | head
  step "packed training: jittor_fast"
  python3 -m jdiff.bench.pack --variant jittor-fp16-replay --packs ${JITTOR_PACKS:-4,8} \
    --out "$OUT/pack_jittor.json" 2>&1 | grep -v "^\[\|it/s\]\|Compiling" | tail -14
fi
step done
