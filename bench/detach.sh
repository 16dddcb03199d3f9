#!/usr/bin/env bash
# Long GPU work across device calls: `bench/detach.sh NAME COMMAND...` starts COMMAND (from the checkout) in a
# process session of its own, so that it outlives the call, unless NAME was started already; then waits until it
# ends or WAIT seconds (default 540) have passed, and copies its folder to $OUT. A later call with the same NAME
# (the command may be left out) only waits and copies again. Its folder, /tmp/jdiff_detached/NAME, holds the log
# (log), the exit status once it has ended (rc), and whatever the command writes under $OUT (set to out/ there).
set -uo pipefail
cd "$(dirname "$0")/.."
name=${1:?usage: bench/detach.sh NAME [COMMAND...]}; shift
dir=/tmp/jdiff_detached/$name
if [ ! -d "$dir" ]; then
  [ $# -gt 0 ] || { echo "error: $name was never started here (a fresh machine?); give its command"; exit 2; }
  mkdir -p "$dir/out"
  OUT=$dir/out setsid bash -c '"$@" > "$0/log" 2>&1; echo $? > "$0/rc"' "$dir" "$@" < /dev/null &
  echo "$name: started $(date +%T)"
fi
start=$(date +%s)
while [ ! -f "$dir/rc" ] && [ $(( $(date +%s) - start )) -lt "${WAIT:-540}" ]; do sleep 5; done
if [ -f "$dir/rc" ]; then echo "$name: ended, exit $(cat "$dir/rc")"; else echo "$name: still running $(date +%T)"; fi
[ -n "${OUT:-}" ] && mkdir -p "$OUT/$name" && cp -r "$dir/." "$OUT/$name/"
tail -c 2000 "$dir/log" | tr '\r' '\n' | tail -8
