#!/usr/bin/env bash
# What the guest IOMMU costs a vhost-user-net switch, side by side in one
# run: testpmd-style io forwarding (vhost-user-net --mode io, port 0 <-> 1,
# one polling thread) between two guests that send to each other as fast as
# their rings allow, in each translation mode:
#   off          no IOMMU (ports iommu=none, guests' DMA policy off)
#   table/static shared table, guest RAM mapped once (DPDK in the guest,
#                through VFIO): the switch's translation cost alone
#   table/lazy   shared table, every buffer mapped, UNMAPs batched (Linux's
#                default flush queue)
#   table/strict shared table, MAP and UNMAP around every buffer (Linux's
#                strict mode)
#   msg/...      the same through a private IOTLB per port filled by miss
#                messages and emptied by invalidation messages (today's
#                vhost-user design), the baseline
# at 64- and 1500-byte frames, with the switch's own cost per frame (its
# polling thread's busy time over the frames it moved; "vs off" there is
# off's cost over the mode's, so below 1 means dearer); then the "no cliff" points: table and
# message mode with 2,048 more live mappings per guest (--extra-maps), and
# a second guest boot on the same switch and daemons (after a driver reset).
#
# Real processes: two vhost-user-iommu daemons (one per guest), the switch,
# and viommu-frontend acting as both VMMs and guest drivers (one thread;
# it builds, checks and maps every frame, so it bounds the figures: see
# docs/performance.md). The switch's polling thread is pinned to the last
# CPU and the guests to CPU 0.
#
# Usage: benches/net/switch.sh [--seconds S] [--rounds N] [--quick]
#   --rounds N  run every point N times, points interleaved, report medians
#               (default 3)
#   --quick     1 s per point, one round, 64-byte frames only (CI's smoke run)
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/../.."

seconds=3
rounds=3
sizes="64 1500"
while [ $# -gt 0 ]; do
    case "$1" in
        --seconds) seconds="$2"; shift 2 ;;
        --rounds) rounds="$2"; shift 2 ;;
        --quick) seconds=1; rounds=1; sizes=64; shift ;;
        *) echo "usage: $0 [--seconds S] [--rounds N] [--quick]" >&2; exit 2 ;;
    esac
done

cargo build -q --release -p vhost-user-iommu -p vhost-user-net -p viommu-frontend
bin=target/release
work=$(mktemp -d /dev/shm/viommu-net-bench.XXXXXX)
pids=()
switch_pid=
cleanup() {
    local status=$?
    if [ "$status" != 0 ]; then
        echo "switch.sh failed (exit $status); last log lines:" >&2
        tail -n 20 "$work"/*.log >&2 2>/dev/null || true
    fi
    for p in "${pids[@]}" $switch_pid; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

cpus=$(nproc)
pmd_cpu=$((cpus - 1))
for g in 0 1; do
    "$bin/vhost-user-iommu" --socket-path "$work/iommu$g.sock" \
        --backend-socket "$work/backends$g.sock" --poll-us 50 --log-level warn \
        2>"$work/iommu$g.log" &
    pids+=($!)
done
for g in 0 1; do
    for _ in $(seq 100); do [ -S "$work/backends$g.sock" ] && break; sleep 0.05; done
done

start_switch() {
    local mode=$1
    local ports=()
    for g in 0 1; do
        local iommu=none
        case "$mode" in
            table) iommu="table:$work/backends$g.sock" ;;
            msg) iommu="iotlb-msg:$work/backends$g.sock" ;;
        esac
        rm -f "$work/port$g.sock"
        ports+=(--port "socket=$work/port$g.sock,iommu=$iommu,endpoint=8")
    done
    : >"$work/switch.log"
    "$bin/vhost-user-net" "${ports[@]}" --mode io --pmd-cpus "$pmd_cpu" --stats-every-s 1 \
        --log-level warn,vhost_user_net::pmd=info 2>"$work/switch.log" &
    switch_pid=$!
    for g in 0 1; do
        for _ in $(seq 100); do [ -S "$work/port$g.sock" ] && break; sleep 0.05; done
    done
}

stop_switch() {
    kill "$switch_pid" 2>/dev/null || true
    wait "$switch_pid" 2>/dev/null || true
    switch_pid=
}

# guests POLICY MODE SIZE [EXTRA_MAPS]: one run of both guests; prints
# "frames/s maps/frame" (both directions together).
guests() {
    local policy=$1 mode=$2 size=$3 extra=${4:-0}
    local ports=()
    for g in 0 1; do
        local spec="socket=$work/port$g.sock,policy=$policy,endpoint=8"
        [ "$mode" != none ] && spec="$spec,iommu=$work/iommu$g.sock"
        ports+=(--port "$spec")
    done
    local out
    out=$(taskset -c 0 "$bin/viommu-frontend" --ram-size 1G net "${ports[@]}" \
        --frame-size "$size" --duration "$seconds" --extra-maps "$extra")
    awk '{
        for (i = 1; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
        if (f["rx_corrupt"] != 0) { print "corrupt frames" > "/dev/stderr"; exit 1 }
        fps += f["rx_fps"]; frames += f["rx_frames"]; maps += f["maps"]
    } END { printf "%.0f %.2f\n", fps, (frames ? maps / frames : 0) }' <<<"$out"
}

# The switch's own cost per frame: its polling thread's busy time over the
# frames it moved, from its last per-second line (counters since it started).
switch_ns() {
    sed -n 's/.*total_frames=\([0-9]*\) total_busy_ns=\([0-9]*\).*/\1 \2/p' "$work/switch.log" |
        tail -n 1 | awk '{ printf "%.0f\n", ($1 ? $2 / $1 : 0) }'
}

