"""The device model (pyvt.device_model): every native device is one
descriptor that Vm and the snapshots iterate; one handle base with one
detach path; errors raised where native code returns -errno; the ports and
counts of the C headers; a type stub that declares exactly what _native has."""

import ast
import re
import resource
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import pyvt
from pyvt import _native, device_model, exits, pc
from pyvt.devices import Device, DeviceDescriptor
from pyvt.snapshot import Snapshot
from pyvt.runner import LOAD_ADDRESS

ROOT = Path(__file__).resolve().parent.parent
kvm_only = pytest.mark.requires_kvm


def _run(vm, source: str, timeout: float = 10) -> exits.Exit:
    """Runs 64-bit guest code (ending in hlt) on a new or the first vCPU."""
    vm.memory.write(LOAD_ADDRESS, pyvt.assemble(
        ".code64\n.globl _start\n_start:\n" + source + "\nhlt\n", at=LOAD_ADDRESS))
    cpu = vm.vcpus.get(0) or vm.vcpu(0, mode="long")
    cpu.regs.rip = LOAD_ADDRESS
    return cpu.run(timeout=timeout)


# -- the table ----------------------------------------------------------------

def test_every_device_is_listed_once_with_a_name_handle_and_native_class():
    names = [d.name for d in device_model.DEVICES]
    assert len(names) == len(set(names))
    assert names == ["console", "debugcon", "debug_exit", "guest_exceptions", "fw_cfg", "cmos",
                     "pm_timer", "acpi_pm1", "i8042", "post"]
    for d in device_model.DEVICES:
        assert isinstance(d, DeviceDescriptor)
        assert device_model.by_name(d.name) is d
        assert issubclass(d.handle, Device) and issubclass(d.native, _native._Device)
    assert [d.name for d in device_model.stateful()] == [
        "console", "debugcon", "fw_cfg", "cmos", "acpi_pm1", "i8042", "post"]
    # Vm declares each device attribute for type checkers, and only those.
    declared = {name for name in pyvt.Vm.__annotations__
                if name in {d.name for d in device_model.DEVICES}}
    assert declared == set(names)


@kvm_only
def test_a_vm_attaches_every_range_of_every_device(vm):
    assert list(vm.devices) == [d.name for d in device_model.DEVICES]
    expected = {
        "console": ((0x3F8, 8),), "debugcon": ((0xE9, 1),), "debug_exit": ((0xF4, 4),),
        "guest_exceptions": ((0xF8, 4),),
        "fw_cfg": ((0x510, 2),), "cmos": ((0x70, 2),), "pm_timer": ((0x608, 4),),
        "acpi_pm1": ((0x600, 6),), "i8042": ((0x60, 1), (0x64, 1)), "post": ((0x80, 1),),
    }
    for name, device in vm.devices.items():
        assert getattr(vm, name) is device and device.name == name
        assert device.attached and device.ranges == expected[name]
        for start, length in device.ranges:
            assert vm._claims[(_native.SPACE_PIO, start)] == (length, name)
    assert (vm.i8042.port, vm.i8042.data_port) == (0x64, 0x60)
    with pytest.raises(TypeError):
        vm.devices["console"] = None  # read-only
    with pytest.raises(pyvt.RegionOverlapError, match="which i8042 holds"):
        vm.on_io(0x60, lambda e: 0)


@kvm_only
def test_without_pc_devices_or_debug_exit_they_are_none():
    with pyvt.Vm("16M", pc_devices=False, debug_exit_port=None) as vm:
        assert list(vm.devices) == ["console", "debugcon", "guest_exceptions"]
        for d in device_model.DEVICES:
            if d.name not in vm.devices:
                assert getattr(vm, d.name) is None
    with pyvt.Vm("16M", debug_exit_port=0x501) as vm:
        assert vm.debug_exit.ranges == ((0x501, 4),)


# -- one detach path -------------------------------------------------------------

