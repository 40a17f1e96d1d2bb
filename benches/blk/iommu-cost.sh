#!/usr/bin/env bash
# What the IOMMU costs a vhost-user-blk backend, side by side in one run:
# 4 KiB random reads at queue depth 1 and 32, for
#   off          no IOMMU (backend --iommu none)
#   passthrough  behind the IOMMU, endpoint in a bypass domain (shared table)
#   table/strict shared table, MAP/UNMAP around every request
#   table/lazy   shared table, UNMAPs batched (Linux's flush queue)
#   msg/strict   message mode (private IOTLB, misses and invalidations)
#   msg/lazy
# then the backend's own cost on the null target (one queue thread).
#
# Real processes: vhost-user-iommu, vhost-user-blk, viommu-frontend (the
# VMM and guest driver stand-in); the image lives on tmpfs.
#
# Usage: benches/blk/iommu-cost.sh [--seconds S] [--quick] [--daemon-poll-us US]
#   --quick             1 s per point, fewer points (the CI smoke run)
#   --daemon-poll-us    the daemon's --poll-us (default 50): a guest's MAP
#                       and UNMAP are synchronous requests, so their round
#                       trip is on the I/O path
set -euo pipefail
cd "$(dirname "$0")/../.."

seconds=3
quick=0
poll_us=50
while [ $# -gt 0 ]; do
    case "$1" in
        --seconds) seconds="$2"; shift 2 ;;
        --quick) quick=1; seconds=1; shift ;;
        --daemon-poll-us) poll_us="$2"; shift 2 ;;
        *) echo "usage: $0 [--seconds S] [--quick] [--daemon-poll-us US]" >&2; exit 2 ;;
    esac
done

cargo build -q --release -p vhost-user-iommu -p vhost-user-blk -p viommu-frontend
bin=target/release
work=$(mktemp -d /dev/shm/viommu-bench.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

img="$work/disk.img"
truncate -s 1G "$img"
# Written once so reads hit page-cache pages, not holes.
dd if=/dev/urandom of="$img" bs=1M count=256 conv=notrunc status=none

"$bin/vhost-user-iommu" --socket-path "$work/iommu.sock" --backend-socket "$work/backends.sock" \
    --poll-us "$poll_us" --log-level warn 2>"$work/iommu.log" &
pids+=($!)
for _ in $(seq 100); do [ -S "$work/backends.sock" ] && break; sleep 0.05; done

# run NAME BACKEND_MODE POLICY DEPTH [TARGET]
run() {
    local name=$1 mode=$2 policy=$3 depth=$4 target=${5:-$img}
    local iommu=none
    case "$mode" in
        table) iommu="table:$work/backends.sock" ;;
        msg) iommu="iotlb-msg:$work/backends.sock" ;;
    esac
    rm -f "$work/blk.sock"
    "$bin/vhost-user-blk" --socket-path "$work/blk.sock" --blk-file "$target" \
        --iommu "$iommu" --endpoint 8 --log-level warn 2>>"$work/blk.log" &
    local bpid=$!
    for _ in $(seq 100); do [ -S "$work/blk.sock" ] && break; sleep 0.05; done
    local out
    out=$("$bin/viommu-frontend" --socket "$work/iommu.sock" --ram-size 1G blk \
        --blk-socket "$work/blk.sock" --policy "$policy" --queues 1 --depth "$depth" \
        --read-percent 100 --span-blocks 65536 --seconds "$seconds")
    kill "$bpid"; wait "$bpid" 2>/dev/null || true
    local iops p50 p99 maps
    iops=$(sed -n 's/.* iops=\([0-9]*\).*/\1/p' <<<"$out")
    p50=$(sed -n 's/.* p50_us=\([0-9.]*\).*/\1/p' <<<"$out")
    p99=$(sed -n 's/.* p99_us=\([0-9.]*\).*/\1/p' <<<"$out")
    maps=$(sed -n 's/.* maps=\([0-9]*\).*/\1/p' <<<"$out")
    echo "$name $depth $iops $p50 $p99 $maps"
}

results="$work/results"
: >"$results"
depths="1 32"
points="off:none:off passthrough:table:passthrough table/strict:table:strict table/lazy:table:lazy msg/strict:msg:strict msg/lazy:msg:lazy"
if [ "$quick" = 1 ]; then
    points="off:none:off table/strict:table:strict table/lazy:table:lazy msg/strict:msg:strict"
fi
for depth in $depths; do
    for p in $points; do
        IFS=: read -r name mode policy <<<"$p"
        run "$name" "$mode" "$policy" "$depth" >>"$results"
    done
done

echo
echo "4 KiB random reads, 1 queue, image on tmpfs, ${seconds}s per point ($(nproc) CPUs, daemon --poll-us $poll_us)"
printf '%-13s %5s %10s %9s %9s %10s %9s\n' mode depth IOPS p50_us p99_us maps/io "vs off"
for depth in $depths; do
    base=$(awk -v d="$depth" '$1=="off" && $2==d {print $3}' "$results")
    awk -v d="$depth" -v base="$base" '$2==d {
        ios=$3; ratio=(base>0)?ios/base:0; mpi=(ios>0)?$6/(ios*'"$seconds"'):0
        printf "%-13s %5s %10d %9.1f %9.1f %10.2f %8.2fx\n", $1, $2, $3, $4, $5, mpi, ratio }' "$results"
done
for depth in $depths; do
    strict_t=$(awk -v d="$depth" '$1=="table/strict" && $2==d {print $3}' "$results")
    strict_m=$(awk -v d="$depth" '$1=="msg/strict" && $2==d {print $3}' "$results")
    if [ -n "$strict_t" ] && [ -n "$strict_m" ] && [ "$strict_m" -gt 0 ]; then
        awk -v t="$strict_t" -v m="$strict_m" -v d="$depth" \
            'BEGIN { printf "table vs message mode under strict, depth %s: %.2fx\n", d, t/m }'
    fi
done

echo
echo "null target (no storage), 1 queue thread, depth 32: the backend's own cost"
: >"$results.null"
for p in off:none:off passthrough:table:passthrough table/lazy:table:lazy table/strict:table:strict; do
    IFS=: read -r name mode policy <<<"$p"
    run "$name" "$mode" "$policy" 32 null:1G >>"$results.null"
done
base=$(awk '$1=="off" {print $3}' "$results.null")
awk -v base="$base" '{ printf "%-13s %10d IOPS %8.2fx\n", $1, $3, (base>0)?$3/base:0 }' "$results.null"
