#!/usr/bin/env python3
"""Writes seed inputs for the fuzz targets into DIR/<target>/ from real
inputs: the guest trace's requests (request_parser, device_model), every
backend-protocol message type as docs/backend-protocol.md lays it out
(backend_protocol), and the settings files of the repository and its tests
(settings_toml). fuzz/run.sh's corpora were merged from these and from
fuzzing runs (fuzz/README.md); this script is kept to redo that.

    python3 fuzz/seeds.py TRACE.gz DIR
"""
import gzip
import hashlib
import os
import re
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def write(out, target, data):
    d = os.path.join(out, target)
    os.makedirs(d, exist_ok=True)
    name = hashlib.sha1(data).hexdigest()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def trace_requests(path, limit):
    """(kind, fields) of the trace's first `limit` lines."""
    with gzip.open(path, "rt") as f:
        for i, line in enumerate(f):
            if i >= limit:
                break
            kind, *kv = line.split()
            yield kind.removeprefix("virtio_iommu_"), {
                k: int(v, 0) for k, v in (x.split("=") for x in kv)
            }


# --- request_parser: requests as the guest wrote them -----------------------
def wire(kind, f):
    head = lambda t: struct.pack("<B3x", t)
    if kind == "attach":
        return head(1) + struct.pack("<III4x", f["domain"], f["endpoint"], f.get("flags", 0))
    if kind == "detach":
        return head(2) + struct.pack("<II8x", f["domain"], f["endpoint"])
    if kind == "map":
        return head(3) + struct.pack(
            "<IQQQI", f["domain"], f["virt_start"], f["virt_end"], f["phys_start"], f["flags"]
        )
    if kind == "unmap":
        return head(4) + struct.pack("<IQQ4x", f["domain"], f["virt_start"], f["virt_end"])
    if kind == "probe":
        return head(5) + struct.pack("<I64x", f["endpoint"])
    raise ValueError(kind)


# --- device_model: the `arbitrary` encoding of the target's Input -----------
def tag(index, count):
    """The u32 that `arbitrary` turns into variant `index` of `count`."""
    return struct.pack("<I", -(-(index << 32) // count))


def addr_any(v):
    return tag(3, 4) + struct.pack("<Q", v)


def fuzz_op(kind, f, ep_byte):
    """One element of `ops` (a "keep going" byte, then the op), the trace's
    IDs moved onto the fixture's: domain % 17, endpoint by index."""
    return b"\x01" + fuzz_op_body(kind, f, ep_byte)


def fuzz_op_body(kind, f, ep_byte):
    dom = struct.pack("<B", f.get("domain", 0) % 17)
    if kind == "attach":
        return tag(0, 7) + dom + bytes([ep_byte, 0]) + bytes(4)
    if kind == "detach":
        return tag(1, 7) + dom + bytes([ep_byte])
    if kind == "map":
        return (
            tag(2, 7) + dom + addr_any(f["virt_start"]) + b"\x00"
            + addr_any(f["virt_end"]) + addr_any(f["phys_start"]) + bytes([f["flags"]])
        )
    if kind == "unmap":
        return (
            tag(3, 7) + dom + addr_any(f["virt_start"]) + b"\x00"
            + addr_any(f["virt_end"]) + bytes(4)
        )
    raise ValueError(kind)


# --- backend_protocol: one frame per message type ---------------------------
def frame(kind, body):
    return struct.pack("<4sIII", b"VIOB", 1, kind, 16 + len(body)) + body


def backend_frames():
    fault = struct.pack("<IIIIQ", 32, 1, 2, 0, 0xFFFF_E000)
    reason = b"user not allowed"
    return [
        frame(1, struct.pack("<II", 4, 64)),
        frame(2, struct.pack("<Q", 7)),
        frame(3, struct.pack("<II", 13, len(reason)) + reason),
        frame(4, fault),
        frame(5, struct.pack("<Q", 1)),
        frame(6, struct.pack("<Q", 2)),
        frame(7, struct.pack("<Q", 3)),
        frame(8, struct.pack("<QII", 1, 71, len(reason)) + reason),
        frame(9, struct.pack("<Q", 4)),
        frame(10, struct.pack("<QIIQ", 5, 32, 3, 0xFFFF_E000)),
        frame(11, struct.pack("<QIIQQQ", 5, 32, 3, 0xFFFF_E000, 0x1000, 0x4B4_2000)),
        frame(12, struct.pack("<Q", 6) + fault),
        frame(13, struct.pack("<QIIQQ", 7, 0xFFFF_FFFF, 0, 0, 2**64 - 1)),
        frame(14, struct.pack("<QII", 8, 32, 0)),
    ]


# --- settings_toml: the repository's settings files --------------------------
def settings_files():
    with open(os.path.join(REPO, "deploy", "example.toml"), "rb") as f:
        example = f.read()
    yield example
    # Each setting alone, after the socket (required).
    for line in example.decode().splitlines():
        if re.match(r"^[a-z_]+ = ", line) and not line.startswith("socket_path"):
            yield f'socket_path = "s"\n{line}\n'.encode()
    # The settings unit test's file.
    yield (
        b'socket_path = "/run/viommu.sock"\nendpoints = "0-0xf"\nprobe_size = 256\n'
        b'bypass = "off"\n[[endpoint]]\nids = "0x100-0x101"\n'
        b'reserved_regions = ["reserved:0x0-0xfff"]\n'
    )


def main():
    trace, out = sys.argv[1], sys.argv[2]
    reqs = list(trace_requests(trace, 4000))
    seen = set()
    for kind, f in reqs:
        b = wire(kind, f)
        if (kind, f.get("flags")) not in seen:
            seen.add((kind, f.get("flags")))
            write(out, "request_parser", b)
    for t in (0, 6, 0xFF):
        write(out, "request_parser", bytes([t, 0, 0, 0]))
    write(out, "request_parser", wire("probe", {"endpoint": 32}))
    write(out, "request_parser", wire("detach", {"domain": 0, "endpoint": 32}))
    # device_model: windows of the trace, mask 4 KiB, on endpoints 0 and 8.
    ops = [(k, f) for k, f in reqs if k in ("attach", "detach", "map", "unmap")]
    for start in range(0, 400, 40):
        for ep in (0, 4):  # fixture endpoint index: 0 -> 0, 4 -> 8
            body = b"".join(fuzz_op(k, f, ep) for k, f in ops[start : start + 40])
            attach = fuzz_op("attach", {"domain": 0}, ep)
            write(out, "device_model", b"\x00" + attach + body)
    for b in backend_frames():
        write(out, "backend_protocol", b)
    for b in settings_files():
        write(out, "settings_toml", b)


if __name__ == "__main__":
    main()