@kvm_only
def test_detaching_the_i8042_frees_both_ports_for_python(vm):
    vm.i8042.detach()
    assert not vm.i8042.attached and not vm.i8042._native.attached
    assert (_native.SPACE_PIO, 0x60) not in vm._claims
    assert (_native.SPACE_PIO, 0x64) not in vm._claims
    written = []
    vm.on_io(0x64, lambda e: written.append(("64", e.value)) if e.is_write else 0x1C)
    vm.on_io(0x60, lambda e: written.append(("60", e.value)) if e.is_write else 0)
    exit = _run(vm, """
        mov $0x64, %dx
        in %dx, %al
        mov %al, %bl
        mov $0xfe, %al
        out %al, %dx        # would be a reset on the native i8042
        mov $0x60, %dx
        mov $0x5a, %al
        out %al, %dx
    """)
    assert isinstance(exit, exits.Hlt), exit
    assert vm.vcpus[0].regs.rbx & 0xFF == 0x1C
    assert written == [("64", 0xFE), ("60", 0x5A)]
    vm.i8042.detach()  # again: nothing to do


@kvm_only
def test_detaching_a_coalesced_console_drops_its_zone_first(vm):
    _run(vm, "mov $0xe9, %dx\nmov $0x41, %al\nout %al, %dx")
    assert vm.debugcon._native.coalescing == ("registered" if vm.debugcon.coalesced else None)
    vm.debugcon.detach()
    assert vm.debugcon._native.coalescing is None and not vm.debugcon.coalesced
    assert vm.debugcon.output == b"A"  # the queued write reached it before it left
    got = []
    vm.on_io(0xE9, lambda e: got.append(e.value))
    _run(vm, "mov $0xe9, %dx\nmov $0x42, %al\nout %al, %dx\nout %al, %dx")
    assert got == [0x42, 0x42] and vm.debugcon.output == b"A"


# -- state ------------------------------------------------------------------------

GUEST_CHANGES_EVERY_DEVICE = """
    mov $0x3ff, %dx     # UART scratch register
    mov $0x77, %al
    out %al, %dx
    mov $0x3f8, %dx
    mov $0x55, %al      # 'U' on the console
    out %al, %dx
    mov $0xe9, %dx
    mov $0x44, %al      # 'D' on the debug console
    out %al, %dx
    mov $0x70, %dx      # CMOS byte 0x41
    mov $0x41, %al
    out %al, %dx
    mov $0x71, %dx
    mov $0x99, %al
    out %al, %dx
    mov $0x64, %dx      # i8042: write the command byte
    mov $0x60, %al
    out %al, %dx
    mov $0x60, %dx
    mov $0x47, %al
    out %al, %dx
    mov $0x80, %dx
    mov $0x33, %al      # POST code
    out %al, %dx
    mov $0x510, %dx     # fw_cfg: select the signature, read one byte
    xor %eax, %eax
    out %ax, %dx
    mov $0x511, %dx
    in %dx, %al
    mov $0x602, %dx     # ACPI PM1_EN
    mov $0x0120, %ax
    out %ax, %dx
"""

GUEST_READS_EVERY_DEVICE = """
    mov $0x3ff, %dx
    in %dx, %al
    mov %al, %bl        # UART scratch
    mov $0x71, %dx
    in %dx, %al         # CMOS index still 0x41
    mov %al, %bh
    mov $0x64, %dx
    mov $0x20, %al      # read the command byte
    out %al, %dx
    mov $0x60, %dx
    in %dx, %al
    mov %al, %cl
    mov $0x80, %dx
    in %dx, %al
    mov %al, %ch
    mov $0x511, %dx     # the signature's next byte
    in %dx, %al
    mov %al, %sil
    mov $0x602, %dx
    in %dx, %ax
    mov %ax, %di        # PM1_EN
"""


@kvm_only
def test_every_device_state_round_trips_through_a_real_guest():
    with pyvt.Vm("16M") as vm:
        assert isinstance(_run(vm, GUEST_CHANGES_EVERY_DEVICE), exits.Hlt)
        states = {name: device.save_state() for name, device in vm.devices.items()
                  if device.has_state}
        assert list(states) == [d.name for d in device_model.stateful()]
        for name, state in states.items():  # what save_state gives, its check takes
            assert device_model.by_name(name).check_state(state) == state
        with pyvt.Vm("16M") as other:
            for name, state in states.items():
                other.devices[name].load_state(state)
                assert other.devices[name].save_state() == state
            assert other.console.output == b"U" and other.debugcon.output == b"D"
            exit = _run(other, GUEST_READS_EVERY_DEVICE)
            assert isinstance(exit, exits.Hlt), exit
            regs = other.vcpus[0].regs
            assert (regs.rbx & 0xFFFF, regs.rcx & 0xFFFF) == (0x9977, 0x3347)
            assert regs.rsi & 0xFF == ord("E")  # "QEMU"[1]
            assert other.post.writes == 1
            assert regs.rdi & 0xFFFF == 0x0120 and other.acpi_pm1.enable == 0x0120


