"""pyvt.Sandbox: a freestanding C guest (tests/guests/sandbox.c) whose
functions Python calls by name, at ring 3 (native on PVM) and ring 0."""

from __future__ import annotations

import runpy
import shutil
import subprocess
import zlib
from pathlib import Path

import pytest

import pyvt
from pyvt import exits
from pyvt.loaders import LoaderError
from pyvt.sandbox import HOST_CALL_PORT, MAX_STRING, build_guest

GUESTS = Path(__file__).parent / "guests"

pytestmark = [
    pytest.mark.requires_kvm,
    pytest.mark.skipif(shutil.which("cc") is None, reason="no system C compiler (cc)"),
]


@pytest.fixture(scope="session")
def guest_elf(tmp_path_factory) -> Path:
    # -mgeneral-regs-only: PVM emulates ring-0 code, and not its SSE.
    out = tmp_path_factory.mktemp("sandbox") / "sandbox.elf"
    build_guest(GUESTS / "sandbox.c", out, flags=["-Wall", "-Werror", "-mgeneral-regs-only"])
    return out


class Ready:
    """The host function the guest's pyvt_init() calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, count: int) -> int:
        self.calls.append(count)
        return 0


@pytest.fixture(params=[3, 0], ids=["ring3", "ring0"])
def ring(request) -> int:
    return request.param


@pytest.fixture(params=[(3, False), (0, False), (3, True)],
                ids=["ring3", "ring0", "ring3-fast_reset"])
def sandbox(guest_elf, request):
    ring, fast_reset = request.param
    with pyvt.Sandbox(guest_elf, memory="16M", ring=ring, fast_reset=fast_reset,
                      host_functions={"ready": Ready()}) as sb:
        yield sb


# -- calls -------------------------------------------------------------------------

def test_integer_arguments_go_in_the_sysv_registers_in_order(sandbox):
    assert sandbox.call("weigh6", 1, 2, 3, 4, 5, 6) == 654321
    assert sandbox.call("weigh6", 9, 0, 0, 0, 0, 0) == 9
    assert sandbox.call("weigh6", 0, 0, 0, 0, 0, 7) == 700000
    # rax comes back as an unsigned 64-bit int; negative arguments are two's complement.
    assert sandbox.call("negate", 5) == 2**64 - 5
    assert sandbox.call("negate", -(2**63)) == 2**63
    assert sandbox.call("negate", True) == 2**64 - 1


def test_bytes_arguments_are_copied_to_the_arena_and_passed_as_pointers(sandbox):
    data = bytes(range(256)) * 4
    assert sandbox.call("crc32", data, len(data)) == zlib.crc32(data)
    assert sandbox.call("crc32", bytearray(b"123456789"), 9) == 0xCBF43926
    assert sandbox.call("crc32", memoryview(b"xx123456789")[2:], 9) == 0xCBF43926
    first = sandbox.call("address_of", b"a")
    assert sandbox.arena_address <= first < sandbox.arena_address + sandbox.arena_size
    # Two buffers do not overlap, and each starts 16-byte aligned.
    assert sandbox.call("distance", b"x" * 17, b"y") == 32
    assert sandbox.call("address_of", None) == 0


def test_a_writable_buffer_gets_the_guests_changes_back(sandbox):
    buffer = bytearray(8)
    sandbox.call("fill", buffer, len(buffer), 0x10)
    assert buffer == bytes(range(0x10, 0x18))
    array = memoryview(bytearray(4))
    sandbox.call("fill", array, 4, 1)
    assert array.tobytes() == b"\x01\x02\x03\x04"
    immutable = b"\0" * 4
    sandbox.call("fill", immutable, 4, 1)
    assert immutable == b"\0" * 4


def test_pyvt_init_runs_once_before_the_snapshot(guest_elf, ring):
    ready = Ready()
    with pyvt.Sandbox(guest_elf, ring=ring, host_functions={"ready": ready}) as sb:
        assert ready.calls == [1]
        assert sb.call("init_count") == 1
        assert sb.call("crc32", b"123456789", 9) == 0xCBF43926  # the table init built
        assert sb.call("init_count") == 1
    assert ready.calls == [1]


def test_each_call_starts_from_the_snapshot_unless_told_to_keep_state(guest_elf, sandbox):
    assert [sandbox.call("bump") for _ in range(3)] == [1, 1, 1]
    assert sandbox.call("bump", keep_state=True) == 1
    assert sandbox.call("bump", keep_state=True) == 2
    assert sandbox.call("bump") == 3  # kept from the two calls before; reset after
    assert sandbox.call("bump") == 1
    with pyvt.Sandbox(guest_elf, ring=sandbox.ring, reset=False,
                      host_functions={"ready": Ready()}) as kept:
        assert [kept.call("bump") for _ in range(3)] == [1, 2, 3]
        kept.reset()
        assert kept.call("bump") == 1


# -- host functions ----------------------------------------------------------------

def test_guest_code_calls_back_into_python(sandbox):
    said = []
    # The header tells the host which arguments are C strings: those arrive as str.
    sandbox.host_function("log", lambda text: said.append(text) or 41)
    assert sandbox.call("greet", "wörld".encode() + b"\0") == 42
    assert said == ["wörld"]
    sandbox.host_function("add", lambda a, b: a + b)
    assert sandbox.call("host_add", 20, 22) == 42
    assert sandbox.call("host_add", -1, 0) == 2**64 - 1  # ints arrive unsigned
    sandbox.host_function("add", lambda a, b: -1)  # replaces it; the guest sees all ones
    assert sandbox.call("host_add", 1, 2) == 2**64 - 1
    # args= says otherwise: bytes take a pointer and a length.
    sandbox.host_function("digest", zlib.crc32, args=(bytes,))
    assert sandbox.call("host_digest", b"123456789", 9) == 0xCBF43926
    sandbox.host_function("digest", lambda p, n: p - sandbox.arena_address + n)
    assert sandbox.call("host_digest", b"123456789", 9) == 9
    sandbox.host_function("log", lambda address: address, args=(int,))
    assert sandbox.call("greet", b"x\0") == sandbox.arena_address + 1


def test_a_host_functions_exception_propagates_and_the_sandbox_goes_on(sandbox):
    def broken(text):
        raise KeyError(text)

    sandbox.host_function("log", broken)
    with pytest.raises(KeyError, match="boom"):
        sandbox.call("greet", b"boom\0")
    sandbox.host_function("log", lambda text: "not an int")
    with pytest.raises(pyvt.ArgumentTypeError, match="returned 'not an int'"):
        sandbox.call("greet", b"x\0")
    sandbox.host_function("log", lambda data: 0, args=(bytes,))
    with pytest.raises(pyvt.SandboxError, match=r"passed 1 argument\(s\) to host function "
                       "'log', whose args= take 2"):
        sandbox.call("greet", b"x\0")
    with pytest.raises(TypeError):  # the guest passes one argument
        sandbox.host_function("log", lambda a, b: 0)
        sandbox.call("greet", b"x\0")
    assert sandbox.call("bump") == 1


def test_an_unregistered_host_function_is_a_clear_error(sandbox):
    with pytest.raises(pyvt.SandboxError, match="'nobody_registered_this', which is not "
                       r"registered .*sb.host_function"):
        sandbox.call("call_unregistered")
    sandbox.host_function("log", print)
    with pytest.raises(pyvt.SandboxError, match="string argument at 0x10000000000 lies "
                       "outside guest memory"):
        sandbox.call("greet", 1 << 40)
    with pytest.raises(pyvt.SandboxError, match="string argument at .* has no NUL in its "
                       "first 1048576 bytes"):
        sandbox.call("greet", b"x" * MAX_STRING)  # as large as the default arena
    assert sandbox.call("weigh6", 1, 1, 0, 0, 0, 0) == 11


def test_pyvt_init_calling_an_unregistered_host_function_fails_the_sandbox(guest_elf, ring):
    with pytest.raises(pyvt.SandboxError, match="'ready', which is not registered"):
        pyvt.Sandbox(guest_elf, ring=ring)


def test_host_function_registration_checks_its_arguments(sandbox):
    with pytest.raises(pyvt.ArgumentTypeError, match="callable"):
        sandbox.host_function("log", "print")
    with pytest.raises(pyvt.ArgumentTypeError, match="int, str or bytes"):
        sandbox.host_function("log", print, args=(float,))
    with pytest.raises(pyvt.ArgumentError, match="takes 8 registers"):
        sandbox.host_function("log", print, args=(bytes, bytes, bytes, int, int))


def test_the_header_names_the_port_and_refuses_seven_arguments(tmp_path):
    header = Path(pyvt.get_include()) / "pyvt_guest.h"
    assert f"#define PYVT_HOST_CALL_PORT {HOST_CALL_PORT:#x}" in header.read_text()
    source = tmp_path / "seven.c"
    source.write_text('#include "pyvt_guest.h"\n'
                      'long f(void) { return pyvt_host_call("x", 1, 2, 3, 4, 5, 6, 7); }\n')
    with pytest.raises(pyvt.AssemblerError, match="pyvt_host_call_takes_at_most_6_arguments"):
        build_guest(source, tmp_path / "seven.elf")


# -- faults, timeouts, misbehaviour ----------------------------------------------------

def test_a_fault_raises_guest_fault_with_registers_and_the_instruction(sandbox):
    unmapped = 1 << 40  # beyond pyvt's 4 GiB identity map
    with pytest.raises(pyvt.GuestFault) as caught:
        sandbox.call("deref", unmapped)
    fault = caught.value
    if sandbox.ring == 0 and "resets the vCPU at a triple fault" in str(fault):
        # AMD-V backends (kvm-amd, pyvt.ko on AMD) reset the vCPU at a
        # shutdown: the fault's registers are gone, and the message says so.
        assert isinstance(fault.exit, exits.Shutdown) and fault.regs.rip == 0xFFF0
        assert sandbox.call("weigh6", 2, 0, 0, 0, 0, 0) == 2  # restored, usable
        return
    assert fault.location.startswith("deref+")
    assert fault.regs.rdi == unmapped
    assert fault.instruction and sandbox.vm.memory.read(fault.regs.rip, 2) == fault.instruction[:2]
    try:
        import capstone  # noqa: F401
        assert fault.disassembly.startswith("mov") and "rdi" in fault.disassembly
        assert fault.disassembly in str(fault)
    except ImportError:
        assert fault.disassembly == ""
    if sandbox.ring == 3:
        assert isinstance(fault.exit, exits.GuestException)
        assert (fault.exit.vector, fault.exit.cr2) == (14, unmapped)
        assert "#PF" in str(fault) and f"{unmapped:#x}" in str(fault)
    else:  # no IDT at ring 0: the CPU triple-faults
        assert isinstance(fault.exit, exits.Shutdown)
        assert "triple-faulted" in str(fault)
    assert "RDI=0000010000000000" in str(fault)
    assert sandbox.call("weigh6", 2, 0, 0, 0, 0, 0) == 2  # restored, usable


def test_divide_by_zero_names_the_exception_at_ring_3(guest_elf):
    with pyvt.Sandbox(guest_elf, ring=3, host_functions={"ready": Ready()}) as sb:
        with pytest.raises(pyvt.GuestFault, match=r"divide\(\) took #DE \(vector 0") as caught:
            sb.call("divide", 1, 0)
        assert caught.value.location.startswith("divide+")
        assert sb.call("divide", 42, 2) == 21


def test_a_spinning_guest_times_out_and_the_sandbox_goes_on(sandbox):
    assert sandbox.call("bump", keep_state=True) == 1
    with pytest.raises(pyvt.SandboxTimeout, match=r"spin\(\) ran longer than its timeout "
                       r"of 0.2 s \(stopped at spin\+") as caught:
        sandbox.call("spin", timeout=0.2)
    assert isinstance(caught.value, TimeoutError)
    assert sandbox.call("bump") == 1  # back at the snapshot, not at the kept state


def test_the_sandboxs_default_timeout_applies_to_every_call(guest_elf, ring):
    with pyvt.Sandbox(guest_elf, ring=ring, timeout=0.2,
                      host_functions={"ready": Ready()}) as sb:
        with pytest.raises(pyvt.SandboxTimeout):
            sb.call("spin")
        assert sb.call("negate", 1) == 2**64 - 1


def test_hlt_instead_of_returning_is_an_error(sandbox):
    with pytest.raises(pyvt.SandboxError, match=r"halt\(\) executed hlt \(at halt\+0x0\)"):
        sandbox.call("halt")
    assert sandbox.call("bump") == 1


# -- bad input -----------------------------------------------------------------------

def test_bad_calls_are_refused_before_the_guest_runs(sandbox):
    assert sandbox.call("bump", keep_state=True) == 1
    with pytest.raises(pyvt.ArgumentError, match=r"no global function 'crc33' \(did you "
                       "mean crc32"):
        sandbox.call("crc33", b"", 0)
    with pytest.raises(pyvt.ArgumentError, match="supports only those"):
        sandbox.call("weigh6", *range(7))
    with pytest.raises(pyvt.ArgumentTypeError, match=r"encode it"):
        sandbox.call("greet", "text")
    with pytest.raises(pyvt.ArgumentTypeError, match="only integer and pointer"):
        sandbox.call("negate", 1.5)
    with pytest.raises(pyvt.ArgumentError, match="does not fit in a 64-bit register"):
        sandbox.call("negate", 2**64)
    with pytest.raises(pyvt.ArgumentError, match="not contiguous"):
        sandbox.call("crc32", memoryview(b"abcdef")[::2], 3)
    with pytest.raises(pyvt.ArgumentTypeError, match="named by a str"):
        sandbox.call(0x401000)
    with pytest.raises(pyvt.ArgumentError, match="arena"):
        sandbox.call("distance", bytes(sandbox.arena_size), b"x")
    for timeout in (-1, "1", float("nan")):
        with pytest.raises(pyvt.ArgumentError, match="timeout must be"):
            sandbox.call("bump", timeout=timeout)
    # Nothing ran, nothing was lost: the kept state is still there.
    assert sandbox.call("bump") == 2


def test_a_host_function_cannot_call_into_the_guest(sandbox):
    sandbox.host_function("log", lambda text: sandbox.call("bump"))
    with pytest.raises(pyvt.SandboxError, match="not reentrant"):
        sandbox.call("greet", b"x\0")
    assert sandbox.call("bump") == 1


def test_the_arena_size_is_configurable(guest_elf):
    with pyvt.Sandbox(guest_elf, arena="4K", host_functions={"ready": Ready()}) as sb:
        assert sb.arena_size == 4096
        assert sb.call("crc32", bytes(4096), 4096) == zlib.crc32(bytes(4096))
        with pytest.raises(pyvt.ArgumentError, match="more than the arena's 4096 bytes"):
            sb.call("crc32", bytes(4097), 4097)


def test_images_that_cannot_be_sandboxed_are_refused(guest_elf, tmp_path):
    stripped = tmp_path / "stripped.elf"
    subprocess.run(["strip", "-o", str(stripped), str(guest_elf)], check=True)
    with pytest.raises(LoaderError, match="stripped"):
        pyvt.Sandbox(stripped)
    with pytest.raises(LoaderError, match="arena, stack and return trampoline"):
        pyvt.Sandbox(guest_elf, memory="5M", arena="2M")  # the arena reaches down to 4 MiB
    pie = tmp_path / "pie.elf"
    subprocess.run(["cc", "-ffreestanding", "-nostdlib", "-static-pie", "-fpie", "-o",
                    str(pie), str(GUESTS / "sandbox.c"), f"-I{pyvt.get_include()}",
                    "-Wl,-e,0"], check=True, capture_output=True)
    with pytest.raises(LoaderError, match="position-independent"):
        pyvt.Sandbox(pie)
    with pytest.raises(LoaderError, match="not an ELF"):
        pyvt.Sandbox(b"\x90" * 64)


def test_a_closed_sandbox_refuses_calls(guest_elf):
    sb = pyvt.Sandbox(guest_elf, host_functions={"ready": Ready()})
    sb.close()
    sb.close()
    assert sb.closed and "closed" in repr(sb)
    with pytest.raises(pyvt.ClosedError):
        sb.call("bump")


def test_the_include_directory_ships_the_header():
    assert (Path(pyvt.get_include()) / "pyvt_guest.h").is_file()


def test_the_example_runs(capsys):
    example = Path(__file__).resolve().parent.parent / "examples" / "sandbox" / "run.py"
    if not example.exists():
        pytest.skip("examples/ is not beside the tests")
    namespace = runpy.run_path(str(example))
    namespace["main"]()
    out = capsys.readouterr().out
    assert "crc32 guest: table ready" in out
    assert "= 0x414fa339 (zlib: 0x414fa339)" in out
    assert "262144/262144" in out
    assert "as expected: crc32() took #PF" in out
    assert "calls/s of an empty function" in out
