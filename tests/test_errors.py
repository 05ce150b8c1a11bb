"""Every documented error: a pyvt.Error subclass with a message that helps."""

import builtins
import os
import re
from pathlib import Path

import pytest

import pyvt
from pyvt import exits
from pyvt._kvm import lib


def test_missing_device():
    with pytest.raises(pyvt.BackendNotFound, match="/nonexistent/kvm does not exist"):
        pyvt.Vm(backend="/nonexistent/kvm")


def test_not_a_kvm_device(tmp_path):
    path = tmp_path / "plain-file"
    path.write_bytes(b"")
    with pytest.raises(pyvt.BackendError, match="not a KVM device"):
        pyvt.Vm(backend=str(path))


@pytest.mark.requires_kvm
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another user")
def test_no_permission_on_device():
    # Root can open anything: a child that drops to "nobody" shows the
    # message a normal user gets.
    device = pyvt.select_backend()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            pyvt.kvm.Kvm(device)
            message = b"opened"
        except pyvt.BackendPermissionError as e:
            message = f"OK {e}".encode()
        except BaseException as e:  # report anything else to the parent
            message = repr(e).encode()
        os.write(write_end, message)
        os._exit(0)
    os.close(write_end)
    message = os.read(read_end, 4096).decode()
    os.close(read_end)
    os.waitpid(pid, 0)
    assert message.startswith(f"OK no permission to open {device}"), message
    assert "kvm" in message


def test_api_version_mismatch(monkeypatch):
    monkeypatch.setattr(pyvt.kvm.Kvm, "api_version", lambda self: 11)
    try:
        path = pyvt.select_backend()
    except pyvt.Error as e:
        pytest.skip(str(e))
    with pytest.raises(pyvt.ApiVersionMismatch, match="version 11; pyvt needs 12"):
        pyvt.kvm.Kvm(path)


@pytest.mark.parametrize("size,message", [
    (1000, "not a multiple of the page size"),
    ("12Q", "cannot read memory size"),
    (0, "must be positive"),
    ("64T", "cannot be allocated|beyond the guest's physical address space"),
    (True, "memory size must be"),
])
@pytest.mark.requires_kvm
def test_bad_memory_sizes(size, message):
    with pytest.raises(pyvt.MemoryConfigError, match=message):
        pyvt.Vm(memory=size)


@pytest.mark.requires_kvm
def test_overlapping_regions_and_out_of_range_access(vm):
    with pytest.raises(pyvt.RegionOverlapError, match="overlaps"):
        vm.memory.add_region(0x800000, "16M")
    with pytest.raises(pyvt.MemoryConfigError, match="not page-aligned"):
        vm.memory.add_region(0x10000001, "4K")
    with pytest.raises(pyvt.OutOfRangeError, match="no memory region holds"):
        vm.memory.write(vm.memory.size - 2, b"abcd")
    with pytest.raises(pyvt.OutOfRangeError):
        vm.memory.read(1 << 40, 1)
    with pytest.raises(pyvt.OutOfRangeError):
        vm.memory.read(-1, 1)
    with pytest.raises(pyvt.ArgumentError):
        vm.memory.write(0, "text")
    # Nothing was written by the refused write.
    assert vm.memory.read(vm.memory.size - 2, 2) == b"\0\0"
    region = vm.memory.add_region(0x10000000, "4K")
    vm.memory.write(region.gpa, b"ok")
    assert vm.memory[region.gpa:region.gpa + 2] == b"ok"


@pytest.mark.requires_kvm
def test_bad_mode_and_vcpu_index(vm):
    with pytest.raises(pyvt.InvalidModeError, match="unknown CPU mode 'unreal'"):
        vm.vcpu(0, mode="unreal")
    with pytest.raises(pyvt.VcpuIndexError, match="out of range"):
        vm.vcpu(vm.max_vcpus)
    with pytest.raises(pyvt.VcpuIndexError):
        vm.vcpu(-1)
    vm.vcpu(0)
    with pytest.raises(pyvt.VcpuIndexError, match="exists already"):
        vm.vcpu(0)