@kvm_only
def test_device_states_survive_a_snapshot_file(vm, tmp_path):
    assert isinstance(_run(vm, GUEST_CHANGES_EVERY_DEVICE), exits.Hlt)
    vm.fw_cfg.add_file("opt/pyvt/x", b"file data")
    snap = vm.snapshot()
    assert set(snap.devices) == {d.name for d in device_model.stateful()}
    path = tmp_path / "devices.snap"
    snap.save(str(path))
    loaded = Snapshot.load(str(path))
    try:
        assert loaded.devices == snap.devices
        assert loaded.pc_devices and snap.pc_devices
    finally:
        loaded.close()
        snap.close()


@kvm_only
def test_a_state_that_does_not_fit_is_refused_clearly(vm):
    with pytest.raises(pyvt.DeviceStateError, match="registers is 1 bytes") as caught:
        vm.cmos.load_state(b"x")
    assert isinstance(caught.value, pyvt.ArgumentError) and isinstance(caught.value, ValueError)
    with pytest.raises(pyvt.DeviceStateError, match="lacks the field"):
        vm.console.load_state({"output": b""})
    with pytest.raises(pyvt.DeviceStateError, match=r"items\[0\] is the file directory"):
        vm.fw_cfg.load_state({"items": [[0x19, b""]], "files": [], "position": [0, 0]})
    with pytest.raises(pyvt.DeviceStateError, match="another pyvt build"):
        vm.i8042._native.load_state(b"")  # the native check, below the handle's
    with pytest.raises(NotImplementedError):
        vm.pm_timer.save_state()


# -- errors raised at the native boundary ---------------------------------------

@kvm_only
def test_native_failures_raise_device_errors_not_kvm_errors(vm):
    # Out of file descriptors: duplicating one for a stream fails.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with open("/dev/null", "wb") as sink:
        resource.setrlimit(resource.RLIMIT_NOFILE, (sink.fileno() + 1, hard))
        try:
            with pytest.raises(pyvt.DeviceError, match="close some files") as caught:
                vm.console.stream(sink)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert not isinstance(caught.value, pyvt.KvmError)
    # The bus itself refuses a second device on taken ports.
    with pytest.raises(pyvt.RegionOverlapError, match="overlaps one already on pyvt's bus"):
        _native.PostCode(vm._machine, 0x80).attach()
    with pytest.raises(pyvt.ArgumentError, match="nothing is registered"):
        vm._machine.remove(_native.SPACE_PIO, 0x1234)
    with pytest.raises(pyvt.ArgumentTypeError, match="no input"):
        vm.debugcon.feed(b"x")


def test_the_old_handle_name_still_works_with_a_warning():
    from pyvt import devices

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert devices.DebugExitDevice is devices.DebugExit
    assert [w.category for w in caught] == [DeprecationWarning]


# -- one source per fact -------------------------------------------------------------

def _header_defines():
    defines = {}
    for header in (ROOT / "csrc").glob("*.h"):
        for name, value in re.findall(r"^#define (PVT_\w+) (0x[0-9a-fA-F]+|\d+)",
                                      header.read_text(), re.M):
            defines[name] = int(value, 0)
    return defines


