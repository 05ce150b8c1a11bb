"""Snapshots: restore in place, copy-on-write clones, files."""

import threading

import pytest
from threadwait import wait_until_running

import pyvt
from pyvt import exits
from pyvt.kvm import struct_bytes
from pyvt.snapshot import Snapshot, SnapshotError

pytestmark = pytest.mark.requires_kvm

# MSRs that move with time on their own: compared apart.
TIME_MSRS = {0x10, 0x6E0, 0x3B}  # TSC, TSC_DEADLINE, TSC_ADJUST


@pytest.fixture
def counter(vm, load):
    cpu = load("count", "long")
    assert isinstance(cpu.run(timeout=5), exits.Hlt)
    return vm, cpu


def _state(vm):
    """Every register block and all memory, as bytes, via a second snapshot."""
    snap = vm.snapshot()
    try:
        memory = [r.read() for r in snap.regions]
        vcpus = [(v.regs, v.sregs, v.fpu, v.xcrs, v.debugregs, v.mp_state, v.events,
                  {k: val for k, val in v.msrs.items() if k not in TIME_MSRS})
                 for v in snap.vcpus]
        return memory, vcpus, snap.devices
    finally:
        snap.close()


def test_restore_is_byte_identical(counter):
    vm, cpu = counter
    before = _state(vm)
    snap = vm.snapshot()
    for _ in range(5):
        cpu.run(timeout=5)
    cpu.fpu.xmm = bytes(range(256))
    cpu.set_msrs({0xC0000103: 99})  # TSC_AUX
    vm.memory.write(0x700000, b"host wrote this")
    vm.restore(snap)
    assert _state(vm) == before


def test_guest_resumes_from_the_snapshot_values(counter):
    vm, cpu = counter
    snap = vm.snapshot()
    for _ in range(3):
        cpu.run(timeout=5)
    assert (vm.memory.read_int(0x5000), cpu.regs.rbx) == (4, 4)
    assert vm.debugcon.output == b"BCDE"
    vm.restore(snap)
    assert (vm.memory.read_int(0x5000), cpu.regs.rbx) == (1, 1)
    assert vm.debugcon.output == b"B"
    assert isinstance(cpu.run(timeout=5), exits.Hlt)
    assert (vm.memory.read_int(0x5000), cpu.regs.rbx) == (2, 2)
    assert vm.debugcon.output == b"BC"
    vm.restore(snap)  # a snapshot can be restored again and again
    assert vm.memory.read_int(0x5000) == 1


def test_clones_are_independent(counter):
    vm, cpu = counter
    snap = vm.snapshot()
    clones = [pyvt.Vm.from_snapshot(snap) for _ in range(3)]
    try:
        for n, clone in enumerate(clones):
            for _ in range(n + 1):
                assert isinstance(clone.vcpus[0].run(timeout=5), exits.Hlt)
        assert [c.memory.read_int(0x5000) for c in clones] == [2, 3, 4]
        assert [c.vcpus[0].regs.rbx for c in clones] == [2, 3, 4]
        assert vm.memory.read_int(0x5000) == 1  # the original is untouched
        clones[0].memory.write(0x5000, b"\xff")
        assert clones[1].memory.read(0x5000, 1) == b"\x03"
        # A clone restores to the snapshot too.
        clones[2].restore(snap)
        assert clones[2].memory.read_int(0x5000) == 1
    finally:
        for clone in clones:
            clone.close()


def test_clones_run_in_parallel_threads(counter):
    vm, cpu = counter
    snap = vm.snapshot()
    clones = [pyvt.Vm.from_snapshot(snap) for _ in range(2)]
    results = []
    threads = [threading.Thread(target=lambda c=c: results.append(c.vcpus[0].run(timeout=10)))
               for c in clones]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(isinstance(r, exits.Hlt) for r in results)
    assert [c.memory.read_int(0x5000) for c in clones] == [2, 2]
    for clone in clones:
        clone.close()


