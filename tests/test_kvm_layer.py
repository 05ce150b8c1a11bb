"""pyvt.kvm, the thin layer: one method per ioctl, usable on its own to
write a VMM by hand."""

import errno
import mmap
import os

import pytest

import pyvt
from pyvt import exits
from pyvt.kvm import Kvm, ffi, lib, struct_bytes

pytestmark = pytest.mark.requires_kvm


@pytest.fixture
def kvm():
    return Kvm(pyvt.select_backend())


def test_system_ioctls(kvm):
    assert kvm.api_version() == 12
    assert kvm.check_extension("KVM_CAP_USER_MEMORY") == kvm.check_extension(lib.KVM_CAP_USER_MEMORY) > 0
    assert kvm.check_extension("user_memory") > 0
    with pytest.raises(pyvt.ArgumentError, match="unknown capability"):
        kvm.check_extension("NO_SUCH_CAP")
    assert kvm.vcpu_mmap_size() >= mmap.PAGESIZE
    leaves = {e.function for e in kvm.get_supported_cpuid()}
    assert 0 in leaves and 1 in leaves
    assert 0x10 in kvm.get_msr_index_list()  # IA32_TIME_STAMP_COUNTER
    if kvm.check_extension("KVM_CAP_GET_MSR_FEATURES"):
        features = kvm.get_msr_feature_index_list()
        assert isinstance(kvm.get_msrs(features[:4]), dict)
    assert "KVM_CAP_IRQCHIP" in pyvt.kvm.caps
    kvm.close()
    kvm.close()
    with pytest.raises(pyvt.ClosedError):
        kvm.api_version()


def _real_mode_vm(kvm, code: bytes, flags: int = 0):
    """A VM built by hand from the thin layer: 64 KiB at 0, code at 0x1000."""
    vm = kvm.create_vm()
    memory = mmap.mmap(-1, 0x10000)
    memory[0x1000:0x1000 + len(code)] = code
    address = int(pyvt.kvm.ffi.cast("uintptr_t", pyvt.kvm.ffi.from_buffer(memory)))
    vm.set_user_memory_region(0, 0, len(memory), address, flags)
    vcpu = vm.create_vcpu(0)
    sregs = vcpu.get_sregs()
    sregs.cs.base = 0
    sregs.cs.selector = 0
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip = 0x1000
    regs.rflags = 2
    vcpu.set_regs(regs)
    return vm, vcpu, memory


def test_hand_written_vmm_loop(kvm):
    # mov $0x3f8, %dx; mov $'K', %al; out %al, (%dx); hlt
    vm, vcpu, memory = _real_mode_vm(kvm, bytes([0xBA, 0xF8, 0x03, 0xB0, 0x4B, 0xEE, 0xF4]))
    seen = []
    while True:
        reason = vcpu.run()
        run = vcpu.run_struct
        if reason == lib.KVM_EXIT_IO:
            data = pyvt.kvm.ffi.buffer(pyvt.kvm.ffi.cast("char *", run) + run.io.data_offset, 1)
            seen.append((run.io.port, bytes(data)))
        elif reason == lib.KVM_EXIT_HLT:
            break
        else:
            pytest.fail(f"unexpected exit {reason}")
    assert seen == [(0x3F8, b"K")]
    vcpu.close()
    vm.close()


def test_immediate_exit(kvm):
    vm, vcpu, memory = _real_mode_vm(kvm, b"\xf4")
    vcpu.immediate_exit = True
    with pytest.raises(pyvt.KvmError) as info:
        vcpu.run()
    assert info.value.errno == errno.EINTR and info.value.ioctl == "KVM_RUN"
    vcpu.immediate_exit = False
    assert vcpu.run() == lib.KVM_EXIT_HLT


