#!/usr/bin/env bash
# Produces the benchmark tables of memory/README.md.
#
#   memory/benches/run.sh
#   REPS=5 BIG=256 BIG_STRUCTS="tracker roaring flat" CG_STRUCTS="tracker roaring flat" memory/benches/run.sh
#   TIMINGS=0 CG_STRUCTS=tracker memory/benches/run.sh     # only the tracker's instruction counts
#
# 1. timings at 4 GiB, every structure, REPS runs (min and median), peak heap, bytes/offline page;
# 2. timings at BIG GiB for BIG_STRUCTS (BTreeSet and HashSet take minutes per row there);
#    TIMINGS=0 skips 1 and 2;
# 3. callgrind at 4 GiB for CG_STRUCTS: instructions inside `measured_workload` only (setup
#    excluded), one run; exact and repeatable, unlike the timings. CALLGRIND=0 skips it.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPS=${REPS:-5}
BIG=${BIG:-256}
BIG_STRUCTS=${BIG_STRUCTS:-tracker roaring flat}
CG_STRUCTS=${CG_STRUCTS:-tracker roaring flat}
OUT=${OUT:-target/memory-bench}
mkdir -p "$OUT"
cargo bench -p memory --bench compare --no-run 2>/dev/null
BIN=$(ls -t target/release/deps/compare-* | grep -v '\.d$' | head -1)
if [ "${TIMINGS:-1}" = 1 ]; then
  "$BIN" --sizes 4 --reps "$REPS" | tee "$OUT/timings-4.md"

  echo
  for w in single runs hotadd lookup iterate; do
    for s in $BIG_STRUCTS; do
      "$BIN" --sizes "$BIG" --reps "$REPS" --only "$w:$s" | grep '^| [a-z]' | grep -v '^| workload'
    done
  done | tee "$OUT/timings-$BIG.md"
fi

[ "${CALLGRIND:-1}" = 1 ] || exit 0
echo
echo "| workload (4 GiB) | structure | instructions | ops | instructions/op |"
echo "|---|---|---|---|---|"
for w in single runs hotadd lookup iterate; do
  for s in $CG_STRUCTS; do
    row=$(valgrind --tool=callgrind --callgrind-out-file="$OUT/cg.$w.$s" \
      --toggle-collect='*measured_workload*' "$BIN" --sizes 4 --reps 1 --only "$w:$s" 2>/dev/null \
      | grep '^| [a-z]' | grep -v '^| workload' || true)
    ops=$(echo "$row" | awk -F'|' '{gsub(/ /,"",$5); print $5}')
    ir=$(callgrind_annotate "$OUT/cg.$w.$s" 2>/dev/null | grep 'PROGRAM TOTALS' | awk '{gsub(/,/,"",$1); print $1}')
    per=$(awk -v a="$ir" -v b="$ops" 'BEGIN { if (b > 0) printf "%.1f", a / b; else print "-" }')
    echo "| $w | $s | $ir | $ops | $per |"
  done
done | tee "$OUT/callgrind.md"
