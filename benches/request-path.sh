#!/usr/bin/env bash
# The request path beside its baselines, in one run (issue 11): requests/s
# replaying the Linux guest trace, then a MAP/UNMAP-only stream (replay
# --map-unmap: Linux's strict mode), at --batch 1, 8 and 32 through
#
#   - vhost-user-iommu, the real daemon, publishing its table
#     (--backend-socket), once as is (adaptive polling up to 50 µs), once
#     with --poll-us 0 (sleeps as soon as the queue is empty, as the naive
#     device does), and once with 8 batches kept in flight (replay --in-flight 8: the device always
#     finds work, so its own rate shows rather than the round trip's);
#   - naive-viommu, what rust-vmm gives in an afternoon (vhost-user-backend's
#     epoll loop, vm-memory copies, a BTreeMap), over its socket
#     (benches/src/bin/naive_viommu.rs), synchronous and with 8 batches in
#     flight;
#   - replay-in-process, the same device model fed the same request bytes
#     with no virtqueue and no daemon (benches/src/in_process.rs), its
#     changes mirrored into RwLock<BTreeMap>s (cloud-hypervisor's structure),
#     into the daemon's own shared table, or nowhere: what the queue and
#     the process boundary cost, and what the table's second copy of the
#     mappings costs over the model alone;
#
# with each figure's ratio to the naive device, the device process's CPU
# time per request (all its threads, from /proc: what a request costs the
# device whatever the frontend costs) and the requests per second one core
# of the device would serve at that cost, and the median batch round trip
# at batch 1. Every daemon is started fresh for each replay, its
# sockets in a temporary directory. A replay with any non-OK status fails
# the run.
#
# Usage: benches/request-path.sh
# Environment: CARGO_TARGET_DIR (default ./target), RUNS (replays per
# figure, the median is shown; default 3), TRACE, PAIRS (MAP/UNMAP pairs of
# the stream; default 200000), QUEUE_SIZE (default 1024).

set -euo pipefail
shopt -s inherit_errexit

cd "$(dirname "$0")/.."
TRACE=${TRACE:-crates/viommu-frontend/traces/linux612-virtio-blk-lazy-mixed.trace.gz}
QUEUE_SIZE=${QUEUE_SIZE:-1024}
PAIRS=${PAIRS:-200000}
# The requests replayed: set per workload below.
SRC=()
RUNS=${RUNS:-3}
BATCHES=(1 8 32)

cargo build --release -q -p vhost-user-iommu -p viommu-frontend -p viommu-benches --bins
BIN=${CARGO_TARGET_DIR:-target}/release

tmp=$(mktemp -d)
daemon_pid=
cleanup() {
    if [[ -n $daemon_pid ]]; then
        kill "$daemon_pid" 2>/dev/null || true
        wait "$daemon_pid" 2>/dev/null || true
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

fail() {
    echo "request-path.sh: $*" >&2
    exit 1
}

# start_daemon SOCKET COMMAND...: starts a daemon listening on SOCKET and
# waits (up to 10 s) for the socket to appear.
start_daemon() {
    local sock=$1
    shift
    rm -f "$sock"
    "$@" 2>"$tmp/daemon.log" &
    daemon_pid=$!
    for _ in $(seq 200); do
        [[ -S $sock ]] && return 0
        kill -0 "$daemon_pid" 2>/dev/null || break
        sleep 0.05
    done
    cat "$tmp/daemon.log" >&2
    fail "$* did not listen on $sock"
}

# stop_daemon: SIGTERM (the naive device has usually exited already, at
# the frontend's disconnect), then wait.
stop_daemon() {
    kill "$daemon_pid" 2>/dev/null || true
    wait "$daemon_pid" 2>/dev/null || true
    daemon_pid=
}

# check OUTPUT STATUS WHAT: fails unless the replay ended well with zero
# non-OK statuses.
check() {
    if [[ $2 -ne 0 ]] || ! grep -q '^non-OK statuses: 0$' <<<"$1"; then
        echo "$1" >&2
        fail "$3: the replay failed or had non-OK statuses"
    fi
}

# figures OUTPUT: prints "REQUESTS_PER_S P50_US DEVICE_NS" from a replay's
# output (DEVICE_NS: the device's CPU per request, "-" if not reported).
figures() {
    awk '
        /^throughput:/ { rps = $2 }
        /^device CPU:/ { dev = $3 }
        /p50 / {
            for (i = 1; i < NF; i++) if ($i == "p50") v = $(i + 1)
            n = v + 0
            if (v ~ /ns$/) n /= 1000
            else if (v ~ /ms$/) n *= 1000
            else if (v ~ /[0-9]s$/) n *= 1000000
            p50 = n
        }
        END {
            if (rps == "" || p50 == "") exit 1
            if (dev == "") dev = "-"
            printf "%s %.2f %s\n", rps, p50, dev
        }' <<<"$1" || fail "cannot read the figures of: $1"
}

# replay_socket SOCKET BATCH [IN_FLIGHT]: one frontend replay; sets FIG.
replay_socket() {
    local out rc=0
    out=$("$BIN/viommu-frontend" --socket "$1" --queue-size "$QUEUE_SIZE" \
        replay "${SRC[@]}" --batch "$2" --in-flight "${3:-1}" 2>&1) || rc=$?
    check "$out" "$rc" "viommu-frontend replay --batch $2 --in-flight ${3:-1} on $1"
    FIG=$(figures "$out")
}

# measure CONFIG BATCH: one replay of CONFIG at BATCH; sets FIG to
# "REQUESTS_PER_S P50_US". Runs in this shell, so the trap sees the daemon.
measure() {
    local sock=$tmp/vmm.sock in_flight=1
    case $1 in
    *-pipelined) in_flight=8 ;;
    esac
    case $1 in
    daemon | daemon-poll | daemon-pipelined)
        local extra=()
        [[ $1 == daemon-poll ]] && extra=(--poll-us 0)
        start_daemon "$sock" "$BIN/vhost-user-iommu" --socket-path "$sock" \
            --backend-socket "$tmp/backends.sock" --log-level error "${extra[@]}"
        replay_socket "$sock" "$2" "$in_flight"
        stop_daemon
        ;;
    naive | naive-pipelined)
        start_daemon "$sock" "$BIN/naive-viommu" --socket-path "$sock"
        replay_socket "$sock" "$2" "$in_flight"
        stop_daemon
        ;;
    in-process | in-process-table | in-process-model)
        local out rc=0 sink=btree
        [[ $1 == in-process-table ]] && sink=table
        [[ $1 == in-process-model ]] && sink=none
        out=$("$BIN/replay-in-process" "${SRC[@]}" --batch "$2" --sink "$sink" 2>&1) || rc=$?
        check "$out" "$rc" "replay-in-process --batch $2"
        FIG=$(figures "$out")
        # One thread does all the work: its CPU per request is the wall time.
        local rps
        read -r rps _ <<<"$FIG"
        FIG="$FIG $(awk -v r="$rps" 'BEGIN { printf "%.0f", 1e9 / r }')"
        FIG=$(awk '{ print $1, $2, $4 }' <<<"$FIG")
        ;;
    esac
}

