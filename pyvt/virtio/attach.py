"""Putting virtio devices on a VM's PCI bus, and taking them down with it
(what the ``vm.add_*`` methods call)."""

from __future__ import annotations

from typing import List, Optional

from .device import VirtioDevice
from .pci_transport import VirtioPciDevice


def add_virtio(vm, device: VirtioDevice, slot: Optional[int] = None) -> VirtioPciDevice:
    """Presents ``device`` on ``vm.pci`` (in ``slot``, default the first
    free one) and returns its transport.  If that fails the device is
    closed: the files it holds are not left open."""
    vm._check_open()
    try:
        transport = VirtioPciDevice(device)
        vm.pci.add(transport, slot)
    except BaseException:
        if device.transport is not None:
            device.transport.close()
            device.transport = None
        else:
            device.close()
        raise
    devices(vm).append(transport)
    return transport


def devices(vm) -> List[VirtioPciDevice]:
    """The VM's virtio transports, in the order they were added."""
    found = vm.__dict__.get("_virtio_devices")
    if found is None:
        found = vm.__dict__["_virtio_devices"] = []
    return found


def close_all(vm) -> None:
    """Stops every virtio device of ``vm`` (its worker threads are joined)
    before the VM's memory goes: a worker must never touch unmapped RAM."""
    for transport in reversed(vm.__dict__.get("_virtio_devices", [])):
        transport.close()
    vm.__dict__.pop("_virtio_devices", None)


def report_written(vm) -> None:
    """Hands every native worker's writes to guest RAM to ``vm.memory`` (see
    :meth:`pyvt.virtio.NativeVirtioDevice.report_written`); Python devices'
    writes are recorded as they are pushed."""
    for transport in vm.__dict__.get("_virtio_devices", []):
        report = getattr(transport.device, "report_written", None)
        if report is not None:
            report()