@pytest.mark.requires_kvm
def test_use_after_close(guest):
    vm = pyvt.Vm("16M")
    cpu = vm.vcpu(0, mode="long")
    vm.close()
    vm.close()  # idempotent
    with pytest.raises(pyvt.ClosedError):
        vm.vcpu(1)
    with pytest.raises(pyvt.ClosedError):
        vm.memory.read(0, 1)
    with pytest.raises(pyvt.ClosedError):
        cpu.run()
    with pytest.raises(pyvt.ClosedError):
        _ = cpu.regs.rax
    with pytest.raises(pyvt.ClosedError):
        vm.on_io(0x10, print)


@pytest.mark.requires_kvm
def test_memoryview_outlives_close_safely():
    vm = pyvt.Vm("1M")
    view = vm.memory.view
    view[0:2] = b"hi"
    vm.close()
    assert bytes(view[0:2]) == b"hi"  # still mapped: no dangling pointer
    view.release()


@pytest.mark.requires_kvm
def test_triple_fault_reports_registers(vm, load):
    cpu = load("triple_fault", "long")
    exit = cpu.run(timeout=5)
    assert isinstance(exit, exits.Shutdown) and exit.failed
    # The registers as KVM reports them after the shutdown (PVM and
    # kvm-intel keep them; AMD-V resets the vCPU first, so RAX may be 0).
    assert isinstance(exit.regs, pyvt.Registers)
    assert exit.regs.rax in (0x1234, 0) and exit.rip == exit.regs.rip
    with pytest.raises(pyvt.TripleFault, match="triple-faulted") as info:
        exit.raise_for_failure()
    assert f"RAX={exit.regs.rax:016x}" in str(info.value)
    assert f"RIP={exit.regs.rip:016x}" in str(info.value)


@pytest.mark.requires_kvm
def test_run_check_raises_for_failures(guest):
    # A fresh VM: after a shutdown some KVMs (AMD-V, pyvt.ko) reset the vCPU.
    with pyvt.Vm("16M") as vm:
        vm.memory.write(0x1000, guest("triple_fault"))
        cpu = vm.vcpu(0, mode="long")
        cpu.regs.rip = 0x1000
        with pytest.raises(pyvt.TripleFault):
            cpu.run(timeout=5, check=True)


@pytest.mark.requires_kvm
def test_internal_error_shows_the_instruction(vm, load):
    cpu = load("unsupported_insn", "long")
    exit = cpu.run(timeout=5)
    if isinstance(exit, (exits.Hlt, exits.Shutdown)):
        pytest.skip(f"this host handles clac itself ({exit!r}): no internal error to see")
    assert isinstance(exit, exits.InternalError), exit
    assert exit.instruction.startswith(bytes([0x0F, 0x01, 0xCA])), exit.instruction.hex()
    message = exit.describe()
    assert "KVM internal error" in message and "bytes at rip: 0f 01 ca" in message
    assert exit.regs.rdi == 0x5000
    try:
        import capstone  # noqa: F401
    except ImportError:
        return
    assert exit.disassembly == "clac"
    with pytest.raises(pyvt.InternalError):
        exit.raise_for_failure()


@pytest.mark.requires_kvm
def test_fail_entry_is_decoded(vm):
    # Software-assisted KVM (PVM, these machines) checks guest state in
    # software and never fails a VM entry, so this drives the decoder with a
    # failure written into the real kvm_run page, as VMX and SVM report them.
    cpu = vm.vcpu(0, mode="long")
    run = cpu.fd.run_struct
    run.exit_reason = lib.KVM_EXIT_FAIL_ENTRY
    run.fail_entry.hardware_entry_failure_reason = 0x80000021
    run.fail_entry.cpu = 1
    exit = cpu._decode_kvm_exit()
    assert isinstance(exit, exits.FailEntry) and exit.failed
    assert "invalid guest state" in exit.describe() and "host CPU 1" in exit.describe()
    with pytest.raises(pyvt.EntryFailed, match="0x80000021"):
        exit.raise_for_failure()
    run.fail_entry.hardware_entry_failure_reason = 0xFFFFFFFFFFFFFFFF
    assert "VMEXIT_INVALID" in cpu._decode_kvm_exit().reason
    # A VMLAUNCH that fails outright reports the VM-instruction error.
    run.fail_entry.hardware_entry_failure_reason = 7
    assert cpu._decode_kvm_exit().reason == \
        "VMX: VM-instruction error 7: VM entry with invalid control field(s)"


