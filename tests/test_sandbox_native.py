"""pyvt.Sandbox's native call path (pyvt/sandbox_calls.py, csrc/sandbox_call.c):
a ring-3 call that returns is run and reset in one native call, with no
vCPU state ioctl, and still starts every call from the snapshot.  The guest
(tests/guests/sandbox_state.c) changes what ring-3 code can change and
reads it back in the next call."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import pyvt
from pyvt import _native, modes, sandbox_calls
from pyvt.sandbox import build_guest

GUESTS = Path(__file__).parent / "guests"

pytestmark = [
    pytest.mark.requires_kvm,
    pytest.mark.skipif(shutil.which("cc") is None, reason="no system C compiler (cc)"),
]

#: A page of pyvt's reserved area no ring-3 call touches: the exception stack's lowest.
RESERVED_SPARE = modes.EXCEPTION_STACK_TOP - 0x1000


@pytest.fixture(scope="module")
def guest_elf(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sandbox_native") / "sandbox_state.elf"
    build_guest(GUESTS / "sandbox_state.c", out,
                flags=["-Wall", "-Werror", "-mgeneral-regs-only"])
    return out


@pytest.fixture(params=[False, True], ids=["full_reset", "fast_reset"])
def sandbox(guest_elf, request):
    with pyvt.Sandbox(guest_elf, memory="16M", ring=3, fast_reset=request.param,
                      host_functions={"seen": lambda first, n: first + n}) as sb:
        yield sb


def _require_native(sb) -> None:
    if sb._native is None:
        pytest.skip(f"the {sb.vm.backend} backend does not sync segment registers and "
                    "events to the run page: calls take the Python path")


class CountingRestores:
    """Counts Vm.restore calls (the Python reset) on one VM."""

    def __init__(self, monkeypatch, vm):
        self.calls = 0
        real = vm.restore

        def counting(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(vm, "restore", counting)


def test_a_returned_call_is_reset_natively_with_one_kvm_run_and_no_state_write(
        sandbox, monkeypatch):
    _require_native(sandbox)
    restores = CountingRestores(monkeypatch, sandbox.vm)
    writes = sandbox.vcpu.fd.writes
    for _ in range(5):
        runs = _native.kvm_runs(sandbox.vcpu._loop)
        assert sandbox.call("bump") == 1  # counter went back to the snapshot's 0
        assert _native.kvm_runs(sandbox.vcpu._loop) == runs + 1
    assert restores.calls == 0
    assert sandbox.vcpu.fd.writes == writes
    assert sandbox.vcpu.save_state().regs == sandbox._snapshot.vcpus[0].regs


def test_every_call_starts_from_the_snapshots_x87_and_sse_state(sandbox):
    clean = (sandbox.call("xmm0_low"), sandbox.call("mxcsr"), sandbox.call("x87_status"))
    assert clean[1] == 0x1F80 and clean[2] & 0x3800 == 0  # MXCSR and TOP at reset values
    sandbox.call("dirty_vector_state", 0x1234_5678_9ABC)
    assert (sandbox.call("xmm0_low"), sandbox.call("mxcsr"), sandbox.call("x87_status")) == clean


def test_a_kept_call_leaves_its_x87_and_sse_state_to_the_next(sandbox):
    sandbox.call("dirty_vector_state", 0x1234_5678_9ABC, keep_state=True)
    assert sandbox.call("xmm0_low", keep_state=True) == 0x1234_5678_9ABC
    assert sandbox.call("mxcsr", keep_state=True) == 0x7F80
    assert sandbox.call("x87_status", keep_state=True) & 0x3800 == 0x3800  # TOP = 7: one push
    sandbox.reset()
    assert sandbox.call("xmm0_low") == 0 and sandbox.call("mxcsr") == 0x1F80


def test_the_x87_sse_image_reads_the_same_from_xsave_and_from_the_fpu_registers(sandbox):
    """pyvt.ko has no XSAVE: its sandboxes build the stub's image from
    KVM_GET_FPU.  Both layouts give the same FXSAVE image (MXCSR_MASK and
    the reserved tail aside, which FXRSTOR ignores)."""
    sandbox.call("dirty_vector_state", 0x1234_5678_9ABC, keep_state=True)
    state = sandbox.vcpu.save_state()
    if state.xsave is None:
        pytest.skip(f"the {sandbox.vm.backend} backend gives no XSAVE area to compare with")
    from_xsave = sandbox_calls._fxsave_from_xsave(state.xsave)
    from_fpu = sandbox_calls._fxsave_from_fpu(state.fpu)

    def registers(image: bytes) -> bytes:  # all but MXCSR, its mask and the tail
        return image[:24] + image[32:416]

    assert registers(from_fpu) == registers(from_xsave)
    assert from_fpu[160:168] == (0x1234_5678_9ABC).to_bytes(8, "little")  # XMM0
    assert int.from_bytes(from_xsave[24:28], "little") == 0x7F80
    # MXCSR as KVM_GET_FPU reads it: PVM's reads 0 whatever the guest set
    # (its XSAVE area has the value), pyvt.ko's the value.
    assert int.from_bytes(from_fpu[24:28], "little") == \
        int.from_bytes(state.fpu[408:412], "little")


def test_a_write_to_pyvts_reserved_area_resets_the_whole_state(sandbox, monkeypatch):
    _require_native(sandbox)
    restores = CountingRestores(monkeypatch, sandbox.vm)
    before = sandbox.vm.memory.read(RESERVED_SPARE, 8)
    sandbox.call("poke", RESERVED_SPARE, 0x5A5A_5A5A)
    assert restores.calls == 1  # the guest could have reached CPL 0: everything goes back
    assert sandbox.vm.memory.read(RESERVED_SPARE, 8) == before
    assert sandbox.call("peek", RESERVED_SPARE) == int.from_bytes(before, "little")
    assert restores.calls == 1  # and the calls after it are native again


def test_host_writes_between_calls_are_taken_back_by_the_next_reset(sandbox, monkeypatch):
    _require_native(sandbox)
    restores = CountingRestores(monkeypatch, sandbox.vm)
    address = sandbox.arena_address  # the first argument's place
    sandbox.vm.memory.write(address + 8, b"\xff" * 8)
    assert sandbox.call("peek", address + 8) == (1 << 64) - 1  # the call sees the host's write
    assert restores.calls == 1  # the Python reset, which knows of host writes
    assert sandbox.vm.memory.read(address + 8, 8) == bytes(8)
    assert sandbox.call("bump") == 1 and restores.calls == 1


@pytest.mark.parametrize("how", ["fault", "host call"])
def test_the_arguments_of_a_call_that_left_the_native_path_are_taken_back(sandbox, how):
    """A call that faults, or goes through Python, is reset by the Python
    path, which must know of the argument bytes the native path copied in."""
    arena = sandbox.vm.memory.read(sandbox.arena_address, 64)
    data = b"\xaa" * 64
    if how == "fault":
        with pytest.raises(pyvt.GuestFault):
            sandbox.call("fault_untouched", data)
    else:
        assert sandbox.call("tell_host_untouched", data, len(data)) == 0xAA + 64
    assert sandbox.vm.memory.read(sandbox.arena_address, 64) == arena
    assert sandbox.call("peek", sandbox.arena_address) == int.from_bytes(arena[:8], "little")


def test_another_snapshot_learns_what_native_resets_copied_back(sandbox):
    """A second snapshot's baseline hears of the pages the native resets
    wrote, so that restoring it copies them back too."""
    counter = sandbox.call("counter_address")
    sandbox.call("bump", keep_state=True)  # counter = 1 in the VM
    other = sandbox.vm.snapshot()
    try:
        sandbox.reset()  # counter = 0 again
        assert sandbox.call("bump") == 1
        assert sandbox.call("bump") == 1  # native resets: the counter's page copied back
        sandbox.vm.restore(other)
        assert sandbox.vm.memory.read_int(counter, 8) == 1
    finally:
        other.close()


def test_ring_0_sandboxes_keep_the_python_path(guest_elf):
    with pyvt.Sandbox(guest_elf, memory="16M", ring=0) as sb:
        assert sb._native is None and not sb.uses_entry_stub
        assert sb.call("bump") == 1 and sb.call("bump") == 1

