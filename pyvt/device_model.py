"""The device model: every native device pyvt has, one descriptor each.

:class:`pyvt.Vm` walks :data:`DEVICES` in order to attach the devices
(``Vm._attach_device``), to turn a device's stop into an exit and to close
them; the snapshots walk it to save and load each device's state, and the
snapshot file checks each saved state with its descriptor.  Nothing else
names a device: adding one is its C pair (``csrc/``), its class in
``pyvt/_native.pyx``, a :class:`~pyvt.devices.Device` handle and one line
here (see ARCHITECTURE.md).
"""

from __future__ import annotations

from typing import Dict

from .devices import BASE_DEVICES, DeviceDescriptor
from .pc import PC_DEVICES

__all__ = ["DEVICES", "DeviceDescriptor", "by_name", "stateful"]

#: Every native device, in the order a VM attaches them.
DEVICES = BASE_DEVICES + PC_DEVICES

_BY_NAME: Dict[str, DeviceDescriptor] = {d.name: d for d in DEVICES}


def by_name(name: str) -> DeviceDescriptor:
    """The descriptor of the device called ``name`` (KeyError if none)."""
    return _BY_NAME[name]


def stateful():
    """The descriptors of the devices that have state to save, in order."""
    return tuple(d for d in DEVICES if d.handle.has_state)