# median_of CONFIG BATCH: RUNS replays; sets FIG to the run with the
# median requests/s.
median_of() {
    local runs=()
    for _ in $(seq "$RUNS"); do
        measure "$1" "$2"
        runs+=("$FIG")
    done
    FIG=$(printf '%s\n' "${runs[@]}" | sort -n -k1,1 | sed -n "$(((RUNS + 1) / 2))p")
}

CONFIGS=(daemon daemon-poll daemon-pipelined naive naive-pipelined in-process in-process-table in-process-model)
declare -A LABEL=(
    [daemon]="vhost-user-iommu --backend-socket"
    [daemon-poll]="vhost-user-iommu --backend-socket --poll-us 0 (no polling)"
    [daemon-pipelined]="vhost-user-iommu --backend-socket, 8 batches in flight"
    [naive]="naive-viommu (rust-vmm, BTreeMap)"
    [naive-pipelined]="naive-viommu, 8 batches in flight"
    [in-process]="in-process model + RwLock<BTreeMap> (no queue, no daemon)"
    [in-process-table]="in-process model + the daemon's shared table"
    [in-process-model]="in-process model alone"
)
declare -A RPS P50 DEV

# table TITLE: measures every configuration at every batch for the
# requests in SRC and prints the table.
table() {
    local load c b
    read -r load _ </proc/loadavg
    for c in "${CONFIGS[@]}"; do
        for b in "${BATCHES[@]}"; do
            median_of "$c" "$b"
            read -r "RPS[$c.$b]" "P50[$c.$b]" "DEV[$c.$b]" <<<"$FIG"
        done
    done
    echo "$1, queue size $QUEUE_SIZE,"
    echo "median of $RUNS runs per figure; every daemon started fresh for each run;"
    echo "$(nproc) CPUs, 1-minute load average $load before the first replay."
    echo "ratio = requests/s / requests/s of naive-viommu at the same batch."
    echo
    printf '%-62s %5s %11s %9s %14s %16s %10s\n' "device" "batch" "requests/s" "vs naive" "device ns/req" "M req/s per core" "p50 b=1 µs"
    for c in "${CONFIGS[@]}"; do
        for b in "${BATCHES[@]}"; do
            local ratio dev core p50
            ratio=$(awk -v a="${RPS[$c.$b]}" -v n="${RPS[naive.$b]}" 'BEGIN { printf "%.2f", a / n }')
            dev=${DEV[$c.$b]}
            core=-
            [[ $dev != - ]] && core=$(awk -v d="$dev" 'BEGIN { printf "%.2f", 1e3 / d }')
            p50=-
            [[ $b -eq 1 ]] && p50=${P50[$c.$b]}
            printf '%-62s %5s %11s %9s %14s %16s %10s\n' "${LABEL[$c]}" "$b" "${RPS[$c.$b]}" "${ratio}x" "$dev" "$core" "$p50"
        done
    done
    echo
}

requests=$(zcat -f "$TRACE" | grep -c '^virtio_iommu_')
SRC=(--trace "$TRACE")
table "Replay of $TRACE ($requests requests)"
SRC=(--map-unmap "$PAIRS")
table "MAP/UNMAP-only stream (replay --map-unmap $PAIRS: $((2 * PAIRS + 1)) requests)"
echo "device ns/req: CPU time of the device process (all threads) per request;"
echo "M req/s per core = 1000 / that. p50 at batch 1: median round trip of one"
echo "request (queue, kick, used) as the frontend times it; in-process, the time"
echo "Device::process takes for it."