def test_dirty_log(kvm):
    # movb $1, 0x3000; hlt
    try:
        vm, vcpu, memory = _real_mode_vm(kvm, bytes([0xC6, 0x06, 0x00, 0x30, 0x01, 0xF4]),
                                         flags=lib.KVM_MEM_LOG_DIRTY_PAGES)
    except pyvt.KvmError as e:
        if e.ioctl == "KVM_SET_USER_MEMORY_REGION" and kvm.path.endswith("pyvt"):
            pytest.skip(f"{kvm.path} has no dirty log: {e}")
        raise
    assert vcpu.run() == lib.KVM_EXIT_HLT
    bitmap = int.from_bytes(vm.get_dirty_log(0, 16), "little")
    assert bitmap & (1 << 3), f"page 3 not dirty: {bitmap:#x}"


@pytest.mark.requires_cap("IOEVENTFD")
def test_ioeventfd_signals_without_an_exit(kvm):
    # out %al, $0x70 (with al=5); hlt
    vm, vcpu, memory = _real_mode_vm(kvm, bytes([0xB0, 0x05, 0xE6, 0x70, 0xF4]))
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        vm.register_ioeventfd(efd, 0x70, 1, pio=True)
        assert vcpu.run() == lib.KVM_EXIT_HLT
        assert os.eventfd_read(efd) == 1
        vm.unregister_ioeventfd(efd, 0x70, 1, pio=True)
        with pytest.raises(pyvt.KvmError):  # gone: nothing left to unregister
            vm.unregister_ioeventfd(efd, 0x70, 1, pio=True)
    finally:
        os.close(efd)


@pytest.mark.requires_cap("IOEVENTFD")
def test_ioeventfd_deassign_is_a_deprecated_alias(kvm):
    vm, vcpu, memory = _real_mode_vm(kvm, bytes([0xB0, 0x05, 0xE6, 0x70, 0xF4]))
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        with pytest.warns(DeprecationWarning, match="register_ioeventfd"):
            vm.ioeventfd(efd, 0x70, 1, pio=True)
        with pytest.warns(DeprecationWarning, match="unregister_ioeventfd"):
            vm.ioeventfd(efd, 0x70, 1, pio=True, deassign=True)
        assert vcpu.run() == lib.KVM_EXIT_IO  # unregistered: the write exits again
        assert vcpu.run_struct.io.port == 0x70
        with pytest.raises(BlockingIOError):
            os.eventfd_read(efd)
    finally:
        os.close(efd)


def test_set_msrs_partial_returns_how_many_were_taken(kvm):
    vm, vcpu, memory = _real_mode_vm(kvm, bytes([0xF4]))
    sysenter_cs, bogus = 0x174, 0x4B564D99  # the second: no such MSR
    with pytest.raises(pyvt.KvmError, match=f"{bogus:#x}"):
        vcpu.set_msrs({sysenter_cs: 8, bogus: 1})
    assert vcpu.set_msrs({sysenter_cs: 0x10, bogus: 1, 0x175: 0x2000}, partial=True) == 1
    assert vcpu.get_msrs([sysenter_cs]) == {sysenter_cs: 0x10}  # the one before it went in
    assert vcpu.get_msrs([sysenter_cs, bogus, 0x175], partial=True) == {sysenter_cs: 0x10}
    block = pyvt.kvm.msrs_struct({sysenter_cs: 0x18, 0x175: 0x3000})
    assert vcpu.set_msrs(block, partial=True) == 2  # a prepared block goes in as it is
    assert vcpu.get_msrs([sysenter_cs, 0x175]) == {sysenter_cs: 0x18, 0x175: 0x3000}


