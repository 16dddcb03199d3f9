#!/usr/bin/env bash
# #20 on one GPU: (1) jittor_fast's peak memory and speed under cuDNN workspace caps (python -m jdiff.bench, train
# and generate, one fresh process each); (2) the whole of set A (15 styles, experiment=all_styles = seed_best,
# 800 steps, 25 images, Hist score, model=sd21_random, cold class-image cache) as a packed torch_fast sweep with one
# shared class set of PRIOR_OBJECTS objects; (3) UNPACKED styles of set A run unpacked (sweep.pack=1) with the same
# class set, warm: their per-run time against the packed runs'. Wheels in .whl/ as for gpu_bench.sh; the styles in
# data/styles/ (copied to /tmp before use). Logs and JSON in ${OUT:-gpu_out}/. PARTS (default "memory set_a unpacked"),
# WORKSPACES in GiB (default "1000 2 0.5"; 1000 is Jittor's own cap, a quarter of the card; jdiff's is 2),
# PRIOR_OBJECTS (default 35: 280 class images, as the reference's ~280).
# It takes longer than one device call: start it with `bench/detach.sh set_a bench/set_a_bench.sh` and call
# `bench/detach.sh set_a` again, at once, until it has ended.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${OUT:-gpu_out}"); mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
step() { echo; echo "=== $* ($(date +%T))"; }
step install
. bench/setup.sh
PARTS=${PARTS:-memory set_a unpacked}
MODELS=$PWD/data/cache/bench/models
if [[ " $PARTS " == *" memory "* ]]; then
  step "Jittor on CUDA 13: patch"
  PYTHONPATH=$JITTOR_PATH python3 -m jdiff.engines.jittor.fast.cuda13 apply > "$OUT/cuda13_apply.txt" 2>&1
  grep -E "nothing to change|verified|FAILED" "$OUT/cuda13_apply.txt" | head
  for w in ${WORKSPACES:-1000 2 0.5}; do
    step "jittor_fast, cuDNN workspace cap: $w"
    JDIFF_CUDNN_WORKSPACE_GIB=$w PYTHONPATH=$JITTOR_PATH python3 -m jdiff.bench --variants jittor-fp16-replay \
      --sections train,generate --out "$OUT/jittor_workspace_$w.json" 2>&1 | grep -v "^\[\|it/s\]\|Compiling" | tail -4
  done
fi
export PYTHONPATH=$TORCH_PATH
rm -rf /tmp/set_a_styles && cp -r data/styles /tmp/set_a_styles  # the user's data stays untouched
ALL='[00,01,02,03,04,05,06,07,08,09,10,11,12,13,14]'
sweep() {  # NAME PACK [overrides...]: one torch_fast sweep of set A's settings, timed; its report and logs to $OUT
  local name=$1 pack=$2; shift 2
  local started=$(date +%s.%N)
  python3 -m jdiff.main -m experiment=all_styles engine=torch_fast model=sd21_random model.path=$MODELS score=hist \
    data.root=/tmp/set_a_styles paths.cache=/tmp/set_a_cache prior.share=sweep "prior.styles=$ALL" \
    prior.max_objects=${PRIOR_OBJECTS:-35} sweep.pack=$pack sweep.name=$name "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc, $(python3 -c "import time; print(round(time.time() - $started, 1))") s wall"
  grep -E "class images:|packs? of|run-steps|FAILED|error" "$OUT/$name.log" | head -8
  mkdir -p "$OUT/$name"
  cp multirun/$name/*.json multirun/$name/*.html multirun/$name/*.csv "$OUT/$name/" 2>/dev/null
  for run in multirun/$name/*/; do
    [ -f "$run/COMPLETE" ] && cp "$run/COMPLETE" "$OUT/$name/$(basename "$run" | tail -c 9).COMPLETE"
  done
}
if [[ " $PARTS " == *" set_a "* ]]; then
  rm -rf /tmp/set_a_cache multirun/set_a_packed
  step "set A, torch_fast, packed (sweep.pack=auto), one class set, cold cache"
  sweep set_a_packed auto
fi
if [[ " $PARTS " == *" unpacked "* ]]; then
  rm -rf multirun/set_a_unpacked
  step "styles ${UNPACKED:-00,01} of set A, torch_fast, unpacked (sweep.pack=1), the same class set, warm"
  sweep set_a_unpacked 1 style=${UNPACKED:-00,01}
fi
nvidia-smi --query-gpu=name,memory.used --format=csv
step done
