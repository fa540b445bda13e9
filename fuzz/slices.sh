#!/usr/bin/env bash
# Fuzz in slices: run every target (or those named) for SECONDS each (default 300), one after
# the other on one core, with its corpus in fuzz/corpus/TARGET (minimized afterwards, so the
# checked-in corpora stay small), and add the time to fuzz/time.tsv (target, wall-clock seconds,
# date, executions, CPU seconds the fuzzer really got: slices run at low priority next to other
# work, so the CPU column is the one that counts). Stops at the first crash, leaving the input
# in fuzz/artifacts/TARGET.
#   fuzz/slices.sh 300            every target, 5 minutes each
#   fuzz/slices.sh 600 snapshot   one target, 10 minutes
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-300}
shift || true
targets=${*:-$(RUSTC_BOOTSTRAP=1 cargo fuzz list)}
for t in $targets; do
    mkdir -p "corpus/$t"
    log=$(mktemp)
    cpu=$(mktemp)
    # Built first, so the timed run is the fuzzer alone.
    RUSTC_BOOTSTRAP=1 cargo fuzz build -O "$t" >/dev/null 2>&1
    if ! RUSTC_BOOTSTRAP=1 /usr/bin/time -f '%U %S' -o "$cpu" nice cargo fuzz run -O "$t" "corpus/$t" -- \
        -max_total_time="$secs" -max_len=8192 -print_final_stats=1 >"$log" 2>&1; then
        tail -40 "$log"
        echo "fuzz/slices.sh: $t crashed; the input is in fuzz/artifacts/$t" >&2
        exit 1
    fi
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
    used=$(awk '{printf "%d", $1 + $2}' "$cpu")
    printf '%s\t%s\t%s\t%s\t%s\n' "$t" "$secs" "$(date -u +%F)" "$runs" "$used" >>time.tsv
    RUSTC_BOOTSTRAP=1 nice cargo fuzz cmin -O "$t" "corpus/$t" >/dev/null 2>&1 || true
    rm -f "$log" "$cpu"
    echo "$t: $secs s ($used s CPU), $runs executions, corpus $(ls "corpus/$t" | wc -l) inputs"
done
