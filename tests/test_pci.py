"""PCI logic (issue 15, part 2): configuration-space semantics, BAR sizing,
the capability list and the MSI-X table with no VM; then, on a VM without
a guest, the bus's assignment, BAR moves that the handlers follow, both
configuration mechanisms, and MSI-X eventfds bound and unbound as the
guest masks."""

import os
import select
import struct

import pytest

import pyvt
from pyvt import pci
from pyvt.gsi_routes import MsiRoute


class Plain(pci.PciDevice):
    def __init__(self, **kw):
        super().__init__(0x1AF4, 0x1041, 0x020000, revision=1, subsystem_vendor_id=0x1AF4,
                         subsystem_id=0x0001, **kw)


class FakeVm:
    """A private stand-in recording what MSI-X sends (the real path is in
    test_pci_guest.py)."""

    def __init__(self):
        self.sent = []

    def signal_msi(self, address, data):
        self.sent.append((address, data))
        return 1

    def _require_irqchip(self, what):
        pass


# -- the header ------------------------------------------------------------------

def test_the_header_holds_the_ids_and_ignores_writes_to_read_only_fields():
    d = Plain()
    assert d.config_read(0, 4) == 0x10411AF4
    assert d.config_read(0x08, 4) == 0x02000001  # class 02/00/00, revision 1
    assert d.config_read(0x2C, 4) == 0x00011AF4
    assert d.config_read(0x0E, 1) == 0  # type 0, single function
    assert d.config_read(0x3D, 1) == 1  # INTA
    d.config_write(0, 4, 0)
    d.config_write(0x08, 4, 0xFFFFFFFF)
    assert d.config_read(0, 4) == 0x10411AF4 and d.config_read(0x08, 4) == 0x02000001
    d.config_write(0x3C, 2, 0xFFFF)  # the line is writable, the pin is not
    assert (d.config[0x3C], d.config[0x3D]) == (0xFF, 1)
    assert d.config_read(0xFFC, 4) == 0  # extended space reads as zeros
    for offset, size in ((0xFFE, 4), (-1, 1), (0, 3)):
        with pytest.raises(pyvt.ArgumentError):
            d.config_read(offset, size)


def test_command_takes_its_writable_bits_and_status_errors_clear_by_writing_one():
    d = Plain()
    d.config_write(pci.COMMAND, 2, 0xFFFF)
    assert d.command == pci.COMMAND_WRITABLE
    d.config[pci.STATUS + 1] = 0xF9  # errors the device latched
    d.config_write(pci.STATUS, 2, 0x0100)  # clears bit 8 only
    assert d.config_read(pci.STATUS, 2) == 0xF800
    d.config_write(pci.COMMAND, 4, 0xF8000000)  # a dword write: command 0, status cleared
    assert d.config_read(pci.COMMAND, 4) == 0


def test_bars_size_like_hardware():
    d = Plain()
    d.add_bar(0, 0x1000)
    d.add_bar(1, 0x100, kind="io")
    d.add_bar(2, 1 << 33, kind="mem64", prefetchable=True)
    d.add_bar(5, 16)
    for offset in range(0x10, 0x28, 4):
        d.config_write(offset, 4, 0xFFFFFFFF)
    assert [d.config_read(o, 4) for o in range(0x10, 0x28, 4)] == [
        0xFFFFF000, 0xFFFFFF01, 0x0000000C, 0xFFFFFFFE, 0, 0xFFFFFFF0]
    d.config_write(0x18, 4, 0x40000000)
    d.config_write(0x1C, 4, 0x12)
    assert d.bar_register(2) == 0x12_0000_0000  # the low bits below the size stay 0
    d.config_write(0x10, 1, 0xFF)  # a byte write into the size bits changes nothing
    assert d.config_read(0x10, 4) == 0xFFFFF000
    assert d.bars[0].address is None  # on no bus: nothing decodes


