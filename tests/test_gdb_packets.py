"""The gdb stub's packet layer (checksums, escaping, framing, bad input),
its register table and target description, and the int3 breakpoint path
(forced where the backend cannot trap int3, as on PVM)."""

from __future__ import annotations

import errno
import xml.etree.ElementTree as ET

import pytest

import pyvt
from pyvt import debugging, exits, gdbstub
from pyvt.gdbstub import PacketReader, checksum, escape, frame, parse_address, unescape

# pyvt.ko has no KVM_SET_GUEST_DEBUG (it says so through KVM_CHECK_EXTENSION).
needs_guest_debug = pytest.mark.requires_cap("SET_GUEST_DEBUG")


def test_checksum_and_frame():
    assert checksum(b"") == 0
    assert checksum(b"g") == 0x67
    assert checksum(b"\xff\x02") == 0x01  # modulo 256
    assert frame(b"OK") == b"$OK#9a"


def test_escaping_round_trips_every_byte():
    data = bytes(range(256))
    escaped = escape(data)
    for special in b"#$*":
        assert special not in escaped
    assert unescape(escaped) == data
    assert escape(b"}") == b"}]" and escape(b"#") == b"}\x03"
    with pytest.raises(pyvt.Error):
        unescape(b"ab}")


def test_reader_splits_packets_acks_interrupts_and_bad_checksums():
    reader = PacketReader()
    assert reader.feed(b"+$g#67") == [("packet", b"g")]
    assert reader.feed(b"$m10") == []  # incomplete: waits for the rest
    assert reader.feed(b"00,4#") == []
    assert reader.feed(b"8e") == [("packet", b"m1000,4")]
    assert reader.feed(b"\x03") == [("interrupt", None)]
    assert reader.feed(b"$g#00") == [("bad", b"g")]
    assert reader.feed(b"$g#zz-") == [("bad", b"g")]


@pytest.mark.parametrize("junk", [b"\x00" * 100, b"$" * 50, b"#" * 10 + b"$#", b"$\xff\xfe#",
                                  bytes(range(256)) * 4])
def test_reader_never_raises_on_junk(junk):
    reader = PacketReader()
    for kind, _ in reader.feed(junk):
        assert kind in ("packet", "interrupt", "bad")


def test_reader_drops_a_packet_that_never_ends():
    reader = PacketReader()
    events = reader.feed(b"$" + b"a" * (3 * gdbstub.MAX_PACKET))
    assert events and events[0][0] == "bad"
    assert reader.feed(b"$g#67") == [("packet", b"g")]


def test_parse_address():
    assert parse_address("1234") == ("localhost", 1234)
    assert parse_address(":1234") == ("localhost", 1234)
    assert parse_address("0.0.0.0:99") == ("0.0.0.0", 99)
    assert parse_address(5) == ("localhost", 5)
    assert parse_address(("127.0.0.1", 0)) == ("127.0.0.1", 0)
    for bad in ("host:port", "70000", 1.5, None, True):
        with pytest.raises(pyvt.Error):
            parse_address(bad)


def test_target_description_matches_the_register_table():
    root = ET.fromstring(gdbstub.TARGET_XML.split(b"\n", 2)[2])
    assert root.findtext("architecture") == "i386:x86-64"
    regs = root.iter("reg")
    names = [(r.get("name"), int(r.get("bitsize")), int(r.get("regnum"))) for r in regs]
    assert names == [(n, size * 8, i) for i, (n, size, _) in enumerate(gdbstub.REGISTERS)]
    for wanted in ("rip", "eflags", "cs", "fs_base", "gs_base", "cr0", "cr3"):
        assert any(n == wanted for n, _, _ in names)