def test_smp_snapshot_restores_every_vcpu(vm, guest):
    vm.memory.write(0x1000, guest("counter"))
    cpus = [vm.vcpu(i, mode="long") for i in range(2)]
    for i, cpu in enumerate(cpus):
        cpu.regs.rip = 0x1000
        cpu.regs.rdi = i
        cpu.regs.rsi = 10 + i
    snap = vm.snapshot()
    for cpu in cpus:
        assert isinstance(cpu.run(timeout=10), exits.Hlt)
    vm.restore(snap)
    assert [(c.regs.rip, c.regs.rdi, c.regs.rsi) for c in cpus] == [(0x1000, 0, 10), (0x1000, 1, 11)]
    assert vm.memory.read_int(0x5000) == vm.memory.read_int(0x5008) == 0
    clone = pyvt.Vm.from_snapshot(snap)
    try:
        assert sorted(clone.vcpus) == [0, 1]
        assert clone.vcpus[1].regs.rdi == 1
        assert isinstance(clone.vcpus[1].run(timeout=10), exits.Hlt)
        assert clone.memory.read_int(0x5008) == 1007
    finally:
        clone.close()


@pytest.mark.parametrize("guest_name,cs_after", [("enter_protected", 0x08), ("enter_long", 0x18)])
def test_restore_undoes_a_mode_change(vm, load, guest_name, cs_after):
    """The guest switches itself from real mode to protected or long mode;
    restore puts it back in real mode at its first instruction."""
    cpu = load(guest_name, "real")
    snap = vm.snapshot()
    assert isinstance(cpu.run(timeout=5), exits.Hlt)
    assert cpu.sregs.cr0 & 1 and cpu.sregs.cs.selector == cs_after
    if guest_name == "enter_long":
        assert cpu.sregs.efer & 0x400 and cpu.sregs.cs.l  # LMA, 64-bit code
    vm.restore(snap)
    assert not cpu.sregs.cr0 & 1 and cpu.sregs.cs.selector == 0
    assert not cpu.sregs.efer & 0x400
    assert cpu.regs.rip == 0x1000
    assert isinstance(cpu.run(timeout=5), exits.Hlt)
    assert cpu.regs.rax & 0xFFFF == 0x600D


def test_uart_state_round_trips(vm, load):
    vm.console.feed(b"pi")
    cpu = load("echo", "real")
    assert isinstance(cpu.run(timeout=0.2), exits.Timeout)  # echoed "pi", waits
    snap = vm.snapshot()
    vm.console.feed(b"ng\n")
    assert isinstance(cpu.run(timeout=5), exits.Hlt)
    assert vm.console.output == b"ping\n"
    vm.restore(snap)
    assert vm.console.output == b"pi"
    vm.console.feed(b"e\n")
    assert isinstance(cpu.run(timeout=5), exits.Hlt)
    assert vm.console.output == b"pie\n"


def test_save_and_load(counter, tmp_path):
    vm, cpu = counter
    path = tmp_path / "counter.snap"
    vm.snapshot().save(str(path))
    snap = Snapshot.load(str(path))
    clone = pyvt.Vm.from_snapshot(snap)
    try:
        assert clone.memory.read_int(0x5000) == 1 and clone.debugcon.output == b"B"
        assert isinstance(clone.vcpus[0].run(timeout=5), exits.Hlt)
        assert clone.memory.read_int(0x5000) == 2
    finally:
        clone.close()


