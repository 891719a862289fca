"""Delay for a simulated host (this kernel has no ``netem``): iptables hands the host's outgoing packets
on ``eth0`` to NFQUEUE 0, and this process holds each one for DELAY seconds before accepting it. Pure
Python over netlink (``NETLINK_NETFILTER``), no library; run inside the host's network namespace by
``netns_hosts.Hosts.delay``:

    ip netns exec NS python tests/netns_delay.py 0.05     # prints "ready" once bound to the queue

Packets keep their order (one delay for all). The iptables rule has ``--queue-bypass``: if this process
dies, packets pass undelayed instead of being dropped.
"""

from __future__ import annotations

import errno
import heapq
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_CONFIG, NFQNL_MSG_VERDICT_BATCH = 0, 2, 3
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN, NFQA_CFG_MASK, NFQA_CFG_FLAGS = 1, 2, 3, 4, 5
NFQA_CFG_F_FAIL_OPEN = 1  # a full queue accepts packets (undelayed) instead of dropping them
NFQA_PACKET_HDR, NFQA_VERDICT_HDR = 1, 2
NFQNL_CFG_CMD_BIND, NFQNL_COPY_META = 1, 1
NF_ACCEPT = 1
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2
QUEUE = 0


def attribute(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def send(sock: socket.socket, kind: int, attributes: list[bytes], flags: int = NLM_F_REQUEST) -> None:
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(QUEUE)) + b"".join(attributes)
    sock.send(struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | kind, flags, 0, 0) + body)


def messages(data: bytes):
    """(type, payload after the nfgenmsg header) of each netlink message in ``data``."""
    offset = 0
    while offset + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, offset)
        if length < 16:
            break
        yield kind, data[offset + 16:offset + length]
        offset += (length + 3) & ~3


def packet_id(payload: bytes) -> int | None:
    offset = 4  # the nfgenmsg header
    while offset + 4 <= len(payload):
        length, kind = struct.unpack_from("=HH", payload, offset)
        if length < 4:
            break
        if kind & 0x7FFF == NFQA_PACKET_HDR:
            return struct.unpack_from("!I", payload, offset + 4)[0]
        offset += (length + 3) & ~3
    return None


def bind() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.setsockopt(socket.SOL_SOCKET, 33, 64 * 2 ** 20)  # SO_RCVBUFFORCE (root): past rmem_max, no drops
    sock.bind((0, 0))
    send(sock, NFQNL_MSG_CONFIG, [attribute(NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_BIND, 0, 0))],
         NLM_F_REQUEST | NLM_F_ACK)
    send(sock, NFQNL_MSG_CONFIG, [attribute(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META)),
                                  attribute(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", 65536)),
                                  attribute(NFQA_CFG_MASK, struct.pack("!I", NFQA_CFG_F_FAIL_OPEN)),
                                  attribute(NFQA_CFG_FLAGS, struct.pack("!I", NFQA_CFG_F_FAIL_OPEN))],
         NLM_F_REQUEST | NLM_F_ACK)
    acks = 0
    while acks < 2:
        for kind, payload in messages(sock.recv(65536)):
            if kind == NLMSG_ERROR:
                code = struct.unpack_from("=i", payload, 0)[0] if len(payload) >= 4 else 0
                if code != 0:
                    raise OSError(-code, f"NFQUEUE configuration refused: {errno.errorcode.get(-code, code)}")
                acks += 1
    return sock


def main() -> int:
    delay = float(sys.argv[1])
    sock = bind()
    print("ready", flush=True)
    held: list[tuple[float, int]] = []  # (when to let it go, packet id): in arrival order, ids ascending
    while True:
        now, due = time.monotonic(), None
        while held and held[0][0] <= now:
            due = heapq.heappop(held)[1]
        if due is not None:  # one batch verdict: every packet up to this id
            send(sock, NFQNL_MSG_VERDICT_BATCH, [attribute(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, due))])
        sock.settimeout(max(0.0005, held[0][0] - now) if held else 1.0)
        try:
            data = sock.recv(1 << 20)
        except socket.timeout:
            continue
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:  # the kernel dropped some messages: their packets pass (bypass)
                continue
            raise
        arrived = time.monotonic()
        for kind, payload in messages(data):
            if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET and (pid := packet_id(payload)) is not None:
                heapq.heappush(held, (arrived + delay, pid))


if __name__ == "__main__":
    sys.exit(main())
