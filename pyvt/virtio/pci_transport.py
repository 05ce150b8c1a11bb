"""Virtio over PCI (virtio 1.x section 4.1), modern devices only.

A :class:`VirtioPciDevice` puts one :class:`pyvt.virtio.VirtioDevice` on the
PCI bus: vendor 0x1af4, device 0x1040 + type, revision 1.  BAR 4 (64-bit
memory, 16 KiB) holds the four virtio structures the vendor capabilities
point to; BAR 1 holds the MSI-X table (one vector per queue plus one for
configuration changes):

    BAR 4 + 0x0000  common configuration (features, status, queues)
    BAR 4 + 0x1000  ISR status (read clears, deasserts INTx)
    BAR 4 + 0x2000  device-specific configuration
    BAR 4 + 0x3000  notifications: queue n at + 4 * n (notify_off_multiplier 4)

Register accesses are MMIO exits served here on the vCPU's thread.  Queue
notifications are not: each queue's notify address has an ioeventfd, so a
guest's kick never leaves the kernel; a native worker reads it directly,
and for a Python device the transport's thread reads it and calls the
device's ``on_queue`` there (a kick then costs the guest no exit to user
space, and the device runs beside the vCPU instead of stopping it).
Interrupts go through the MSI-X vector's eventfd (an irqfd), or, when the
driver did not enable MSI-X, the INTx eventfd (an irqfd with resample) and
the ISR bits.  Neither takes the bus lock, so the device's thread never
waits for a vCPU (a reset, on a vCPU's thread under that lock, joins it).
"""

from __future__ import annotations

import os
import select
import struct
import sys
import threading
import traceback
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from ..errors import KvmError
from ..pci import PciDevice
from .constants import (
    COMMON_CFG_SIZE, COMMON_CFGGENERATION, COMMON_DF, COMMON_DFSELECT, COMMON_GF,
    COMMON_GFSELECT, COMMON_MSIX, COMMON_NUMQ, COMMON_Q_AVAILLO,
    COMMON_Q_DESCLO, COMMON_Q_ENABLE, COMMON_Q_MSIX, COMMON_Q_NOFF,
    COMMON_Q_SELECT, COMMON_Q_SIZE, COMMON_Q_USEDLO, COMMON_STATUS,
    F_VERSION_1, ISR_CONFIG, ISR_QUEUE, NO_VECTOR, PCI_CAP_COMMON_CFG,
    PCI_CAP_DEVICE_CFG, PCI_CAP_ISR_CFG, PCI_CAP_NOTIFY_CFG, PCI_CAP_VENDOR, PCI_CLASS,
    PCI_CLASS_OTHER, PCI_DEVICE_ID_BASE, PCI_REVISION, PCI_SUBSYSTEM_ID, PCI_VENDOR_ID,
    STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER_OK, STATUS_FAILED, STATUS_FEATURES_OK,
)
from .device import VirtioDevice
from .errors import VirtioError, VirtqueueError
from .guest_ram import GuestRam

MSIX_BAR = 1
VIRTIO_BAR = 4
VIRTIO_BAR_SIZE = 0x4000
COMMON_OFFSET, ISR_OFFSET, DEVICE_OFFSET, NOTIFY_OFFSET = 0x0000, 0x1000, 0x2000, 0x3000
STRUCTURE_SIZE = 0x1000
NOTIFY_MULTIPLIER = 4
MAX_QUEUES = STRUCTURE_SIZE // NOTIFY_MULTIPLIER
MSIX_BAR_SIZE = 0x1000
MSIX_PBA_OFFSET = 0x800


#: Common configuration registers that read back an attribute as it is.
_PLAIN_REGISTERS = {
    COMMON_DFSELECT: "device_feature_select", COMMON_GFSELECT: "driver_feature_select",
    COMMON_MSIX: "config_msix_vector", COMMON_STATUS: "status",
    COMMON_CFGGENERATION: "config_generation", COMMON_Q_SELECT: "queue_select",
}


@dataclass
class QueueConfig:
    """One queue's registers in the common configuration."""
    max_size: int
    kick_fd: int            # the eventfd behind the queue's notify address
    size: int = 0
    msix_vector: int = NO_VECTOR
    enabled: bool = False
    desc: int = 0
    avail: int = 0
    used: int = 0

    def reset(self) -> None:
        self.size, self.msix_vector, self.enabled = self.max_size, NO_VECTOR, False
        self.desc = self.avail = self.used = 0


