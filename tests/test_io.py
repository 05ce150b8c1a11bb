"""Port I/O and MMIO: Python handlers, unclaimed exits, string I/O."""

import pytest

import pyvt
from pyvt import exits

pytestmark = pytest.mark.requires_kvm


def test_port_handlers_see_writes_and_answer_reads(vm, load):
    writes, string_out = [], []
    vm.on_io(0x10, lambda e: writes.append((e.port, e.size, e.value, e.direction)))
    vm.on_io(0x11, lambda e: 0xCAFEF00D)
    vm.on_io(0x12, lambda e: string_out.append(e.data))
    letters = iter(b"wxyz")
    vm.on_io(range(0x13, 0x14), lambda e: next(letters))
    cpu = load("port_io", "protected")
    exit = cpu.run(timeout=5)
    assert isinstance(exit, exits.Hlt), exit
    assert writes == [(0x10, 1, 1, "out"), (0x10, 1, 2, "out"), (0x10, 1, 3, "out")]
    assert vm.memory.read_int(0x5000, 4) == 0xCAFEF00D
    # rep outsb / rep insb: the handler is called once per element.
    assert string_out == [b"A", b"B", b"C", b"D"]
    assert vm.memory.read(0x6000, 4) == b"wxyz"


def test_handler_exit_objects_are_immutable_and_printable(vm, load):
    seen = []
    vm.on_io((0x10, 1), seen.append)
    vm.on_io(0x11, lambda e: 0)
    vm.on_io(0x12, lambda e: None)
    vm.on_io(0x13, lambda e: 0)
    load("port_io", "protected").run(timeout=5)
    first = seen[0]
    with pytest.raises(AttributeError):
        first.port = 1
    assert repr(first).startswith("Io(out port=0x10, size=1, value=0x1")
    assert first.rip is not None and first.rip > 0x1000


def test_unclaimed_io_is_returned_and_reply_answers_it(vm, load):
    cpu = load("port_io", "protected")
    exit = cpu.run(timeout=5)
    assert exit == exits.Io(0x10, 1, "out", b"\x01", 1, exit.rip)
    cpu.run(timeout=5)
    cpu.run(timeout=5)
    read = cpu.run(timeout=5)
    assert (read.port, read.direction, read.size) == (0x11, "in", 4)
    cpu.reply(0x11223344)
    # rep outsb, unclaimed: KVM may report it in one exit or several.
    written = b""
    while len(written) < 4:
        out = cpu.run(timeout=5)
        assert (out.port, out.direction, out.size) == (0x12, "out", 1), out
        assert len(out.data) == out.count
        written += out.data
    assert written == b"ABCD"
    assert vm.memory.read_int(0x5000, 4) == 0x11223344
    with pytest.raises(pyvt.Error, match="pending read"):
        cpu.reply(1)


def test_mmio_handler(vm, load):
    writes = []
    vm.on_mmio(range(0xD0000000, 0xD0001000),
               lambda e: writes.append((e.address, e.value)) if e.is_write else 0x1122334455667788)
    cpu = load("mmio", "long")
    exit = cpu.run(timeout=5)
    assert isinstance(exit, exits.Hlt), exit
    assert writes == [(0xD0000000, 0xDEADBEEF)]
    assert cpu.regs.rax == 0x1122334455667788
    assert vm.memory.read_int(0x5000) == 0x1122334455667788


def test_unclaimed_mmio_is_returned(vm, load):
    cpu = load("mmio", "long")
    exit = cpu.run(timeout=5)
    assert isinstance(exit, exits.Mmio)
    assert (exit.address, exit.size, exit.is_write, exit.value) == (0xD0000000, 4, True, 0xDEADBEEF)
    read = cpu.run(timeout=5)
    assert (read.address, read.size, read.is_write) == (0xD0000010, 8, False)
    with pytest.raises(pyvt.ArgumentError, match="does not fit in a 8-byte read"):
        cpu.reply(1 << 64)
    with pytest.raises(pyvt.ArgumentError, match="3 bytes for a 8-byte read"):
        cpu.reply(b"abc")
    cpu.reply(99)
    assert isinstance(cpu.run(timeout=5), exits.Hlt)
    assert cpu.regs.rax == 99