@pytest.mark.requires_kvm
def test_unknown_exit_reason_is_a_value(vm):
    cpu = vm.vcpu(0)
    cpu.fd.run_struct.exit_reason = 1234
    exit = cpu._decode_kvm_exit()
    assert isinstance(exit, exits.Unhandled) and exit.reason == 1234


@pytest.mark.requires_kvm
def test_bad_arguments_are_rejected(vm):
    cpu = vm.vcpu(0)
    with pytest.raises(pyvt.ArgumentError):
        cpu.run(timeout=-1)
    with pytest.raises(pyvt.ArgumentError):
        cpu.run(timeout="soon")
    with pytest.raises(pyvt.ArgumentError):
        cpu.set_msrs([1, 2])
    with pytest.raises(pyvt.ArgumentError):
        pyvt.run("not bytes")
    with pytest.raises(pyvt.ArgumentError):
        pyvt.Vm(backend=42)


def test_assembler_errors_are_clear():
    with pytest.raises(pyvt.AssemblerError, match="no such instruction"):
        pyvt.assemble("_start: frobnicate %eax")
    assert pyvt.assemble(".code16\n.globl _start\n_start: hlt") == b"\xf4"


@pytest.mark.requires_kvm
def test_backend_io_data_outside_the_mapping_is_refused(vm):
    # A KVM-ABI backend with a bug (data_offset past the mapping) must not
    # make the run loop touch memory outside it: simulated by running the
    # native loop's check on a doctored exit in the real kvm_run page.
    cpu = vm.vcpu(0)
    run = cpu.fd.run_struct
    run.exit_reason = lib.KVM_EXIT_IO
    run.io.size, run.io.count, run.io.data_offset = 1, 1, 4096
    assert cpu._loop.io_data_valid()
    for size, count, offset in ((1, 1, 1 << 40), (4, 1 << 20, 4096), (0, 1, 4096), (1, 1, 8)):
        run.io.size, run.io.count, run.io.data_offset = size, count, offset
        assert not cpu._loop.io_data_valid(), (size, count, offset)
    with pytest.raises(pyvt.BackendError, match="outside the vCPU mapping"):
        cpu._decode(pyvt._native.STOP_BAD_EXIT, 0, 0, None)


