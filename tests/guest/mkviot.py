#!/usr/bin/env python3
"""Writes an ACPI VIOT table (binary, for QEMU's `-acpitable file=`) that puts
a PCI requester-ID range behind one virtio-pci IOMMU (layout: docs/qemu.md §3).

    mkviot.py OUT --iommu-bdf 00:03.0 [--bdf-start 0] [--bdf-end 0xffff]
              [--endpoint-start 0]

Endpoint IDs seen by the daemon are endpoint-start + (BDF - bdf-start).
"""
import argparse
import struct
import sys


def bdf(text):
    """`bus:dev.fn` or a number."""
    if ":" in text:
        bus, rest = text.split(":")
        dev, fn = rest.split(".")
        b, d, f = int(bus, 16), int(dev, 16), int(fn, 16)
        if b > 0xFF or d > 0x1F or f > 7:
            raise argparse.ArgumentTypeError(f"BDF out of range: {text}")
        return (b << 8) | (d << 3) | f
    value = int(text, 0)
    if not 0 <= value <= 0xFFFF:
        raise argparse.ArgumentTypeError(f"BDF out of range: {text}")
    return value


def viot(iommu_bdf, bdf_start, bdf_end, endpoint_start):
    header_len, node_offset = 36, 48
    pci_range = struct.pack("<BBHIHHHHH6x", 1, 0, 24, endpoint_start, 0, 0,
                            bdf_start, bdf_end, node_offset + 24)
    iommu = struct.pack("<BBHHH8x", 3, 0, 16, 0, iommu_bdf)
    body = struct.pack("<HH8x", 2, node_offset) + pci_range + iommu
    length = header_len + len(body)
    header = struct.pack("<4sIBB6s8sI4sI", b"VIOT", length, 0, 0, b"VIOMMU",
                         b"VIOMMU  ", 1, b"VIOM", 1)
    table = bytearray(header + body)
    table[9] = (-sum(table)) & 0xFF
    assert sum(table) & 0xFF == 0 and len(table) == 88
    return bytes(table)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--iommu-bdf", type=bdf, required=True)
    p.add_argument("--bdf-start", type=bdf, default=0)
    p.add_argument("--bdf-end", type=bdf, default=0xFFFF)
    p.add_argument("--endpoint-start", type=lambda s: int(s, 0), default=0)
    a = p.parse_args()
    if a.bdf_start > a.bdf_end:
        sys.exit(f"mkviot: --bdf-start {a.bdf_start:#x} is above --bdf-end {a.bdf_end:#x}")
    with open(a.out, "wb") as f:
        f.write(viot(a.iommu_bdf, a.bdf_start, a.bdf_end, a.endpoint_start))


if __name__ == "__main__":
    main()