def test_bad_files_are_refused_whole(counter, tmp_path):
    vm, cpu = counter
    path = tmp_path / "good.snap"
    vm.snapshot().save(str(path))
    data = path.read_bytes()

    def load(raw, match):
        bad = tmp_path / "bad.snap"
        bad.write_bytes(raw)
        with pytest.raises(SnapshotError, match=match):
            Snapshot.load(str(bad))

    load(data[:len(data) // 2], "corrupted or truncated")
    load(data[:20], "truncated")
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0x40
    load(bytes(flipped), "corrupted or truncated")
    load(b"NOTASNAP" + data[8:], "not a pyvt snapshot")
    newer = bytearray(data)
    newer[8] = 99  # format version
    load(bytes(newer), "format 99")


def test_cpuid_the_host_lacks_is_refused(counter, tmp_path):
    vm, cpu = counter
    snap = vm.snapshot()
    table = bytearray(snap.vcpus[0].cpuid)
    view = pyvt.kvm.ffi.from_buffer("struct kvm_cpuid2 *", table)
    for i in range(view.nent):
        if view.entries[i].function == 7 and view.entries[i].index == 0:
            view.entries[i].ebx |= 0xFFFFFFFF  # claims every leaf-7 feature
    snap.vcpus[0].cpuid = bytes(table)
    path = tmp_path / "alien.snap"
    snap.save(str(path))
    with pytest.raises(SnapshotError, match="lacks CPUID features"):
        Snapshot.load(str(path))


def test_misuse_is_refused(counter, guest):
    vm, cpu = counter
    snap = vm.snapshot()
    with pyvt.Vm("32M") as other:
        with pytest.raises(SnapshotError, match="memory"):
            other.restore(snap)
    vm.memory.write(0x2000, guest("spin"))
    cpu.regs.rip = 0x2000
    thread = threading.Thread(target=cpu.run, kwargs={"timeout": 60})
    thread.start()
    wait_until_running(cpu)
    with pytest.raises(SnapshotError, match="running"):
        vm.restore(snap)
    cpu.stop()
    thread.join()
    snap.close()
    with pytest.raises(SnapshotError, match="closed"):
        vm.restore(snap)


def test_reset_between_calls(vm, guest):
    """The worked example: a guest function called many times with
    different inputs, the VM reset to a clean snapshot between calls."""
    vm.memory.write(0x1000, guest("function"))
    cpu = vm.vcpu(0, mode="long")
    cpu.regs.rip = 0x1000
    clean = vm.snapshot()
    for n in range(200):
        vm.memory.write(0x6000, n.to_bytes(8, "little"))
        exit = cpu.run(timeout=5)
        if n == 0x42:  # the planted bug: a triple fault, and restore recovers
            assert isinstance(exit, exits.Shutdown), exit
        else:
            assert isinstance(exit, exits.Hlt), exit
        assert vm.memory.read_int(0x6008) == n * n + 7
        vm.restore(clean)
        assert vm.memory.read_int(0x6008) == 0 and cpu.regs.rip == 0x1000


def test_fuzz_loop_on_snapshots(guest):
    """A tiny coverage-free fuzz loop: random inputs, each run from the same
    snapshot; it finds the planted bug (inputs whose low byte is 0x42)."""
    import random

    rng = random.Random(7)
    with pyvt.Vm("16M") as vm:
        vm.memory.write(0x1000, guest("function"))
        cpu = vm.vcpu(0, mode="long")
        cpu.regs.rip = 0x1000
        clean = vm.snapshot()
        crashes = []
        for _ in range(600):
            n = rng.randrange(1 << 16)
            vm.memory.write(0x6000, n.to_bytes(8, "little"))
            if cpu.run(timeout=1).failed:
                crashes.append(n)
            vm.restore(clean)
        assert crashes and all(n & 0xFF == 0x42 for n in crashes), crashes


@pytest.mark.requires_cap("IRQCHIP", "PIT2")
def test_irqchip_pit_and_lapic_round_trip(guest):
    with pyvt.Vm("16M") as vm:
        vm.fd.create_irqchip()
        vm.fd.create_pit2()
        vm.memory.write(0x1000, guest("debug_exit"))
        cpus = [vm.vcpu(i, mode="long") for i in range(2)]
        cpus[0].regs.rip = 0x1000
        snap = vm.snapshot()
        assert snap.irqchip is not None and len(snap.irqchip) == 3 and snap.pit is not None
        assert all(v.lapic is not None for v in snap.vcpus)
        exit = cpus[0].run(timeout=5)
        assert isinstance(exit, exits.DebugExit) and exit.code == 0x2A
        vm.restore(snap)
        assert cpus[0].regs.rip == 0x1000
        assert struct_bytes(cpus[1].fd.get_lapic()) == snap.vcpus[1].lapic
        clone = pyvt.Vm.from_snapshot(snap)
        try:
            assert clone.fd.has_irqchip and clone.fd.has_pit
            assert isinstance(clone.vcpus[0].run(timeout=5), exits.DebugExit)
        finally:
            clone.close()


def test_pc_device_state_round_trips(tmp_path):
    """fw_cfg (a file and the guest's read position) and the CMOS RAM come
    back with a restore, in a clone and through a file."""
    with pyvt.Vm("16M") as vm:
        vm.fw_cfg.add_file("opt/pyvt/test", b"0123456789")
        key = vm.fw_cfg.files()["opt/pyvt/test"]
        # The guest selects the file and reads 3 of its bytes.
        vm.memory.write(0x1000, pyvt.assemble("""
            .code64
            .globl _start
        _start:
            mov 0x5000, %ax
            mov $0x510, %dx
            out %ax, %dx
            mov $0x511, %dx
            in %dx, %al
            in %dx, %al
            in %dx, %al
            hlt
        """))
        vm.memory.write_int(0x5000, key, 2)
        cpu = vm.vcpu(0, mode="long")
        cpu.regs.rip = 0x1000
        assert isinstance(cpu.run(timeout=5), exits.Hlt)
        assert cpu.regs.rax & 0xFF == ord("2")
        snap = vm.snapshot()
        vm.fw_cfg._native.set_position(0, 0)
        vm.fw_cfg.add_file("opt/pyvt/test", b"changed")
        vm.restore(snap)
        assert vm.fw_cfg._native.position() == (key, 3)
        assert vm.fw_cfg.get(key) == b"0123456789"
        path = tmp_path / "pc.snap"
        snap.save(str(path))
        for source in (snap, Snapshot.load(str(path))):
            clone = pyvt.Vm.from_snapshot(source)
            try:
                assert clone.fw_cfg.get(key) == b"0123456789"
                assert clone.fw_cfg._native.position() == (key, 3)
                assert clone.cmos._native.save_state() == vm.cmos._native.save_state()
            finally:
                clone.close()


def test_restore_without_a_dirty_log(counter, monkeypatch):
    """Backends without KVM_MEM_LOG_DIRTY_PAGES (pyvt.ko): restore compares
    pages instead, with the same result."""
    vm, cpu = counter
    real = vm.fd.set_user_memory_region

    def refuse_dirty_log(slot, gpa, size, address, flags=0):
        if flags & pyvt.kvm.lib.KVM_MEM_LOG_DIRTY_PAGES:
            raise pyvt.KvmError("KVM_SET_USER_MEMORY_REGION", 22)
        return real(slot, gpa, size, address, flags)

    monkeypatch.setattr(vm.fd, "set_user_memory_region", refuse_dirty_log)
    snap = vm.snapshot()
    assert all(r.dirty_log_refused for r in vm.memory.regions)
    for _ in range(3):
        cpu.run(timeout=5)
    vm.restore(snap)
    assert (vm.memory.read_int(0x5000), cpu.regs.rbx) == (1, 1)
    assert isinstance(cpu.run(timeout=5), exits.Hlt)
    assert vm.memory.read_int(0x5000) == 2
    later = vm.snapshot()  # an older snapshot after a later one, host writes too
    cpu.run(timeout=5)
    vm.memory.write_int(0x700000, 77)
    vm.restore(snap)
    assert (vm.memory.read_int(0x5000), vm.memory.read_int(0x700000)) == (1, 0)
    vm.restore(later)
    assert vm.memory.read_int(0x5000) == 2
