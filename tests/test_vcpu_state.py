"""State kept by its owners: Vcpu.save_state()/restore_state(), the VM's
KVM clock, irqchip and PIT, and the order a restore puts them back in."""

import contextlib

import pytest
from test_kvm_interrupts import (
    APIC_BASE,
    ENABLE_LAPIC,
    expect_handler_then_done,
    expect_out,
    idt_guest,
    irqchip_vm,
    load_idt_guest,
    mmio_write,
)

import pyvt
from pyvt import exits, snapshot
from pyvt.kvm import ffi, host_cpuid, struct_bytes
from pyvt.snapshot import Snapshot, VcpuImage
from pyvt.vcpu_state import VcpuState

pytestmark = pytest.mark.requires_kvm

MSR_TSC_DEADLINE = 0x6E0
ARMED_PORT = 0x502
LVT_TIMER_TSC_DEADLINE = 2 << 17


@contextlib.contextmanager
def _resumed(vm, snap, how: str, tmp_path):
    """A VM in ``snap``'s state: ``vm`` restored ("restore"), a clone
    ("clone"), or a clone of the snapshot saved and loaded ("file")."""
    if how == "restore":
        vm.restore(snap)
        yield vm
        return
    if how == "file":
        snap.save(tmp_path / "state.snap")
        snap = Snapshot.load(tmp_path / "state.snap")
    with pyvt.Vm.from_snapshot(snap) as clone:
        yield clone


def _tsc_deadline_guest(vector: int, cycles: int) -> bytes:
    """Enables the LAPIC, puts its timer in TSC-deadline mode on ``vector``,
    arms it ``cycles`` TSC cycles ahead (IA32_TSC_DEADLINE), reports on
    ARMED_PORT, then waits with interrupts on; the handler reports on
    HANDLER_PORT."""
    arm = "\n        ".join([
        ENABLE_LAPIC,
        mmio_write(APIC_BASE + 0x320, vector | LVT_TIMER_TSC_DEADLINE),
        "rdtsc", "shl $32, %rdx", "or %rdx, %rax",
        f"movabs ${cycles}, %rcx", "add %rcx, %rax",
        "mov %rax, %rdx", "shr $32, %rdx",
        f"mov ${MSR_TSC_DEADLINE:#x}, %ecx", "wrmsr",
        "mov $0xa1, %al", f"mov ${ARMED_PORT:#x}, %dx", "out %al, %dx",
    ])
    return idt_guest(vector, prologue=arm)


@pytest.mark.requires_cap("IRQCHIP", "TSC_DEADLINE_TIMER", "GET_TSC_KHZ")
@pytest.mark.parametrize("how", ["restore", "clone", "file"])
def test_tsc_deadline_timer_armed_before_a_snapshot_fires_after_restore(kvm, how, tmp_path):
    """Guards the restore order (pyvt.vcpu_state.write): KVM takes
    IA32_TSC_DEADLINE only while the LAPIC timer is in TSC-deadline mode,
    so the LAPIC goes back before the MSRs; the other way round the
    deadline is dropped and the timer never fires (in a clone, or a VM
    loaded from a file, whose LAPIC starts out of that mode)."""
    with irqchip_vm(kvm) as vm:
        with pyvt.Vm("1M", backend=kvm.path) as probe:
            second = probe.vcpu(0).fd.get_tsc_khz() * 1000  # TSC cycles
        cpu = load_idt_guest(vm, _tsc_deadline_guest(0x66, second))
        expect_out(cpu, ARMED_PORT, 0xA1)
        snap = vm.snapshot()
        lvt_timer = int.from_bytes(snap.vcpus[0].lapic[0x320:0x324], "little")
        assert lvt_timer == 0x66 | LVT_TIMER_TSC_DEADLINE
        assert snap.vcpus[0].msrs[MSR_TSC_DEADLINE] != 0  # armed, not fired yet
        expect_handler_then_done(cpu, 0x66)  # the original fires
        assert cpu.get_msrs([MSR_TSC_DEADLINE]) == {MSR_TSC_DEADLINE: 0}  # spent
        with _resumed(vm, snap, how, tmp_path) as target:
            guest = target.vcpus[0]
            assert guest.get_msrs([MSR_TSC_DEADLINE])[MSR_TSC_DEADLINE] != 0  # re-armed
            expect_handler_then_done(guest, 0x66)


# -- the YMM registers, set from the host ----------------------------------------

XSTATE_BV = 512
XCR0_AVX = 0b111  # x87, SSE, AVX


def _avx_offset() -> int:
    return host_cpuid(0xD, 2)[1]  # where the AVX component lives (CPUID 0xD.2 EBX)


