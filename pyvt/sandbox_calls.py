"""pyvt.Sandbox's native call path: what a call costs beyond raw C.

A call through :class:`_native.SandboxCalls` copies its arguments, writes
the entry registers into the run page, runs the vCPU and, when the call
returned through the trampoline with no other exit, resets the VM in the
same native call: the pages the call wrote are copied back (KVM's dirty log)
and, unless the guest wrote pyvt's reserved area (the only way it could have
reached CPL 0 and come back: see csrc/sandbox_call.h), only what CPL-3 code
can change is written back.  That is the registers (through the run page),
and the segment registers and events where they differ (KVM copies them to
the run page at each exit): the same two KVM ioctls per call as raw C
(KVM_RUN, KVM_GET_DIRTY_LOG).

The x87/SSE state is not written back with an ioctl (one would cost as much
as the rest of the reset on PVM): every ring-3 call enters through a stub in
the trampoline page that reloads it (``fxrstor``) from an image of the
snapshot's, kept in the same page, and then jumps to the function.  The
entry registers tell the stub where: R10 holds the function, R11 the third
argument (RDX, which the stub sets last); RAX is 0 at the function's entry
(SysV: no vector registers used by a variadic call).  A ring-3 guest cannot
enable XSAVE (CR4.OSXSAVE is pyvt's, and clear), so x87 and SSE are all the
vector state it has.  Between calls, the vCPU holds the last call's x87/SSE
registers; the next call starts from the snapshot's.
"""

from __future__ import annotations

import mmap
import struct
from typing import TYPE_CHECKING, Optional

from . import _native, modes

if TYPE_CHECKING:
    from .sandbox import Sandbox
    from .snapshot import Snapshot
    from .vcpu_state import VcpuState

#: Offsets in the trampoline page (pyvt/sandbox.py puts the return
#: trampoline at 0 and the parked RIP at 32): the entry stub, and the
#: 16-byte aligned FXSAVE image it loads.
ENTRY_STUB = 64
FXSAVE_IMAGE = 0x800
FXSAVE_SIZE = 512

_FXRSTOR64_RIP_RELATIVE = bytes((0x48, 0x0F, 0xAE, 0x0D))  # fxrstor64 disp32(%rip)
_STUB_TAIL = bytes((0x4C, 0x89, 0xDA,   # mov %r11, %rdx
                    0x31, 0xC0,         # xor %eax, %eax
                    0x41, 0xFF, 0xE2))  # jmp *%r10

#: CR4.OSXSAVE: with it set, XSAVE state beyond x87/SSE may be live.
_CR4_OSXSAVE = 1 << 18
#: XSTATE_BV (byte 512 of an XSAVE area): x87, SSE, AVX.
_XSTATE_BV = 512
_X87, _SSE, _AVX = 1, 2, 4
_FCW_INIT = 0x037F
_MXCSR_INIT = 0x1F80


def entry_stub() -> bytes:
    """The entry stub's code, for ENTRY_STUB in the trampoline page."""
    after = ENTRY_STUB + len(_FXRSTOR64_RIP_RELATIVE) + 4
    return _FXRSTOR64_RIP_RELATIVE + struct.pack("<i", FXSAVE_IMAGE - after) + _STUB_TAIL


def fxsave_image(state: "VcpuState") -> Optional[bytes]:
    """The FXSAVE-format x87/SSE state of a vCPU state: from its XSAVE
    area, or from its FPU registers on a backend without XSAVE (pyvt.ko);
    None if it has neither."""
    if state.xsave is not None:
        return _fxsave_from_xsave(state.xsave)
    if state.fpu is not None:
        return _fxsave_from_fpu(state.fpu)
    return None


#: struct kvm_fpu: fpr[8][16], fcw, fsw, ftwx, pad, last_opcode, last_ip,
#: last_dp, xmm[16][16], mxcsr, pad.
_KVM_FPU = struct.Struct("<128sHHBxHQQ256sI4x")


def _fxsave_from_fpu(fpu: bytes) -> bytes:
    """KVM_GET_FPU's registers laid out as FXSAVE stores them (64-bit form)."""
    fpr, fcw, fsw, ftwx, fop, fip, fdp, xmm, mxcsr = _KVM_FPU.unpack_from(fpu)
    image = bytearray(FXSAVE_SIZE)
    struct.pack_into("<HHBxHQQI", image, 0, fcw, fsw, ftwx, fop, fip, fdp, mxcsr)
    image[32:160] = fpr
    image[160:416] = xmm
    return bytes(image)


