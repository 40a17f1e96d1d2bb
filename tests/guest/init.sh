#!/bin/busybox sh
# The guest side of tests/guest/run.sh: PID 1 of a busybox initramfs.
# Reports on the serial console with lines starting "VIOMMU-" that run.sh
# reads; never exits (PID 1), ends with a power-off or a reboot.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp

say() { echo "VIOMMU-$*" > /dev/console; }
fail() { say "FAIL $*"; sync; poweroff -f; sleep 60; }
arg() { sed -n "s/.*\\bviommu\\.$1=\\([^ ]*\\).*/\\1/p" /proc/cmdline; }

BLK_BDF=$(arg blk_bdf)     # e.g. 0000:00:04.0
SCENARIO=$(arg scenario)   # modes to test this boot, e.g. strict,pause,identity
MIB=$(arg mib)

for m in $(cat /lib/modules/order); do
    insmod /lib/modules/$m.ko || fail "insmod $m"
done

# The disk appears once the IOMMU has probed (the VIOT defers it).
i=0
while [ ! -b /dev/vda ]; do
    i=$((i + 1)); [ $i -gt 300 ] && fail "no /dev/vda after 30 s"
    sleep 0.1
done

group_of() { basename "$(readlink /sys/bus/pci/devices/$1/iommu_group)"; }
check_group() {
    g=$(group_of "$BLK_BDF")
    [ -n "$g" ] || fail "$BLK_BDF is in no IOMMU group"
    grep -q "0x00000000fee00000 0x00000000feefffff msi" /sys/kernel/iommu_groups/$g/reserved_regions \
        || fail "group $g lacks the MSI reserved region: $(cat /sys/kernel/iommu_groups/$g/reserved_regions)"
    say "GROUP $g type=$(cat /sys/kernel/iommu_groups/$g/type)"
}

# Boot count kept in the disk's last MiB.
BOOT_AT=$((MIB - 1))
boot=$(dd if=/dev/vda bs=1M skip=$BOOT_AT count=1 2>/dev/null | head -c 5 | tr -dc 'a-z0-9')
case "$boot" in
    boot1) boot=2 ;;
    *) boot=1 ;;
esac
say "BOOT $boot $(uname -r) cmdline=$(cat /proc/cmdline)"

# Writes a fresh pattern over the disk's first MIB-1 MiB, drops the cache,
# reads it back and compares checksums; and first verifies what the previous
# round (or boot) wrote.
ROUND=0
io_round() {
    label=$1
    if [ -n "$EXPECT" ]; then
        echo 3 > /proc/sys/vm/drop_caches
        got=$(dd if=/dev/vda bs=1M count=$((MIB - 1)) 2>/dev/null | md5sum | cut -d' ' -f1)
        [ "$got" = "$EXPECT" ] || fail "$label: previous data changed: $got != $EXPECT"
    fi
    dd if=/dev/urandom of=/tmp/pattern bs=1M count=$((MIB - 1)) 2>/dev/null
    want=$(md5sum < /tmp/pattern | cut -d' ' -f1)
    dd if=/tmp/pattern of=/dev/vda bs=64k conv=fsync 2>/dev/null || fail "$label: write failed"
    rm /tmp/pattern
    echo 3 > /proc/sys/vm/drop_caches
    got=$(dd if=/dev/vda bs=1M count=$((MIB - 1)) 2>/dev/null | md5sum | cut -d' ' -f1)
    [ "$got" = "$want" ] || fail "$label: read back $got, wrote $want"
    EXPECT=$want
    say "IO-OK $label $want"
}
# The first boot has no previous data to verify; a later boot verifies the
# checksum the previous boot stored beside its marker.
EXPECT=
if [ "$boot" = 2 ]; then
    EXPECT=$(dd if=/dev/vda bs=1M skip=$BOOT_AT count=1 2>/dev/null | head -c 64 | sed -n 's/^boot1 \([0-9a-f]*\).*/\1/p')
fi

# Unbinds the disk's PCI function, sets its IOMMU group's default domain
# type (DMA = strict, DMA-FQ = lazy, identity = passthrough), binds it again.
rebind() {
    echo "$BLK_BDF" > /sys/bus/pci/drivers/virtio-pci/unbind || fail "unbind $BLK_BDF"
    g=$(group_of "$BLK_BDF")
    echo "$1" > /sys/kernel/iommu_groups/$g/type || fail "group $g type $1"
    echo "$BLK_BDF" > /sys/bus/pci/drivers/virtio-pci/bind || fail "bind $BLK_BDF"
    i=0
    while [ ! -b /dev/vda ]; do
        i=$((i + 1)); [ $i -gt 100 ] && fail "no /dev/vda after rebind"
        sleep 0.1
    done
    [ "$(cat /sys/kernel/iommu_groups/$g/type)" = "$1" ] || fail "group $g type is $(cat /sys/kernel/iommu_groups/$g/type), not $1"
}

check_group
for step in $(echo "$SCENARIO" | tr ',' ' '); do
    case "$step" in
        strict|lazy) io_round "$step" ;;
        pause)
            say "PAUSE-ME"
            # run.sh stops and resumes the VM while this sleeps (guest time
            # stands still while stopped).
            sleep 3
            io_round after-pause ;;
        identity|DMA|DMA-FQ)
            rebind "$step"; check_group; io_round "rebound-$step" ;;
        *) fail "unknown scenario step $step" ;;
    esac
done

if [ "$boot" = 1 ] && echo ",$(arg reboot)," | grep -q ",yes,"; then
    printf 'boot1 %s\n' "$EXPECT" | dd of=/dev/vda bs=1M seek=$BOOT_AT conv=fsync 2>/dev/null
    say "REBOOTING"
    reboot -f
else
    say "DONE boot=$boot"
    poweroff -f
fi
sleep 60
