"""Runs tests/guests/virtio_driver.c, a minimal virtio-pci driver, against
a VM's virtio device: the host describes the requests (buffers in guest
memory, readable or writable), the guest finds the device through PCI
configuration space, negotiates, sets up the queue, submits them and polls
the used ring; the result block says what it saw."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple

import pyvt
from pyvt.loaders.elf import load_elf
from pyvt.sandbox import build_guest

SOURCE = Path(__file__).parent / "guests" / "virtio_driver.c"
CMD, RESULT = 0x7000, 0x6000
DATA = 0x20000  # where the tests put request buffers
MAX_REQUESTS, MAX_SEGMENTS = 8, 4
FLAG_INDIRECT, FLAG_RESET_AFTER, FLAG_MSIX = 1, 2, 4
STAGE_DONE = 7
STAGES = {1: "start", 2: "found", 3: "caps", 4: "features", 5: "queue", 6: "running",
          7: "done", 0x101: "no device", 0x102: "no virtio capabilities",
          0x103: "features refused", 0x104: "no such queue"}

Segment = Tuple[int, int, bool]  # address, length, device-writable


def build(out_dir: Path) -> bytes:
    elf = out_dir / "virtio_driver.elf"
    if not elf.exists():
        build_guest(SOURCE, elf, flags=["-Wall", "-Werror", "-mgeneral-regs-only", "-Wl,-e,_start"])
    return elf.read_bytes()


@dataclass
class Result:
    stage: int
    slot: int
    offered: int
    accepted: int
    status: int
    queue_size: int
    num_queues: int
    isr: int
    used: List[Tuple[int, int]]
    config_generation: int
    notify_multiplier: int
    config: bytes
    msix_vector: int
    pba: int

    @property
    def stage_name(self) -> str:
        if self.stage >= 0x100 and self.stage not in STAGES:
            return f"timeout on request {self.stage - 0x100}"
        return STAGES.get(self.stage, hex(self.stage))


def run(vm: pyvt.Vm, elf: bytes, device_id: int, requests: Sequence[Sequence[Segment]], *,
        queue: int = 0, features: int = 0, flags: int = 0, queue_size: int = 0,
        timeout: float = 120) -> Result:
    """Runs the driver once in ``vm`` (which has the device); returns what it saw."""
    assert len(requests) <= MAX_REQUESTS
    blob = struct.pack("<IIIIQII", device_id, queue, len(requests), flags, features,
                       queue_size, 0)
    for segments in requests:
        assert len(segments) <= MAX_SEGMENTS
        blob += struct.pack("<II", len(segments), 0)
        for i in range(MAX_SEGMENTS):
            addr, length, write = segments[i] if i < len(segments) else (0, 0, False)
            blob += struct.pack("<QII", addr, length, int(write))
    vm.memory.write(CMD, blob)
    vm.memory.write(RESULT, bytes(0x200))
    image = load_elf(vm.memory, elf, "virtio driver")
    cpu = vm.vcpus.get(0) or vm.vcpu(0, mode="long", ring=3)
    cpu.regs.rip = image.entry
    cpu.regs.rsp = 0x80000
    exit = cpu.run(timeout=timeout)
    assert isinstance(exit, pyvt.exits.DebugExit), (exit, vm.debugcon.output)
    raw = vm.memory.read(RESULT, 0x200)
    stage, slot, offered, accepted, status, qsize, nq, isr = struct.unpack_from("<IIQQIIII", raw)
    at = struct.calcsize("<IIQQIIII")
    ids = struct.unpack_from(f"<{MAX_REQUESTS}I", raw, at)
    lens = struct.unpack_from(f"<{MAX_REQUESTS}I", raw, at + 4 * MAX_REQUESTS)
    at += 8 * MAX_REQUESTS
    generation, multiplier = struct.unpack_from("<II", raw, at)
    config = raw[at + 8:at + 8 + 64]
    msix_vector, pba = struct.unpack_from("<II", raw, at + 8 + 64)
    return Result(stage, slot, offered, accepted, status, qsize, nq, isr,
                  list(zip(ids, lens, strict=True))[:len(requests)], generation, multiplier, config,
                  msix_vector, pba)


def new_vm(memory: str = "16M") -> pyvt.Vm:
    """A VM with the in-kernel irqchip (for MSI-X and INTx irqfds)."""
    vm = pyvt.Vm(memory)
    vm.fd.create_irqchip()
    return vm
