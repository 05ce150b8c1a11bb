"""The native PC devices (csrc/fw_cfg.c, cmos.c, pm_timer.c, i8042.c,
port80.c), driven by a guest (tests/guests/port_script.S) through their
ports exactly as a kernel would: the host writes the script, the guest runs
it, and the test checks what the guest read."""

import calendar
import struct
import time

import pytest

import pyvt
from pyvt import exits, pc

pytestmark = pytest.mark.requires_kvm

SCRIPT, OUTPUT = 0x3000, 0x8000
END, OUTB, OUTW, OUTL, INB, INW, INL, INSB, SPIN = range(9)


def run_script(vm, guest, steps, timeout=10):
    """Runs ``steps`` [(op, port, value)] in the guest; returns the exit."""
    script = b"".join(struct.pack("<BxHI", op, port, value) for op, port, value in steps)
    vm.memory.write(SCRIPT, script + struct.pack("<BxHI", END, 0, 0))
    vm.memory.write(0x1000, guest("port_script"))
    cpu = vm.vcpus.get(0) or vm.vcpu(0, mode="long")
    cpu.regs.rip = 0x1000
    return cpu.run(timeout=timeout)


def reads(vm, count):
    return list(struct.unpack(f"<{count}I", vm.memory.read(OUTPUT, 4 * count)))


def fw_cfg_read(key, length):
    return [(OUTW, pc.FW_CFG_PORT, key), (INSB, pc.FW_CFG_PORT + 1, length)]


# -- fw_cfg ----------------------------------------------------------------

def test_fw_cfg_signature_ram_size_and_cpu_count(guest):
    with pyvt.Vm("32M") as vm:
        vm.fw_cfg.cpu_count = 3
        exit = run_script(vm, guest, fw_cfg_read(0x00, 4) + fw_cfg_read(0x01, 4)
                          + fw_cfg_read(0x03, 8) + fw_cfg_read(0x05, 2)
                          + fw_cfg_read(0x0F, 2))
        assert isinstance(exit, exits.Hlt), exit
        raw = vm.memory.read(OUTPUT, 20)
        assert raw[:4] == b"QEMU"
        assert struct.unpack("<I", raw[4:8]) == (1,)  # traditional interface, no DMA
        assert struct.unpack("<Q", raw[8:16]) == (32 << 20,)
        assert struct.unpack("<HH", raw[16:20]) == (3, 3)


def test_fw_cfg_files_are_found_through_the_directory(guest):
    with pyvt.Vm("16M") as vm:
        key_b = vm.fw_cfg.add_file("opt/pyvt/b", b"second file")
        key_a = vm.fw_cfg.add_file("opt/pyvt/a", "first")
        assert vm.fw_cfg.files() == {"opt/pyvt/a": key_a, "opt/pyvt/b": key_b}
        exit = run_script(vm, guest, fw_cfg_read(0x19, 4 + 2 * 64))
        assert isinstance(exit, exits.Hlt), exit
        raw = vm.memory.read(OUTPUT, 4 + 2 * 64)
        assert struct.unpack(">I", raw[:4]) == (2,)
        entries = [struct.unpack(">IHH56s", raw[4 + i * 64: 4 + (i + 1) * 64]) for i in range(2)]
        # Sorted by name, big-endian size and key, as QEMU lays it out.
        assert [(e[0], e[1], e[3].rstrip(b"\0")) for e in entries] == [
            (5, key_a, b"opt/pyvt/a"), (11, key_b, b"opt/pyvt/b")]
        # The guest reads the file by its key; past the end reads zeros.
        exit = run_script(vm, guest, fw_cfg_read(key_b, 13))
        assert vm.memory.read(OUTPUT, 13) == b"second file\0\0"
        # Replacing a file keeps its key and updates the size.
        assert vm.fw_cfg.add_file("opt/pyvt/b", b"x" * 100) == key_b
        assert vm.fw_cfg.get(key_b) == b"x" * 100


def test_fw_cfg_rejects_bad_keys_and_names(vm):
    with pytest.raises(pyvt.ArgumentError, match="file directory"):
        vm.fw_cfg.set(0x19, b"x")
    with pytest.raises(pyvt.ArgumentError, match="add_file"):
        vm.fw_cfg.set(0x20, b"x")
    with pytest.raises(pyvt.ArgumentError, match="1-55 bytes"):
        vm.fw_cfg.add_file("x" * 56, b"")
    with pytest.raises(pyvt.ArgumentError):
        vm.fw_cfg.add_file("", b"")
    with pytest.raises(pyvt.ArgumentError, match="bytes or str"):
        vm.fw_cfg.add_file("opt/x", 5)
    with pytest.raises(pyvt.ArgumentError):
        vm.fw_cfg.cpu_count = 0
    vm.fw_cfg.set(0x0E, b"\1")
    assert vm.fw_cfg.get(0x0E) == b"\1"
    assert vm.fw_cfg.get(0x300) is None


