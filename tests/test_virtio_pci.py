"""virtio over PCI with a real guest: tests/guests/virtio_driver.c (a
freestanding virtio-pci driver at ring 3) finds each device through
0xcf8/0xcfc, negotiates, sets up a queue and drives it; a Python
VirtioDevice, the example's Python rng, and the native rng and blk."""

import importlib.util
import os
import struct
from pathlib import Path

import pytest

import pyvt
import pyvt.virtio as virtio
from pyvt.virtio import constants as C

import virtio_guest as g
from virtio_guest import DATA

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "virtio_rng.py"
F_VERSION_1, F_INDIRECT, F_EVENT_IDX = 1 << 32, 1 << 28, 1 << 29
TEST_TYPE = 30  # a device type no Linux driver claims


@pytest.fixture(scope="module")
def elf(tmp_path_factory):
    return g.build(tmp_path_factory.mktemp("virtio_driver"))


@pytest.fixture
def vm():
    vm = g.new_vm()
    yield vm
    vm.close()


class Upper(virtio.VirtioDevice):
    """Writes the upper-cased readable bytes of each chain to its writable part."""

    device_type = TEST_TYPE
    queue_sizes = (16, 8)
    features = 1 << 3

    def __init__(self):
        super().__init__()
        self.chains, self.resets, self.threads = [], 0, set()

    def config(self):
        return b"UPPR" + struct.pack("<I", 0x12345678)

    def on_queue(self, queue):
        import threading

        self.threads.add(threading.current_thread().name)
        for chain in queue:
            self.chains.append((queue.index, chain.readable_size, chain.writable_size))
            chain.write(chain.read().upper())
            queue.push(chain)
        queue.notify()

    def on_reset(self):
        self.resets += 1


def test_python_device_chains_features_config(vm, elf):
    device = Upper()
    transport = vm.add_virtio(device)
    assert vm.virtio_devices == [transport]
    vm.memory.write(DATA, b"hello ")
    vm.memory.write(DATA + 0x100, b"virtio")
    vm.memory.write(DATA + 0x200, b"second request")
    r = g.run(vm, elf, 0x1040 + TEST_TYPE, [
        [(DATA, 6, False), (DATA + 0x100, 6, False), (DATA + 0x1000, 64, True)],
        [(DATA + 0x200, 14, False), (DATA + 0x2000, 8, True), (DATA + 0x2100, 8, True)],
    ], features=1 << 3 | F_EVENT_IDX, queue_size=8)
    assert r.stage_name == "done"
    assert r.slot == transport.slot
    assert r.offered == F_VERSION_1 | F_INDIRECT | F_EVENT_IDX | 1 << 3
    assert r.accepted == F_VERSION_1 | F_EVENT_IDX | 1 << 3
    assert device.negotiated == r.accepted
    assert r.status == 0xF and r.num_queues == 2 and r.queue_size == 8
    assert r.notify_multiplier == 4
    assert r.config[:8] == b"UPPR" + struct.pack("<I", 0x12345678)
    assert vm.memory.read(DATA + 0x1000, 12) == b"HELLO VIRTIO"
    assert vm.memory.read(DATA + 0x2000, 8) + vm.memory.read(DATA + 0x2100, 6) == b"SECOND REQUEST"
    assert r.used == [(0, 12), (3, 14)]  # head descriptors 0 and 3, bytes written
    assert device.chains == [(0, 12, 64), (0, 14, 16)]
    # on_queue ran on the device's thread, not the vCPU's
    assert device.threads == {"virtio-Upper"}
    # the kicks went through the ioeventfds at the notify addresses
    assert transport._ioeventfd_base == transport.bars[4].address is not None
    assert r.isr & C.ISR_QUEUE  # no MSI-X: the ISR says the queue interrupted