def test_bad_bars_are_refused():
    d = Plain()
    d.add_bar(2, 0x1000, kind="mem64")
    for args, kw in (((3, 0x1000), {}), ((1, 0x1000), {"kind": "mem64"}),
                     ((5, 0x1000), {"kind": "mem64"}), ((0, 0x1800), {}), ((0, 8), {}),
                     ((0, 512), {"kind": "io"}), ((0, 16), {"kind": "io", "prefetchable": True}),
                     ((6, 0x1000), {}), ((0, 0x1000), {"kind": "rom"})):
        with pytest.raises(pyvt.ArgumentError):
            d.add_bar(*args, **kw)


def test_capabilities_form_a_list_with_their_writable_bits():
    d = Plain()
    assert d.config_read(pci.STATUS, 2) & pci.STATUS_CAPABILITIES == 0
    first = d.add_capability(0x09, bytes([16, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]))
    second = d.add_capability(0x09, b"\x05\xAA\xBB", writable=b"\x00\xFF\x00")
    assert (first, second) == (0x40, 0x50)
    assert d.config_read(pci.STATUS, 2) & pci.STATUS_CAPABILITIES
    assert d.config[0x34] == first and d.config[first:first + 3] == bytes([0x09, second, 16])
    assert d.config[second + 1] == 0  # the end of the list
    d.config_write(second + 2, 4, 0xFFFFFFFF)
    assert d.config[second + 2:second + 5] == b"\x05\xFF\xBB"
    assert d.capabilities() == {0x40: 0x09, 0x50: 0x09}
    with pytest.raises(pyvt.DeviceError, match="full"):
        d.add_capability(0x09, bytes(200))
    with pytest.raises(pyvt.ArgumentError):
        d.add_capability(0x09, b"ab", writable=b"a")


# -- MSI-X with no VM ---------------------------------------------------------------

def _msix_device(vectors=3):
    d = Plain()
    d.add_bar(1, 0x1000)
    msix = d.enable_msix(vectors, 1, 0x800, 0xC00)
    d.vm = FakeVm()
    return d, msix


def _table_write(d, vector, field, value):
    d._bar_access(d.bars[1], 0x800 + 16 * vector + 4 * field, 4, True, value)


def _pba(d):
    return d._bar_access(d.bars[1], 0xC00, 8, False, 0)


def test_msix_capability_and_table_start_masked_and_disabled():
    d, msix = _msix_device()
    cap = msix.cap_offset
    assert d.config[cap] == pci.CAP_MSIX
    assert struct.unpack_from("<HII", d.config, cap + 2) == (2, 0x800 | 1, 0xC00 | 1)
    assert [msix.entry(v) for v in range(3)] == [(0, 0, True)] * 3
    d.config_write(cap, 4, 0xFFFFFFFF)  # only enable and function mask change
    assert msix.control == 0xC002 and msix.enabled and msix.function_masked
    # Vector control: only the mask bit is kept.
    _table_write(d, 1, 3, 0xFFFFFFFF)
    assert d._bar_access(d.bars[1], 0x800 + 16 + 12, 4, False, 0) == 1


def test_msix_notify_follows_enable_function_mask_and_vector_mask():
    d, msix = _msix_device()
    sent = d.vm.sent
    _table_write(d, 2, 0, 0xFEE01000)
    _table_write(d, 2, 2, 0x4455)
    _table_write(d, 2, 3, 0)  # unmasked, but MSI-X is off
    assert msix.notify(2) is False and sent == [] and _pba(d) == 1 << 2
    d.config_write(msix.cap_offset + 2, 2, pci.MSIX_ENABLE | pci.MSIX_FUNCTION_MASK)
    assert sent == []  # enabled but function-masked: still pending
    d.config_write(msix.cap_offset + 2, 2, pci.MSIX_ENABLE)
    assert sent == [(0xFEE01000, 0x4455)] and _pba(d) == 0
    assert msix.notify(2) is True and len(sent) == 2
    _table_write(d, 2, 3, 1)
    msix.notify(2)
    msix.notify(2)  # pending twice is one message
    assert len(sent) == 2 and _pba(d) == 1 << 2
    _table_write(d, 2, 3, 0)
    assert len(sent) == 3 and _pba(d) == 0
    d._bar_access(d.bars[1], 0xC00, 4, True, 0xFFFFFFFF)  # the PBA is read-only
    assert _pba(d) == 0
    with pytest.raises(pyvt.ArgumentError):
        msix.notify(3)