def test_ports_and_counts_are_the_c_headers():
    if not (ROOT / "csrc").is_dir():
        pytest.skip("needs the source checkout")
    c = _header_defines()
    python_to_c = {
        "UART_PORT": "PVT_UART_DEFAULT_PORT", "UART_PORT_COUNT": "PVT_UART_PORT_COUNT",
        "UART_IRQ": "PVT_UART_DEFAULT_IRQ", "UART_COM2_IRQ": "PVT_UART_COM2_IRQ",
        "DEBUGCON_PORT": "PVT_DEBUGCON_DEFAULT_PORT",
        "DEBUGCON_PORT_COUNT": "PVT_DEBUGCON_PORT_COUNT",
        "DEBUG_EXIT_PORT": "PVT_DEBUG_EXIT_DEFAULT_PORT",
        "DEBUG_EXIT_PORT_COUNT": "PVT_DEBUG_EXIT_PORT_COUNT",
        "FW_CFG_PORT": "PVT_FW_CFG_PORT", "FW_CFG_PORT_COUNT": "PVT_FW_CFG_PORT_COUNT",
        "CMOS_PORT": "PVT_CMOS_PORT", "CMOS_PORT_COUNT": "PVT_CMOS_PORT_COUNT",
        "PM_TIMER_PORT": "PVT_PM_TIMER_PORT", "PM_TIMER_PORT_COUNT": "PVT_PM_TIMER_PORT_COUNT",
        "I8042_DATA_PORT": "PVT_I8042_DATA_PORT", "I8042_COMMAND_PORT": "PVT_I8042_COMMAND_PORT",
        "I8042_PORT_COUNT": "PVT_I8042_PORT_COUNT",
        "POST_PORT": "PVT_PORT80_PORT", "POST_PORT_COUNT": "PVT_PORT80_PORT_COUNT",
        "PM1_PORT": "PVT_PM1_PORT", "PM1_PORT_COUNT": "PVT_PM1_PORT_COUNT",
        "PM1_EVENT_LENGTH": "PVT_PM1_EVENT_LENGTH",
        "PM1_CONTROL_LENGTH": "PVT_PM1_CONTROL_LENGTH",
        "FW_CFG_FILE_DIR": "PVT_FW_CFG_FILE_DIR", "FW_CFG_KEY_COUNT": "PVT_FW_CFG_KEY_COUNT",
        "I8042_CMD_PULSE_RESET": "PVT_I8042_CMD_PULSE_RESET",
        "GUEST_EXCEPTION_PORT": "PVT_GUEST_EXCEPTION_PORT",
        "CMOS_SIZE": "PVT_CMOS_SIZE", "FW_CFG_NAME_SIZE": "PVT_FW_CFG_NAME_SIZE",
    }
    for python, macro in python_to_c.items():
        assert getattr(_native, python) == c[macro], (python, macro)
    # Python's own names are the same objects, not numbers written again.
    assert (pc.FW_CFG_PORT, pc.CMOS_PORT, pc.PM_TIMER_PORT, pc.POST_PORT) == (
        _native.FW_CFG_PORT, _native.CMOS_PORT, _native.PM_TIMER_PORT, _native.POST_PORT)
    assert [d.port for d in device_model.DEVICES] == [
        c["PVT_UART_DEFAULT_PORT"], c["PVT_DEBUGCON_DEFAULT_PORT"],
        c["PVT_DEBUG_EXIT_DEFAULT_PORT"], c["PVT_GUEST_EXCEPTION_PORT"], c["PVT_FW_CFG_PORT"], c["PVT_CMOS_PORT"],
        c["PVT_PM_TIMER_PORT"], c["PVT_PM1_PORT"], c["PVT_I8042_DATA_PORT"],
        c["PVT_PORT80_PORT"]]


def test_no_python_module_writes_a_device_port_again():
    """The numbers live in the C headers: pyvt/*.py only names them."""
    if not (ROOT / "csrc").is_dir():
        pytest.skip("needs the source checkout")
    assignment = re.compile(r"^\s*\w*(PORT|PORT_COUNT)\w*\s*(:\s*\w+\s*)?=\s*(0x[0-9a-fA-F]+|\d+)\b",
                            re.M)
    offenders = [f"{path.name}: {m.group(0).strip()}"
                 for path in (ROOT / "pyvt").glob("*.py")
                 for m in assignment.finditer(path.read_text())]
    assert offenders == []


# -- the type stub ----------------------------------------------------------------------

def _stub_names():
    tree = ast.parse((ROOT / "pyvt" / "_native.pyi").read_text())
    names = {}
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            names[node.name] = node
        elif isinstance(node, ast.AnnAssign):
            names[node.target.id] = node
    return names


