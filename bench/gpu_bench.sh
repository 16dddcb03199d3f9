#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md, in one go, on a machine like the device machine (CUDA 13, Python
# 3.12 with torch, no internet; one GPU, or two for the sweep parts). Wheels for what is missing there
# (diffusers, hydra-core, omegaconf, antlr4, hydra-joblib-launcher, joblib, jittor, astunparse, six, numpy 1.26)
# in .whl/. Logs and JSON go to ${OUT:-gpu_out}/, packed at the end into results.tar.gz.
#   1. sweeps (#5): 1 GPU vs 2 GPUs, and the determinism check (torch)
#   2. two tracks, at once when there are two GPUs (else one after the other):
#      torch on GPU 0: checks, training, scoring speed (#4), generation, one style end to end, a profile
#      Jittor on the last GPU: the CUDA 13 patch, the fused-attention check (ATTENTION=1), the engine bench,
#      a profile, the replayed step's kernel times, determinism
# Stops starting new steps after ${DEADLINE_MIN:-17} minutes, so that what was measured comes back.
# Choosing parts (space-separated lists): PARTS (default "sweeps torch jittor"), TORCH_SECTIONS (default
# "check train scoring generate e2e profile"; group_norm adds the Triton GroupNorm check), JITTOR_SECTIONS (default "bench profile kernels determinism"),
# JITTOR_VARIANTS (default "jittor jittor-fp16 jittor-fp16-replay"), JITTOR_PROFILE (default "jittor-fp16"; Jittor's profiler
# sees eager steps only), JITTOR_BENCH (default "check,train,generate"); variant lists
# for the torch sections: TORCH_CHECK, TORCH_TRAIN, TORCH_GEN, E2E, TORCH_PROFILE. ATTENTION=1 / KERNELS=1 add the GPU checks
# of the fused attention / the transpose, GroupNorm and size-keeping convolution kernels to the Jittor track.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${OUT:-gpu_out}"); mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
END=$(( $(date +%s) + 60 * ${DEADLINE_MIN:-17} ))
step() { echo; echo "=== $* ($(date +%T))"; }
late() { [ "$(date +%s)" -ge "$END" ] && echo "=== skipped, past the deadline: $*"; }
want() { [[ " $1 " == *" $2 "* ]]; }  # want LIST ITEM
bench() { python3 -m jdiff.bench "$@" 2>&1 | grep -v "^\[\|it/s\]" | tail -25; }

step install
. bench/setup.sh

PARTS=${PARTS:-sweeps torch jittor}
TS=${TORCH_SECTIONS:-check train scoring generate e2e profile}
JS=${JITTOR_SECTIONS:-bench profile kernels determinism}
if want "$PARTS" sweeps; then
  if [ "$GPUS" -ge 2 ]; then
    step "sweeps: one GPU, then two"
    python3 -m jdiff.bench.sweep --runs 4 --gpus 0,1 engine=torch 2>&1 | tail -8
  fi
  step "determinism, engine=torch"
  python3 -m jdiff.bench.determinism --engine torch --out "$OUT/determinism_torch.json" 2>&1 | tail -12
fi

torch_track() {
  export PYTHONPATH=$TORCH_PATH CUDA_VISIBLE_DEVICES=0
  if want "$TS" group_norm; then step "the Triton GroupNorm against PyTorch's, SD 2.1 shapes"
    python3 -m jdiff.bench.group_norm --out "$OUT/group_norm.json" 2>&1 | tail -45; fi
  if want "$TS" check; then step "bench: the speed paths against the fp32 torch engine"
    bench --sections check --variants ${TORCH_CHECK:-torch,torch-cudagraphs,torch-bf16-cudagraphs,torch-bf16-cudagraphs-triton-cl} --out "$OUT/check_torch.json"; fi
  touch "$OUT/reference_ready"
  want "$TS" train && { late "torch training" || { step "bench: torch training"
    bench --sections train --variants ${TORCH_TRAIN:-baseline,torch,torch-bf16-cudagraphs,torch-bf16-cudagraphs-triton-cl} --out "$OUT/train_torch.json"; }; }
  want "$TS" scoring && { late "scoring" || { step "scoring speed"
    python3 -m jdiff.bench.scoring --size full --device cuda 2>&1 | tail -20; }; }
  want "$TS" generate && { late "torch generation" || { step "bench: torch generation"
    bench --sections generate --variants ${TORCH_GEN:-baseline,torch-bf16-cudagraphs,torch-bf16-cudagraphs-triton-cl} --out "$OUT/generate_torch.json"; }; }
  want "$TS" profile && { late "profile" || { step "profile: ${TORCH_PROFILE:-torch-bf16-cudagraphs-triton-cl}"
    python3 -m jdiff.bench.profile_train --variant ${TORCH_PROFILE:-torch-bf16-cudagraphs-triton-cl} 2>&1 | grep -v "^\\[" | head -60; }; }
  want "$TS" e2e && { late "end to end" || { step "bench: one style end to end"
    bench --sections e2e --variants ${E2E:-torch-bf16-cudagraphs-triton-cl} --out "$OUT/e2e.json"; }; }
  step "torch track done"
}

