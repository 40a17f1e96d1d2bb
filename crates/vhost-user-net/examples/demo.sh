#!/usr/bin/env bash
# One command: two guests exchange frames through the vhost-user-net switch,
# each guest's DMA going through its own vhost-user-iommu daemon's shared
# table. Builds what it needs, runs for DURATION seconds (default 2), prints
# each guest's figures and the switch's counters, and cleans up.
#
#   crates/vhost-user-net/examples/demo.sh [DURATION] [POLICY]
#   POLICY: the guests' DMA policy, lazy (default), strict or static
set -euo pipefail
cd "$(dirname "$0")/../../.."
duration=${1:-2}
policy=${2:-lazy}
cargo build -q --release -p vhost-user-iommu -p vhost-user-net -p viommu-frontend
bin=target/release
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
wait_for() {
    for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done
    echo "$1 never appeared" >&2
    exit 1
}

echo "1. one vhost-user-iommu daemon per guest, each publishing its table on a backend socket"
for g in 0 1; do
    "$bin/vhost-user-iommu" --socket-path "$work/iommu$g.sock" --backend-socket "$work/backends$g.sock" \
        --log-level warn 2>"$work/iommu$g.log" &
    pids+=($!)
    wait_for "$work/backends$g.sock"
done
echo "2. the switch: port N translates through daemon N's table (iommu=table:...,endpoint=8)"
"$bin/vhost-user-net" \
    --port "socket=$work/net0.sock,mac=52:54:00:00:00:01,iommu=table:$work/backends0.sock,endpoint=8" \
    --port "socket=$work/net1.sock,mac=52:54:00:00:00:02,iommu=table:$work/backends1.sock,endpoint=8" \
    --idle-us 50 --log-level info 2>"$work/switch.log" &
pids+=($!)
wait_for "$work/net0.sock"
wait_for "$work/net1.sock"
echo "3. two guests (VMM and Linux driver stand-ins), DMA policy $policy, 64-byte frames to each other for ${duration}s"
"$bin/viommu-frontend" net \
    --port "socket=$work/net0.sock,iommu=$work/iommu0.sock,policy=$policy,endpoint=8" \
    --port "socket=$work/net1.sock,iommu=$work/iommu1.sock,policy=$policy,endpoint=8" \
    --duration "$duration" --rate 100000
echo "4. the switch's counters per port (logged as each guest disconnects)"
for _ in $(seq 100); do
    [ "$(grep -c 'VMM connection over' "$work/switch.log")" -ge 2 ] && break
    sleep 0.05
done
grep 'VMM connection over' "$work/switch.log" | sed 's/.*VMM connection over: /   /'
