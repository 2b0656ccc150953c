"""Machines on one switch, made of Linux network namespaces, for the partition tests.

Each node (Redis, each worker, the producer) gets a namespace of its own with one interface,
``eth0``, and its own address on 10.203.0.0/24; the other end of its veth pair sits on a bridge
in a switch namespace.  A node may be *relayed*: its link then goes through :mod:`tests.netem`
(user-space latency and loss) between two veth ends in the switch.  Faults are what they would be
between machines: :meth:`Network.link` sets a node's ``eth0`` down (its cable pulled) and up
again, :meth:`Network.impair` gives a relayed node's link latency and loss.

Processes run in a node with :meth:`Network.prefix` (``ip netns exec <ns>``) and keep the
environment they are given (``PYTHONPATH``, ``GENQ_HOME``...).  A test reads Redis through its
Unix socket, which no network fault touches.  Everything is created by :meth:`Network.create` and
removed by :meth:`Network.close`; :func:`unavailable` says why it cannot be, where it cannot
(not root, no iproute2, a kernel without veth, bridges or packet sockets).
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

SUBNET = "10.203.0"
SIOCETHTOOL = 0x8946
ETHTOOL_STXCSUM = 0x17


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def checksum_offload_off(iface: str) -> None:
    """Compute transmit checksums in software (what ``ethtool -K IFACE tx off`` does): frames
    that cross the user-space relay must carry real checksums.  Also turns off the segmentation
    offloads that depend on it, so no frame is larger than the MTU."""
    value = ctypes.create_string_buffer(struct.pack("II", ETHTOOL_STXCSUM, 0))
    request = struct.pack("16sP", iface.encode(), ctypes.addressof(value))
    with socket.socket() as s:
        fcntl.ioctl(s.fileno(), SIOCETHTOOL, request)


def unavailable() -> str | None:
    """Why namespaces, veth pairs, a bridge and packet sockets cannot be used here (None: they can)."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_SYS_ADMIN, CAP_NET_ADMIN)"
    probe = f"genq-probe-{os.getpid()}"
    try:
        for args in (
            ("netns", "add", probe),
            ("-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1"),
            ("-n", probe, "link", "add", "br0", "type", "bridge"),
        ):
            proc = ip(*args, check=False)
            if proc.returncode != 0:
                return f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}"
        try:
            socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3)).close()
        except OSError as exc:
            return f"raw packet sockets are not allowed ({exc})"
    finally:
        ip("netns", "del", probe, check=False)
    return None


@dataclass
class Node:
    name: str
    ns: str
    address: str
    veth: str
    """The root-namespace name its veth pair was created under (``<veth>a`` / ``<veth>b``)."""


class Network:
    """``Network(folder, ["redis", "w1", ...], relayed={"w1"})``; ``create()``, then ``close()``."""

    def __init__(self, folder: Path, names: list[str], *, relayed: frozenset[str] = frozenset()) -> None:
        self.folder = folder
        tag = f"{os.getpid() % 100000}{secrets.token_hex(2)}"
        self.switch = f"genq-{tag}-switch"
        self.nodes = {
            name: Node(name, f"genq-{tag}-{name}", f"{SUBNET}.{10 + i}", f"gq{tag}{i}")
            for i, name in enumerate(names)
        }
        self.relayed = relayed
        self.relays: dict[str, subprocess.Popen[str]] = {}
        self.created: list[str] = []

    def prefix(self, node: str) -> list[str]:
        """Run a command on ``node``: ``[*net.prefix("w1"), "python", ...]``."""
        return ["ip", "netns", "exec", self.nodes[node].ns]

    def address(self, node: str) -> str:
        return self.nodes[node].address

    def create(self) -> Network:
        try:
            self._namespace(self.switch)
            ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            ip("-n", self.switch, "link", "set", "br0", "up")
            for node in self.nodes.values():
                self._attach(node)
        except Exception:
            self.close()
            raise
        return self

    def _namespace(self, ns: str) -> None:
        ip("netns", "add", ns)
        self.created.append(ns)
        ip("-n", ns, "link", "set", "lo", "up")

    def _attach(self, node: Node) -> None:
        self._namespace(node.ns)
        inner, outer = f"{node.veth}a", f"{node.veth}b"
        ip("link", "add", inner, "type", "veth", "peer", "name", outer)
        ends = [inner, outer]
        if node.name in self.relayed:  # node -> outer | relay | wire -> port on the bridge
            ip("link", "add", f"{node.veth}c", "type", "veth", "peer", "name", f"{node.veth}d")
            ends += [f"{node.veth}c", f"{node.veth}d"]
        for end in ends:
            checksum_offload_off(end)
        ip("link", "set", inner, "netns", node.ns)
        ip("-n", node.ns, "link", "set", inner, "name", "eth0")
        ip("-n", node.ns, "addr", "add", f"{node.address}/24", "dev", "eth0")
        ip("-n", node.ns, "link", "set", "eth0", "up")
        for end in ends[1:]:
            ip("link", "set", end, "netns", self.switch)
            ip("-n", self.switch, "link", "set", end, "up")
        ip("-n", self.switch, "link", "set", ends[-1], "master", "br0")
        if node.name in self.relayed:
            self._relay(node, outer, f"{node.veth}c")

    def _relay(self, node: Node, a: str, b: str) -> None:
        params = self.folder / f"netem-{node.name}.txt"
        params.write_text("0 0\n")
        log = open(self.folder / f"netem-{node.name}.log", "w")  # noqa: SIM115 - the relay's stderr
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.switch, sys.executable, "-m", "tests.netem", a, b, str(params)],
            cwd=Path(__file__).resolve().parent.parent,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        self.relays[node.name] = proc
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the relay for {node.name} did not start (exit {proc.poll()})")

    def link(self, node: str, up: bool) -> None:
        """Pull ``node``'s cable (its ``eth0`` down) or plug it back in."""
        ip("-n", self.nodes[node].ns, "link", "set", "eth0", "up" if up else "down")

    def impair(self, node: str, delay: float = 0.0, loss: float = 0.0) -> None:
        """Latency (seconds, each way) and loss (a probability, each way) on a relayed node's link."""
        (self.folder / f"netem-{node}.txt").write_text(f"{delay} {loss}\n")
        self.relays[node].send_signal(signal.SIGHUP)

    def close(self) -> None:
        for proc in self.relays.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        for ns in reversed(self.created):
            ip("netns", "del", ns, check=False)
        self.created.clear()