def _fxsave_from_xsave(xsave: bytes) -> bytes:
    """The FXSAVE-format x87/SSE state an XSAVE area (KVM_GET_XSAVE)
    describes: its legacy region, with the components its XSTATE_BV marks
    as in their initial configuration written out as such (what XRSTOR
    would load for them)."""
    image = bytearray(xsave[:FXSAVE_SIZE])
    bv = int.from_bytes(xsave[_XSTATE_BV:_XSTATE_BV + 8], "little")
    if not bv & _X87:
        image[0:24] = bytes(24)  # FCW, FSW, FTW, FOP, FIP, FDP
        struct.pack_into("<H", image, 0, _FCW_INIT)
        image[32:160] = bytes(128)  # ST0-ST7
    if not bv & _SSE:
        image[160:416] = bytes(256)  # XMM0-XMM15
    if not bv & (_SSE | _AVX):
        struct.pack_into("<I", image, 24, _MXCSR_INIT)
    return bytes(image)


def can_use_entry_stub(sandbox: "Sandbox") -> bool:
    """Whether the sandbox's calls may enter through the stub: ring 3
    (ring-0 code runs emulated on PVM, and could change anything anyway)
    without CR4.OSXSAVE."""
    return sandbox.ring == 3 and not sandbox.vcpu.sregs.cr4 & _CR4_OSXSAVE


def reserved_pages(pages: int) -> bytes:
    """pyvt's reserved area (page tables, GDT, IDT, TSS, exception stubs and
    stack) as a little-endian page bitmap of a slot of ``pages`` pages."""
    bits = 0
    for page in range(modes.SETUP_AREA_START // mmap.PAGESIZE,
                      min(modes.SETUP_AREA_END // mmap.PAGESIZE, pages)):
        bits |= 1 << page
    return bits.to_bytes((pages + 63) // 64 * 8, "little")


def native_calls(sandbox: "Sandbox", snap: "Snapshot",
                 return_out: int) -> Optional[_native.SandboxCalls]:
    """The native call path for ``sandbox`` and its snapshot ``snap``
    (``return_out``: the trampoline's OUT, the return's RIP at most), or
    None where it does not apply (the calls then take the Python path, with
    the same results): ring 0, a backend without synced segment registers
    and events in the run page (pyvt.ko), several memory regions, a dirty
    ring, a page size other than 4 KiB, or memory the dirty log cannot
    follow."""
    from . import snapshot_memory
    from ._kvm import lib
    from .vcpu import _SYNCED_USER_MODE, _user_mode_plan

    vm, cpu = sandbox.vm, sandbox.vcpu
    if cpu._loop is None or sandbox.ring != 3 or len(vm.memory.regions) != 1 or len(snap.vcpus) != 1 \
            or vm.fd.dirty_ring_size or vm.fd.has_irqchip \
            or mmap.PAGESIZE != _native.PAGE_RESTORE_PAGE_SIZE:
        return None
    synced = lib.KVM_SYNC_X86_REGS | _SYNCED_USER_MODE
    if cpu.fd.run_struct.kvm_valid_regs & synced != synced:
        return None
    (region,) = vm.memory.regions
    (image,) = snap.regions
    if not (region.dirty_logging and region.host_dirty is not None and region.host_writable
            and region.source is None and isinstance(region.mapping, mmap.mmap)
            and image.mapping is not None):
        return None
    state = snap.vcpus[0]
    plan = _user_mode_plan(cpu.fd, state)
    if plan is None:
        return None
    regs, request, sregs, sregs_common, xsave, fpu, events = plan
    stub = sandbox.trampoline_address + ENTRY_STUB if sandbox.uses_entry_stub else 0
    if stub:
        xsave = fpu = 0  # the stub reloads x87/SSE at every entry
    return _native.SandboxCalls(
        cpu._loop, vm.fd.fileno(), region.slot, region.pages, region.mapping, image.mapping,
        snapshot_memory.data_bitmap(image), reserved_pages(region.pages), regs, request, sregs,
        sregs_common, xsave, fpu, events, stub, sandbox._entry_rsp, sandbox._exit_port,
        sandbox.trampoline_address, return_out,
        state._structs.get("user mode plan"))
