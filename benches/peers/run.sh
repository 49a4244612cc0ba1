#!/usr/bin/env bash
# Runs scenarios 1 (live-trace) and 3 (catch-up) through y-websocket's
# server and Hocuspocus (Yjs clients in Node), then through notesync, and
# prints one comparison table (medians over RUNS runs, ratios to notesync).
#
#   benches/peers/run.sh             # full trace, RUNS=3
#   RUNS=1 SMOKE=1 benches/peers/run.sh   # 2,000 edits, quick check
#
# Needs node >= 20 and npm (installs from package-lock.json on first use).
set -euo pipefail
cd "$(dirname "$0")"
root=$(cd ../.. && pwd)
RUNS=${RUNS:-3}
if [[ -n "${SMOKE:-}" ]]; then
  YJS_ARGS=(--edits 2000 --paced-rate 2000 --reps 3)
  NS_ARGS=(--smoke)
else
  YJS_ARGS=()
  NS_ARGS=()
fi
[[ -d node_modules ]] || npm ci --no-audit --no-fund
(cd "$root" && cargo build --release -p notesync-server -p notesync-benches --bins)
out=${OUT:-$(mktemp -d)}
mkdir -p "$out"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg); results in $out" >&2
for r in $(seq 1 "$RUNS"); do
  for s in y-websocket hocuspocus; do
    for sc in live-trace catch-up; do
      echo "run $r: $s $sc" >&2
      node yjs-bench.mjs "$s" "$sc" --json "${YJS_ARGS[@]}" > "$out/$s-$sc-$r.json"
    done
  done
  for sc in live-trace catch-up; do
    echo "run $r: notesync $sc" >&2
    "$root/target/release/notesync-bench" "$sc" --json "${NS_ARGS[@]}" > "$out/notesync-$sc-$r.json"
  done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
node compare.mjs "$out"/*.json
