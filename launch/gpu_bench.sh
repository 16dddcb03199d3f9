#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md, in one go, on a machine like the device machine (one H100/H200,
# CUDA 13, Python 3.12 with torch; no internet). Wheels for what is missing there (diffusers, hydra-core,
# omegaconf, antlr4, hydra-joblib-launcher, joblib, jittor, astunparse, six, numpy 1.26) in .whl/.
# Writes logs and JSON into ${OUT:-gpu_out}/. PyTorch parts first, then Jittor (patch, attention, engine).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
step() { echo; echo "=== $* ($(date +%T))"; }
bench() { python3 -m jdiff.bench "$@" 2>&1 | grep -v "^\[\|it/s\]" | tail -25; }

step install
rm -rf /tmp/site /tmp/np1
# numpy 1.26 apart (Jittor 1.3.11 needs numpy < 2; the machine's compiled packages need its numpy 2)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $(ls .whl/*.whl | grep -v numpy) || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/np1 .whl/numpy-*.whl || exit 1
TORCH_PATH=/tmp/site:$PWD
JITTOR_PATH=/tmp/np1:/tmp/site:$PWD
export PYTHONPATH=$TORCH_PATH
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import torch, numpy, diffusers; print('torch', torch.__version__, 'numpy', numpy.__version__, 'diffusers', diffusers.__version__)"

export PYTHONPATH=$JITTOR_PATH
step "Jittor on CUDA 13: patch and verify"
python3 -m jdiff.engines.jittor.cuda13 apply > "$OUT/cuda13_apply.txt" 2>&1; grep -v "^\[i\|^\[w\|^ " "$OUT/cuda13_apply.txt" | head -60
python3 -m jdiff.engines.jittor.cuda13 apply 2>&1 | grep -E "nothing to change|verified|FAILED"  # idempotent
step "Jittor fused attention check"
timeout 1200 python3 launch/check_jittor_attention.py --out "$OUT/attention.json" 2>&1 | grep -v "^\[i\|^\[w" | tail -40
export PYTHONPATH=$TORCH_PATH
step "bench: correctness of the speed paths against the fp32 torch engine"
bench --sections check --variants torch,torch-bf16,torch-bf16-graphs --out "$OUT/check_torch.json"
step "bench: torch training"
bench --sections train --variants ${TORCH_TRAIN:-baseline,torch,torch-bf16,torch-bf16-graphs,torch-bf16-compile} --out "$OUT/train_torch.json"
step "bench: torch generation"
bench --sections generate --variants ${TORCH_GEN:-baseline,torch-bf16} --out "$OUT/generate_torch.json"
step "bench: one style end to end"
bench --sections e2e --variants ${E2E:-torch-bf16} --out "$OUT/e2e.json"

step "scoring speed"
python3 launch/bench_scoring.py --size full --device cuda 2>&1 | tail -20

export PYTHONPATH=$JITTOR_PATH
step "bench: jittor"  # its check compares with the torch reference saved above
bench --sections check,train,generate --variants jittor --out "$OUT/jittor.json"
step done
