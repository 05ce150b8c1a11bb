"""A virtio entropy device written in Python, which Linux's virtio-rng
driver uses as /dev/hwrng.

    python examples/virtio_rng.py bzImage [initrd.gz] [--append "..."]

boots the kernel with the device on the VM's PCI bus (the console on the
host's terminal) and prints how many random bytes the guest took.  The whole
device is the class below: the driver hands it chains of writable buffers,
it fills them and returns them on the used ring.
"""

import argparse
import os
import sys

import pyvt
from pyvt.virtio import VirtioDevice
from pyvt.virtio.constants import TYPE_ENTROPY


class PythonRng(VirtioDevice):
    device_type = TYPE_ENTROPY  # virtio device ID 4: entropy source
    queue_sizes = (64,)         # one queue, "requestq"

    def __init__(self, source=os.urandom):
        super().__init__()
        self.source = source
        self.bytes_served = 0

    def on_queue(self, queue):
        # Runs on the device's thread each time the driver notifies the queue.
        for chain in queue:                      # each chain: writable buffers
            chain.write(self.source(chain.writable_size))
            queue.push(chain)                    # to the used ring, with its length
            self.bytes_served += chain.written
        queue.notify()                           # an interrupt, if the driver wants one


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kernel")
    parser.add_argument("initrd", nargs="?")
    parser.add_argument("--append", default="console=ttyS0 panic=-1")
    parser.add_argument("--memory", default="256M")
    args = parser.parse_args()
    with pyvt.Vm(args.memory) as vm:
        vm.boot(args.kernel, cmdline=args.append, initrd=args.initrd)
        rng = PythonRng()
        vm.add_virtio(rng)
        vm.console.stream(sys.stdout)            # the guest's serial console, live
        exit = vm.run()
        print(f"\npyvt: {exit}; the guest took {rng.bytes_served} random bytes")
    return 1 if exit.failed else 0               # a power-off or reset: 0


if __name__ == "__main__":
    sys.exit(main())
