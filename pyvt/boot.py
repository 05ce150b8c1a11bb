"""Booting kernels: ``vm.boot(kernel, ...)`` then ``vm.run()``.

``boot`` loads a kernel (multiboot, ELF or flat: :mod:`pyvt.loaders`),
creates the vCPUs (``smp``; with the in-kernel irqchip the application
processors wait for the guest's INIT/SIPI/SIPI), writes the ACPI tables
(:mod:`pyvt.acpi`) and the fw_cfg boot items, and makes the VM answer
unclaimed I/O like a PC.  ``run`` runs every vCPU, one thread each, until one
of them stops (debug-exit, reset, shutdown, timeout...), stops the others,
and returns that exit.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import List, Optional, Sequence, Tuple, Union

from . import exits
from ._kvm import lib
from .errors import ArgumentError, Error
from .loaders import Image, LoaderError, detect, load_elf, load_flat, load_multiboot

KernelSource = Union[bytes, bytearray, str, os.PathLike]

# fw_cfg items QEMU fills for -kernel/-append/-initrd (hw/nvram/fw_cfg.h).
FW_CFG_KERNEL_ENTRY = 0x10
FW_CFG_INITRD_SIZE = 0x0B
FW_CFG_INITRD_DATA = 0x12
FW_CFG_CMDLINE_SIZE = 0x14
FW_CFG_CMDLINE_DATA = 0x15


class BootError(LoaderError):
    """The VM cannot boot this way; the message says what to change."""


def _read(source: KernelSource, what: str) -> Tuple[bytes, str]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), what
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        try:
            with open(path, "rb") as f:
                return f.read(), path
        except OSError as e:
            raise BootError(f"cannot read {what} {path}: {e.strerror}") from None
    raise ArgumentError(f"{what} must be bytes or a path, not {type(source).__name__}")


def boot(vm, kernel: KernelSource, *, cmdline: str = "", initrd: Optional[KernelSource] = None,
         modules: Sequence[Tuple[KernelSource, str]] = (), smp: int = 1,
         irqchip: bool = True, acpi: bool = True, format: Optional[str] = None,
         load_address: int = 0x100000, flat_mode: str = "long",
         strict_io: bool = False, kernel_name: Optional[str] = None) -> Image:
    """Loads ``kernel`` into ``vm`` and creates its vCPUs; see :meth:`pyvt.Vm.boot`."""
    vm._check_open()
    if vm.vcpus:
        raise BootError("boot() creates the vCPUs itself: call it on a fresh Vm, "
                        "before vm.vcpu()")
    if isinstance(smp, bool) or not isinstance(smp, int) or smp < 1:
        raise BootError(f"smp must be a positive number of vCPUs, not {smp!r}")
    if smp > vm.max_vcpus or smp > 255:
        raise BootError(f"smp={smp} is more vCPUs than this backend allows "
                        f"({min(vm.max_vcpus, 255)})")
    if smp > 1 and not irqchip:
        raise BootError("--smp above 1 needs the in-kernel irqchip (its LAPICs deliver "
                        "INIT/SIPI): drop --no-irqchip")
    if not isinstance(cmdline, str):
        raise ArgumentError(f"cmdline must be a str, not {type(cmdline).__name__}")
    if format not in (None, "multiboot", "elf", "flat"):
        raise ArgumentError(f"format must be multiboot, elf or flat, not {format!r}")

    data, path = _read(kernel, "kernel")
    if not data:
        raise BootError(f"the kernel {path} is empty")
    mods: List[Tuple[bytes, str]] = []
    if initrd is not None:
        blob, ipath = _read(initrd, "initrd")
        mods.append((blob, ipath))
    for entry in modules:
        if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], str)):
            raise ArgumentError("modules must be (data or path, string) pairs")
        blob, _ = _read(entry[0], "module")
        mods.append((blob, entry[1]))

    kind = format or detect(data)
    if kind == "multiboot":
        image = load_multiboot(vm.memory, data, cmdline,
                               kernel_name if kernel_name is not None else path, mods)
    elif mods and kind != "multiboot":
        raise BootError(f"the kernel is {kind}, not multiboot: only a multiboot kernel gets "
                        "modules; its initrd would be unreachable (fw_cfg keeps a copy only "
                        "for multiboot-less kernels that read it from there: use "
                        "vm.fw_cfg.add_file)")
    elif kind == "elf":
        image = load_elf(vm.memory, data)
    else:
        image = load_flat(vm.memory, data, load_address, flat_mode)

    if irqchip:
        if not vm.kvm.check_extension("KVM_CAP_IRQCHIP"):
            raise BootError(f"{vm.backend} has no in-kernel irqchip (KVM_CAP_IRQCHIP): "
                            "boot with --no-irqchip (one vCPU, no interrupts)")
        vm.fd.create_irqchip()
        if vm.kvm.check_extension("KVM_CAP_PIT2"):
            vm.fd.create_pit2()
    vm._irqchip = irqchip

    if vm.fw_cfg is not None:
        vm.fw_cfg.cpu_count = smp
        raw = cmdline.encode()
        vm.fw_cfg.set(FW_CFG_CMDLINE_SIZE, (len(raw) + 1).to_bytes(4, "little"))
        vm.fw_cfg.set(FW_CFG_CMDLINE_DATA, raw + b"\0")
        vm.fw_cfg.set(FW_CFG_KERNEL_ENTRY, image.entry.to_bytes(4, "little"))
    if acpi:
        from . import acpi as acpi_tables

        acpi_tables.install(vm, smp, irqchip)
    vm._machine.unclaimed_as_pc = not strict_io

    for index in range(smp):
        cpu = vm.vcpu(index, mode=image.mode)
        if index == 0:
            cpu.regs.rip = image.entry
            for name, value in image.registers.items():
                setattr(cpu.regs, name, value)
        else:
            # Application processors sleep until the guest's INIT/SIPI/SIPI.
            cpu.fd.set_mp_state(lib.KVM_MP_STATE_UNINITIALIZED)
    vm.boot_image = image
    return image


def _answer_unclaimed(cpu, exit, trace) -> bool:
    """With --trace-io: log an access nothing claims, answer it like a PC
    (reads all ones, writes dropped) and go on.  False if it is not one."""
    if isinstance(exit, exits.Io):
        what = f"port {exit.port:#x}"
        size = exit.size * exit.count
    elif isinstance(exit, exits.Mmio):
        what = f"MMIO {exit.address:#x}"
        size = exit.size
    else:
        return False
    kind = "write" if exit.is_write else "read"
    value = f" {exit.value:#x}" if exit.is_write and exit.value is not None else ""
    print(f"pyvt: unclaimed {kind} {what} size {exit.size}{value} "
          f"(cpu {cpu.index}, rip={exit.rip:#x})" if exit.rip is not None else
          f"pyvt: unclaimed {kind} {what} size {exit.size}{value} (cpu {cpu.index})",
          file=trace, flush=True)
    if not exit.is_write:
        cpu.reply((1 << (8 * size)) - 1)
    return True


def _run_one(cpu, timeout, trace) -> exits.Exit:
    while True:
        exit = cpu.run(timeout=timeout)
        if trace is not None and _answer_unclaimed(cpu, exit, trace):
            continue  # the timeout restarts; a trace is for debugging
        return exit


def run(vm, timeout: Optional[float] = None, trace_io=None) -> exits.Exit:
    """Runs every vCPU until one stops; see :meth:`pyvt.Vm.run`."""
    vm._check_open()
    if not vm.vcpus:
        raise Error("no vCPU to run: call vm.boot() (or vm.vcpu()) first")
    if trace_io is True:
        trace_io = sys.stderr
    if trace_io is not None:
        vm._machine.unclaimed_as_pc = False
    cpus = [vm.vcpus[i] for i in sorted(vm.vcpus)]
    if len(cpus) == 1:
        return _run_one(cpus[0], timeout, trace_io)

    Outcome = Union[exits.Exit, BaseException]
    results: List[Tuple[int, Outcome]] = []  # (cpu, exit or exception), first wins
    lock = threading.Lock()

    def finish(index, outcome):
        with lock:
            first = not results
            results.append((index, outcome))
        if first:
            for other in cpus:
                if other.index != index:
                    other.stop()

    def worker(cpu):
        outcome: Outcome
        try:
            outcome = _run_one(cpu, None, trace_io)
        except BaseException as e:  # handed to the caller below
            outcome = e
        if not isinstance(outcome, exits.Stopped) or not results:
            finish(cpu.index, outcome)

    threads = [threading.Thread(target=worker, args=(cpu,), name=f"pyvt-vcpu{cpu.index}",
                                daemon=True) for cpu in cpus[1:]]
    for t in threads:
        t.start()
    outcome: Outcome
    try:
        outcome = _run_one(cpus[0], timeout, trace_io)
    except BaseException as e:
        outcome = e
    if not isinstance(outcome, exits.Stopped) or not results:
        finish(0, outcome)
    for cpu in cpus[1:]:
        cpu.stop()
    for t in threads:
        while t.is_alive():
            t.join(0.05)
            if t.is_alive():
                cpus[threads.index(t) + 1].stop()
    _, first = results[0]
    if isinstance(first, BaseException):
        raise first
    return first


__all__ = ["boot", "run", "BootError"]
