#!/usr/bin/env bash
# Produces the benchmark tables of memory/README.md.
#
#   memory/benches/run.sh                 # timings (4 and 256 GiB, 5 runs) + callgrind (4 GiB)
#   SIZES=4 REPS=3 memory/benches/run.sh  # quicker
#   CALLGRIND=0 memory/benches/run.sh     # timings only
#
# Timings: min and median of REPS runs of each workload, peak heap and bytes per offline page
# from a counting allocator (benches/compare.rs). Callgrind: instructions executed inside
# `measured_workload` only (setup excluded), one run at 4 GiB.
set -euo pipefail
cd "$(dirname "$0")/../.."
SIZES=${SIZES:-4,256}
REPS=${REPS:-5}
OUT=${OUT:-target/memory-bench}
mkdir -p "$OUT"
cargo bench -p memory --bench compare --no-run 2>/dev/null
BIN=$(ls -t target/release/deps/compare-* | grep -v '\.d$' | head -1)
"$BIN" --sizes "$SIZES" --reps "$REPS" | tee "$OUT/timings.md"

[ "${CALLGRIND:-1}" = 1 ] || exit 0
echo
echo "| workload (4 GiB) | structure | instructions | ops | instructions/op |"
echo "|---|---|---|---|---|"
for w in single runs hotadd lookup iterate; do
  for s in tracker btreeset hashset roaring flat; do
    if [ "$w" = hotadd ] && { [ "$s" = btreeset ] || [ "$s" = hashset ]; }; then
      echo "| $w | $s | not run (16M per-page inserts take many minutes under valgrind) | | |"
      continue
    fi
    row=$(valgrind --tool=callgrind --callgrind-out-file="$OUT/cg.$w.$s" \
      --toggle-collect='*measured_workload*' "$BIN" --sizes 4 --reps 1 --only "$w:$s" 2>/dev/null | grep '^| [a-z]' | grep -v '^| workload' || true)
    ops=$(echo "$row" | awk -F'|' '{gsub(/ /,"",$5); print $5}')
    ir=$(callgrind_annotate "$OUT/cg.$w.$s" 2>/dev/null | grep 'PROGRAM TOTALS' | awk '{gsub(/,/,"",$1); print $1}')
    per=$(awk -v a="$ir" -v b="$ops" 'BEGIN { if (b > 0) printf "%.1f", a / b; else print "-" }')
    echo "| $w | $s | $ir | $ops | $per |"
  done
done | tee "$OUT/callgrind.md"
