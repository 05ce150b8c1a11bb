"""virtio-rng (virtio 1.x section 5.4, "entropy device"), served by
pyvt._virtio's RngWorker from the host's getrandom()."""

from __future__ import annotations

from .constants import TYPE_ENTROPY
from .native import NativeVirtioDevice, native_module


class RngDevice(NativeVirtioDevice):
    """A virtio entropy source: Linux's virtio-rng driver makes it
    /dev/hwrng."""

    device_type = TYPE_ENTROPY
    worker_class = "RngWorker"
    queue_sizes = (64,)

    def make_worker(self, memory):
        return native_module().RngWorker(memory)

    def __repr__(self) -> str:
        return "RngDevice()"