# point NAME MODE POLICY SIZE [EXTRA_MAPS [BOOTS]]: a fresh switch; with
# BOOTS=2 the guests boot twice and the second boot is measured.
point() {
    local name=$1 mode=$2 policy=$3 size=$4 extra=${5:-0} boots=${6:-1}
    start_switch "$mode"
    local r
    for _ in $(seq "$boots"); do r=$(guests "$policy" "$mode" "$size" "$extra"); done
    local ns
    ns=$(switch_ns)
    stop_switch
    echo "$name $size $r ${ns:-0}"
}

results="$work/results"
: >"$results"
points="off:none:off table/static:table:static table/lazy:table:lazy table/strict:table:strict msg/static:msg:static msg/lazy:msg:lazy msg/strict:msg:strict"
for _ in $(seq "$rounds"); do
    for size in $sizes; do
        for p in $points; do
            IFS=: read -r name mode policy <<<"$p"
            point "$name" "$mode" "$policy" "$size" >>"$results"
        done
        point "table/lazy+2048" table lazy "$size" 2048 >>"$results"
        point "msg/lazy+2048" msg lazy "$size" 2048 >>"$results"
        point "table/lazy,reboot" table lazy "$size" 0 2 >>"$results"
        point "msg/lazy,reboot" msg lazy "$size" 0 2 >>"$results"
    done
done

echo
echo "vhost-user-net --mode io, 1 polling thread (CPU $pmd_cpu), two guests sending to each other (CPU 0), ${seconds}s per point, median of $rounds"
printf '%-18s %6s %12s %11s %8s %15s %8s\n' mode frame frames/s maps/frame "vs off" "switch ns/frame" "vs off"
median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
for size in $sizes; do
    off=$(awk -v s="$size" '$1 == "off" && $2 == s { print $3 }' "$results" | median)
    off_ns=$(awk -v s="$size" '$1 == "off" && $2 == s { print $5 }' "$results" | median)
    for name in off table/static table/lazy table/strict msg/static msg/lazy msg/strict \
        table/lazy+2048 msg/lazy+2048 table/lazy,reboot msg/lazy,reboot; do
        fps=$(awk -v n="$name" -v s="$size" '$1 == n && $2 == s { print $3 }' "$results" | median)
        maps=$(awk -v n="$name" -v s="$size" '$1 == n && $2 == s { print $4 }' "$results" | median)
        ns=$(awk -v n="$name" -v s="$size" '$1 == n && $2 == s { print $5 }' "$results" | median)
        printf '%-18s %6s %12s %11s %7.2fx %15s %7.2fx\n' "$name" "$size" "$fps" "$maps" \
            "$(awk -v a="$fps" -v b="$off" 'BEGIN { print (b ? a / b : 0) }')" "$ns" \
            "$(awk -v a="$ns" -v b="$off_ns" 'BEGIN { print (a ? b / a : 0) }')"
    done
    ratio() {
        awk -v a="$(awk -v n="$1" -v s="$size" '$1 == n && $2 == s { print $3 }' "$results" | median)" \
            -v b="$(awk -v n="$2" -v s="$size" '$1 == n && $2 == s { print $3 }' "$results" | median)" \
            'BEGIN { printf "%.2f", (b ? a / b : 0) }'
    }
    echo "table vs message mode, $size-byte frames: strict $(ratio table/strict msg/strict)x, lazy $(ratio table/lazy msg/lazy)x, static $(ratio table/static msg/static)x"
    echo "no cliff, $size-byte frames: table/lazy with 2048 more mappings $(ratio table/lazy+2048 table/lazy)x, after a reboot $(ratio table/lazy,reboot table/lazy)x of table/lazy"
done
