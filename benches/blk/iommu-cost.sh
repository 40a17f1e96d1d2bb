#!/usr/bin/env bash
# What the IOMMU costs a vhost-user-blk backend, side by side in one run:
# 4 KiB random reads at queue depth 1 and 32, for
#   off          no IOMMU (backend --iommu none)
#   passthrough  behind the IOMMU, endpoint in a bypass domain (shared table)
#   table/strict shared table, MAP/UNMAP around every request
#   table/lazy   shared table, UNMAPs batched (Linux's flush queue)
#   table/static shared table, guest RAM mapped once (a DPDK or SPDK guest
#                driver through VFIO): the backend's translation cost alone
#   msg/strict   message mode (private IOTLB, misses and invalidations)
#   msg/lazy
#   msg/static
# then the backend's own cost on the null target (one queue thread): IOPS,
# and IOPS per core of the backend (completed I/Os over its CPU time).
#
# Real processes: vhost-user-iommu, vhost-user-blk, viommu-frontend (the
# VMM and guest driver stand-in); the image lives on tmpfs.
#
# Usage: benches/blk/iommu-cost.sh [--seconds S] [--rounds N] [--quick]
#            [--daemon-poll-us US] [--backend-poll-us US] [--spin-us US]
#   --rounds N          run the image points N times, modes interleaved, and
#                       report each point's median run (default 3)
#   --quick             1 s per point, one round, fewer points (the CI smoke run)
#   --daemon-poll-us    the daemon's --poll-us (default 50): a guest's MAP
#                       and UNMAP are synchronous requests, so their round
#                       trip is on the I/O path
#   --backend-poll-us   vhost-user-blk's --poll-us (default 50)
#   --spin-us           the guest's halt polling: viommu-frontend blk
#                       --spin-us (default 200, KVM's default halt_poll_ns)
# Every party polls by default, as on a host that dedicates cores: without
# it each I/O pays two or three wake-ups of an idle CPU, tens of µs on a
# virtual machine, which hide the cost being measured. On fewer cores than
# pollers the polling loops yield the CPU.
set -euo pipefail
cd "$(dirname "$0")/../.."

seconds=3
rounds=3
quick=0
poll_us=50
backend_poll_us=50
spin_us=200
while [ $# -gt 0 ]; do
    case "$1" in
        --seconds) seconds="$2"; shift 2 ;;
        --rounds) rounds="$2"; shift 2 ;;
        --quick) quick=1; seconds=1; rounds=1; shift ;;
        --daemon-poll-us) poll_us="$2"; shift 2 ;;
        --backend-poll-us) backend_poll_us="$2"; shift 2 ;;
        --spin-us) spin_us="$2"; shift 2 ;;
        *) echo "usage: $0 [--seconds S] [--rounds N] [--quick] [--daemon-poll-us US] [--backend-poll-us US] [--spin-us US]" >&2; exit 2 ;;
    esac
done

cargo build -q --release -p vhost-user-iommu -p vhost-user-blk -p viommu-frontend
bin=target/release
work=$(mktemp -d /dev/shm/viommu-bench.XXXXXX)
pids=()
blk_pid=
cleanup() {
    local status=$?
    if [ "$status" != 0 ]; then
        echo "iommu-cost.sh failed (exit $status); last log lines:" >&2
        tail -n 20 "$work/iommu.log" "$work/blk.log" >&2 2>/dev/null || true
    fi
    for p in "${pids[@]}" $blk_pid; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

img="$work/disk.img"
truncate -s 1G "$img"
# Written once so reads hit page-cache pages, not holes.
dd if=/dev/urandom of="$img" bs=1M count=256 conv=notrunc status=none

"$bin/vhost-user-iommu" --socket-path "$work/iommu.sock" --backend-socket "$work/backends.sock" \
    --poll-us "$poll_us" --log-level info 2>"$work/iommu.log" &
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
        --iommu "$iommu" --endpoint 8 --poll-us "$backend_poll_us" --log-level info 2>>"$work/blk.log" &
    local bpid=$!
    blk_pid=$bpid
    for _ in $(seq 100); do [ -S "$work/blk.sock" ] && break; sleep 0.05; done
    local out
    out=$("$bin/viommu-frontend" --socket "$work/iommu.sock" --ram-size 1G blk \
        --blk-socket "$work/blk.sock" --policy "$policy" --queues 1 --depth "$depth" \
        --read-percent 100 --span-blocks 65536 --seconds "$seconds" --spin-us "$spin_us")
    # The backend's CPU time (user + system) over its whole life: what
    # "IOPS per core" divides by.
    local cpu
    cpu=$(awk -v hz="$(getconf CLK_TCK)" '{ printf "%.3f", ($14 + $15) / hz }' "/proc/$bpid/stat")
    kill "$bpid"; wait "$bpid" 2>/dev/null || true
    blk_pid=
    local iops p50 p99 maps
    iops=$(sed -n 's/.* iops=\([0-9]*\).*/\1/p' <<<"$out")
    p50=$(sed -n 's/.* p50_us=\([0-9.]*\).*/\1/p' <<<"$out")
    p99=$(sed -n 's/.* p99_us=\([0-9.]*\).*/\1/p' <<<"$out")
    maps=$(sed -n 's/.* maps=\([0-9]*\).*/\1/p' <<<"$out")
    echo "$name $depth $iops $p50 $p99 $maps $cpu"
}

