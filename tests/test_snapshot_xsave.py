"""The XSAVE area (AVX state) in snapshots, and the thin layer's
KVM_GET_XSAVE / KVM_GET_XSAVE2 / KVM_SET_XSAVE.

The guest sets its YMM registers itself, at CPL 3: on software-assisted
KVM (PVM, see MACHINES.md) ring-0 guest code is emulated and KVM's emulator
has no VEX instructions (an AVX instruction at CPL 0 ends in
KVM_EXIT_INTERNAL_ERROR), while ring-3 code runs on the CPU.  The host
enables AVX for it (XCR0 and CR4.OSXSAVE), as a guest kernel would.
"""

import pytest

import pyvt
from pyvt import exits, modes
from pyvt.kvm import host_cpuid, struct_bytes
from pyvt.snapshot import Snapshot

pytestmark = [pytest.mark.requires_kvm, pytest.mark.requires_cap("XSAVE", "XCRS"),
              pytest.mark.requires_cpu("avx")]

XSTATE_BV = 512  # the XSAVE header's first field, in the standard format
XCR0_AVX = 0b111  # x87, SSE, AVX
CR4_OSXSAVE = 1 << 18
STORE = 0x6000

# ymm1 = all ones, stop; store ymm1 (32 bytes) and clear it, stop.
AVX_GUEST = """
    .code64
    .globl _start
_start:
    vpcmpeqb %ymm1, %ymm1, %ymm1
    out %al, $0xf4
    vmovdqu %ymm1, 0x6000
    vpxor %ymm1, %ymm1, %ymm1
    out %al, $0xf4
"""


def _ymm_high(area, register: int) -> bytes:
    """The upper 128 bits of YMM ``register`` in an XSAVE area (a struct
    kvm_xsave or its bytes)."""
    if not isinstance(area, bytes):
        area = struct_bytes(area)
    offset = host_cpuid(0xD, 2)[1]  # where the AVX component lives (CPUID 0xD.2 EBX)
    return area[offset + 16 * register:offset + 16 * (register + 1)]


def _user_mode_vcpu(vm, code: bytes):
    """A long-mode vCPU that runs ``code`` at CPL 3 with AVX enabled:
    user-accessible page tables, DPL-3 segments, IOPL 3 (port I/O stops it)."""
    vm.memory.write(0x1000, code)
    cpu = vm.vcpu(0, mode="long")
    cpu.regs.rip = 0x1000
    for table, entries in ((modes.PML4_ADDRESS, 1), (modes.PDPT_ADDRESS, 4),
                           (modes.PD_ADDRESS, 4 * 512)):
        for i in range(entries):
            entry = vm.memory.read_int(table + 8 * i)
            vm.memory.write_int(table + 8 * i, entry | 4)  # U/S: user
    sregs = cpu.sregs
    sregs.cs.dpl, sregs.cs.selector = 3, modes.CODE64_SELECTOR | 3
    for segment in (sregs.ss, sregs.ds, sregs.es):
        segment.dpl, segment.selector = 3, modes.DATA_SELECTOR | 3
    sregs.cr4 |= CR4_OSXSAVE
    cpu.regs.rflags |= 3 << 12  # IOPL 3
    xcrs = cpu.fd.get_xcrs()
    xcrs.xcrs[0].value = XCR0_AVX
    cpu.fd.set_xcrs(xcrs)
    return cpu


def _stop(cpu):
    exit = cpu.run(timeout=10)
    assert isinstance(exit, exits.DebugExit), exit


@pytest.mark.parametrize("how", ["restore", "clone", "file"])
def test_ymm_upper_halves_survive(how, tmp_path):
    """The guest fills ymm1, a snapshot is taken, the guest clears ymm1;
    after a restore (or in a clone, or through a file) the guest stores
    ymm1 and finds all 32 bytes set again."""
    with pyvt.Vm("16M") as vm:
        cpu = _user_mode_vcpu(vm, pyvt.assemble(AVX_GUEST))
        _stop(cpu)
        snap = vm.snapshot()
        assert _ymm_high(snap.vcpus[0].xsave, 1) == b"\xff" * 16
        _stop(cpu)
        assert vm.memory.read(STORE, 32) == b"\xff" * 32
        assert _ymm_high(cpu.fd.get_xsave(), 1) == bytes(16)  # the guest cleared it
        if how == "restore":
            target = vm
            vm.restore(snap)
        else:
            if how == "file":
                snap.save(str(tmp_path / "avx.snap"))
                snap = Snapshot.load(str(tmp_path / "avx.snap"))
            target = pyvt.Vm.from_snapshot(snap)
        try:
            guest = target.vcpus[0]
            assert target.memory.read(STORE, 32) == bytes(32)
            assert _ymm_high(guest.fd.get_xsave(), 1) == b"\xff" * 16
            _stop(guest)
            assert target.memory.read(STORE, 32) == b"\xff" * 32
        finally:
            if target is not vm:
                target.close()


def test_set_xsave_round_trips(vm):
    """The thin layer: YMM state written from the host comes back."""
    cpu = vm.vcpu(0, mode="long")
    area = bytearray(struct_bytes(cpu.fd.get_xsave()))
    assert len(area) == 4096
    pattern = bytes(range(16))
    offset = host_cpuid(0xD, 2)[1] + 16 * 2
    area[offset:offset + 16] = pattern  # ymm2's upper half
    area[XSTATE_BV] |= 0b100  # the AVX component is in use
    cpu.fd.set_xsave(bytes(area))
    assert _ymm_high(cpu.fd.get_xsave(), 2) == pattern
    if pyvt.kvm.lib.PVT_HAVE_KVM_GET_XSAVE2 and vm.kvm.check_extension("KVM_CAP_XSAVE2"):
        whole = cpu.fd.get_xsave2()
        assert len(struct_bytes(whole)) == cpu.fd.xsave_size() >= 4096
        assert _ymm_high(whole, 2) == pattern
        cpu.fd.set_xsave(whole)  # the struct goes back as it came
        assert _ymm_high(cpu.fd.get_xsave(), 2) == pattern
    for bad in (b"", bytes(100), bytes(cpu.fd.xsave_size() + 64), "text"):
        with pytest.raises(pyvt.ArgumentError, match="XSAVE state"):
            cpu.fd.set_xsave(bad)