def _cap(cfg_type: int, offset: int, length: int, extra: bytes = b"") -> bytes:
    """struct virtio_pci_cap after the capability ID and next pointer:
    cap_len, cfg_type, bar, id, padding[2], offset, length (+ extra)."""
    return struct.pack("<BBBB2xII", 16 + len(extra), cfg_type, VIRTIO_BAR, 0, offset, length) + extra


class VirtioPciDevice(PciDevice):
    """The PCI function presenting ``device`` (a :class:`VirtioDevice`)."""

    def __init__(self, device: VirtioDevice):
        if not isinstance(device, VirtioDevice):
            raise VirtioError(f"a virtio PCI device presents a pyvt.virtio.VirtioDevice, "
                              f"not {type(device).__name__}")
        device.check()
        if not 0 < len(device.queue_sizes) <= MAX_QUEUES:
            raise VirtioError(f"a virtio device has 1 to {MAX_QUEUES} queues, "
                              f"not {len(device.queue_sizes)}")
        if device.transport is not None:
            raise VirtioError(f"{device!r} is already attached to a VM")
        if not 0 < device.device_type < 0x3F:
            raise VirtioError(f"device_type must be a virtio device ID (1-62), "
                              f"not {device.device_type!r}")
        super().__init__(PCI_VENDOR_ID, PCI_DEVICE_ID_BASE + device.device_type,
                         PCI_CLASS.get(device.device_type, PCI_CLASS_OTHER),
                         revision=PCI_REVISION, subsystem_vendor_id=PCI_VENDOR_ID,
                         subsystem_id=PCI_SUBSYSTEM_ID)
        self.device = device
        self.offered = (device.features | device.ring_features | 1 << F_VERSION_1)
        self.queue_configs: List[QueueConfig] = []
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC)
        self._no_irqchip_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        for size in device.queue_sizes:
            self.queue_configs.append(QueueConfig(size, os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)))
        # The registers are served under the PCI bus's lock (vCPU threads).
        # The device's thread never takes that lock: a reset joins it while
        # holding it.  _isr_lock guards the ISR bits and the generation.
        self._isr_lock = threading.Lock()
        self._msix_fds: dict = {}  # vector -> eventfd, fetched on vCPU threads
        self.last_failure: Optional[str] = None
        self._thread: Optional[threading.Thread] = None
        self._ioeventfd_base: Optional[int] = None
        self._reset_registers()
        self.config_generation = 0
        self.add_bar(VIRTIO_BAR, VIRTIO_BAR_SIZE, kind="mem64", prefetchable=False)
        self.add_bar(MSIX_BAR, MSIX_BAR_SIZE, kind="mem32")
        self.vectors = self.enable_msix(len(self.queue_configs) + 1, MSIX_BAR, 0, MSIX_PBA_OFFSET)
        nqueues = len(self.queue_configs)
        self.add_capability(PCI_CAP_VENDOR, _cap(PCI_CAP_COMMON_CFG, COMMON_OFFSET, COMMON_CFG_SIZE))
        self.add_capability(PCI_CAP_VENDOR, _cap(PCI_CAP_NOTIFY_CFG, NOTIFY_OFFSET,
                                                 NOTIFY_MULTIPLIER * nqueues,
                                                 struct.pack("<I", NOTIFY_MULTIPLIER)))
        self.add_capability(PCI_CAP_VENDOR, _cap(PCI_CAP_ISR_CFG, ISR_OFFSET, 1))
        self.add_capability(PCI_CAP_VENDOR, _cap(PCI_CAP_DEVICE_CFG, DEVICE_OFFSET, STRUCTURE_SIZE))
        device.transport = self

    def _reset_registers(self) -> None:
        self.status = 0
        self.negotiated = 0
        self.driver_features = 0
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.config_msix_vector = NO_VECTOR
        self.queue_select = 0
        self.isr = 0
        self._active_fds: dict = {}
        self._config_fd: Optional[int] = None
        for q in self.queue_configs:
            q.reset()

    # -- what devices call ---------------------------------------------------

    @property
    def _vm(self) -> Any:
        if self.vm is None:
            raise VirtioError(f"{self!r} is not on a VM's PCI bus: add it with vm.add_virtio()")
        return self.vm

    def guest_ram(self) -> GuestRam:
        return GuestRam(self._vm.memory)

    def _vector_fd(self, vector: int) -> Optional[int]:
        """The eventfd of MSI-X ``vector`` if the driver enabled MSI-X and
        chose a vector; None: INTx.  Fetched on a vCPU's thread (the bus
        lock held) before the device's thread uses it."""
        if vector == NO_VECTOR or not self.vectors.enabled or not self._vm.fd.has_irqchip:
            return None
        fd = self._msix_fds.get(vector)
        if fd is None:
            fd = self._msix_fds[vector] = self.vectors.eventfd(vector)
        return fd

    def call_fd(self, index: int) -> int:
        """The eventfd that interrupts the guest for queue ``index`` (for a
        native worker): its MSI-X vector's, or the INTx irqfd (the worker
        sets its ISR bits, which an ISR read takes)."""
        fd = self._vector_fd(self.queue_configs[index].msix_vector)
        return self._intx_fd() if fd is None else fd

    def _intx_fd(self) -> int:
        """The INTx irqfd; in a VM without the in-kernel irqchip (no
        interrupts at all), an eventfd the device's thread just drains: the
        driver polls the used ring or the ISR."""
        if self._vm.fd.has_irqchip:
            return self.intx_eventfd()
        return self._no_irqchip_fd

    def interrupt_queue(self, index: int) -> None:
        """Interrupts the guest for queue ``index`` (a Python device's
        queue.notify()); any thread, no lock but the ISR's."""
        self._interrupt(self._active_fds.get(index), ISR_QUEUE)

    def _interrupt(self, fd: Optional[int], isr_bit: int) -> None:
        if fd is not None and self.vectors.enabled:
            os.eventfd_write(fd, 1)
        else:
            self._raise_isr(isr_bit)

    def config_changed(self) -> None:
        """The device's configuration changed: a new generation, and the
        configuration-change interrupt."""
        with self._isr_lock:
            self.config_generation = (self.config_generation + 1) & 0xFF
        self._interrupt(self._config_fd, ISR_CONFIG)

    def needs_reset(self, reason: str) -> None:
        """Something went wrong on the device's side (a bad chain): DEVICE_NEEDS_RESET."""
        if self.status & STATUS_DRIVER_OK:
            self.status |= STATUS_DEVICE_NEEDS_RESET
            self.last_failure = reason
            self.config_changed()

    def _raise_isr(self, bits: int) -> None:
        """Sets ISR ``bits`` and asserts INTx (an irqfd: no bus lock)."""
        with self._isr_lock:
            self.isr |= bits
        os.eventfd_write(self._intx_fd(), 1)

    def _resampled(self) -> None:
        """The guest EOIed INTx and KVM lowered it: raise it again while
        ISR bits (ours or a native worker's) wait for the driver."""
        with self._isr_lock:
            self.isr |= self.device.take_isr()
            pending = self.isr
        if pending:
            os.eventfd_write(self._intx_fd(), 1)

    # -- BAR accesses (MMIO exits, on the vCPU's thread) ----------------------

    def on_bar_read(self, index: int, offset: int, size: int) -> int:
        if index != VIRTIO_BAR:
            return 0
        if offset < COMMON_OFFSET + STRUCTURE_SIZE:
            return self._common_read(offset, size)
        if offset < ISR_OFFSET + STRUCTURE_SIZE:
            if offset != ISR_OFFSET:
                return 0
            with self._isr_lock:
                value = self.isr | self.device.take_isr()
                self.isr = 0
            return value
        if offset < DEVICE_OFFSET + STRUCTURE_SIZE:
            data = self.device.config()[offset - DEVICE_OFFSET:offset - DEVICE_OFFSET + size]
            return int.from_bytes(data, "little")
        return 0  # notify registers read as 0

    def on_bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        if index != VIRTIO_BAR:
            return
        if offset < COMMON_OFFSET + STRUCTURE_SIZE:
            self._common_write(offset, size, value)
        elif DEVICE_OFFSET <= offset < DEVICE_OFFSET + STRUCTURE_SIZE:
            self.device.write_config(offset - DEVICE_OFFSET,
                                     (value & ((1 << 8 * size) - 1)).to_bytes(size, "little"))
        elif offset >= NOTIFY_OFFSET:
            # A write the ioeventfd did not take (another width, or no
            # address yet): the same kick, through the same eventfd.
            queue = (offset - NOTIFY_OFFSET) // NOTIFY_MULTIPLIER
            if queue < len(self.queue_configs):
                os.eventfd_write(self.queue_configs[queue].kick_fd, 1)

    def on_bar_moved(self, index: int, old: Optional[int], new: Optional[int]) -> None:
        if index == VIRTIO_BAR:
            self._register_ioeventfds(new)

    def _register_ioeventfds(self, base: Optional[int]) -> None:
        """Puts each queue's ioeventfd at its notify address under ``base``
        (None: the BAR is unassigned or decoding is off; none)."""
        vm_fd = self._vm.fd
        if self._ioeventfd_base is not None:
            for n, q in enumerate(self.queue_configs):
                vm_fd.unregister_ioeventfd(q.kick_fd, self._notify_address(self._ioeventfd_base, n), 2)
            self._ioeventfd_base = None
        if base is not None:
            done = []
            try:
                for n, q in enumerate(self.queue_configs):
                    vm_fd.register_ioeventfd(q.kick_fd, self._notify_address(base, n), 2)
                    done.append(n)
            except KvmError:
                # No ioeventfd here (a backend without them, or out of
                # slots): kicks come as MMIO exits to on_bar_write, which
                # signals the same eventfds; slower, but the same path.
                for n in done:
                    vm_fd.unregister_ioeventfd(self.queue_configs[n].kick_fd,
                                               self._notify_address(base, n), 2)
                return
            self._ioeventfd_base = base

    @staticmethod
    def _notify_address(base: int, queue: int) -> int:
        return base + NOTIFY_OFFSET + NOTIFY_MULTIPLIER * queue

    def _selected(self) -> Optional[QueueConfig]:
        if self.queue_select < len(self.queue_configs):
            return self.queue_configs[self.queue_select]
        return None

    def _common_read(self, offset: int, size: int) -> int:
        q = self._selected()
        if offset in _PLAIN_REGISTERS:
            return getattr(self, _PLAIN_REGISTERS[offset])
        if offset == COMMON_DF:
            return self.offered >> (32 * self.device_feature_select) & 0xFFFFFFFF \
                if self.device_feature_select < 2 else 0
        if offset == COMMON_GF:
            return self.driver_features >> (32 * self.driver_feature_select) & 0xFFFFFFFF \
                if self.driver_feature_select < 2 else 0
        if offset == COMMON_NUMQ:
            return len(self.queue_configs)
        if q is None:
            return NO_VECTOR if offset == COMMON_Q_MSIX else 0
        if offset == COMMON_Q_SIZE:
            return q.size
        if offset == COMMON_Q_MSIX:
            return q.msix_vector
        if offset == COMMON_Q_ENABLE:
            return int(q.enabled)
        if offset == COMMON_Q_NOFF:
            return self.queue_select
        for low, attr in ((COMMON_Q_DESCLO, "desc"), (COMMON_Q_AVAILLO, "avail"),
                          (COMMON_Q_USEDLO, "used")):
            if offset == low:
                return getattr(q, attr) & ((1 << 8 * size) - 1)
            if offset == low + 4:
                return getattr(q, attr) >> 32
        return 0

    def _common_write(self, offset: int, size: int, value: int) -> None:
        q = self._selected()
        if offset == COMMON_DFSELECT:
            self.device_feature_select = value
        elif offset == COMMON_GFSELECT:
            self.driver_feature_select = value
        elif offset == COMMON_GF:
            if not self.status & STATUS_FEATURES_OK and self.driver_feature_select < 2:
                shift = 32 * self.driver_feature_select
                self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) \
                    | (value & 0xFFFFFFFF) << shift
        elif offset == COMMON_MSIX:
            self.config_msix_vector = self._vector(value)
            self._config_fd = self._vector_fd(self.config_msix_vector)
        elif offset == COMMON_STATUS:
            self._write_status(value & 0xFF)
        elif offset == COMMON_Q_SELECT:
            self.queue_select = value & 0xFFFF
        elif q is None or self.status & STATUS_DRIVER_OK:
            return  # the queue registers are fixed while the device runs
        elif offset == COMMON_Q_SIZE:
            if 0 < value <= q.max_size and not value & (value - 1):
                q.size = value
        elif offset == COMMON_Q_MSIX:
            q.msix_vector = self._vector(value)
        elif offset == COMMON_Q_ENABLE:
            q.enabled = q.enabled or value == 1
        else:
            for low, attr in ((COMMON_Q_DESCLO, "desc"), (COMMON_Q_AVAILLO, "avail"),
                              (COMMON_Q_USEDLO, "used")):
                if offset == low:
                    mask = (1 << 8 * size) - 1
                    setattr(q, attr, (getattr(q, attr) & ~mask) | (value & mask))
                elif offset == low + 4 and size == 4:
                    setattr(q, attr, (getattr(q, attr) & 0xFFFFFFFF) | (value & 0xFFFFFFFF) << 32)

    def _vector(self, value: int) -> int:
        """A vector the driver chose: NO_VECTOR if there is no such vector."""
        return value if value <= len(self.queue_configs) else NO_VECTOR

    def _write_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        old, self.status = self.status, value
        if value & STATUS_FEATURES_OK and not old & STATUS_FEATURES_OK:
            driver = self.driver_features
            if driver & ~self.offered or not driver >> F_VERSION_1 & 1:
                self.status &= ~STATUS_FEATURES_OK  # refused: the driver reads it back
            else:
                self.negotiated = driver
        if value & STATUS_FAILED:  # the driver gave up: serve nothing until a reset
            self._stop()
            self.device.deactivate()
        elif value & STATUS_DRIVER_OK and not old & STATUS_DRIVER_OK:
            if not self.status & STATUS_FEATURES_OK:
                self.status |= STATUS_DEVICE_NEEDS_RESET
                return
            self._activate()

    # -- lifecycle -------------------------------------------------------------

    def _activate(self) -> None:
        self._active_fds = {n: self._vector_fd(q.msix_vector)
                            for n, q in enumerate(self.queue_configs) if q.enabled}
        self._config_fd = self._vector_fd(self.config_msix_vector)
        self._intx_fd()  # made here, on a vCPU thread: the device thread only writes it
        try:
            self.device.activate(self)
        except VirtqueueError as error:
            self.needs_reset(str(error))
            return
        self._start_thread()

    def _start_thread(self) -> None:
        self._thread = threading.Thread(target=self._serve, daemon=True,
                                        name=f"virtio-{type(self.device).__name__}")
        self._thread.start()

    def _serve(self) -> None:
        """The device's thread: queue kicks for a Python device, and the
        INTx relay of a native worker's interrupts."""
        poller = select.poll()
        fds: Dict[int, int] = {self._stop_fd: -3, self._no_irqchip_fd: -2}
        if self._vm.fd.has_irqchip:
            fds[self.intx_resample_eventfd] = -1
        if self.device.serves_queues_in_python:
            for n, q in enumerate(self.queue_configs):
                if q.enabled:
                    fds[q.kick_fd] = n
        for fd in fds:
            poller.register(fd, select.POLLIN)
        while True:
            for fd, _ in poller.poll():
                if fd == self._stop_fd:
                    return
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    continue
                index = fds[fd]
                if index == -1:
                    self._resampled()
                if index < 0:
                    continue
                try:
                    self.device.kicked(index)
                except VirtqueueError as error:
                    self.needs_reset(str(error))
                except Exception as error:  # a device's own bug: report, ask for reset
                    self.device.error = error
                    print(f"pyvt.virtio: {type(self.device).__name__}.on_queue raised:",
                          file=sys.stderr)
                    traceback.print_exc()
                    self.needs_reset(f"on_queue raised {error!r}")

    def _stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            os.eventfd_write(self._stop_fd, 1)
            if thread is not threading.current_thread():
                thread.join()
            os.eventfd_read(self._stop_fd)

    def reset(self) -> None:
        """Device reset (the driver wrote 0 to device_status): the device and
        its worker stop, every register goes back to its initial value."""
        self._stop()
        self.device.deactivate()
        self._reset_registers()

    def close(self) -> None:
        """Stops the device for good and frees its eventfds (the VM closes)."""
        self._stop()
        self.device.deactivate()
        self.device.close()
        if self.vm is not None and not self.vm.closed and self._ioeventfd_base is not None:
            self._register_ioeventfds(None)
        for fd in [q.kick_fd for q in self.queue_configs] + [self._stop_fd, self._no_irqchip_fd]:
            try:
                os.close(fd)
            except OSError:
                pass
        self.queue_configs = []

    def __repr__(self) -> str:
        return f"VirtioPciDevice({self.device!r}, status={self.status:#x})"
