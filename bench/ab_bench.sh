#!/usr/bin/env bash
# A against B on one machine in one call: `python -m jdiff.bench` with the same arguments from two jdiff source
# trees, interleaved (A B A B ...), so that a change is measured against its baseline on the same card.
#   bench/ab_bench.sh TREE_A TREE_B [ROUNDS] -- BENCH_ARGS...
# A tree is a checkout, or a revision unpacked with `git archive REV | tar -x -C DIR` (carry it to the device
# machine as an ignored path). Each run imports jdiff from its tree (PYTHONPATH; the working directory is an
# empty folder, so neither tree shadows the other) and shares one model cache, $AB_CACHE (default
# data/cache/bench here), which must hold the model already: a torch-path bench run builds it. AB_PATH goes in
# front of PYTHONPATH (on the device machine: /tmp/np1:/tmp/site for Jittor, /tmp/site for torch). Each run
# writes $OUT/ab-<A|B>-<round>.json (default OUT=ab_out) and prints its table row. Default ROUNDS: 2. The
# interpreter is $PYTHON (default python3).
set -uo pipefail
usage() { echo "usage: $0 TREE_A TREE_B [ROUNDS] -- BENCH_ARGS..." >&2; exit 2; }
[ $# -ge 3 ] || usage
A=$(realpath "$1"); B=$(realpath "$2"); shift 2
ROUNDS=2
if [ "$1" != "--" ]; then ROUNDS=$1; shift; fi
[ "${1:-}" == "--" ] || usage
shift
for tree in "$A" "$B"; do
  # jdiff/bench.py before the bench became a package, so that a change can be run against an older baseline
  [ -f "$tree/jdiff/bench/__init__.py" ] || [ -f "$tree/jdiff/bench.py" ] ||
    { echo "$tree has no jdiff/bench: not a jdiff source tree" >&2; exit 2; }
done
OUT=$(realpath -m "${OUT:-ab_out}"); mkdir -p "$OUT"
CACHE=$(realpath -m "${AB_CACHE:-data/cache/bench}")
cd "$(mktemp -d)" || exit 1
failed=0
for round in $(seq 1 "$ROUNDS"); do
  for side in A B; do
    tree=$A; [ "$side" == B ] && tree=$B
    log=$OUT/ab-$side-$round.log
    echo "=== $side, round $round: $tree ($(date +%T))"
    PYTHONPATH=${AB_PATH:+$AB_PATH:}$tree "${PYTHON:-python3}" -m jdiff.bench --cache "$CACHE" \
      --out "$OUT/ab-$side-$round.json" "$@" > "$log" 2>&1 || { failed=1; tail -5 "$log"; }
    grep "^| \| vs " "$log"
  done
done
exit $failed
