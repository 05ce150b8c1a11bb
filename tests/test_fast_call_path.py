"""The fast paths of a guest function call and its reset: a restore that
leaves the port write the last exit made pending for the next KVM_RUN
when that write cannot act on the state put back (Vcpu._defer_port_write),
and user-mode restores in one native call (_native.restore_user_mode).
Each test checks what the guest does and reads back, not only that the
path was taken."""

from __future__ import annotations

import shutil
import zlib
from pathlib import Path

import pytest

import pyvt
from pyvt import _native, exits
from pyvt.sandbox import build_guest

pytestmark = pytest.mark.requires_kvm

CODE = 0x1000
FAR = 0x2000  # far from the OUT at CODE: its completion cannot act there
PORT = 0x3F0  # nobody claims it: run() returns the write, left pending

def _kvm_runs(cpu) -> int:
    return cpu._loop.stats["kvm_exits"]


def _vm_at_out(ring: int):
    """A VM whose vCPU stopped at an OUT to PORT (the write pending), with
    a snapshot at the OUT itself and one at FAR (a `hlt`); and the OUT's RIP."""
    vm = pyvt.Vm("16M")
    set_port = pyvt.assemble(f"mov ${PORT:#x}, %dx", at=CODE, bits=64)
    out_rip = CODE + len(set_port)
    vm.memory.write(CODE, set_port + pyvt.assemble("out %al, %dx; hlt", at=out_rip, bits=64))
    vm.memory.write(FAR, b"\xf4")  # hlt
    cpu = vm.vcpu(0, mode="long", ring=ring)
    cpu.track_user_mode_state()
    cpu.regs.rdx = PORT
    cpu.regs.rip = out_rip
    at_out = vm.snapshot()
    cpu.regs.rip = FAR
    far = vm.snapshot()
    cpu.regs.rip = out_rip
    exit = cpu.run(timeout=30)
    assert isinstance(exit, exits.Io) and exit.port == PORT and exit.direction == "out"
    assert cpu._loop.pending_io == "write"
    return vm, cpu, at_out, far, out_rip


def _runs_the_out(cpu) -> None:
    """The next run stops at the OUT to PORT: it was not skipped."""
    exit = cpu.run(timeout=30)
    assert isinstance(exit, exits.Io) and exit.port == PORT, exit


@pytest.fixture(params=[3, 0], ids=["ring3", "ring0"])
def ring(request) -> int:
    return request.param


def test_a_restore_far_from_the_out_leaves_it_pending_and_runs_from_the_state(ring):
    vm, cpu, at_out, far, out_rip = _vm_at_out(ring)
    with vm:
        before = _kvm_runs(cpu)
        vm.restore(far)
        assert _kvm_runs(cpu) == before, "no KVM_RUN retired the write"
        assert cpu._loop.pending_io == "write"  # still owed, for pyvt too
        assert cpu.regs.rip == FAR
        exit = cpu.run(timeout=30)
        assert isinstance(exit, exits.Hlt) and exit.rip == FAR + 1
        at_out.close()
        far.close()


def test_a_restore_to_the_outs_own_rip_retires_it_first_so_the_out_runs_again(ring):
    vm, cpu, at_out, far, out_rip = _vm_at_out(ring)
    with vm:
        for _ in range(2):
            before = _kvm_runs(cpu)
            vm.restore(at_out)
            assert _kvm_runs(cpu) == before + 1, "the write was retired before the state"
            _runs_the_out(cpu)
        at_out.close()
        far.close()


def test_restores_in_a_row_check_each_state_against_the_deferred_out(ring):
    vm, cpu, at_out, far, out_rip = _vm_at_out(ring)
    with vm:
        vm.restore(far)  # deferred
        before = _kvm_runs(cpu)
        vm.restore(at_out)  # the OUT's own RIP: the deferred write is retired now
        assert _kvm_runs(cpu) == before + 1
        _runs_the_out(cpu)
        at_out.close()
        far.close()


def test_a_register_write_after_a_deferred_out_settles_it_first(ring):
    vm, cpu, at_out, far, out_rip = _vm_at_out(ring)
    with vm:
        vm.restore(far)
        cpu.regs.rip = out_rip  # the OUT's own RIP: its completion would skip it
        assert cpu._loop.pending_io is None
        _runs_the_out(cpu)
        at_out.close()
        far.close()


