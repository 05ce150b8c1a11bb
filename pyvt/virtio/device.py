"""The base class of virtio devices, whatever serves their queues.

A device says what it is (``device_type``, ``features``, ``queue_sizes``,
its configuration bytes); a transport (:class:`pyvt.virtio.VirtioPciDevice`)
presents it to the guest and, when the driver sets DRIVER_OK, calls
:meth:`VirtioDevice.activate`.  Subclass :class:`VirtioDevice` to write a
device in Python: implement :meth:`VirtioDevice.on_queue`, and the transport
calls it on a thread of its own each time the driver notifies a queue.
The native devices (:mod:`pyvt.virtio.native`) override ``activate`` to
hand the queues to a C worker instead.
"""

from __future__ import annotations

import functools
import threading
from typing import TYPE_CHECKING, List, Optional, Sequence

from .constants import F_RING_EVENT_IDX, F_RING_INDIRECT_DESC
from .virtqueue import Virtqueue, check_queue_size

if TYPE_CHECKING:
    from .pci_transport import VirtioPciDevice


class VirtioDevice:
    """A virtio device written in Python.

    Subclasses set (class attributes or in ``__init__``):

    - ``device_type``: the virtio device ID (section 5: 4 is entropy...);
    - ``features``: the device-specific feature bits it offers (an int;
      VIRTIO_F_VERSION_1, INDIRECT_DESC and EVENT_IDX are added for it);
    - ``queue_sizes``: the maximum size of each virtqueue;

    and implement :meth:`on_queue` (and :meth:`config`/:meth:`write_config`
    for a configuration space, :meth:`on_reset` for state to forget).

    ``on_queue(queue)`` runs on the device's own thread, never on a vCPU's,
    once the driver notified ``queue`` (a :class:`pyvt.virtio.Virtqueue`):
    pop its chains, fill them, push them back, then ``queue.notify()``.
    A :class:`pyvt.virtio.VirtqueueError` from it (a bad chain) makes the
    device ask the driver for a reset; any other exception does the same
    and is kept in ``error``.
    """

    device_type: int = 0
    features: int = 0
    queue_sizes: Sequence[int] = (128,)
    #: Ring features the queues support (the transport offers them).
    ring_features: int = 1 << F_RING_INDIRECT_DESC | 1 << F_RING_EVENT_IDX

    def __init__(self) -> None:
        self.transport: Optional["VirtioPciDevice"] = None
        self.queues: List[Optional[Virtqueue]] = []
        #: The last exception an on_queue raised (the device then needs a reset).
        self.error: Optional[BaseException] = None
        #: Serializes on_queue with activate/reset: held while either runs.
        self.lock = threading.RLock()

    # -- what a subclass provides -------------------------------------------

    def config(self) -> bytes:
        """The device-specific configuration space (section 5.x), little-endian."""
        return b""

    def write_config(self, offset: int, data: bytes) -> None:
        """The driver wrote ``data`` at ``offset`` of the configuration space
        (most fields are read-only: the default ignores it)."""

    def on_queue(self, queue: Virtqueue) -> None:
        """The driver notified ``queue``: serve its available chains."""
        raise NotImplementedError(f"{type(self).__name__} must implement on_queue(queue)")

    def on_activate(self) -> None:
        """Called after the driver set DRIVER_OK and ``queues`` are ready."""

    def on_reset(self) -> None:
        """Called when the driver resets the device (the queues are gone)."""

    # -- what the transport calls --------------------------------------------

    @property
    def negotiated(self) -> int:
        """The features the driver accepted (0 before FEATURES_OK)."""
        return self.transport.negotiated if self.transport is not None else 0

    def has_feature(self, bit: int) -> bool:
        return bool(self.negotiated >> bit & 1)

    def check(self) -> None:
        """Checks the class attributes before the device is attached."""
        for size in self.queue_sizes:
            check_queue_size(size)

    def activate(self, transport: "VirtioPciDevice") -> None:
        """DRIVER_OK: builds a :class:`Virtqueue` for each enabled queue
        (VirtqueueError if the driver's rings are not in RAM) and lets the
        transport's thread call :meth:`on_queue` on notifications."""
        with self.lock:
            queues: List[Optional[Virtqueue]] = []
            ram = transport.guest_ram()
            for index, q in enumerate(transport.queue_configs):
                if not q.enabled:
                    queues.append(None)
                    continue
                queues.append(Virtqueue(
                    ram, q.size, q.desc, q.avail, q.used, index=index,
                    event_idx=self.has_feature(F_RING_EVENT_IDX),
                    indirect=self.has_feature(F_RING_INDIRECT_DESC),
                    interrupt=functools.partial(transport.interrupt_queue, index)))
            self.queues = queues
            self.on_activate()

    def kicked(self, index: int) -> None:
        """The transport's thread: the driver notified queue ``index``."""
        with self.lock:
            queue = self.queues[index] if index < len(self.queues) else None
            if queue is not None and queue.broken is None:
                self.on_queue(queue)

    def deactivate(self) -> None:
        """Device reset: the queues are forgotten."""
        with self.lock:
            self.queues = []
            self.error = None
            self.on_reset()

    def take_isr(self) -> int:
        """ISR bits set by something other than the transport (native workers)."""
        return 0

    @property
    def serves_queues_in_python(self) -> bool:
        """Whether the transport's thread calls :meth:`kicked` (False for
        native devices, whose worker reads the notifications itself)."""
        return True

    def close(self) -> None:
        """Frees what the device holds (files, workers); the VM is closing."""
