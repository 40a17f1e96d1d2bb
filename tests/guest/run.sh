#!/usr/bin/env bash
# The real-guest test: a Debian Linux 6.12 guest on stock QEMU >= 10.2 (TCG)
# with the daemon as its virtio-iommu (QEMU's generic vhost-user device, the
# ACPI VIOT from mkviot.py) and vhost-user-blk, in table mode, as a disk
# behind it. In the guest (init.sh): the disk's IOMMU group and MSI
# reserved region, a pattern written and read back with checksums in strict
# mode, after a pause (`stop`/`cont` from QEMU's monitor), in passthrough
# (identity) mode, then a reboot and the same again; a second guest in lazy
# mode (iommu.strict=0). Fails on any data mismatch, on a daemon or backend
# log line at WARN or above that the scenario did not expect, on a request
# the daemon answered with an error, and unless the reboot was detected as
# a device reset and the pauses were not.
#
#   tests/guest/run.sh [--keep] [--record DIR]
#
# --keep leaves the work directory (logs, serial console) in place;
# --record DIR also records the vhost-user messages QEMU sends to the
# daemon (vhost-user-trace.py) into DIR/<session>.txt.
# Set-up (QEMU, kernel) is done once by setup.sh and cached; a missing
# prerequisite is a failure, never a skip.
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=tests/guest
CACHE=${VIOMMU_GUEST_CACHE:-$HOME/.cache/vhost-user-iommu/guest}
KEEP=0
RECORD=
while [ $# -gt 0 ]; do
    case "$1" in
        --keep) KEEP=1 ;;
        --record) RECORD=$(readlink -f "$2"); shift ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "run.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done

command -v python3 >/dev/null || { echo "run.sh: python3 is required (VIOT, monitor)" >&2; exit 1; }
"$HERE/setup.sh"
cargo build -q --release -p vhost-user-iommu -p vhost-user-blk
BIN=$PWD/target/release