def test_indirect_chains_and_reset(vm, elf):
    device = Upper()
    transport = vm.add_virtio(device)
    vm.memory.write(DATA, b"indirect")
    r = g.run(vm, elf, 0x1040 + TEST_TYPE, [[(DATA, 8, False), (DATA + 0x1000, 8, True)]],
              features=F_INDIRECT, flags=g.FLAG_INDIRECT | g.FLAG_RESET_AFTER, queue=1)
    assert r.stage_name == "done", r
    assert vm.memory.read(DATA + 0x1000, 8) == b"INDIRECT"
    assert r.used == [(0, 8)]
    assert device.chains == [(1, 8, 8)]
    assert r.status == 0  # after the reset
    # reset: the device forgot its queues, the transport its registers and features
    assert device.resets >= 1 and device.queues == [] and transport.negotiated == 0
    assert transport._thread is None


def test_msix_vector_gets_the_queue_interrupt(vm, elf):
    """With MSI-X enabled (every vector masked) the queue's interrupt goes to
    its vector's irqfd: masked, it shows as pending in the PBA, not in the ISR."""
    device = Upper()
    vm.add_virtio(device)
    r = g.run(vm, elf, 0x1040 + TEST_TYPE, [[(DATA, 4, False), (DATA + 0x1000, 4, True)]],
              flags=g.FLAG_MSIX)
    assert r.stage_name == "done", r
    assert r.msix_vector == 0
    assert r.pba & 1
    assert r.isr == 0


def test_bad_chain_sets_needs_reset(vm, elf):
    device = Upper()
    transport = vm.add_virtio(device)
    r = g.run(vm, elf, 0x1040 + TEST_TYPE, [[(0xF0000000, 16, True)]])  # not RAM
    assert r.stage_name == "timeout on request 0"
    assert transport.status & C.STATUS_DEVICE_NEEDS_RESET
    assert "not all guest RAM" in transport.last_failure
    assert device.chains == []


def test_features_without_version_1_are_refused(vm, elf):
    """The transport refuses FEATURES_OK for features it did not offer."""
    transport = vm.add_virtio(Upper())
    common = transport.on_bar_write
    common(4, C.COMMON_STATUS, 1, 3)
    common(4, C.COMMON_GFSELECT, 4, 0)
    common(4, C.COMMON_GF, 4, 1 << 3)  # no VERSION_1
    common(4, C.COMMON_STATUS, 1, 3 | C.STATUS_FEATURES_OK)
    assert not transport.on_bar_read(4, C.COMMON_STATUS, 1) & C.STATUS_FEATURES_OK
    common(4, C.COMMON_GFSELECT, 4, 1)
    common(4, C.COMMON_GF, 4, 1 | 1 << 20)  # VERSION_1 and a bit never offered
    common(4, C.COMMON_STATUS, 1, 3 | C.STATUS_FEATURES_OK)
    assert not transport.on_bar_read(4, C.COMMON_STATUS, 1) & C.STATUS_FEATURES_OK
    # queue registers: a size that is not a power of 2, or too big, is ignored;
    # a vector the device does not have reads back as NO_VECTOR
    common(4, C.COMMON_Q_SELECT, 2, 0)
    common(4, C.COMMON_Q_SIZE, 2, 12)
    common(4, C.COMMON_Q_SIZE, 2, 32)
    assert transport.on_bar_read(4, C.COMMON_Q_SIZE, 2) == 16
    common(4, C.COMMON_Q_MSIX, 2, 7)
    assert transport.on_bar_read(4, C.COMMON_Q_MSIX, 2) == C.NO_VECTOR
    common(4, C.COMMON_Q_SELECT, 2, 5)
    assert transport.on_bar_read(4, C.COMMON_Q_SIZE, 2) == 0