@needs_guest_debug
def test_int3_breakpoints_where_the_backend_traps_them(monkeypatch, vm):
    """The int3 path, forced: the byte is written, hidden from gdb's reads,
    lifted for a step over it, and put back on removal."""
    monkeypatch.setitem(debugging._probed, vm.backend,
                        debugging.BackendDebugSupport(int3=True, data_breakpoints=True))
    code = pyvt.assemble("mov $1, %eax\nmov $2, %ebx\nhlt\n")
    vm.memory.write(0x1000, code)
    cpu = vm.vcpu(0, mode="long")
    cpu.regs.rip = 0x1000
    point = vm.breakpoints.add(0x1000)
    assert point.via == "int3" and point.slot is None
    assert vm.memory.read(0x1000, 1) == b"\xcc"
    server = gdbstub.GdbServer(vm, ("127.0.0.1", 0))
    assert server._read_memory(b"1000,2") == code[:2].hex().encode()
    server._listener.close()
    exit = cpu.step()  # runs mov $1, %eax, not the int3
    assert isinstance(exit, exits.Debug) and exit.step and cpu.regs.rip == 0x1005
    assert cpu.regs.rax == 1
    assert vm.memory.read(0x1000, 1) == b"\xcc"
    watch = vm.watchpoints.add(0x3000, 8, access="rw")
    assert watch.slot == 0  # a debug register: the backend raises data breakpoints
    vm.breakpoints.remove(0x1000)
    assert vm.memory.read(0x1000, 5) == code[:5]


@needs_guest_debug
def test_bad_breakpoint_and_watchpoint_arguments(vm):
    vm.vcpu(0, mode="long")
    with pytest.raises(pyvt.ArgumentError):
        vm.breakpoints.add(0x1000, kind="soft")
    with pytest.raises(pyvt.ArgumentError):
        vm.breakpoints.add(-1)
    with pytest.raises(pyvt.ArgumentError):
        vm.watchpoints.add(0x3001, 4)  # unaligned
    with pytest.raises(pyvt.ArgumentError):
        vm.watchpoints.add(0x3000, 3)
    with pytest.raises(pyvt.ArgumentError):
        vm.watchpoints.add(0x3000, 4, access="r")
    with pytest.raises(pyvt.ArgumentError, match="no breakpoint at 0x1000"):
        vm.breakpoints.remove(0x1000)


def test_the_software_page_walk_matches_kvm_translate(vm):
    """Backends without KVM_TRANSLATE (pyvt.ko) get pyvt's own walk of the
    long-mode tables: it agrees with KVM's on 2 MiB pages and a 4 KiB page."""
    import struct

    from pyvt import debugging, modes

    cpu = vm.vcpu(0, mode="long")
    # Map guest-virtual 1 << 39 (PML4 slot 1) on to physical 0x7000 through
    # a PDPT, a PD and a PT of 4 KiB pages.
    pdpt, pd, pt = 0x22000, 0x20000, 0x21000
    vm.memory.write(modes.PML4_ADDRESS + 8, struct.pack("<Q", pdpt | 7))
    vm.memory.write(pdpt, struct.pack("<Q", pd | 7))
    vm.memory.write(pd, struct.pack("<Q", pt | 7))
    vm.memory.write(pt + 8 * 3, struct.pack("<Q", 0x7000 | 7))
    cr3 = cpu.sregs.cr3
    expected = {0x1234: 0x1234, 0x3FFF_F123: 0x3FFF_F123, (1 << 39) + 0x3123: 0x7123}
    for virtual, physical in expected.items():
        assert debugging.walk_long_mode_tables(vm.memory, cr3, virtual) == physical
        try:
            assert cpu.translate(virtual) == physical  # KVM agrees
        except pyvt.KvmError as e:
            assert e.errno == errno.ENOTTY  # pyvt.ko has no KVM_TRANSLATE
            assert debugging.linear_to_physical(cpu, virtual) == physical  # the fallback
    with pytest.raises(pyvt.UnmappedAddressError):
        debugging.walk_long_mode_tables(vm.memory, cr3, 5 << 39)
