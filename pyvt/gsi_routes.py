"""GSI routing entries for ``KVM_SET_GSI_ROUTING`` as plain Python values.

A GSI (global system interrupt number, what ``irq_line`` and ``irqfd`` raise)
goes where the VM's routing table says: to a pin of the in-kernel PIC or
IOAPIC (:class:`IrqchipRoute`) or out as an MSI message to the LAPICs
(:class:`MsiRoute`).  Setting a table replaces the kernel's default one, so
keep :func:`irqchip_routes` in it where the guest still uses the IOAPIC/PIC.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List

from ._kvm import ffi, lib
from .errors import ArgumentError, ArgumentTypeError
from .kvm import _as_list, _u32, _u64

#: The in-kernel irqchip's pins: ``KVM_IRQCHIP_*`` -> how many.
IRQCHIP_PINS = {lib.KVM_IRQCHIP_PIC_MASTER: 8, lib.KVM_IRQCHIP_PIC_SLAVE: 8,
                lib.KVM_IRQCHIP_IOAPIC: 24}


@dataclass(frozen=True)
class IrqchipRoute:
    """GSI ``gsi`` drives pin ``pin`` of ``irqchip`` (``KVM_IRQCHIP_PIC_MASTER``,
    ``KVM_IRQCHIP_PIC_SLAVE`` or ``KVM_IRQCHIP_IOAPIC``)."""

    gsi: int
    irqchip: int
    pin: int


@dataclass(frozen=True)
class MsiRoute:
    """GSI ``gsi`` sends the MSI message ``data`` to ``address`` (0xfee00000 |
    destination APIC ID << 12 on x86)."""

    gsi: int
    address: int
    data: int
    flags: int = 0
    devid: int = 0


def irqchip_routes() -> List[IrqchipRoute]:
    """The kernel's default table with the in-kernel irqchip: GSIs 0-15 to
    both the PICs and the IOAPIC pin of the same number, 16-23 to the IOAPIC
    only (arch/x86/kvm/irq_comm.c)."""
    routes = []
    for gsi in range(24):
        if gsi < 16:
            chip = lib.KVM_IRQCHIP_PIC_MASTER if gsi < 8 else lib.KVM_IRQCHIP_PIC_SLAVE
            routes.append(IrqchipRoute(gsi, chip, gsi % 8))
        routes.append(IrqchipRoute(gsi, lib.KVM_IRQCHIP_IOAPIC, gsi))
    return routes


def _fill_entry(entry, route, max_gsi: int) -> None:
    if isinstance(route, ffi.CData):
        kind = ffi.typeof(route)
        if kind is ffi.typeof("struct kvm_irq_routing_entry *"):
            route = route[0]
        elif kind is not ffi.typeof("struct kvm_irq_routing_entry"):
            raise ArgumentTypeError(f"a GSI route must be an IrqchipRoute, an MsiRoute or a "
                                    f"cffi struct kvm_irq_routing_entry, not {route!r}")
        ffi.buffer(ffi.addressof(entry))[:] = ffi.buffer(ffi.addressof(route))
        return
    if not isinstance(route, (IrqchipRoute, MsiRoute)):
        raise ArgumentTypeError(f"a GSI route must be an IrqchipRoute, an MsiRoute or a "
                                f"cffi struct kvm_irq_routing_entry, not {route!r}")
    entry.gsi = _u32(route.gsi, "GSI")
    if max_gsi and entry.gsi >= max_gsi:
        raise ArgumentError(f"GSI {entry.gsi} is beyond this VM's {max_gsi} (KVM_CAP_IRQ_ROUTING)")
    if isinstance(route, IrqchipRoute):
        pins = IRQCHIP_PINS.get(route.irqchip)
        if pins is None:
            raise ArgumentError(f"irqchip must be one of KVM_IRQCHIP_PIC_MASTER, _PIC_SLAVE, "
                                f"_IOAPIC ({sorted(IRQCHIP_PINS)}), not {route.irqchip!r}")
        if _u32(route.pin, "pin") >= pins:
            raise ArgumentError(f"irqchip {route.irqchip} has pins 0-{pins - 1}, not {route.pin}")
        entry.type = lib.KVM_IRQ_ROUTING_IRQCHIP
        entry.u.irqchip.irqchip = route.irqchip
        entry.u.irqchip.pin = route.pin
    else:
        address = _u64(route.address, "MSI address")
        entry.type = lib.KVM_IRQ_ROUTING_MSI
        entry.flags = _u32(route.flags, "flags")
        entry.u.msi.address_lo = address & 0xFFFFFFFF
        entry.u.msi.address_hi = address >> 32
        entry.u.msi.data = _u32(route.data, "MSI data")
        entry.u.msi.devid = _u32(route.devid, "devid")


def routing_table(routes: Iterable, max_gsi: int = 0):
    """A cffi ``struct kvm_irq_routing *`` holding ``routes`` (validated;
    ``max_gsi``: the backend's KVM_CAP_IRQ_ROUTING, 0 for no check)."""
    routes = _as_list(routes, "GSI routes", "IrqchipRoute/MsiRoute")
    # cffi sizes the flexible entries[] from the length given for it.
    table = ffi.new("struct kvm_irq_routing *", {"nr": len(routes), "entries": len(routes)})
    for i, route in enumerate(routes):
        _fill_entry(table.entries[i], route, max_gsi)
    return table
