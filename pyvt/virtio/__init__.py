"""virtio 1.x devices on PCI.

- :class:`Virtqueue`, :class:`Chain`: split virtqueues served from Python,
  buffers as memoryviews over guest RAM, every guest address checked.
- :class:`VirtioDevice`: the base class of a virtio device written in
  Python; ``vm.add_virtio(device)`` puts it on the VM's PCI bus.
- :class:`VirtioPciDevice`: the virtio-over-PCI transport (section 4.1).
- The front ends of the native devices, served by C workers off the GIL
  (pyvt._virtio): :class:`BlockDevice`, :class:`NetDevice`,
  :class:`ConsoleDevice`, :class:`RngDevice`, made by ``vm.add_disk()``,
  ``vm.add_net()``, ``vm.add_console()`` and ``vm.add_rng()``.
"""

from .errors import DiskImageError, TapError, VirtioError, VirtqueueError
from .virtqueue import Chain, Virtqueue
from .guest_ram import GuestRam
from .device import VirtioDevice
from .pci_transport import VirtioPciDevice
from .native import NativeVirtioDevice
from .blk import BlockDevice
from .net import NetDevice
from .console import ConsoleDevice
from .rng import RngDevice
from . import constants

__all__ = ["Chain", "Virtqueue", "GuestRam", "VirtioDevice", "VirtioPciDevice",
           "NativeVirtioDevice", "BlockDevice", "NetDevice", "ConsoleDevice", "RngDevice",
           "constants", "VirtioError", "VirtqueueError", "DiskImageError", "TapError"]