def test_handler_exception_propagates_and_vm_stays_usable(vm, load):
    calls = []

    def flaky(exit):
        calls.append(exit.value)
        if len(calls) == 2:
            raise RuntimeError("handler bug")

    vm.on_io(0x10, flaky)
    vm.on_io(0x11, lambda e: 5)
    vm.on_io(0x12, lambda e: None)
    vm.on_io(0x13, lambda e: 1)
    cpu = load("port_io", "protected")
    with pytest.raises(RuntimeError, match="handler bug"):
        cpu.run(timeout=5)
    assert isinstance(cpu.run(timeout=5), exits.Hlt)
    assert calls == [1, 2, 3]


@pytest.mark.parametrize("answer,error", [
    ("text", TypeError), (None, TypeError), (1 << 40, ValueError), (b"\x00", ValueError),
])
def test_bad_handler_answers_raise_clearly(vm, load, answer, error):
    vm.on_io(0x10, lambda e: None)
    vm.on_io(0x11, lambda e: answer)
    cpu = load("port_io", "protected")
    with pytest.raises(error, match="port 0x11"):
        cpu.run(timeout=5)


def test_handler_ranges_are_validated(vm):
    with pytest.raises(pyvt.RegionOverlapError, match="which console holds"):
        vm.on_io(range(0x3F0, 0x400), lambda e: 0)
    vm.on_io(0x10, lambda e: 0)
    with pytest.raises(pyvt.RegionOverlapError):
        vm.on_io((0x0F, 2), lambda e: 0)
    with pytest.raises(pyvt.ArgumentError):
        vm.on_io(0x10000, lambda e: 0)
    with pytest.raises(pyvt.ArgumentError):
        vm.on_io(0x20, "not callable")
    with pytest.raises(pyvt.RegionOverlapError, match="guest RAM"):
        vm.on_mmio(range(0x1000, 0x2000), lambda e: 0)
    vm.off_io(0x10)
    vm.on_io(0x10, lambda e: 0)
    with pytest.raises(pyvt.ArgumentError):
        vm.off_io(0x3F8)


def test_readonly_region_writes_exit_as_mmio(vm):
    region = vm.memory.add_region(0x4000000, "64K", readonly=True)
    vm.memory.write(0x4000000, b"\x2a")
    # mov 0x4000000, %al; movb $1, 0x4000000; hlt
    code = bytes([0x8A, 0x04, 0x25, 0x00, 0x00, 0x00, 0x04,
                  0xC6, 0x04, 0x25, 0x00, 0x00, 0x00, 0x04, 0x01, 0xF4])
    vm.memory.write(0x1000, code)
    cpu = vm.vcpu(0, mode="long")
    cpu.regs.rip = 0x1000
    exit = cpu.run(timeout=5)
    assert isinstance(exit, exits.Mmio) and exit.is_write and exit.address == region.gpa
    assert cpu.regs.rax & 0xFF == 0x2A
    assert isinstance(cpu.run(timeout=5), exits.Hlt)
    assert vm.memory.read(0x4000000, 1) == b"\x2a"


def test_backend_without_sync_regs(monkeypatch, guest):
    """Backends without KVM_CAP_SYNC_REGS (pyvt.ko): registers go through
    KVM_GET/SET_REGS and handler exits still carry RIP."""
    kvm = pyvt.kvm.Kvm.shared(pyvt.select_backend())
    real = kvm.check_extension
    monkeypatch.setattr(kvm, "check_extension",
                        lambda cap: 0 if cap == "KVM_CAP_SYNC_REGS" else real(cap))
    with pyvt.Vm("16M") as vm:
        seen = []
        vm.on_io(0x10, seen.append)
        vm.on_io(0x11, lambda e: 0x12345678)
        vm.on_io(0x12, lambda e: None)
        vm.on_io(0x13, lambda e: 0x41)
        vm.memory.write(0x1000, guest("port_io"))
        cpu = vm.vcpu(0, mode="protected")
        assert not cpu._sync_regs
        cpu.regs.rip = 0x1000
        assert isinstance(cpu.run(timeout=5), exits.Hlt)
        assert [e.value for e in seen] == [1, 2, 3]
        assert all(e.rip is not None and e.rip > 0x1000 for e in seen)
        assert cpu.regs.rax == 0x12345678 and vm.memory.read(0x6000, 4) == b"AAAA"
