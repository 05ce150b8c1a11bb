"""The native virtio-net worker against a real tap (IFF_VNET_HDR, 12-byte
header): frames the guest transmits come out of the interface, frames sent
into the interface reach the guest's receive buffers.  A packet socket on
the tap stands for the host side."""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import time

import pytest

import pyvt
from pyvt._virtio import NetWorker

from virtio_native_driver import VIRTIO_F_VERSION_1, Queue

pytestmark = pytest.mark.requires_kvm

TUNSETIFF = 0x400454CA
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
ETH_P_ALL = 0x0003
ETH_P_TEST = 0x88B5     # IEEE local experimental: nothing else sends it
PACKET_OUTGOING = 4
HDR_LEN = 12

RING = 0x10000
RX_BUF = 0x100000
TX_BUF = 0x200000


def open_tap():
    """(fd, name): a new tap with a 12-byte vnet header, up."""
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("no /dev/net/tun")
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        ifr = fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", b"pvtvn%d",
                                                     IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
    except PermissionError:
        os.close(fd)
        pytest.skip("creating a tap needs CAP_NET_ADMIN")
    name = ifr[:16].rstrip(b"\0").decode()
    fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", HDR_LEN))
    # No IPv6 on it: router solicitations would land in the guest's buffers.
    try:
        with open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w") as f:
            f.write("1")
    except OSError:
        pass
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
        flags = struct.unpack("16sH", fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sH", name.encode(), 0)))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH", name.encode(), flags | IFF_UP))
    return fd, name


def frame(payload: bytes) -> bytes:
    return b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + struct.pack(">H", ETH_P_TEST) + payload


@pytest.fixture
def net(vm):
    """(worker, rx queue, tx queue, packet socket on the tap)."""
    tap_fd, name = open_tap()
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((name, 0))
    sock.settimeout(20)
    worker = NetWorker(vm.memory, tap_fd, vnet_hdr_len=HDR_LEN)
    os.close(tap_fd)   # the worker holds its own: the tap lives as long as it
    rx = Queue(vm.memory, RING, 64)
    tx = Queue(vm.memory, RING + 0x8000, 64)
    rx.attach(worker, NetWorker.RX_QUEUE)
    tx.attach(worker, NetWorker.TX_QUEUE)
    worker.set_features(1 << VIRTIO_F_VERSION_1)
    worker.start()
    yield worker, rx, tx, sock
    worker.stop()
    sock.close()
    rx.close()
    tx.close()


def receive_test_frame(sock, payload_prefix: bytes) -> bytes:
    """The next frame of ours the interface received (not one it sent)."""
    while True:
        data, addr = sock.recvfrom(65536)
        if addr[2] != PACKET_OUTGOING and data[12:14] == struct.pack(">H", ETH_P_TEST) \
                and data[14:].startswith(payload_prefix):
            return data


def test_transmit_reaches_the_tap(vm, net):
    worker, rx, tx, sock = net
    packet = frame(b"guest-to-host " + os.urandom(8))
    vm.memory.write(TX_BUF, bytes(HDR_LEN))          # no offloads
    vm.memory.write(TX_BUF + 0x100, packet[:20])
    vm.memory.write(TX_BUF + 0x200, packet[20:])
    head = tx.add([(TX_BUF, HDR_LEN, False), (TX_BUF + 0x100, 20, False),
                   (TX_BUF + 0x200, len(packet) - 20, False)])
    assert tx.wait_used() == [(head, 0)]
    assert receive_test_frame(sock, b"guest-to-host ") == packet
    assert worker.stats[1]["bytes"] == len(packet) and worker.stats[1]["errors"] == 0


def test_receive_reaches_the_guest(vm, net):
    worker, rx, tx, sock = net
    packet = frame(b"host-to-guest " + os.urandom(8))
    for i in range(8):
        rx.add([(RX_BUF + 0x1000 * i, 2048, True)])
    sock.send(packet)
    # Other traffic may arrive first (the kernel's own frames): find ours.
    deadline = time.monotonic() + 20
    while True:
        for head, length in rx.wait_used():
            gpa = RX_BUF + 0x1000 * head
            data = vm.memory.read(gpa, length)
            if data[HDR_LEN:] == packet:
                num_buffers = struct.unpack_from("<H", data, 10)[0]
                assert num_buffers == 1
                assert worker.stats[0]["requests"] >= 1
                return
            rx.add([(gpa, 2048, True)])
        assert time.monotonic() < deadline, "our frame never reached the guest"


def test_receive_waits_for_buffers_then_resumes(vm, net):
    worker, rx, tx, sock = net
    packet = frame(b"queued " + os.urandom(8))
    sock.send(packet)   # no buffers yet: the tap keeps it
    deadline = time.monotonic() + 20
    slot = 0
    while True:
        rx.add([(RX_BUF + 0x1000 * slot, 2048, True)])
        head, length = rx.wait_used()[0]
        data = vm.memory.read(RX_BUF + 0x1000 * slot, length)
        if data[HDR_LEN:] == packet:
            break
        slot = (slot + 1) % 8
        assert time.monotonic() < deadline, "our frame never reached the guest"


def test_short_chains_fail_cleanly(vm, net):
    worker, rx, tx, sock = net
    head = tx.add([(TX_BUF, 4, False)])              # shorter than the header
    head2 = tx.add([(1 << 40, 64, False)])           # outside RAM
    assert tx.wait_used(2) == [(head, 0), (head2, 0)]
    assert worker.stats[1]["errors"] == 2


def test_bad_arguments(vm):
    tap_fd, _ = open_tap()
    try:
        with pytest.raises(pyvt.ArgumentError, match="vnet_hdr_len"):
            NetWorker(vm.memory, tap_fd, vnet_hdr_len=14)
    finally:
        os.close(tap_fd)


def test_stress_transmit(vm, net):
    worker, rx, tx, sock = net
    sent = 0
    seen = set()
    for round_ in range(10):
        for i in range(30):
            gpa = TX_BUF + 0x800 * i
            packet = frame(b"burst %04d" % (round_ * 30 + i))
            vm.memory.write(gpa, bytes(HDR_LEN) + packet)
            tx.add([(gpa, HDR_LEN + len(packet), False)], kick=i % 10 == 9)
        tx.wait_used(30)
        sent += 30
        while len(seen) < sent:
            data = receive_test_frame(sock, b"burst ")
            seen.add(data[14:24])
    assert len(seen) == 300 and worker.stats[1]["requests"] == 300