# -- CMOS / RTC --------------------------------------------------------------

def bcd(value):
    return (value >> 4) * 10 + (value & 0xF)


def test_cmos_clock_and_memory_size(guest):
    with pyvt.Vm("48M") as vm:
        indices = [0x00, 0x02, 0x04, 0x07, 0x08, 0x09, 0x32, 0x0B, 0x0D,
                   0x15, 0x16, 0x17, 0x18, 0x30, 0x31, 0x34, 0x35]
        before = time.time()
        exit = run_script(vm, guest, [step for i in indices
                                      for step in ((OUTB, 0x70, i), (INB, 0x71, 0))])
        after = time.time()
        assert isinstance(exit, exits.Hlt), exit
        got = dict(zip(indices, reads(vm, len(indices)), strict=True))
        assert got[0x0B] & 0x06 == 0x02  # BCD, 24-hour
        assert got[0x0D] == 0x80  # valid RAM and time
        seen = calendar.timegm((bcd(got[0x32]) * 100 + bcd(got[0x09]), bcd(got[0x08]),
                                bcd(got[0x07]), bcd(got[0x04]), bcd(got[0x02]),
                                bcd(got[0x00])))
        assert int(before) - 1 <= seen <= after + 1
        assert got[0x15] | got[0x16] << 8 == 640
        assert got[0x17] | got[0x18] << 8 == (48 - 1) * 1024  # KiB above 1M
        assert got[0x30] | got[0x31] << 8 == (48 - 1) * 1024
        assert got[0x34] | got[0x35] << 8 == (48 - 16) * 16  # 64 KiB blocks above 16M
    with pyvt.Vm("128M") as vm:  # more than 64 MiB: the 16-bit KiB count saturates
        assert vm.cmos[0x17] | vm.cmos[0x18] << 8 == 0xFFFF
        assert vm.cmos[0x34] | vm.cmos[0x35] << 8 == (128 - 16) * 16


def test_cmos_clock_can_be_set_and_ram_keeps_bytes(guest):
    with pyvt.Vm("16M") as vm:
        exit = run_script(vm, guest, [
            (OUTB, 0x70, 0x0B), (OUTB, 0x71, 0x06),   # binary, 24-hour
            (OUTB, 0x70, 0x09), (OUTB, 0x71, 99),     # year 99
            (OUTB, 0x70, 0x09), (INB, 0x71, 0),
            (OUTB, 0x70, 0x40), (OUTB, 0x71, 0x5A),   # plain CMOS RAM
            (OUTB, 0x70, 0xC0), (INB, 0x71, 0),       # NMI-mask bit ignored
        ])
        assert isinstance(exit, exits.Hlt), exit
        assert reads(vm, 2) == [99, 0x5A]
        assert vm.cmos[0x40] == 0x5A
        with pytest.raises(pyvt.ArgumentError):
            vm.cmos[0x80]


# -- ACPI PM timer -----------------------------------------------------------

def test_pm_timer_counts_at_3_579545_mhz(guest):
    with pyvt.Vm("16M") as vm:
        start = time.monotonic()
        exit = run_script(vm, guest, [(INL, pc.PM_TIMER_PORT, 0), (SPIN, 0, 20000),
                                      (INL, pc.PM_TIMER_PORT, 0), (INW, pc.PM_TIMER_PORT, 0)])
        elapsed = time.monotonic() - start
        assert isinstance(exit, exits.Hlt), exit
        first, second, low = reads(vm, 3)
        ticks = (second - first) & 0xFFFFFFFF
        assert 0 < ticks <= elapsed * pc.PM_TIMER_HZ + 1
        assert low != 0 or second != 0  # a 16-bit read sees the low half
        assert vm.pm_timer.value >= second


# -- i8042 and port 0x80 -----------------------------------------------------

def test_i8042_self_test_and_command_byte(guest):
    with pyvt.Vm("16M") as vm:
        exit = run_script(vm, guest, [
            (INB, 0x64, 0),
            (OUTB, 0x64, 0xAA), (INB, 0x64, 0), (INB, 0x60, 0), (INB, 0x64, 0),
            (OUTB, 0x64, 0x60), (OUTB, 0x60, 0x45),
            (OUTB, 0x64, 0x20), (INB, 0x60, 0),
        ])
        assert isinstance(exit, exits.Hlt), exit
        status, full, answer, empty, command_byte = reads(vm, 5)
        assert status & 0x01 == 0 and status & 0x04
        assert full & 0x01 and answer == 0x55 and empty & 0x01 == 0
        assert command_byte == 0x45