def test_msix_layout_is_checked():
    d = Plain()
    d.add_bar(0, 0x1000)
    d.add_bar(1, 16, kind="io")
    for args in ((4, 0, 0x800, 0x800), (4, 0, 0xFF8, 0), (4, 0, 0x804, 0x900), (4, 1, 0, 8),
                 (4, 2, 0, 0x800), (0, 0, 0, 0x800)):
        with pytest.raises(pyvt.ArgumentError):
            d.enable_msix(*args)
    d.enable_msix(4, 0, 0, 0x800)
    with pytest.raises(pyvt.DeviceError):
        d.enable_msix(4, 0, 0, 0x800)


def test_intx_swizzle_rotates_over_four_gsis():
    assert [pci.intx_gsi(0, pin) for pin in (1, 2, 3, 4)] == [16, 17, 18, 19]
    assert [pci.intx_gsi(3, pin) for pin in (1, 2, 3, 4)] == [19, 16, 17, 18]
    d = Plain(interrupt_pin=0)
    assert d.intx_gsi is None
    with pytest.raises(pyvt.DeviceError):
        d.set_intx(True)


# -- on a VM, no guest ----------------------------------------------------------------

class Moving(Plain):
    def __init__(self):
        super().__init__()
        self.add_bar(0, 0x1000)
        self.add_bar(2, 0x4000, kind="mem64", prefetchable=True)
        self.add_bar(4, 64, kind="io")
        self.moves = []

    def on_bar_moved(self, index, old, new):
        self.moves.append((index, old, new))


@pytest.mark.requires_kvm
def test_the_bus_assigns_bars_and_follows_moves(vm):
    bus = vm.pci
    assert bus.devices == {0: bus.host_bridge}
    d = Moving()
    assert bus.add(d) == 1 and d.vm is vm and d.bus is bus
    assert d.command == pci.COMMAND_IO | pci.COMMAND_MEMORY
    addresses = {i: b.address for i, b in d.bars.items()}
    assert all(a is not None and a % d.bars[i].size == 0 for i, a in addresses.items())
    assert pci.IO_WINDOW[0] <= addresses[4] < pci.IO_WINDOW[1]
    # Being placed is a move too (from None): ioeventfds can follow from the start.
    assert sorted(d.moves) == [(i, None, addresses[i]) for i in (0, 2, 4)]
    assert bus.config_read(1, 0, 0x10, 4) == addresses[0]
    d.moves.clear()
    # The guest moves BAR 0: the handler follows, the old range is free.
    bus.config_write(1, 0, 0x10, 4, 0xD0000000)
    assert d.bars[0].address == 0xD0000000
    assert d.moves == [(0, addresses[0], 0xD0000000)]
    vm.on_mmio((addresses[0], 0x1000), lambda e: 0)  # free again
    # A BAR moved onto another range does not decode there.
    bus.config_write(1, 0, 0x10, 4, addresses[0])
    assert d.bars[0].address is None and d.moves[-1] == (0, 0xD0000000, None)
    # Decoding off and on again.
    bus.config_write(1, 0, 0x10, 4, 0xD0000000)
    bus.config_write(1, 0, pci.COMMAND, 2, 0)
    assert all(b.address is None for b in d.bars.values())
    bus.config_write(1, 0, pci.COMMAND, 2, pci.COMMAND_MEMORY)
    assert d.bars[0].address == 0xD0000000 and d.bars[4].address is None
    with pytest.raises(pyvt.ArgumentError, match="holds"):
        bus.add(Plain(), 1)
    with pytest.raises(pyvt.ArgumentError, match="on a bus already"):
        bus.add(d)
    with pytest.raises(pyvt.ArgumentTypeError):
        bus.add(object())


