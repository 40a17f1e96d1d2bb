#!/usr/bin/env bash
# One-time set-up for the real-guest test, cached under
# ${VIOMMU_GUEST_CACHE:-$HOME/.cache/vhost-user-iommu/guest}:
#   root/     a minimal Debian trixie tree (debootstrap) holding QEMU >= 10.2
#             from trixie-backports; QEMU runs from it through its own
#             dynamic loader, so the host's libc is never touched
#   kernel/   a Debian 6.12 kernel (virtio-iommu as a module, VIOT built in)
#             and the modules the guest needs, decompressed
#   busybox   a static busybox for the guest's initramfs
# Re-running is cheap: each step is skipped when its result is there.
# Needs root (apt-get, debootstrap) and Debian's package archive.
set -euo pipefail

CACHE=${VIOMMU_GUEST_CACHE:-$HOME/.cache/vhost-user-iommu/guest}
MIRROR=${VIOMMU_DEBIAN_MIRROR:-http://deb.debian.org/debian}
ROOT=$CACHE/root
mkdir -p "$CACHE"

log() { echo "guest-setup: $*" >&2; }
die() { echo "guest-setup: error: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (debootstrap and apt-get install packages)"
command -v apt-get >/dev/null || die "apt-get not found: this set-up needs a Debian-based host"

need_host=()
command -v debootstrap >/dev/null || need_host+=(debootstrap)
dpkg -s busybox-static >/dev/null 2>&1 || need_host+=(busybox-static)
command -v cpio >/dev/null || need_host+=(cpio)
command -v xz >/dev/null || need_host+=(xz-utils)
command -v zstd >/dev/null || need_host+=(zstd)
if [ ${#need_host[@]} -gt 0 ]; then
    log "installing host packages: ${need_host[*]}"
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need_host[@]}" >&2
fi

if [ ! -e "$ROOT/.viommu-qemu-ready" ]; then
    if [ ! -e "$ROOT/.viommu-debootstrap-done" ]; then
        log "debootstrap trixie into $ROOT (a few minutes, once)"
        rm -rf "$ROOT"
        debootstrap --variant=minbase --include=ca-certificates trixie "$ROOT" "$MIRROR" >&2 \
            || die "debootstrap of trixie failed (see above)"
        touch "$ROOT/.viommu-debootstrap-done"
    fi
    log "installing qemu-system-x86 from trixie-backports inside $ROOT"
    cat > "$ROOT/etc/apt/sources.list" <<SRC
deb $MIRROR trixie main
deb $MIRROR trixie-backports main
SRC
    cp /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
    mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
    trap 'umount "$ROOT/proc" 2>/dev/null || true' EXIT
    chroot "$ROOT" apt-get update -q >&2
    chroot "$ROOT" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        -t trixie-backports qemu-system-x86 >&2 || die "installing qemu-system-x86 in the trixie tree failed"
    umount "$ROOT/proc" 2>/dev/null || true
    trap - EXIT
    touch "$ROOT/.viommu-qemu-ready"
fi

if [ ! -e "$CACHE/kernel/.ready" ]; then
    log "fetching a Debian 6.12 kernel"
    rm -rf "$CACHE/kernel" "$CACHE/kernel-deb"
    mkdir -p "$CACHE/kernel-deb" "$CACHE/kernel"
    mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
    pkg=$(chroot "$ROOT" apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-6/ {print $2; exit}')
    [ -n "$pkg" ] || die "no linux-image-6.* package found in trixie"
    rm -f "$ROOT"/tmp/linux-image-*.deb
    chroot "$ROOT" sh -c "cd /tmp && apt-get download $pkg" >&2 || die "downloading $pkg failed"
    umount "$ROOT/proc" 2>/dev/null || true
    dpkg-deb -x "$ROOT"/tmp/linux-image-*.deb "$CACHE/kernel-deb"
    rm -f "$ROOT"/tmp/linux-image-*.deb
    cp "$CACHE"/kernel-deb/boot/vmlinuz-* "$CACHE/kernel/vmlinuz"
    cfg=$(ls "$CACHE"/kernel-deb/boot/config-*)
    grep -q '^CONFIG_ACPI_VIOT=y' "$cfg" || die "$pkg: CONFIG_ACPI_VIOT is not built in"
    grep -q '^CONFIG_VIRTIO_IOMMU=[ym]' "$cfg" || die "$pkg: no CONFIG_VIRTIO_IOMMU"
    cp "$cfg" "$CACHE/kernel/config"
    moddir=$(ls -d "$CACHE"/kernel-deb/lib/modules/* 2>/dev/null || ls -d "$CACHE"/kernel-deb/usr/lib/modules/*)
    # The guest's modules and what they depend on (read from each module's
    # .modinfo; the package ships no modules.dep). `modules` lists them in
    # load order, dependencies first.
    : > "$CACHE/kernel/modules"
    add_module() {
        local name=$1 f dep
        grep -qx "$name" "$CACHE/kernel/modules" && return 0
        f=$(find "$moddir" \( -name "$name.ko*" -o -name "${name//_/-}.ko*" -o -name "${name//-/_}.ko*" \) | head -1)
        [ -n "$f" ] || die "module $name not found in $pkg"
        case "$f" in
            *.xz) xz -dc "$f" > "$CACHE/kernel/$name.ko" ;;
            *.zst) zstd -qdc "$f" > "$CACHE/kernel/$name.ko" ;;
            *) cp "$f" "$CACHE/kernel/$name.ko" ;;
        esac
        for dep in $(tr '\0' '\n' < "$CACHE/kernel/$name.ko" | sed -n 's/^depends=//p' | tr ',' ' '); do
            add_module "$dep"
        done
        echo "$name" >> "$CACHE/kernel/modules"
    }
    add_module virtio-iommu
    add_module virtio_blk
    echo "$pkg" > "$CACHE/kernel/package"
    rm -rf "$CACHE/kernel-deb"
    touch "$CACHE/kernel/.ready"
fi

cp /bin/busybox "$CACHE/busybox"

# QEMU runs from the trixie tree through that tree's own dynamic loader and
# libraries; its firmware and modules come from the tree too.
cat > "$CACHE/qemu" <<'WRAP'
#!/bin/sh
R=$(dirname "$(readlink -f "$0")")/root
export QEMU_MODULE_DIR="$R/usr/lib/x86_64-linux-gnu/qemu"
exec "$R/lib64/ld-linux-x86-64.so.2" --library-path "$R/usr/lib/x86_64-linux-gnu:$R/lib/x86_64-linux-gnu" \
    "$R/usr/bin/qemu-system-x86_64" -L "$R/usr/share/qemu" -L "$R/usr/share/seabios" "$@"
WRAP
chmod +x "$CACHE/qemu"
"$CACHE/qemu" --version >/dev/null || die "QEMU from $ROOT does not run"
log "ready: $(cat "$CACHE/kernel/package"), $("$CACHE/qemu" --version 2>/dev/null | head -1 || true)"