@pytest.mark.requires_kvm
def test_guest_memory_access_errors_are_pyvt_errors(vm):
    memory = vm.memory
    memory.write(0x100, b"keep")
    bad_calls = [
        (pyvt.ArgumentError, lambda: memory.__setitem__(0x100, 300)),
        (pyvt.ArgumentError, lambda: memory.__setitem__(0x100, -1)),
        (pyvt.ArgumentTypeError, lambda: memory.__setitem__(0x100, "a")),
        (pyvt.ArgumentTypeError, lambda: memory.__setitem__(slice(0x100, 0x104), 5)),
        (pyvt.ArgumentError, lambda: memory.__setitem__(slice(0x100, 0x104), b"ab")),
        (pyvt.ArgumentTypeError, lambda: memory.__setitem__(slice("a", None), b"ab")),
        (pyvt.ArgumentTypeError, lambda: memory.__getitem__(slice(0x100, "b"))),
        (pyvt.ArgumentTypeError, lambda: memory.__getitem__(None)),
        (pyvt.ArgumentError, lambda: memory.write_int(0x100, 1 << 32, 4)),
        (pyvt.ArgumentError, lambda: memory.write_int(0x100, -(1 << 31) - 1, 4)),
        (pyvt.ArgumentTypeError, lambda: memory.write_int(0x100, 1.5, 4)),
        (pyvt.ArgumentTypeError, lambda: memory.write_int(0x100, None)),
        (pyvt.ArgumentError, lambda: memory.write_int(0x100, 0, 0)),
        (pyvt.OutOfRangeError, lambda: memory.write_int(0x100, 0, 1 << 50)),
        (pyvt.OutOfRangeError, lambda: memory.read_int(0x100, -1)),
        (pyvt.ArgumentTypeError, lambda: memory.read(0x100, "4")),
    ]
    for error, call in bad_calls:
        with pytest.raises(error):
            call()
    assert memory.read(0x100, 4) == b"keep"  # nothing refused was written
    # Builtin-compatible: what Python raises for bytearray[0] = 300 / "a".
    with pytest.raises(ValueError):
        memory[0x100] = 300
    with pytest.raises(TypeError):
        memory[0x100] = "a"
    # A negative int that fits is written in two's complement.
    memory.write_int(0x100, -1, 4)
    assert memory.read(0x100, 4) == b"\xff" * 4
    memory.write_int(0x100, -(1 << 31), 4)
    assert memory.read_int(0x100, 4) == 1 << 31
    memory[0x100] = 0x41
    memory[0x101:0x103] = bytearray(b"BC")
    assert memory[0x100:0x103] == b"ABC"


@pytest.mark.requires_kvm
def test_kvm_layer_argument_errors_are_pyvt_errors(vm):
    cpu = vm.vcpu(0, mode="long")
    fd = cpu.fd
    bad_calls = [
        (pyvt.ArgumentTypeError, lambda: vm.kvm.get_msrs(None)),
        (pyvt.ArgumentTypeError, lambda: fd.get_msrs(None)),
        (pyvt.ArgumentError, lambda: fd.get_msrs([-1])),
        (pyvt.ArgumentTypeError, lambda: fd.set_msrs([0x10])),
        (pyvt.ArgumentTypeError, lambda: fd.set_regs(5)),
        (pyvt.ArgumentTypeError, lambda: fd.set_regs(fd.get_sregs())),
        (pyvt.ArgumentTypeError, lambda: fd.set_sregs(b"\0" * 8)),
        (pyvt.ArgumentTypeError, lambda: fd.set_cpuid2(None)),
        (pyvt.ArgumentTypeError, lambda: fd.set_cpuid2_table(7)),
        # A header saying 5 entries, and none behind it: KVM would read past it.
        (pyvt.ArgumentError, lambda: fd.set_cpuid2_table((5).to_bytes(8, "little"))),
        (pyvt.ArgumentTypeError, lambda: fd.set_guest_debug(0, None)),
        (pyvt.ArgumentError, lambda: fd.set_guest_debug(0, [0] * 9)),
        (pyvt.ArgumentTypeError, lambda: fd.set_lapic("state")),
        (pyvt.ArgumentError, lambda: fd.set_lapic(b"short")),
        (pyvt.ArgumentError, lambda: vm.kvm.check_extension(1 << 70)),
        (pyvt.ArgumentTypeError, lambda: vm.kvm.check_extension(1.5)),
        (pyvt.ArgumentTypeError, lambda: vm.kvm.create_vm("x")),
        (pyvt.ArgumentError, lambda: vm.fd.register_ioeventfd(-1, 0x10)),
        (pyvt.ArgumentError, lambda: vm.fd.enable_cap("KVM_CAP_HALT_POLL", flags=-1)),
        (pyvt.ArgumentTypeError, lambda: pyvt.kvm.Kvm.shared(["/dev/kvm"])),
        (pyvt.ArgumentTypeError, lambda: pyvt.kvm.host_cpuid("0")),
        (pyvt.ArgumentError, lambda: pyvt.kvm.host_cpuid(1 << 32)),
    ]
    for error, call in bad_calls:
        with pytest.raises(error):
            call()
    with pytest.raises(TypeError):  # as Python's own "'NoneType' is not iterable"
        vm.kvm.get_msrs(None)
    spare = vm.fd.create_vcpu(1)
    spare.close()
    with pytest.raises(pyvt.ClosedError):
        spare.immediate_exit = True
    # The struct itself (not just a pointer to it) is taken too.
    regs = fd.get_regs()
    regs.rbx = 0x5151
    fd.set_regs(regs[0])
    assert fd.get_regs().rbx == 0x5151


