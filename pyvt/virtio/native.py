"""Virtio devices whose queues a native worker serves (pyvt._virtio).

The data path never runs on the GIL: the guest's queue notifications reach
the worker's pthread through the queues' ioeventfds, and the worker
interrupts the guest through the MSI-X vectors' irqfds (or the INTx irqfd).
Python keeps the control path: the PCI transport's registers, feature
negotiation and the device's configuration space.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from .device import VirtioDevice
from .errors import VirtioError
from .virtqueue import Virtqueue

if TYPE_CHECKING:
    from .pci_transport import VirtioPciDevice


def native_module():
    """pyvt._virtio, or VirtioError saying it was not built."""
    try:
        from .. import _virtio
    except ImportError as error:
        raise VirtioError(f"pyvt's native virtio workers (pyvt._virtio) are not built ({error}): "
                          "run 'python3 setup.py build_ext --inplace'") from None
    return _virtio


class NativeVirtioDevice(VirtioDevice):
    """A virtio device served by a worker of pyvt._virtio.  Subclasses name
    the worker class (``worker_class``) and implement :meth:`make_worker`."""

    worker_class: str = ""

    @property
    def ring_features(self) -> int:  # type: ignore[override]
        """The ring features (INDIRECT_DESC, EVENT_IDX) the worker serves."""
        worker = getattr(native_module(), self.worker_class)
        return worker.supported_features & VirtioDevice.ring_features

    def __init__(self) -> None:
        super().__init__()
        self.worker: Optional[Any] = None
        #: Host file descriptors the device owns (image, tap...), closed with it.
        self.owned_fds: List[int] = []

    def make_worker(self, memory):
        """The worker for ``memory`` (the VM's GuestMemory: the worker keeps
        its regions mapped while it lives, even past the VM's close)."""
        raise NotImplementedError

    @property
    def serves_queues_in_python(self) -> bool:
        return False

    def activate(self, transport: "VirtioPciDevice") -> None:
        """DRIVER_OK: checks the driver's rings like a Python queue would
        (VirtqueueError: the device needs a reset), then gives the worker
        the features, each enabled queue's rings, kick and call eventfds,
        and starts it."""
        with self.lock:
            ram = transport.guest_ram()
            for index, q in enumerate(transport.queue_configs):
                if q.enabled:
                    Virtqueue(ram, q.size, q.desc, q.avail, q.used, index=index)
            worker = self.make_worker(transport._vm.memory)
            worker.set_features(transport.negotiated)
            for index, q in enumerate(transport.queue_configs):
                if q.enabled:
                    worker.set_queue(index, q.size, q.desc, q.avail, q.used,
                                     q.kick_fd, transport.call_fd(index))
            worker.start()
            self.worker = worker

    def deactivate(self) -> None:
        """Device reset: the worker stops (its thread joined) and is dropped."""
        with self.lock:
            worker, self.worker = self.worker, None
            if worker is not None:
                worker.stop()
                self._report_written(worker)
                worker.reset()
            self.on_reset()

    def report_written(self) -> None:
        """Hands the guest pages the worker wrote since the last call to the
        VM's memory (snapshot baselines, ``dirty_pages()``): KVM's dirty log
        does not see a worker's writes.  Call before a snapshot or a
        migration pass reads them."""
        worker = self.worker
        if worker is not None:
            self._report_written(worker)

    def _report_written(self, worker) -> None:
        if self.transport is not None and self.transport.vm is not None \
                and not self.transport.vm.closed:
            worker.report_written(self.transport.vm.memory)

    def take_isr(self) -> int:
        worker = self.worker
        return worker.take_isr() if worker is not None else 0

    @property
    def stats(self) -> Dict[str, int]:
        """The worker's counters (empty while the driver has not started it)."""
        worker = self.worker
        return dict(worker.stats) if worker is not None else {}

    def own(self, fd: int) -> int:
        """Makes the device close ``fd`` when it closes; returns ``fd``."""
        self.owned_fds.append(fd)
        return fd

    def close(self) -> None:
        self.deactivate()
        fds, self.owned_fds = self.owned_fds, []
        for fd in fds:
            os.close(fd)
