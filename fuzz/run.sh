#!/usr/bin/env bash
# Builds the fuzz targets with libFuzzer's coverage instrumentation on the
# stable toolchain and runs each for SECONDS (default 30), one after the
# other, starting from its corpus in fuzz/corpus/<target>/ (which is read,
# not changed). Prints the executions per target and in total. A crash
# fails the run and prints the reproducer and how to replay it.
#
#   fuzz/run.sh [SECONDS]
#   FUZZ_TARGETS="chain device_model" fuzz/run.sh 300
#   FUZZ_KEEP=DIR fuzz/run.sh 300   # keep the grown corpora in DIR/<target>
set -euo pipefail
cd "$(dirname "$0")"

seconds=${1:-30}
targets=${FUZZ_TARGETS:-"request_parser device_model chain backend_protocol settings_toml state_format"}
host=$(rustc -vV | sed -n 's/^host: //p')
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}

# What cargo-fuzz passes, minus the sanitizer (which needs nightly): the
# SanitizerCoverage pass with inline 8-bit counters, a PC table and compare
# tracing is what libFuzzer's guidance reads. --target keeps these flags off
# build scripts and proc-macros.
export RUSTFLAGS="-Cpasses=sancov-module \
 -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
 -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares \
 --cfg fuzzing -Cdebug-assertions -Coverflow-checks"

echo "building the fuzz targets ($host)"
cargo build -q --release --target "$host" --bins
bin=$CARGO_TARGET_DIR/$host/release

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p artifacts
failed=()
total=0
printf '%-18s %14s %12s %8s\n' target executions exec/s corpus > "$work/table"
for t in $targets; do
    mkdir -p "$work/$t" "corpus/$t"
    log=$work/$t.log
    rm -f artifacts/"$t"-*
    dict=()
    [ -f "dict/$t.dict" ] && dict=(-dict="dict/$t.dict")
    echo "== fuzz $t for ${seconds}s"
    # The first directory receives new inputs; the kept corpus is only read.
    if "$bin/$t" -max_total_time="$seconds" -print_final_stats=1 -timeout=10 \
        -rss_limit_mb=2048 -artifact_prefix="$PWD/artifacts/$t-" "${dict[@]}" \
        "$work/$t" "corpus/$t" >"$log" 2>&1; then
        status=ok
    else
        status=failed
        failed+=("$t")
    fi
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    units=$(find "$work/$t" "corpus/$t" -type f | wc -l)
    total=$((total + ${execs:-0}))
    printf '%-18s %14s %12s %8s %s\n' "$t" "${execs:-?}" "${rate:-?}" "$units" \
        "$([ $status = ok ] || echo FAILED)" >> "$work/table"
    if [ $status = failed ]; then
        echo "!! $t failed; libFuzzer's report:"
        grep -v '^#[0-9]' "$log" | tail -60
        for a in artifacts/"$t"-*; do
            [ -e "$a" ] || continue
            echo "!! reproducer fuzz/$a ($(wc -c < "$a") bytes, base64):"
            base64 "$a"
            echo "!! replay: CARGO_TARGET_DIR=... fuzz/run.sh builds it; then $bin/$t fuzz/$a"
        done
    fi
    if [ -n "${FUZZ_KEEP:-}" ]; then
        mkdir -p "$FUZZ_KEEP/$t" && cp -n "$work/$t"/* "$FUZZ_KEEP/$t"/ 2>/dev/null || true
    fi
done
echo "== fuzzing results (${seconds}s per target)"
cat "$work/table"
echo "total executions: $total"
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzzing found crashes in: ${failed[*]}"
    exit 1
fi