@pytest.mark.requires_kvm
def test_bus_registration_errors_are_not_kvm_errors(vm):
    # No ioctl is involved in registering a handler: no KvmError.
    for addresses in ((2**64 - 1, 1), (1 << 63, 0x1000), range(0x1000000, 2**64)):
        with pytest.raises(pyvt.ArgumentError, match="physical address space") as info:
            vm.on_mmio(addresses, lambda e: 0)
        assert not isinstance(info.value, pyvt.KvmError)
    # Should pyvt's own bookkeeping and the native bus ever disagree, the
    # bus's refusal is a RegionOverlapError too (simulated: a claim dropped).
    del vm._claims[(pyvt._native.SPACE_PIO, vm.console.port)]
    with pytest.raises(pyvt.RegionOverlapError, match="overlaps one already on pyvt's bus"):
        vm.on_io(vm.console.port, lambda e: 0)
    with pytest.raises(pyvt.ArgumentTypeError):
        vm.on_io(0x20, "not callable")
    with pytest.raises(pyvt.ArgumentTypeError):
        vm.off_mmio(None)


@pytest.mark.parametrize("name", ["../escaped", "sub/guest", "/tmp/guest", "", ".", "..",
                                  "nul\0byte", "x" * 300])
def test_assemble_refuses_names_that_are_not_file_stems(tmp_path, monkeypatch, name):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # pyvt's build dir goes here
    with pytest.raises(pyvt.ArgumentError, match="name"):
        pyvt.assemble(".globl _start\n_start: hlt\n", name=name)
    assert list(tmp_path.iterdir()) == []  # nothing written, here or above


def test_assemble_argument_errors(tmp_path):
    with pytest.raises(pyvt.ArgumentTypeError):
        pyvt.assemble(".globl _start\n_start: hlt\n", name=5)
    with pytest.raises(pyvt.ArgumentTypeError):
        pyvt.assemble(b"hlt")
    with pytest.raises(pyvt.ArgumentError):
        pyvt.assemble(".globl _start\n_start: hlt\n", at=-1)
    with pytest.raises(pyvt.AssemblerError, match="cannot read"):
        pyvt.assemble_file(tmp_path / "missing.S")
    # A stem with spaces and dots is a plain file name.
    assert pyvt.assemble(".globl _start\n_start: hlt\n", name="my guest.v2") == b"\xf4"


def test_readme_errors_section_names_every_error_class():
    readme = Path(__file__).resolve().parent.parent / "README.md"
    if not readme.exists():
        pytest.skip("README.md is not beside the tests (installed without the checkout)")
    import pyvt.boot  # noqa: F401  (BootError, LoaderError)

    section = readme.read_text().split("## Errors\n", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`(\w+)`", section))

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    missing = sorted(c.__name__ for c in subclasses(pyvt.Error) if c.__name__ not in named)
    assert missing == [], f"README's Errors section does not name {missing}"
    # Each row says which builtins its classes also are (or a subclass of one).
    for cls in subclasses(pyvt.Error):
        row = next(line for line in section.splitlines() if f"`{cls.__name__}`" in line)
        said = [getattr(builtins, name) for name in re.findall(r"`(\w+)`", row)
                if isinstance(getattr(builtins, name, None), type)]
        for builtin in (ValueError, TypeError, IndexError, OSError):
            if issubclass(cls, builtin):
                assert any(issubclass(b, builtin) for b in said), (cls.__name__, builtin.__name__)
