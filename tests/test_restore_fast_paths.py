"""The restore paths that write less (pyvt.Vcpu.restore_state): a vCPU
that holds a state already gets back only what can have changed, and
``user_mode_only`` restores what CPL-3 code can change.  Each test checks
the state the vCPU reads back after the short path, field by field."""

import pytest

import pyvt
from pyvt import exits

pytestmark = pytest.mark.requires_kvm

CODE = 0x1000
KERNEL_GS_BASE = 0xC0000102  # an MSR every backend saves
# MSRs that move with time on their own (as in test_snapshot.py).
TIME_MSRS = {0x10, 0x6E0, 0x3B}

# Changes what CPL-3 code can change: general registers, RFLAGS, SSE
# registers, then leaves through the UART scratch port.
USER_CODE = """
    mov $0x1234, %rax; mov $0x5678, %rbx
    movq %rax, %xmm0; movq %rbx, %xmm7; addps %xmm0, %xmm7
    stc
    mov $0x3ff, %dx
    out %al, %dx
    hlt
"""


def _state_fields(state):
    return {"regs": state.regs, "sregs": state.sregs, "sregs2": state.sregs2,
            "fpu": state.fpu, "xsave": state.xsave, "xcrs": state.xcrs,
            "events": state.events, "debugregs": state.debugregs,
            "mp_state": state.mp_state, "lapic": state.lapic,
            "msrs": {k: v for k, v in state.msrs.items() if k not in TIME_MSRS}}


def _ring3_vm():
    vm = pyvt.Vm("16M")
    vm.memory.write(CODE, pyvt.assemble(USER_CODE, at=CODE, bits=64))
    cpu = vm.vcpu(0, mode="long", ring=3)
    cpu.regs.rip = CODE
    return vm, cpu


def test_user_mode_restore_puts_back_what_ring3_code_changed():
    vm, cpu = _ring3_vm()
    with vm:
        cpu.track_user_mode_state()
        snap = vm.snapshot()
        expected = _state_fields(snap.vcpus[0])
        for _ in range(3):
            assert isinstance(cpu.run(timeout=30), exits.Hlt)
            assert cpu.regs.rax == 0x1234 and cpu.regs.rflags & 1
            assert _state_fields(cpu.save_state()) != expected
            vm.restore(snap, user_mode_only=True)
            assert cpu.regs.rip == CODE
            assert _state_fields(cpu.save_state()) == expected
        snap.close()


def test_user_mode_restore_without_tracking_writes_the_segment_registers_and_events():
    vm, cpu = _ring3_vm()
    with vm:
        snap = vm.snapshot()
        expected = _state_fields(snap.vcpus[0])
        cpu.run(timeout=30)
        vm.restore(snap, user_mode_only=True)
        assert _state_fields(cpu.save_state()) == expected
        snap.close()


def test_a_state_the_vcpu_does_not_hold_is_restored_in_full_even_with_the_promise(vm):
    vm.memory.write(CODE, pyvt.assemble("mov $0x30, %ecx; out %al, $0x10; hlt", at=CODE,
                                        bits=64))
    cpu = vm.vcpu(0, mode="long")
    cpu.regs.rip = CODE
    snap = vm.snapshot()
    cpu.set_msrs({KERNEL_GS_BASE: 0x42000})  # a write the promise does not cover
    vm.restore(snap, user_mode_only=True)
    assert cpu.get_msrs([KERNEL_GS_BASE]) == {KERNEL_GS_BASE: snap.vcpus[0].msrs[KERNEL_GS_BASE]}
    snap.close()


def test_writes_through_the_vcpu_are_undone_by_a_restore_without_a_run(vm):
    vm.memory.write(CODE, pyvt.assemble("hlt", at=CODE, bits=64))
    cpu = vm.vcpu(0, mode="long")
    cpu.regs.rip = CODE
    snap = vm.snapshot()
    expected = _state_fields(snap.vcpus[0])
    vm.restore(snap)  # nothing changed: the short path
    assert _state_fields(cpu.save_state()) == expected
    cpu.set_msrs({KERNEL_GS_BASE: 0x7000})
    cpu.sregs.cr2 = 0xDEAD000
    cpu.fpu.fcw = 0x27F
    cpu.regs.rbx = 5
    vm.restore(snap)
    assert _state_fields(cpu.save_state()) == expected
    assert cpu.regs.rbx == 0


def test_writes_through_the_thin_layer_are_undone_by_a_restore_without_a_run(vm):
    """cpu.fd bypasses the Vcpu, but not the restore: any ioctl that may
    change the vCPU (VcpuFd.writes) makes the next restore whole."""
    vm.memory.write(CODE, pyvt.assemble("hlt", at=CODE, bits=64))
    cpu = vm.vcpu(0, mode="long")
    cpu.regs.rip = CODE
    snap = vm.snapshot()
    expected = _state_fields(snap.vcpus[0])
    vm.restore(snap)  # nothing changed: the short path
    writes = cpu.fd.writes
    cpu.fd.set_msrs({KERNEL_GS_BASE: 0x7000})
    sregs = cpu.fd.get_sregs()
    sregs.cr2 = 0xBEEF000
    cpu.fd.set_sregs(sregs)
    assert cpu.fd.writes == writes + 2
    cpu.fd.get_msrs([KERNEL_GS_BASE])  # a read does not count
    assert cpu.fd.writes == writes + 2
    vm.restore(snap)
    assert _state_fields(cpu.save_state()) == expected
    assert cpu.get_msrs([KERNEL_GS_BASE])[KERNEL_GS_BASE] != 0x7000


def test_a_state_edited_in_place_is_written_again(vm):
    vm.memory.write(CODE, pyvt.assemble("hlt", at=CODE, bits=64))
    cpu = vm.vcpu(0, mode="long")
    cpu.regs.rip = CODE
    snap = vm.snapshot()
    saved = snap.vcpus[0]
    saved.msrs[KERNEL_GS_BASE] = 0x1234000  # the same VcpuState object, other values
    vm.restore(snap)
    assert cpu.get_msrs([KERNEL_GS_BASE]) == {KERNEL_GS_BASE: 0x1234000}
    cpu.fpu.fcw = 0x27F
    other = cpu.save_state()
    vm.restore(snap)  # in full: the vCPU held `other`
    assert cpu.fpu.fcw != 0x27F
    saved.fpu = other.fpu  # a field of the state the vCPU holds, replaced
    vm.restore(snap)
    assert cpu.fpu.fcw == 0x27F


def test_fast_reset_is_for_ring3_sandboxes_only(tmp_path):
    with pytest.raises(pyvt.ArgumentError, match="ring-3"):
        pyvt.Sandbox(b"\x7fELF", ring=0, fast_reset=True)