def test_the_stub_declares_exactly_what_native_has():
    stub = _stub_names()
    assert "__getattr__" not in stub  # nothing hidden
    assert sorted(name for name in stub if not hasattr(_native, name)) == []
    defined_here = {name for name, value in vars(_native).items()
                    if not name.startswith("__") and getattr(value, "__module__", "pyvt._native")
                    == "pyvt._native" and not isinstance(value, type(sys))}
    public = {name for name in defined_here
              if not name.startswith("_") or isinstance(getattr(_native, name), type)}
    assert sorted(public - set(stub)) == []
    # Every device class, with its public methods.
    for cls in (getattr(_native, name) for name in stub if isinstance(stub[name], ast.ClassDef)):
        declared = {item.name for item in stub[cls.__name__].body
                    if isinstance(item, ast.FunctionDef)}
        declared |= {item.target.id for item in stub[cls.__name__].body
                     if isinstance(item, ast.AnnAssign)}
        bases = [b.id for b in stub[cls.__name__].bases if isinstance(b, ast.Name)]
        while bases:
            base = stub[bases.pop()]
            declared |= {item.name for item in base.body if isinstance(item, ast.FunctionDef)}
            declared |= {i.target.id for i in base.body if isinstance(i, ast.AnnAssign)}
            bases += [b.id for b in base.bases if isinstance(b, ast.Name)]
        if issubclass(cls, _native._Device):
            missing = {name for name in vars(cls) if not name.startswith("_")} - declared
            assert missing == set(), (cls.__name__, missing)


def test_mypy_sees_every_device_class_and_no_other(tmp_path):
    pytest.importorskip("mypy")
    code = tmp_path / "use_native.py"
    code.write_text(
        "from pyvt import _native\n"
        "m = _native.Machine()\n"
        "devices = [_native.Uart(m, 1), _native.DebugCon(m, 2), _native.DebugExit(m, 3),\n"
        "           _native.FwCfg(m, 4), _native.Cmos(m, 5), _native.PmTimer(m, 6),\n"
        "           _native.I8042(m, 7), _native.PostCode(m, 8), _native.AcpiPm1(m, 10)]\n"
        "size: int = _native.I8042.STATE_SIZE + _native.Cmos.STATE_SIZE\n"
        "key: int = _native.FwCfg(m, 9).add_file(b'n', b'd')\n"
        "old = _native.Port80\n")
    out = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir=/dev/null",
                          "--ignore-missing-imports", "--no-error-summary", str(code)], capture_output=True, text=True,
                         cwd=ROOT, env={"MYPYPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    errors = [line for line in out.stdout.splitlines()
              if ": error:" in line and line.startswith(str(code))]
    assert len(errors) == 1 and '"Port80"' in errors[0], out.stdout + out.stderr


@kvm_only
def test_a_console_zone_is_registered_by_the_first_write_only(vm):
    # Registering a coalesced zone at creation made a quick close wait for
    # the kernel's grace period (~15 ms): it waits for the guest's first write.
    if not vm.debugcon.coalesced:
        pytest.skip(f"{vm.backend} has no KVM_CAP_COALESCED_PIO")
    assert vm.debugcon._native.coalescing == "armed"
    assert vm.console._native.coalescing == "armed"
    _run(vm, "mov $0xe9, %dx\nmov $0x41, %al\nout %al, %dx\nout %al, %dx\nout %al, %dx")
    assert vm.debugcon._native.coalescing == "registered"
    assert vm.console._native.coalescing == "armed"  # the guest never wrote to it
    assert vm.debugcon.output == b"AAA"
    # The first write exited (and registered the zone); the others were queued.
    assert vm.vcpus[0].stats["coalesced_writes"] == 2


@kvm_only
def test_a_console_zone_armed_but_never_registered_detaches_cleanly(vm):
    vm.console.detach()
    assert vm.console._native.coalescing is None
    got = []
    vm.on_io(0x3F8, lambda e: got.append(e.value))
    _run(vm, "mov $0x3f8, %dx\nmov $0x42, %al\nout %al, %dx")
    assert got == [0x42] and vm.console.output == b""