jittor_track() {
  export PYTHONPATH=$JITTOR_PATH CUDA_VISIBLE_DEVICES=$LAST
  step "Jittor on CUDA 13: patch and verify"
  python3 -m jdiff.engines.jittor.fast.cuda13 apply > "$OUT/cuda13_apply.txt" 2>&1; grep -v "^\[i\|^\[w\|^ " "$OUT/cuda13_apply.txt" | head -40
  python3 -m jdiff.engines.jittor.fast.cuda13 apply 2>&1 | grep -E "nothing to change|verified|FAILED"  # idempotent
  if [ -n "${ATTENTION:-}" ]; then
    step "Jittor fused attention check"
    timeout 600 python3 -m jdiff.bench.jittor_attention --out "$OUT/attention.json" 2>&1 | grep -v "^\[i\|^\[w" | tail -30
  fi
  if [ -n "${KERNELS:-}" ]; then
    step "Jittor transpose and GroupNorm kernels check"
    timeout 600 python3 -m jdiff.bench.jittor_kernels --out "$OUT/kernels.json" 2>&1 | grep -v "^\\[i\\|^\\[w" | tail -16
  fi
  if want "$PARTS" torch; then  # the torch reference for the check section
    while [ ! -e "$OUT/reference_ready" ] && [ "$(date +%s)" -lt "$END" ]; do sleep 5; done
  fi
  for variant in ${JITTOR_PROFILE:-jittor-fp16}; do
    want "$JS" profile && { late "$variant profile" || { step "profile: $variant"
      python3 -m jdiff.bench.profile_train --variant $variant --steps 5 2>&1 | grep -v "^\\[i\\|^\\[w" | tail -40; }; }
  done
  want "$JS" kernels && { late "kernel times" || { step "kernel times of a replayed step (CUPTI)"
    python3 -m jdiff.bench.diagnose_jittor --parts kernels --variant jittor-fp16-replay --steps 5 --out "$OUT/kernels_replay.json" 2>&1 | grep -v "^\\[i\\|^\\[w" | tail -28; }; }
  for variant in ${JITTOR_VARIANTS:-jittor jittor-fp16 jittor-fp16-replay}; do
    want "$JS" bench && { late "$variant" || { step "bench: $variant"
      bench --sections ${JITTOR_BENCH:-check,train,generate} --variants $variant --out "$OUT/$variant.json"; }; }
  done
  want "$JS" determinism && { late "jittor determinism" || { step "determinism, engine=jittor"
    python3 -m jdiff.bench.determinism --engine jittor --gpus $LAST --out "$OUT/determinism_jittor.json" 2>&1 | tail -12; }; }
  step "jittor track done"
}

touch "$OUT/torch.log" "$OUT/jittor.log"
if [ "$GPUS" -ge 2 ]; then
  want "$PARTS" torch && torch_track > "$OUT/torch.log" 2>&1 &
  want "$PARTS" jittor && jittor_track > "$OUT/jittor.log" 2>&1 &
  wait
else
  want "$PARTS" torch && torch_track > "$OUT/torch.log" 2>&1
  want "$PARTS" jittor && jittor_track > "$OUT/jittor.log" 2>&1
fi
cat "$OUT/torch.log" "$OUT/jittor.log"
(cd "$OUT" && tar czf results.tar.gz --exclude=results.tar.gz *.json *.log *.txt 2>/dev/null)
step done
