#!/usr/bin/env python3
"""A vhost-user proxy that records the messages a frontend (QEMU) sends.

    vhost-user-trace.py LISTEN_PATH BACKEND_PATH LOG

QEMU connects to LISTEN_PATH; every connection is forwarded to BACKEND_PATH
with its file descriptors, and each frontend request (plus the replies that
carry state) is appended to LOG as one line:

    <seconds> <REQUEST> [details]

Used to record what a VMM sends around a reboot, a driver rebind and a
pause (docs/design.md, "Device reset"); the recordings live in
tests/guest/recorded/.
"""
import array
import os
import socket
import struct
import sys
import threading
import time

NAMES = {
    1: "GET_FEATURES", 2: "SET_FEATURES", 3: "SET_OWNER", 4: "RESET_OWNER",
    5: "SET_MEM_TABLE", 6: "SET_LOG_BASE", 7: "SET_LOG_FD", 8: "SET_VRING_NUM",
    9: "SET_VRING_ADDR", 10: "SET_VRING_BASE", 11: "GET_VRING_BASE",
    12: "SET_VRING_KICK", 13: "SET_VRING_CALL", 14: "SET_VRING_ERR",
    15: "GET_PROTOCOL_FEATURES", 16: "SET_PROTOCOL_FEATURES",
    17: "GET_QUEUE_NUM", 18: "SET_VRING_ENABLE", 19: "SEND_RARP",
    20: "NET_SET_MTU", 21: "SET_BACKEND_REQ_FD", 22: "IOTLB_MSG",
    23: "SET_VRING_ENDIAN", 24: "GET_CONFIG", 25: "SET_CONFIG",
    26: "CREATE_CRYPTO_SESSION", 27: "CLOSE_CRYPTO_SESSION",
    28: "POSTCOPY_ADVISE", 29: "POSTCOPY_LISTEN", 30: "POSTCOPY_END",
    31: "GET_INFLIGHT_FD", 32: "SET_INFLIGHT_FD", 33: "GPU_SET_SOCKET",
    34: "RESET_DEVICE", 35: "VRING_KICK", 36: "GET_MAX_MEM_SLOTS",
    37: "ADD_MEM_REG", 38: "REM_MEM_REG", 39: "SET_STATUS", 40: "GET_STATUS",
    41: "GET_SHARED_OBJECT", 42: "SET_DEVICE_STATE_FD", 43: "CHECK_DEVICE_STATE",
}
REPLY = 1 << 2
HEADER = struct.Struct("<III")
START = time.monotonic()
LOCK = threading.Lock()


def recv_exact(sock, n, fds=None):
    buf = b""
    while len(buf) < n:
        if fds is not None and not buf:
            data, anc, _, _ = sock.recvmsg(n, socket.CMSG_SPACE(8 * 4))
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(payload[: len(payload) - len(payload) % 4])
                    fds.extend(a)
        else:
            data = sock.recv(n - len(buf))
        if not data:
            return None
        buf += data
    return buf


def details(req, payload):
    if req in (2, 16) and len(payload) >= 8:
        return f"{struct.unpack_from('<Q', payload)[0]:#x}"
    if req in (8, 10, 18) and len(payload) >= 8:
        return "index=%d num=%d" % struct.unpack_from("<II", payload)
    if req == 11 and len(payload) >= 8:
        return "index=%d" % struct.unpack_from("<I", payload)
    if req in (12, 13) and len(payload) >= 8:
        return "index=%d" % (struct.unpack_from("<Q", payload)[0] & 0xFF)
    if req == 9 and len(payload) >= 40:
        index, _, desc, used, avail = struct.unpack_from("<IIQQQ", payload)
        return f"index={index} desc={desc:#x} used={used:#x} avail={avail:#x}"
    if req == 24 and len(payload) >= 12:
        return "offset=%d size=%d" % struct.unpack_from("<II", payload)
    if req == 39 and len(payload) >= 8:
        return f"status={struct.unpack_from('<Q', payload)[0]:#x}"
    if req == 5 and len(payload) >= 8:
        return "regions=%d" % struct.unpack_from("<I", payload)
    return ""


def pump(src, dst, log, from_frontend):
    while True:
        fds = []
        head = recv_exact(src, HEADER.size, fds)
        if head is None:
            break
        req, flags, size = HEADER.unpack(head)
        payload = recv_exact(src, size) if size else b""
        if payload is None:
            break
        name = NAMES.get(req, f"REQ_{req}")
        line = None
        if from_frontend:
            line = f"{name} {details(req, payload)}".rstrip()
        elif flags & REPLY and req == 11 and len(payload) >= 8:
            line = "  reply GET_VRING_BASE index=%d num=%d" % struct.unpack_from("<II", payload)
        if line:
            with LOCK:
                log.write(f"{time.monotonic() - START:9.3f} {line}\n")
                log.flush()
        msg = head + payload
        if fds:
            dst.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
            for fd in fds:
                os.close(fd)
        else:
            dst.sendall(msg)
    for s in (src, dst):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def main():
    listen_path, backend_path, log_path = sys.argv[1:4]
    log = open(log_path, "a")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if os.path.exists(listen_path):
        os.unlink(listen_path)
    server.bind(listen_path)
    server.listen(1)
    while True:
        frontend, _ = server.accept()
        backend = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        backend.connect(backend_path)
        with LOCK:
            log.write(f"{time.monotonic() - START:9.3f} -- connected\n")
            log.flush()
        threading.Thread(target=pump, args=(frontend, backend, log, True), daemon=True).start()
        threading.Thread(target=pump, args=(backend, frontend, log, False), daemon=True).start()


if __name__ == "__main__":
    main()