def test_a_snapshot_after_a_deferred_out_holds_the_restored_state(ring):
    vm, cpu, at_out, far, out_rip = _vm_at_out(ring)
    with vm:
        vm.restore(far)
        again = vm.snapshot()  # settles the write: it must not move RIP
        assert again.vcpus[0].regs == far.vcpus[0].regs
        assert cpu._loop.pending_io is None
        for snap in (again, at_out, far):
            snap.close()


# -- pyvt.Sandbox: a call is one KVM_RUN ----------------------------------------

GUESTS = Path(__file__).parent / "guests"


@pytest.fixture(scope="module")
def guest_elf(tmp_path_factory) -> Path:
    if shutil.which("cc") is None:
        pytest.skip("no system C compiler (cc)")
    out = tmp_path_factory.mktemp("fast_call") / "sandbox.elf"
    build_guest(GUESTS / "sandbox.c", out, flags=["-Wall", "-Werror", "-mgeneral-regs-only"])
    return out


@pytest.mark.parametrize("fast_reset", [False, True])
def test_a_sandbox_call_and_its_reset_take_one_kvm_run(guest_elf, fast_reset):
    data = bytes(range(256)) * 4
    with pyvt.Sandbox(guest_elf, memory="16M", ring=3, fast_reset=fast_reset,
                      host_functions={"ready": lambda count: 0}) as sb:
        sb.call("empty")
        for function, args, expected in (("empty", (), None),
                                         ("crc32", (data, len(data)), zlib.crc32(data)),
                                         ("bump", (), None)):
            before = _kvm_runs(sb.vcpu)
            result = sb.call(function, *args)
            assert _kvm_runs(sb.vcpu) == before + 1, function
            if expected is not None:
                assert result & 0xFFFFFFFF == expected
        # Each call started from the snapshot: bump() counts from the same value.
        assert sb.call("bump") == sb.call("bump")
        assert sb.vcpu.save_state().regs == sb._snapshot.vcpus[0].regs