WORK=$(mktemp -d /tmp/viommu-guest.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ "$KEEP" = 1 ]; then echo "run.sh: work directory kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
fail() {
    echo "run.sh: FAIL: $*" >&2
    for f in "$WORK"/*.log; do
        echo "---- $(basename "$f") (last 40 lines)" >&2
        tail -n 40 "$f" >&2 || true
    done
    exit 1
}

# The guest: 512 MiB of RAM in one region [0, 0x20000000); the IOVA window
# lies inside it (QEMU hands ring IOVAs over as guest-physical addresses,
# docs/qemu.md). The IOMMU at 00:03.0, the disk at 00:04.0 (endpoint 0x20).
MIB=64
INPUT_RANGE=0x10000000-0x1fffffff
python3 "$HERE/mkviot.py" "$WORK/viot.bin" --iommu-bdf 00:03.0
mkdir -p "$WORK/initrd/bin" "$WORK/initrd/lib/modules" "$WORK/initrd"/{proc,sys,dev,tmp}
cp "$CACHE/busybox" "$WORK/initrd/bin/busybox"
cp "$HERE/init.sh" "$WORK/initrd/init"
chmod +x "$WORK/initrd/init"
for m in $(cat "$CACHE/kernel/modules"); do cp "$CACHE/kernel/$m.ko" "$WORK/initrd/lib/modules/"; done
cp "$CACHE/kernel/modules" "$WORK/initrd/lib/modules/order"
(cd "$WORK/initrd" && find . | cpio -o -H newc --quiet) > "$WORK/initrd.cpio"

# Waits for a line matching $2 in file $1, for at most $3 seconds.
wait_for() {
    local i=0
    until grep -q "$2" "$1" 2>/dev/null; do
        i=$((i + 1))
        [ $i -le $(($3 * 10)) ] || return 1
        sleep 0.1
    done
}

# Sends monitor commands (one per argument, a pause between them).
monitor() {
    python3 - "$WORK/mon.sock" "$@" <<'PY'
import socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
for cmd in sys.argv[2:]:
    s.sendall(cmd.encode() + b"\n")
    time.sleep(1.0)
s.close()
PY
}

# One guest session: $1 name, $2 iommu.strict value, $3 scenario, $4 reboot
# (yes/no), $5 expected detected resets.
session() {
    local name=$1 strict=$2 scenario=$3 reboot=$4 want_resets=$5
    local S=$WORK/$name
    mkdir -p "$S"
    rm -f "$WORK"/*.log
    : > "$WORK/serial.log"
    truncate -s ${MIB}M "$S/disk.raw"
    local vmm_sock=$S/viommu.sock
    RUST_LOG=${VIOMMU_GUEST_DAEMON_LOG:-debug} "$BIN/vhost-user-iommu" --socket-path "$S/viommu.sock" \
        --backend-socket "$S/backends.sock" --input-range $INPUT_RANGE > "$WORK/daemon.log" 2>&1 &
    PIDS+=($!)
    wait_for "$WORK/daemon.log" "waiting for a VMM" 10 || fail "$name: the daemon did not start"
    if [ -n "$RECORD" ]; then
        mkdir -p "$RECORD"
        : > "$RECORD/$name.txt"
        python3 "$HERE/vhost-user-trace.py" "$S/trace.sock" "$S/viommu.sock" "$RECORD/$name.txt" &
        PIDS+=($!)
        vmm_sock=$S/trace.sock
        for _ in $(seq 50); do [ -S "$vmm_sock" ] && break; sleep 0.1; done
    fi
    RUST_LOG=${VIOMMU_GUEST_BLK_LOG:-info} "$BIN/vhost-user-blk" --socket-path "$S/blk.sock" --blk-file "$S/disk.raw" \
        --num-queues 1 --iommu "table:$S/backends.sock" --endpoint 0x20 > "$WORK/blk.log" 2>&1 &
    PIDS+=($!)
    wait_for "$WORK/blk.log" "waiting for a VMM" 10 || fail "$name: the block backend did not start"

    "$CACHE/qemu" -machine q35,memory-backend=mem -m 512M \
        -object memory-backend-memfd,id=mem,size=512M,share=on \
        -accel tcg -smp 1 -nographic -nodefaults -nic none \
        -serial "file:$WORK/serial.log" -monitor "unix:$WORK/mon.sock,server=on,wait=off" \
        -chardev "socket,id=viommu,path=$vmm_sock" \
        -device vhost-user-test-device-pci,chardev=viommu,virtio-id=23,num_vqs=2,config_size=40,addr=0x3 \
        -chardev "socket,id=blk0,path=$S/blk.sock" \
        -device vhost-user-blk-pci,chardev=blk0,num-queues=1,iommu_platform=on,disable-legacy=on,addr=0x4 \
        -acpitable "file=$WORK/viot.bin" -kernel "$CACHE/kernel/vmlinuz" -initrd "$WORK/initrd.cpio" \
        -append "console=ttyS0 quiet iommu.strict=$strict viommu.blk_bdf=0000:00:04.0 viommu.scenario=$scenario viommu.mib=$MIB viommu.reboot=$reboot" \
        > "$WORK/qemu.log" 2>&1 &
    local qemu=$!
    PIDS+=($qemu)
    local deadline=$((SECONDS + 240)) paused=0
    while kill -0 $qemu 2>/dev/null; do
        [ $SECONDS -lt $deadline ] || fail "$name: the guest did not finish within 240 s"
        local asks
        asks=$(grep -c "VIOMMU-PAUSE-ME" "$WORK/serial.log" 2>/dev/null || true)
        if [ "${asks:-0}" -gt $paused ]; then
            paused=$((paused + 1))
            [ -z "$RECORD" ] || echo "## host: stop" >> "$RECORD/$name.txt"
            monitor stop
            [ -z "$RECORD" ] || echo "## host: cont" >> "$RECORD/$name.txt"
            monitor cont
        fi
        if [ -n "$RECORD" ] && grep -qs "VIOMMU-REBOOTING" "$WORK/serial.log" && ! grep -q "## guest: reboot" "$RECORD/$name.txt"; then
            echo "## guest: reboot" >> "$RECORD/$name.txt"
        fi
        sleep 0.2
    done
    wait $qemu || true
    grep "VIOMMU-" "$WORK/serial.log" | sed "s/^/[$name] /"
    ! grep -q "VIOMMU-FAIL" "$WORK/serial.log" || fail "$name: the guest reported a failure"
    local last_boot=1
    [ "$reboot" = yes ] && last_boot=2
    grep -q "VIOMMU-DONE boot=$last_boot" "$WORK/serial.log" || fail "$name: the guest did not finish (boot $last_boot)"
    local want_type=DMA
    [ "$strict" = 0 ] && want_type=DMA-FQ
    [ "$(grep -m1 -o 'VIOMMU-GROUP [0-9]* type=[A-Za-z-]*' "$WORK/serial.log" | sed 's/.*type=//')" = "$want_type" ] \
        || fail "$name: the disk's default domain is not $want_type (iommu.strict=$strict)"

    # Stop the daemons the way an operator does and read their logs.
    kill -TERM "${PIDS[@]}" 2>/dev/null || true
    sleep 0.5
    local resets pauses
    resets=$(grep -c "device reset detected without RESET_DEVICE" "$WORK/daemon.log" || true)
    [ "$resets" = "$want_resets" ] || fail "$name: $resets device resets detected, expected $want_resets"
    pauses=$(grep -c "VIOMMU-PAUSE-ME" "$WORK/serial.log" || true)
    [ "$paused" = "$pauses" ] || fail "$name: the guest asked for $pauses pauses, $paused were made"
    local failed
    failed=$(grep ' request=' "$WORK/daemon.log" | grep -v 'status=OK' || true)
    [ -z "$failed" ] || fail "$name: the daemon answered requests with errors:
$(echo "$failed" | head -5)"
    grep -q ' request="MAP"' "$WORK/daemon.log" || fail "$name: the daemon logged no MAP request"
    # Nothing at WARN or above is expected from either process.
    local noisy
    noisy=$(grep -hE '^\S+\s+(WARN|ERROR)' "$WORK/daemon.log" "$WORK/blk.log" || true)
    [ -z "$noisy" ] || fail "$name: unexpected log lines at WARN or above:
$(echo "$noisy" | head -10)"
    cp "$WORK/daemon.log" "$S/daemon.log"; cp "$WORK/blk.log" "$S/blk.log"; cp "$WORK/serial.log" "$S/serial.log"
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    PIDS=()
    echo "[$name] ok: $pauses pause(s) kept the state, $resets reset(s) detected"
}

start=$SECONDS
session strict 1 strict,pause,identity,DMA yes 1
session lazy 0 lazy no 0
echo "run.sh: real-guest test passed in $((SECONDS - start)) s"