@pytest.mark.requires_cap("XSAVE", "XCRS")
@pytest.mark.requires_cpu("avx")
@pytest.mark.parametrize("how", ["restore", "clone", "file"])
def test_ymm_registers_set_from_the_host_survive(how, tmp_path):
    """The host writes ymm0-15's upper halves into the AVX component of the
    XSAVE area (KVM_SET_XSAVE: the guest cannot run AVX at CPL 0 on PVM);
    they survive a snapshot and restore, a clone and a save/load."""
    with pyvt.Vm("16M") as vm:
        vm.memory.write(0x1000, pyvt.assemble(".code64\n out %al, $0xf4\n", at=0x1000))
        cpu = vm.vcpu(0, mode="long")
        cpu.regs.rip = 0x1000
        cpu.sregs.cr4 |= 1 << 18  # OSXSAVE
        xcrs = cpu.fd.get_xcrs()
        xcrs.xcrs[0].value = XCR0_AVX
        cpu.fd.set_xcrs(xcrs)
        pattern = bytes((7 * i + 1) & 0xFF for i in range(16 * 16))
        area = cpu.fd.get_xsave()
        raw = bytearray(struct_bytes(area))
        raw[_avx_offset():_avx_offset() + len(pattern)] = pattern
        raw[XSTATE_BV] |= 0b100  # the AVX component is in use
        cpu.fd.set_xsave(bytes(raw))
        snap = vm.snapshot()
        assert isinstance(cpu.run(timeout=10), exits.DebugExit)  # the guest ran meanwhile
        raw[_avx_offset():_avx_offset() + len(pattern)] = bytes(len(pattern))
        cpu.fd.set_xsave(bytes(raw))  # the host clears them after the snapshot
        with _resumed(vm, snap, how, tmp_path) as target:
            now = struct_bytes(target.vcpus[0].fd.get_xsave())
            assert now[_avx_offset():_avx_offset() + len(pattern)] == pattern


# -- Vcpu.save_state / restore_state ---------------------------------------------


def test_save_state_and_restore_state_on_their_own(vm):
    """The owner's API, without a snapshot: registers, MSRs and the XSAVE
    area go back, and the old name of the state class still imports."""
    assert VcpuImage is VcpuState
    cpu = vm.vcpu(0, mode="long")
    cpu.regs.rbx = 0x1234
    cpu.set_msrs({0x174: 0x10})  # IA32_SYSENTER_CS
    state = cpu.save_state()
    assert isinstance(state, VcpuState) and state.index == 0 and state.mode == "long"
    assert (state.sregs is None) == bool(vm.kvm.check_extension("KVM_CAP_SREGS2"))
    assert state.msrs[0x174] == 0x10
    assert state.nested is None or len(state.nested) >= ffi.sizeof("struct kvm_nested_state")
    cpu.regs.rbx = 0
    cpu.set_msrs({0x174: 0x20})
    cpu.sregs.cr2 = 0xDEAD000
    cpu.restore_state(state)
    assert cpu.regs.rbx == 0x1234
    assert cpu.get_msrs([0x174]) == {0x174: 0x10}
    assert cpu.sregs.cr2 == 0


def test_special_registers_saved_as_the_other_struct_go_back(vm):
    """A state saved with KVM_GET_SREGS goes back on a backend with
    KVM_CAP_SREGS2 (and the other way round): their common part is the same."""
    cpu = vm.vcpu(0, mode="long")
    cpu.sregs.cr2 = 0xABC000
    state = cpu.save_state()
    sregs = struct_bytes(cpu.fd.get_sregs())
    if state.sregs is None:  # saved as sregs2: make it an sregs-only state
        state.sregs, state.sregs2 = sregs, None
    else:
        state.sregs2, state.sregs = sregs[:ffi.offsetof("struct kvm_sregs", "interrupt_bitmap")] \
            + bytes(ffi.sizeof("struct kvm_sregs2")
                    - ffi.offsetof("struct kvm_sregs", "interrupt_bitmap")), None
    cpu.sregs.cr2 = 0
    cpu.restore_state(state)
    assert cpu.sregs.cr2 == 0xABC000
    assert struct_bytes(cpu.fd.get_sregs()) == sregs


def test_state_of_a_running_vcpu_is_refused(vm):
    import threading

    from threadwait import wait_until_running

    vm.memory.write(0x1000, pyvt.assemble(".code16\n spin: jmp spin\n", at=0x1000))
    cpu = vm.vcpu(0)
    cpu.regs.rip = 0x1000
    thread = threading.Thread(target=lambda: cpu.run(timeout=30))
    thread.start()
    try:
        wait_until_running(cpu)
        with pytest.raises(pyvt.Error, match="is running"):
            cpu.save_state()
    finally:
        cpu.stop()
        thread.join()
    state = cpu.save_state()
    cpu.restore_state(state)


# -- the KVM clock ----------------------------------------------------------------


@pytest.mark.requires_cap("ADJUST_CLOCK")
def test_the_kvm_clock_continues_from_the_snapshot(vm):
    """A restore and a clone put the KVM clock back where the snapshot found
    it: guest kvmclock time continues from there, not from the host's now."""
    import time

    cpu = vm.vcpu(0)
    cpu.set_msrs({snapshot.KVMCLOCK_MSRS[0]: 0x5000 | 1})  # the guest enabled kvmclock
    snap = vm.snapshot()
    assert snap.clock is not None
    time.sleep(1)  # the host's clock moves on
    later = vm.save_clock()
    assert later > snap.clock
    with pyvt.Vm.from_snapshot(snap) as clone:
        assert snap.clock <= clone.save_clock() < later
    vm.restore(snap)
    assert snap.clock <= vm.save_clock() < later


@pytest.mark.requires_cap("ADJUST_CLOCK")
def test_a_restore_leaves_the_kvm_clock_alone_where_no_guest_uses_kvmclock(vm):
    """Nothing a guest without kvmclock reads depends on the KVM clock: the
    restore skips KVM_SET_CLOCK and the clock keeps the host's time."""
    import time

    vm.vcpu(0)
    snap = vm.snapshot()
    time.sleep(0.2)
    before = vm.save_clock()
    vm.restore(snap)
    assert vm.save_clock() >= before > snap.clock