@pytest.mark.requires_kvm
def test_both_configuration_mechanisms_reach_the_same_space(vm):
    bus = vm.pci
    bus.add(Plain(), 3)
    address = 0x80000000 | 3 << 11

    def io_access(port, size, value=None):
        exit = pyvt.exits.Io(port, size, "in" if value is None else "out",
                             b"" if value is None else value.to_bytes(size, "little"))
        return bus._config_io(exit)

    def mmio(offset, size, value=None):
        exit = pyvt.exits.Mmio(pci.ECAM_BASE + (3 << 15) + offset, size, value is not None,
                               b"" if value is None else value.to_bytes(size, "little"))
        return bus._ecam(exit)

    io_access(0xCF8, 4, address | 0x3C)
    assert io_access(0xCF8, 4) == address | 0x3C
    io_access(0xCFC, 1, 0x5A)
    assert mmio(0x3C, 1) == 0x5A and io_access(0xCFD, 1) == 1  # the line, the pin
    io_access(0xCF8, 4, address)
    assert io_access(0xCFE, 2) == 0x1041
    assert mmio(0, 8) == bus.config_read(3, 0, 4, 4) << 32 | 0x10411AF4  # a qword: two dwords
    io_access(0xCF8, 4, address & 0x7FFFFFFF)  # enable bit off: nothing
    assert io_access(0xCFC, 4) == 0xFFFFFFFF
    io_access(0xCF8, 4, (address | 1 << 16))  # bus 1: nothing
    assert io_access(0xCFC, 4) == 0xFFFFFFFF
    assert io_access(0xCF9, 1) == 0xFF  # not a dword at 0xcf8
    assert mmio(1 << 12, 4) == 0xFFFFFFFF  # function 1
    assert mmio(0xFFC, 8) == 0xFFFFFFFF_00000000  # past the end: the upper half


@pytest.mark.requires_kvm
@pytest.mark.requires_cap("IRQCHIP", "IRQ_ROUTING", "IRQFD")
def test_msix_eventfds_bind_while_unmasked_and_hold_the_pending_bit_while_masked(kvm):
    with pyvt.Vm("16M", backend=kvm.path) as vm:
        vm.fd.create_irqchip()
        d = Plain()
        d.add_bar(0, 0x1000)
        msix = d.enable_msix(2, 0, 0, 0x800)
        vm.pci.add(d)
        fd = msix.eventfd(1)
        assert msix.eventfd(1) == fd and msix._vectors[1].bound is False
        assert vm.gsi_routing == ()  # no route until the vector can fire
        _table_write_bar0 = lambda field, value: d._bar_access(  # noqa: E731
            d.bars[0], 16 + 4 * field, 4, True, value)
        _table_write_bar0(0, 0xFEE00000)
        _table_write_bar0(2, 0x31)
        _table_write_bar0(3, 0)
        d.config_write(msix.cap_offset + 2, 2, pci.MSIX_ENABLE)
        gsi = msix._vectors[1].gsi
        assert msix._vectors[1].bound and gsi >= pci.MSI_GSI_BASE
        assert vm.gsi_routing[-1] == MsiRoute(gsi, 0xFEE00000, 0x31)
        assert len(vm.gsi_routing) > 24  # the irqchip's routes stay
        _table_write_bar0(2, 0x32)  # a new message: the route follows
        assert vm.gsi_routing[-1] == MsiRoute(gsi, 0xFEE00000, 0x32)
        _table_write_bar0(3, 1)  # masked: unbound; a write stays in the eventfd
        assert not msix._vectors[1].bound
        os.eventfd_write(fd, 1)
        assert d._bar_access(d.bars[0], 0x800, 8, False, 0) == 2
        assert select.select([fd], [], [], 0)[0] == [fd]
        _table_write_bar0(3, 0)  # unmasked: KVM takes what the eventfd holds
        assert msix._vectors[1].bound
        assert d._bar_access(d.bars[0], 0x800, 8, False, 0) == 0
        trigger = d.intx_eventfd()
        assert d.intx_eventfd() == trigger and d.intx_resample_eventfd != trigger


@pytest.mark.requires_kvm
def test_a_pci_bus_needs_the_ecam_window_free_of_ram(vm):
    with pyvt.Vm("16M") as other:
        other.on_mmio((pci.ECAM_BASE, 0x1000), lambda e: 0)
        with pytest.raises(pyvt.RegionOverlapError):
            assert other.pci is None  # raises first
        assert (pyvt._native.SPACE_PIO, 0xCF8) not in other._claims  # nothing left behind
