"""virtio-net (virtio 1.x section 5.1) on a host tap device, served by
pyvt._virtio's NetWorker.  One queue pair; no offloads."""

from __future__ import annotations

import os
import re
import struct
from typing import Optional

from .constants import NET_F_MAC, NET_F_STATUS, NET_S_LINK_UP, TYPE_NET
from .errors import VirtioError
from .native import NativeVirtioDevice, native_module
from .tap import open_tap

QUEUE_SIZE = 256


def parse_mac(mac: Optional[str]) -> bytes:
    """``"52:54:00:12:34:56"`` as 6 bytes; None: a random locally
    administered unicast address in QEMU's 52:54:00 prefix."""
    if mac is None:
        return b"\x52\x54\x00" + os.urandom(3)
    if not isinstance(mac, str) or not re.fullmatch(r"([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}", mac):
        raise VirtioError(f"a MAC address looks like 52:54:00:12:34:56, not {mac!r}")
    raw = bytes(int(part, 16) for part in mac.split(":"))
    if raw[0] & 1:
        raise VirtioError(f"{mac} is a multicast address: a NIC needs a unicast one")
    return raw


class NetDevice(NativeVirtioDevice):
    """A virtio NIC attached to the existing tap ``tap`` (TapError if it is
    missing), with MAC address ``mac`` (default: random, 52:54:00:xx:xx:xx)."""

    device_type = TYPE_NET
    worker_class = "NetWorker"
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE)  # receiveq1, transmitq1
    features = 1 << NET_F_MAC | 1 << NET_F_STATUS

    def __init__(self, tap: str, mac: Optional[str] = None):
        super().__init__()
        self.mac = parse_mac(mac)
        self.tap = tap
        self.fd = self.own(open_tap(tap))

    @property
    def mac_address(self) -> str:
        return ":".join(f"{b:02x}" for b in self.mac)

    def config(self) -> bytes:
        # struct virtio_net_config: mac, status, max_virtqueue_pairs
        return self.mac + struct.pack("<HH", NET_S_LINK_UP, 1)

    def make_worker(self, memory):
        return native_module().NetWorker(memory, self.fd)

    def __repr__(self) -> str:
        return f"NetDevice(tap={self.tap!r}, mac={self.mac_address})"