results="$work/results"
: >"$results"
# Warm-up, not reported: the first run over the image pays one-time costs
# (the kernel's io-wq workers, page-cache lookups) that would go to `off`.
run warmup none off 32 >/dev/null
depths="1 32"
points="off:none:off passthrough:table:passthrough table/strict:table:strict table/lazy:table:lazy table/static:table:static msg/strict:msg:strict msg/lazy:msg:lazy msg/static:msg:static"
if [ "$quick" = 1 ]; then
    points="off:none:off table/strict:table:strict table/lazy:table:lazy table/static:table:static msg/strict:msg:strict"
fi
for _ in $(seq "$rounds"); do
    for depth in $depths; do
        for p in $points; do
            IFS=: read -r name mode policy <<<"$p"
            run "$name" "$mode" "$policy" "$depth" >>"$results.all"
        done
    done
done
# Each point's median run by IOPS (its p50 and p99 with it).
for depth in $depths; do
    for p in $points; do
        name=${p%%:*}
        awk -v n="$name" -v d="$depth" '$1==n && $2==d' "$results.all" | sort -k3,3n |
            awk '{ line[NR] = $0 } END { if (NR > 0) print line[int((NR + 1) / 2)] }' >>"$results"
    done
done

echo
echo "4 KiB random reads, 1 queue, image on tmpfs, ${seconds}s per point, median of $rounds ($(nproc) CPUs; --poll-us: daemon $poll_us, backend $backend_poll_us; guest --spin-us $spin_us)"
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
echo "null target (no storage), 1 queue thread: the backend's own cost (its CPU time"
echo "includes the polling it does while the guest is busy with MAPs)"
: >"$results.null"
null_points="off:none:off passthrough:table:passthrough table/static:table:static table/lazy:table:lazy table/strict:table:strict msg/static:msg:static"
if [ "$quick" = 1 ]; then
    null_points="off:none:off table/static:table:static"
fi
for depth in $depths; do
    for p in $null_points; do
        IFS=: read -r name mode policy <<<"$p"
        run "$name" "$mode" "$policy" "$depth" null:1G >>"$results.null"
    done
done
printf '%-13s %5s %10s %9s %9s %8s %11s %9s\n' mode depth IOPS p50_us p99_us "vs off" "p50 vs off" "IOPS/core"
for depth in $depths; do
    base=$(awk -v d="$depth" '$1=="off" && $2==d {print $3}' "$results.null")
    base_p50=$(awk -v d="$depth" '$1=="off" && $2==d {print $4}' "$results.null")
    awk -v d="$depth" -v base="$base" -v bp="$base_p50" -v s="$seconds" '$2==d {
        per_core = ($7 > 0) ? $3 * s / $7 : 0
        printf "%-13s %5s %10d %9.2f %9.2f %7.2fx %+10.2f %9d\n", $1, $2, $3, $4, $5, (base>0)?$3/base:0, $4-bp, per_core }' "$results.null"
done
