#!/usr/bin/env python3
"""A stand-in rank for oxclip's rendezvous (trainer/src/collectives/tcp.rs), to test what the
other ranks do when a peer joins and then goes silent.

    python3 scripts/silent_peer.py PORT RANK WORLD_SIZE [EXCHANGES]

Joins rank 0 at 127.0.0.1:PORT as RANK of WORLD_SIZE, answers EXCHANGES byte gathers (default
0; each sends 128 zero bytes, the size of NCCL's unique id, so EXCHANGES=1 takes part in the
NCCL id hand-out and then never creates the communicator), then sends nothing more and
exits when rank 0 closes the connection. Exit status 0 if it joined, 1 if it never could.
The job token is OXCLIP_RDZV_TOKEN, as for the real ranks (empty when unset).
"""
import hashlib
import os
import socket
import struct
import sys
import time

MAGIC = b"OXCLIP\x00\x02"
TOKEN_DIGEST = hashlib.sha256(
    b"oxclip rendezvous token\0" + os.environ.get("OXCLIP_RDZV_TOKEN", "").encode()
).digest()
GATHER_BYTES = 4


def read_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError("rank 0 closed the connection")
        data += chunk
    return data


def main():
    port, rank, world = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    exchanges = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    deadline = time.time() + 60
    while True:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=1)
            sock.settimeout(None)
            sock.sendall(MAGIC + struct.pack("<II", rank, world) + TOKEN_DIGEST)
            answer = read_exact(sock, 2)
            if answer != b"OK":
                reason = read_exact(sock, read_exact(sock, 1)[0]) if answer == b"NO" else b""
                print(f"silent_peer: rank 0 refused: {reason.decode(errors='replace')}", file=sys.stderr)
                return 1
            break
        except (OSError, EOFError):
            if time.time() > deadline:
                print(f"silent_peer: could not join rank 0 on port {port}", file=sys.stderr)
                return 1
            time.sleep(0.05)
    print(f"silent_peer: joined as rank {rank} of {world}", file=sys.stderr, flush=True)
    try:
        for seq in range(1, exchanges + 1):
            payload = bytes(128)
            sock.sendall(struct.pack("<BQQ", GATHER_BYTES, seq, len(payload)) + payload)
            op, got_seq, length = struct.unpack("<BQQ", read_exact(sock, 17))
            read_exact(sock, length)
            print(f"silent_peer: exchange {seq} answered (op {op}, #{got_seq})", file=sys.stderr, flush=True)
        # Silent from here on: wait for rank 0 to give up and close.
        while sock.recv(65536):
            pass
    except (OSError, EOFError):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
