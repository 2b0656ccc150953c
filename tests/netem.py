"""A link with latency and loss, in user space: netem for a kernel that has none.

    python -m tests.netem IFACE_A IFACE_B PARAMS_FILE

Copies every Ethernet frame that arrives on one interface out of the other, each way, after
``delay`` seconds, dropping each with probability ``loss``.  ``PARAMS_FILE`` holds ``delay loss``
(``0 0``: a plain wire); it is read at start and again on SIGHUP, so one relay serves a whole test
module and a test changes the link's quality while it runs.  Prints ``ready`` once both interfaces
are bound.

Why not the kernel: this machine's kernel has no ``sch_netem`` (``tc qdisc add ... netem`` is
refused), no ``act_gact`` and no ``cls_matchall``; nftables (``numgen random``) and iptables
(``-m statistic``) can drop packets but nothing there can delay one.  A relay between two veth
ends, in the switch's namespace (:mod:`tests.netns`), does both with the standard library only.
The interfaces whose frames cross it must have transmit checksum offload off (the frames then
carry real checksums); :mod:`tests.netns` does that.
"""

from __future__ import annotations

import heapq
import random
import select
import signal
import socket
import sys
import time
from pathlib import Path

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4


class Relay:
    def __init__(self, a: str, b: str, params: Path) -> None:
        self.params = params
        self.delay, self.loss = 0.0, 0.0
        self.socks: dict[socket.socket, socket.socket] = {}
        ends = []
        for name in (a, b):
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            s.bind((name, 0))
            s.setblocking(False)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
            ends.append(s)
        self.socks = {ends[0]: ends[1], ends[1]: ends[0]}
        self.queue: list[tuple[float, int, socket.socket, bytes]] = []
        self.seq = 0
        self.rng = random.Random(11)
        self.reload()

    def reload(self, *_: object) -> None:
        delay, loss = self.params.read_text().split()
        self.delay, self.loss = float(delay), float(loss)

    def receive(self, s: socket.socket) -> None:
        while True:
            try:
                frame, addr = s.recvfrom(65536)
            except BlockingIOError:
                return
            if addr[2] == PACKET_OUTGOING:  # our own copy going out of this interface
                continue
            if self.loss and self.rng.random() < self.loss:
                continue
            self.seq += 1
            heapq.heappush(self.queue, (time.monotonic() + self.delay, self.seq, self.socks[s], frame))

    def send_due(self) -> None:
        now = time.monotonic()
        while self.queue and self.queue[0][0] <= now:
            _, _, out, frame = heapq.heappop(self.queue)
            try:
                out.send(frame)
            except OSError as exc:  # a link set down: the frame is lost, as on a wire
                print(f"netem: dropped a frame of {len(frame)} bytes: {exc}", file=sys.stderr, flush=True)

    def run(self) -> None:
        while True:
            wait = max(0.0, self.queue[0][0] - time.monotonic()) if self.queue else 1.0
            try:
                ready, _, _ = select.select(list(self.socks), [], [], wait)
            except InterruptedError:
                continue
            for s in ready:
                self.receive(s)
            self.send_due()


def main(argv: list[str]) -> int:
    a, b, params = argv
    relay = Relay(a, b, Path(params))
    signal.signal(signal.SIGHUP, relay.reload)
    print("ready", flush=True)
    relay.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