def test_user_mode_restores_go_through_the_native_call(monkeypatch):
    calls = []
    real = _native.restore_user_mode

    def counting(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(_native, "restore_user_mode", counting)
    vm = pyvt.Vm("16M")
    # Ends at the debug-exit port: no CPL-0 stub runs (a ring-3 hlt would).
    vm.memory.write(CODE, pyvt.assemble(
        f"mov $0x1234, %rax; movq %rax, %xmm3; stc; out %al, ${pyvt.vm.DEBUG_EXIT_PORT:#x}",
        at=CODE, bits=64))
    cpu = vm.vcpu(0, mode="long", ring=3)
    cpu.track_user_mode_state()
    cpu.regs.rip = CODE
    with vm:
        snap = vm.snapshot()
        expected = snap.vcpus[0]
        for _ in range(2):
            assert isinstance(cpu.run(timeout=30), exits.DebugExit)
            assert cpu.regs.rax == 0x1234 and cpu.regs.rflags & 1
            vm.restore(snap, user_mode_only=True)
            assert cpu.regs.rip == CODE and cpu.regs.rax != 0x1234
        state = cpu.save_state()
        assert (state.regs, state.fpu, state.xsave, state.events) == \
            (expected.regs, expected.fpu, expected.xsave, expected.events)
        assert (state.sregs, state.sregs2) == (expected.sregs, expected.sregs2)
        assert len(calls) == 2
        snap.close()


def test_full_restores_make_their_writes_in_one_native_batch(monkeypatch):
    from pyvt import vcpu as vcpu_module

    batches = []
    real = vcpu_module._state_batch

    def recording(fd, state):
        batch = real(fd, state)
        batches.append(batch)
        return batch

    monkeypatch.setattr(vcpu_module, "_state_batch", recording)
    vm = pyvt.Vm("16M")
    # Ring 0 (a full restore): no SSE, which PVM's ring-0 emulator lacks.
    vm.memory.write(CODE, pyvt.assemble("mov $0x1234, %rax; stc; hlt", at=CODE, bits=64))
    cpu = vm.vcpu(0, mode="long")
    cpu.regs.rip = CODE
    with vm:
        snap = vm.snapshot()
        expected = snap.vcpus[0]
        for _ in range(2):
            assert isinstance(cpu.run(timeout=30), exits.Hlt)
            cpu.set_msrs({0xC0000102: 0x5555_0000})  # KERNEL_GS_BASE, which the restore puts back
            vm.restore(snap)
        state = cpu.save_state()
        for field in ("regs", "sregs", "sregs2", "fpu", "xsave", "xcrs", "events",
                      "debugregs", "mp_state", "lapic"):
            assert getattr(state, field) == getattr(expected, field), field
        assert state.msrs[0xC0000102] == expected.msrs[0xC0000102]
        assert len(batches) == 2 and all(batch is batches[0] for batch in batches)
        assert len(batches[0]) >= 4  # sregs, XSAVE or FPU, MSRs, ...
        snap.close()


def test_restores_copy_back_memory_in_one_native_call_per_region(monkeypatch):
    """Guest writes (KVM's dirty log), host writes, and restores of two
    snapshots in turn: each restore leaves exactly its snapshot's memory,
    and dirty_pages() still reports what the guest and the restores wrote."""
    calls = []
    real = _native.restore_logged_pages

    def counting(*args):
        calls.append(args[1])
        return real(*args)

    monkeypatch.setattr(_native, "restore_logged_pages", counting)
    data = 0x10000
    vm = pyvt.Vm("16M")
    # Fills 8 pages from `data` with the byte in al, then halts.
    vm.memory.write(CODE, pyvt.assemble(
        f"mov ${data:#x}, %rdi; mov $0x8000, %rcx; rep stosb; hlt", at=CODE, bits=64))
    cpu = vm.vcpu(0, mode="long")
    with vm:
        cpu.regs.rip, cpu.regs.rax = CODE, 0xAA
        assert isinstance(cpu.run(timeout=60), exits.Hlt)
        first = vm.snapshot()
        vm.memory.write(data + 0x9000, b"host")
        cpu.regs.rip, cpu.regs.rax = CODE, 0xBB
        assert isinstance(cpu.run(timeout=60), exits.Hlt)
        second = vm.snapshot()
        expected_second = vm.memory.read(data, 0xA000)
        expected_first = b"\xaa" * 0x8000 + bytes(0x2000)
        vm.restore(first)
        assert vm.memory.read(data, 0xA000) == expected_first
        vm.memory.dirty_pages()  # reported so far: start afresh
        cpu.regs.rip, cpu.regs.rax = CODE, 0xCC
        assert isinstance(cpu.run(timeout=60), exits.Hlt)
        vm.memory.write(data + 0x9000, b"again")
        vm.restore(second)
        assert vm.memory.read(data, 0xA000) == expected_second
        reported = vm.memory.dirty_pages()[0]
        for page in (*range(8), 9):  # the guest's stosb, the host's write
            assert data + page * 0x1000 in reported, page
        vm.restore(first)
        assert vm.memory.read(data, 0xA000) == expected_first
        assert len(calls) == 3
        first.close()
        second.close()


def test_a_restore_without_a_run_writes_the_tsc_through_a_native_batch():
    vm = pyvt.Vm("16M", pc_devices=False)
    vm.memory.write(CODE, b"\xf4")
    cpu = vm.vcpu(0, mode="long")
    cpu.regs.rip = CODE
    with vm:
        snap = vm.snapshot()
        cpu.regs.rax = 0x77  # undone by the restore, which writes the TSC only besides
        writes = cpu.fd.writes
        vm.restore(snap)
        assert cpu.regs.rax == int.from_bytes(snap.vcpus[0].regs[:8], "little") != 0x77
        assert cpu.regs.rip == CODE
        vm.restore(snap)  # the vCPU holds the state: registers and the TSC
        assert "tsc batch" in snap.vcpus[0]._structs
        assert cpu.fd.writes > writes
        tsc = pyvt.vcpu_state.MSR_IA32_TSC
        assert cpu.get_msrs([tsc])[tsc] >= snap.vcpus[0].msrs[tsc]
        snap.close()