def test_i8042_reset_stops_the_run(guest):
    with pyvt.Vm("16M") as vm:
        exit = run_script(vm, guest, [(OUTB, 0x64, 0xFE), (OUTB, 0xE9, ord("!"))])
        assert isinstance(exit, exits.Reset), exit
        assert (exit.source, exit.port) == ("i8042", 0x64)
        assert vm.debugcon.output == b""
    with pyvt.Vm("16M") as vm:  # the output port's reset line, as Linux may use
        exit = run_script(vm, guest, [(OUTB, 0x64, 0xD1), (OUTB, 0x60, 0xFE)])
        assert isinstance(exit, exits.Reset), exit


def test_port_80_absorbs_post_codes(guest):
    with pyvt.Vm("16M") as vm:
        exit = run_script(vm, guest, [(OUTB, 0x80, 0x12), (OUTB, 0x80, 0x34),
                                      (INB, 0x80, 0)])
        assert isinstance(exit, exits.Hlt), exit
        assert reads(vm, 1) == [0x34]
        assert (vm.post.last, vm.post.writes) == (0x34, 2)


def test_pc_devices_can_be_swapped_for_python_handlers(guest):
    with pyvt.Vm("16M") as vm:
        with pytest.raises(pyvt.RegionOverlapError, match="pm_timer"):
            vm.on_io(pc.PM_TIMER_PORT, lambda e: 0)
        vm.pm_timer.detach()
        vm.i8042.detach()
        assert not vm.i8042.attached
        vm.on_io((pc.PM_TIMER_PORT, 4), lambda e: 0x1234)
        vm.on_io(0x64, lambda e: 0x77)
        exit = run_script(vm, guest, [(INL, pc.PM_TIMER_PORT, 0), (INB, 0x64, 0)])
        assert isinstance(exit, exits.Hlt), exit
        assert reads(vm, 2) == [0x1234, 0x77]


def test_vm_without_pc_devices():
    with pyvt.Vm("16M", pc_devices=False) as vm:
        assert vm.fw_cfg is None and vm.cmos is None and vm.i8042 is None
        vm.on_io(0x70, lambda e: 0)  # the port is free


def test_device_state_moves_to_another_vm(guest):
    with pyvt.Vm("16M") as vm:
        vm.fw_cfg.add_file("opt/pyvt/a", b"0123456789")
        key = vm.fw_cfg.files()["opt/pyvt/a"]
        vm.fw_cfg.set(0x0E, b"\x01")
        exit = run_script(vm, guest, [
            (OUTW, pc.FW_CFG_PORT, key), (INSB, pc.FW_CFG_PORT + 1, 4),  # read 4 of 10
            (OUTB, 0x70, 0x0B), (OUTB, 0x71, 0x06), (OUTB, 0x70, 0x09), (OUTB, 0x71, 42),
            (OUTB, 0x70, 0x41), (OUTB, 0x71, 0x77), (OUTB, 0x70, 0x09),  # index left at 9
            (OUTB, 0x64, 0x60), (OUTB, 0x60, 0x45), (OUTB, 0x64, 0xAA),  # 0x55 waiting
            (OUTB, 0x80, 0x99),
        ])
        assert isinstance(exit, exits.Hlt), exit
        state = pc.save_state(vm)
    with pyvt.Vm("16M") as clone:
        pc.load_state(clone, state)
        assert clone.fw_cfg.files() == {"opt/pyvt/a": key}
        assert clone.fw_cfg.get(0x0E) == b"\x01"
        exit = run_script(clone, guest, [
            (INSB, pc.FW_CFG_PORT + 1, 6),                     # the rest of the file
            (INB, 0x71, 0), (OUTB, 0x70, 0x41), (INB, 0x71, 0),  # year, RAM byte
            (INB, 0x64, 0), (INB, 0x60, 0),                    # output full: 0x55
            (OUTB, 0x64, 0x20), (INB, 0x60, 0),                # command byte
            (INB, 0x80, 0),
        ])
        assert isinstance(exit, exits.Hlt), exit
        assert clone.memory.read(OUTPUT, 6) == b"456789"
        year, ram, status, answer, command_byte, post = struct.unpack(
            "<6I", clone.memory.read(OUTPUT + 6, 24))  # rep insb left rdi at +6
        assert (year, ram) == (42, 0x77)
        assert status & 1 and answer == 0x55 and command_byte == 0x45
        assert post == 0x99 and clone.post.writes == 1
    with pyvt.Vm("16M", pc_devices=False) as bare:
        with pytest.raises(pyvt.ArgumentError, match="pc_devices=False"):
            pc.load_state(bare, state)
    with pyvt.Vm("16M") as other:
        other.fw_cfg.add_file("opt/other", b"x")
        with pytest.raises(pyvt.ArgumentError, match="no files of its own"):
            pc.load_state(other, state)
        with pytest.raises(pyvt.ArgumentError):
            pc.load_state(other, {"cmos": b""})