def test_example_python_rng(vm, elf):
    spec = importlib.util.spec_from_file_location("virtio_rng_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    rng = example.PythonRng()
    vm.add_virtio(rng)
    r = g.run(vm, elf, 0x1040 + C.TYPE_ENTROPY, [[(DATA, 64, True)], [(DATA + 0x100, 64, True)]])
    assert r.stage_name == "done"
    assert r.used == [(0, 64), (1, 64)]
    first, second = vm.memory.read(DATA, 64), vm.memory.read(DATA + 0x100, 64)
    assert first != bytes(64) and second != bytes(64) and first != second
    assert rng.bytes_served == 128


def test_native_rng(vm, elf):
    rng = vm.add_rng()
    r = g.run(vm, elf, 0x1040 + C.TYPE_ENTROPY, [[(DATA, 64, True)], [(DATA + 0x100, 32, True)]])
    assert r.stage_name == "done", r
    assert r.used == [(0, 64), (1, 32)]
    first, second = vm.memory.read(DATA, 64), vm.memory.read(DATA + 0x100, 32)
    assert first != bytes(64) and second != bytes(32) and first[:32] != second
    assert vm.memory.read(DATA + 0x100 + 32, 32) == bytes(32)  # nothing past the buffer
    assert rng.worker is not None
    assert r.isr & C.ISR_QUEUE  # the worker's ISR bit (INTx: no MSI-X), read through the transport
    assert rng.stats[0]["requests"] == 2


def blk_request(kind, sector, at, data_len, write_data=None):
    """A virtio-blk chain: header (readable), data, status byte (writable)."""
    header = DATA + at
    status = header + 0x10
    data = header + 0x100
    segments = [(header, 16, False)]
    if data_len:
        segments.append((data, data_len, kind != C.BLK_T_OUT))
    segments.append((status, 1, True))
    return header, status, data, segments


def write_header(vm, header, kind, sector, status, write_data=None, data=None):
    vm.memory.write(header, struct.pack("<IIQ", kind, 0, sector))
    vm.memory.write(status, b"\xee")
    if write_data is not None:
        vm.memory.write(data, write_data)


def native_worker(name):
    return pytest.mark.skipif(
        not hasattr(pytest.importorskip("pyvt._virtio"), name),
        reason=f"pyvt._virtio has no {name} yet (the native workers are another part)")


@native_worker("BlkWorker")
def test_native_blk_read_write_flush_id(vm, elf, tmp_path):
    image = tmp_path / "disk.img"
    pattern = bytes(range(256)) * 8  # sectors 0-3
    image.write_bytes(pattern + bytes(4096 - len(pattern)))
    disk = vm.add_disk(image, serial="pyvt-test-disk")
    requests, checks = [], []
    for at, kind, sector, length, payload in [
            (0x0000, C.BLK_T_IN, 1, 1024, None),
            (0x2000, C.BLK_T_OUT, 5, 512, b"W" * 512),
            (0x4000, C.BLK_T_FLUSH, 0, 0, None),
            (0x6000, C.BLK_T_GET_ID, 0, 20, None)]:
        header, status, data, segments = blk_request(kind, sector, at, length)
        write_header(vm, header, kind, sector, status, payload, data)
        requests.append(segments)
        checks.append((status, data))
    r = g.run(vm, elf, 0x1040 + C.TYPE_BLOCK, requests, features=1 << C.BLK_F_FLUSH)
    assert r.stage_name == "done", r
    assert struct.unpack_from("<Q", r.config)[0] == 8  # capacity: 4096 bytes
    assert r.accepted & 1 << C.BLK_F_FLUSH and not r.offered & 1 << C.BLK_F_RO
    assert [vm.memory.read(status, 1)[0] for status, _ in checks] == [C.BLK_S_OK] * 4
    assert vm.memory.read(checks[0][1], 1024) == pattern[512:1536]
    assert image.read_bytes()[5 * 512:6 * 512] == b"W" * 512
    assert vm.memory.read(checks[3][1], 20).rstrip(b"\0") == b"pyvt-test-disk"
    assert disk.capacity == 8


@native_worker("BlkWorker")
def test_native_blk_readonly_refuses_writes(vm, elf, tmp_path):
    image = tmp_path / "ro.img"
    image.write_bytes(b"R" * 4096)
    vm.add_disk(image, readonly=True)
    header, status, data, segments = blk_request(C.BLK_T_OUT, 0, 0, 512)
    write_header(vm, header, C.BLK_T_OUT, 0, status, b"X" * 512, data)
    r = g.run(vm, elf, 0x1040 + C.TYPE_BLOCK, [segments], features=1 << C.BLK_F_RO)
    assert r.stage_name == "done", r
    assert r.offered & 1 << C.BLK_F_RO
    assert vm.memory.read(status, 1)[0] == C.BLK_S_IOERR
    assert image.read_bytes() == b"R" * 4096


def test_add_disk_errors(vm, tmp_path):
    with pytest.raises(pyvt.DiskImageError, match="does not exist") as info:
        vm.add_disk(tmp_path / "missing.img")
    assert isinstance(info.value, pyvt.Error) and info.value.errno == 2
    with pytest.raises(pyvt.DiskImageError, match="is a directory"):
        vm.add_disk(tmp_path)
    with pytest.raises(pyvt.DiskImageError, match="not a regular file or a block device"):
        vm.add_disk("/dev/null", readonly=True)
    assert vm.virtio_devices == []


def test_add_net_missing_tap(vm):
    with pytest.raises(pyvt.TapError, match="no network interface 'pyvt-no-tap'"):
        vm.add_net(tap="pyvt-no-tap")
    with pytest.raises(pyvt.TapError, match="not a tap"):
        vm.add_net(tap="lo")
    assert vm.virtio_devices == []


def test_devices_stop_when_the_vm_closes(elf):
    vm = g.new_vm()
    device = Upper()
    transport = vm.add_virtio(device)
    vm.memory.write(DATA, b"x")
    r = g.run(vm, elf, 0x1040 + TEST_TYPE, [[(DATA, 1, False), (DATA + 0x1000, 1, True)]])
    assert r.stage_name == "done"
    thread = transport._thread
    assert thread is not None and thread.is_alive()
    vm.close()
    assert not thread.is_alive()


@pytest.fixture
def tap():
    """A fresh tap interface, up, and an AF_PACKET socket on its host side."""
    import shutil
    import socket
    import subprocess

    name = f"pyvt{os.getpid() % 100000}"
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("making a tap needs root and iproute2")
    made = subprocess.run(["ip", "tuntap", "add", "dev", name, "mode", "tap"],
                          capture_output=True, text=True)
    if made.returncode:
        pytest.skip(f"cannot make a tap here: {made.stderr.strip()}")
    try:
        # No IPv6 on it: the host's own neighbour discovery would reach the guest.
        with open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w") as knob:
            knob.write("1")
        subprocess.run(["ip", "link", "set", name, "up"], check=True)
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        sock.bind((name, 0))
        sock.settimeout(10)
        yield name, sock
        sock.close()
    finally:
        subprocess.run(["ip", "link", "del", name], capture_output=True)


def wait_until_up(name):
    """Waits until the kernel sees the tap's carrier (the device's fd
    attached): before, its queue discipline drops what is sent to it."""
    import time

    for _ in range(1000):
        with open(f"/sys/class/net/{name}/operstate") as state:
            if state.read().strip() == "up":
                return
        time.sleep(0.01)
    pytest.fail(f"tap {name} never came up")


FRAME = bytes.fromhex("ffffffffffff525400abcdef88b5") + b"pyvt virtio-net frame".ljust(46, b".")


def test_net_attaches_to_a_tap_with_the_virtio_header(vm, tap):
    name, sock = tap
    nic = vm.add_net(tap=name, mac="52:54:00:ab:cd:ef")
    wait_until_up(name)
    transport = nic.transport
    assert nic.mac_address == "52:54:00:ab:cd:ef"
    config = bytes(transport.on_bar_read(4, 0x2000 + i, 1) for i in range(8))
    assert config == bytes.fromhex("525400abcdef") + struct.pack("<H", C.NET_S_LINK_UP)
    assert transport.offered & (1 << C.NET_F_MAC)
    # A frame sent into the interface reaches the device's fd after a
    # 12-byte virtio_net_hdr (IFF_VNET_HDR, TUNSETVNETHDRSZ 12).
    sock.send(FRAME)
    import select

    assert select.select([nic.fd], [], [], 10)[0]
    got = os.read(nic.fd, 4096)
    assert got[12:] == FRAME and len(got) == 12 + len(FRAME)
    with pytest.raises(pyvt.VirtioError, match="52:54:00:12:34:56"):
        vm.add_net(tap=name, mac="52:54:00:12:34")


@native_worker("NetWorker")
def test_native_net_sends_and_receives(vm, elf, tap):
    name, sock = tap
    vm.add_net(tap=name)
    wait_until_up(name)
    sock.send(FRAME)  # waits in the tap until the guest gives a receive buffer
    r = g.run(vm, elf, 0x1040 + C.TYPE_NET, [[(DATA, 2048, True)]], queue=0)
    assert r.stage_name == "done", r
    assert r.used[0][1] == 12 + len(FRAME)
    assert vm.memory.read(DATA + 12, len(FRAME)) == FRAME
    outgoing = bytes.fromhex("ffffffffffff525400000001" "88b5") + b"from the guest".ljust(46, b"!")
    vm.memory.write(DATA, bytes(12) + outgoing)
    r = g.run(vm, elf, 0x1040 + C.TYPE_NET, [[(DATA, 12 + len(outgoing), False)]], queue=1)
    assert r.stage_name == "done", r
    while True:
        frame = sock.recv(4096)
        if frame == outgoing:
            break


@native_worker("ConsoleWorker")
def test_native_console_both_ways(vm, elf):
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    try:
        vm.add_console(input=in_r, output=out_w)
        os.write(in_w, b"typed on the host")
        r = g.run(vm, elf, 0x1040 + C.TYPE_CONSOLE, [[(DATA, 64, True)]], queue=0)
        assert r.stage_name == "done", r
        assert vm.memory.read(DATA, r.used[0][1]) == b"typed on the host"
        vm.memory.write(DATA + 0x100, b"hello from hvc0\n")
        r = g.run(vm, elf, 0x1040 + C.TYPE_CONSOLE, [[(DATA + 0x100, 16, False)]], queue=1)
        assert r.stage_name == "done", r
        assert os.read(out_r, 100) == b"hello from hvc0\n"
    finally:
        for fd in (in_r, in_w, out_r, out_w):
            os.close(fd)


def test_worker_writes_reach_snapshot_restores(vm, elf):
    """KVM's dirty log does not see a native worker's writes to guest RAM:
    report_written hands them to the VM's memory, so a restore undoes them."""
    from pyvt.virtio import attach

    vm.add_rng()
    vm.vcpu(0, mode="long", ring=3)
    snap = vm.snapshot()
    r = g.run(vm, elf, 0x1040 + C.TYPE_ENTROPY, [[(DATA + 0x3000, 64, True)]])
    assert r.stage_name == "done"
    assert vm.memory.read(DATA + 0x3000, 64) != bytes(64)
    attach.report_written(vm)
    vm.restore(snap)
    assert vm.memory.read(DATA + 0x3000, 64) == bytes(64)


def test_native_worker_interrupts_through_its_msix_vector(vm, elf):
    """With MSI-X on, the worker's call eventfd is the queue vector's irqfd:
    the vector is masked, so its interrupt waits in the PBA."""
    vm.add_rng()
    r = g.run(vm, elf, 0x1040 + C.TYPE_ENTROPY, [[(DATA, 16, True)]], flags=g.FLAG_MSIX)
    assert r.stage_name == "done", r
    assert r.msix_vector == 0 and r.pba & 1