def test_irqchip_pit_and_irq_line(kvm):
    vm = kvm.create_vm()
    if not kvm.check_extension("KVM_CAP_IRQCHIP"):
        pytest.skip("no in-kernel irqchip on this backend")
    vm.create_irqchip()
    vm.create_pit2()
    vm.irq_line(4, 1)
    vm.irq_line(4, 0)
    vcpu = vm.create_vcpu(0)
    assert vcpu.get_mp_state() == lib.KVM_MP_STATE_RUNNABLE
    lapic = vcpu.get_lapic()
    assert ffi.typeof(lapic) is ffi.typeof("struct kvm_lapic_state *")
    assert len(struct_bytes(lapic)) == 1024
    vcpu.set_lapic(lapic)
    vcpu.set_lapic(struct_bytes(lapic))  # the bytes a snapshot keeps
    assert struct_bytes(vcpu.get_lapic()) == struct_bytes(lapic)
    chip = vm.get_irqchip(lib.KVM_IRQCHIP_IOAPIC)
    assert chip.chip_id == lib.KVM_IRQCHIP_IOAPIC
    vm.set_irqchip(chip)
    vm.set_irqchip(struct_bytes(chip))
    pit = vm.get_pit2()
    assert ffi.typeof(pit) is ffi.typeof("struct kvm_pit_state2 *")
    vm.set_pit2(pit)
    vm.set_pit2(struct_bytes(pit))


@pytest.mark.requires_cap("SET_GUEST_DEBUG")
def test_guest_debug_single_step():
    with pyvt.Vm("1M") as vm:
        # nop; nop; hlt
        vm.memory.write(0x1000, b"\x90\x90\xf4")
        cpu = vm.vcpu(0, mode="real")
        cpu.regs.rip = 0x1000
        cpu.fd.set_guest_debug(lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_SINGLESTEP)
        steps = [cpu.run(timeout=5) for _ in range(2)]
        assert all(isinstance(s, exits.Debug) for s in steps), steps
        assert [s.pc for s in steps] == [0x1001, 0x1002]
        cpu.fd.set_guest_debug(0)
        assert isinstance(cpu.run(timeout=5), exits.Hlt)


@pytest.mark.requires_cap("VCPU_EVENTS", "DEBUGREGS")
def test_vcpu_state_blocks(vm):
    cpu = vm.vcpu(0, mode="long")
    ffi = pyvt.kvm.ffi
    events = cpu.fd.get_vcpu_events()
    cpu.fd.set_vcpu_events(events)
    assert bytes(ffi.buffer(cpu.fd.get_vcpu_events())) == bytes(ffi.buffer(events))
    debugregs = cpu.fd.get_debugregs()
    debugregs.db[0] = 0x1234
    cpu.fd.set_debugregs(debugregs)
    assert cpu.fd.get_debugregs().db[0] == 0x1234
    if vm.kvm.check_extension("KVM_CAP_XCRS"):
        xcrs = cpu.fd.get_xcrs()
        assert xcrs.nr_xcrs >= 1 and xcrs.xcrs[0].value & 1  # XCR0: x87 is always on
        cpu.fd.set_xcrs(xcrs)
        assert cpu.fd.get_xcrs().xcrs[0].value == xcrs.xcrs[0].value


def test_pyvt_module_extras(kvm):
    """PYVT_GET_HW_CAPS / PYVT_MEASURE_ROUNDTRIP: real figures on /dev/pyvt
    (the kernel-module harness runs this suite there), a clear refusal on
    any other device."""
    if not kvm.path.endswith("pyvt"):
        with pytest.raises(pyvt.KvmError, match="only /dev/pyvt"):
            kvm.get_hw_caps()
        with pytest.raises(pyvt.KvmError, match="only /dev/pyvt"):
            kvm.measure_roundtrip(10)
        return
    caps = kvm.get_hw_caps()
    assert caps["abi_version"] == lib.PYVT_ABI_VERSION
    assert caps["nr_cpus"] == len(caps["cpus"]) >= 1
    cpu0 = caps["cpus"][0]
    if caps["vendor"] == lib.PYVT_VENDOR_AMD:
        assert cpu0["ext_ecx"] & (1 << 2), "SVM bit missing on an AMD-V host"
        assert cpu0["svm_ebx"] > 0, "no ASIDs"
    trip = kvm.measure_roundtrip(100)
    assert 0 < trip["min_cycles"] <= trip["median_cycles"] <= trip["max_cycles"]
    with pytest.raises(pyvt.ArgumentError):
        kvm.measure_roundtrip(0)
