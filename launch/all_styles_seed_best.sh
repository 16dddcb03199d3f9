#!/usr/bin/env bash
# The reference method's best settings on all 15 challenge styles, as one sweep.
# Extra arguments are passed on as overrides, e.g. `launch/all_styles_seed_best.sh model.path=/models/sd21`.
set -euo pipefail
exec python -m jdiff.main -m experiment=seed_best \
  style=00,01,02,03,04,05,06,07,08,09,10,11,12,13,14 "$@"
