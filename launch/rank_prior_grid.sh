#!/usr/bin/env bash
# LoRA rank x prior-preservation weight on three styles: 3 x 3 x 3 = 27 runs.
set -euo pipefail
exec python -m jdiff.main -m experiment=seed_best \
  style=00,05,10 lora.unet_rank=4,16,32 prior.weight=0.0,0.5,1.0 "$@"
