"""Booting kernels: ``vm.boot(kernel, ...)`` then ``vm.run()``.

``boot`` loads a kernel (multiboot, ELF or flat: :mod:`pyvt.loaders`;
a multiboot kernel gets ``initrd`` as module 0, other kernels find it, and
the command line, in fw_cfg under QEMU's keys 0x0b/0x12 and 0x14/0x15),
creates the vCPUs (``smp``; with the in-kernel irqchip the application
processors wait for the guest's INIT/SIPI/SIPI; each one's CPUID is
``KVM_GET_SUPPORTED_CPUID`` with its APIC ID and the ``smp`` topology, see
:func:`cpuid_topology`: change it with ``vm.vcpus[i].cpuid = ...`` between
``boot`` and ``run``), writes the ACPI tables
(:mod:`pyvt.acpi`) and the fw_cfg boot items, and makes the VM answer
unclaimed I/O like a PC.  ``run`` runs every vCPU, one thread each, until one
of them stops (debug-exit, reset, shutdown, timeout...), stops the others,
and returns that exit.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import replace
from typing import List, Optional, Sequence, Tuple, Union

from . import exits, modes
from ._kvm import lib
from .errors import ArgumentError, Error, KvmError
from .kvm import CpuidEntry
from .loaders import Image, LoaderError, detect, load_elf, load_flat, load_multiboot
from .loaders.common import guest_string, read_image_file

KernelSource = Union[bytes, bytearray, str, os.PathLike]

KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1  # (sic) <linux/kvm.h>

# fw_cfg items QEMU fills for -kernel/-append/-initrd (hw/nvram/fw_cfg.h).
FW_CFG_KERNEL_ENTRY = 0x10
FW_CFG_INITRD_SIZE = 0x0B
FW_CFG_INITRD_DATA = 0x12
FW_CFG_CMDLINE_SIZE = 0x14
FW_CFG_CMDLINE_DATA = 0x15


class BootError(LoaderError):
    """The VM cannot boot this way; the message says what to change."""


def _read(source: KernelSource, what: str, limit: int) -> Tuple[bytes, str]:
    """``source``'s bytes and a name for it; a file larger than ``limit``
    (the guest's RAM) is refused before it is read in full."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), what
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        try:
            return read_image_file(path, what, limit), path
        except LoaderError as e:
            raise BootError(str(e)) from None
    raise ArgumentError(f"{what} must be bytes or a path, not {type(source).__name__}")


def boot(vm, kernel: KernelSource, *, cmdline: Union[str, bytes] = "", initrd: Optional[KernelSource] = None,
         modules: Sequence[Tuple[KernelSource, str]] = (), smp: int = 1,
         irqchip: bool = True, acpi: bool = True, format: Optional[str] = None,
         load_address: int = 0x100000, flat_mode: str = "long",
         strict_io: bool = False, kernel_name: Union[str, bytes, None] = None) -> Image:
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
    raw_cmdline = guest_string(cmdline, "cmdline")
    if format not in (None, "multiboot", "elf", "flat"):
        raise ArgumentError(f"format must be multiboot, elf or flat, not {format!r}")

    if vm.memory.size < modes.SETUP_AREA_END:
        raise BootError(f"boot needs at least {modes.SETUP_AREA_END // 1024} KiB of RAM "
                        "(pyvt's GDT and page tables live below 640 KiB); give the VM more "
                        "memory (--memory)")
    if acpi and vm.memory.size < 0x100000:
        raise BootError("the ACPI tables live at 0xe0000-0xfffff: give the VM at least 1 MiB "
                        "of RAM (--memory), or boot with acpi=False")
    data, path = _read(kernel, "kernel", vm.memory.size)
    if not data:
        raise BootError(f"the kernel {path} is empty")
    mods: List[Tuple[bytes, str]] = []
    if initrd is not None:
        blob, ipath = _read(initrd, "initrd", vm.memory.size)
        mods.append((blob, ipath))
    for entry in modules:
        if not (isinstance(entry, tuple) and len(entry) == 2):  # load_multiboot checks the string
            raise ArgumentError("modules must be (data or path, string) pairs")
        blob, _ = _read(entry[0], "module", vm.memory.size)
        mods.append((blob, entry[1]))

    kind = format or detect(data)
    if kind == "multiboot":
        image = load_multiboot(vm.memory, data, raw_cmdline,
                               kernel_name if kernel_name is not None else path, mods)
    elif len(mods) > len(([initrd] if initrd is not None else [])):
        raise BootError(f"the kernel is {kind}, not multiboot: only a multiboot kernel gets "
                        "modules (pass files with vm.fw_cfg.add_file instead)")
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
        vm.fw_cfg.set(FW_CFG_CMDLINE_SIZE, (len(raw_cmdline) + 1).to_bytes(4, "little"))
        vm.fw_cfg.set(FW_CFG_CMDLINE_DATA, raw_cmdline + b"\0")
        vm.fw_cfg.set(FW_CFG_KERNEL_ENTRY, image.entry.to_bytes(4, "little"))
        if kind != "multiboot" and mods:
            # As QEMU's -initrd for kernels that fetch it themselves.
            vm.fw_cfg.set(FW_CFG_INITRD_SIZE, len(mods[0][0]).to_bytes(4, "little"))
            vm.fw_cfg.set(FW_CFG_INITRD_DATA, mods[0][0])
    elif kind != "multiboot" and mods:
        raise BootError("only a multiboot kernel gets its initrd in memory; others read "
                        "it from fw_cfg, which this VM has not (pc_devices=False)")
    if acpi:
        from . import acpi as acpi_tables

        acpi_tables.install(vm, smp, irqchip)
    vm._machine.unclaimed_as_pc = not strict_io

    for index in range(smp):
        cpu = vm.vcpu(index, mode=image.mode)
        try:
            entries = cpu.cpuid
        except KvmError:
            entries = None  # a backend without a CPUID table answers CPUID itself
        if entries:
            cpu.cpuid = cpuid_topology(entries, index, smp)
        if index == 0:
            cpu.regs.rip = image.entry
            for name, value in image.registers.items():
                setattr(cpu.regs, name, value)
        else:
            # Application processors sleep until the guest's INIT/SIPI/SIPI.
            cpu.fd.set_mp_state(lib.KVM_MP_STATE_UNINITIALIZED)
    vm.boot_image = image
    return image


def cpuid_topology(entries: Sequence[CpuidEntry], index: int, cpus: int) -> List[CpuidEntry]:
    """``entries`` with the topology of a ``cpus``-core, one-package machine,
    seen from vCPU ``index`` (APIC ID ``index``): leaf 1 (logical processor
    count, HTT), leaf 4 (cores per package), leaf 0xB (x2APIC topology:
    one thread per core, ``cpus`` cores) and AMD's 0x80000008 (core count).
    Leaves the table lacks stay absent."""
    shift = max(cpus - 1, 0).bit_length()  # APIC ID bits for the core level
    amd = any(e.function == 0 and e.ebx in (0x68747541, 0x6F677948) for e in entries)
    entries = list(entries)
    if any(e.function == 0xB for e in entries):
        # Both levels and the terminating one, whatever the host table had.
        entries = [e for e in entries if e.function != 0xB] + [
            CpuidEntry(0xB, level, KVM_CPUID_FLAG_SIGNIFCANT_INDEX) for level in range(3)]
    out = []
    for e in entries:
        if e.function == 1:
            ebx = (e.ebx & 0x00FFFFFF & ~(0xFF << 16)) | (min(cpus, 255) << 16) | (index << 24)
            edx = e.edx | (1 << 28) if cpus > 1 else e.edx  # HTT: more than one
            e = replace(e, ebx=ebx, edx=edx)
        elif e.function == 4 and e.eax & 0x1F:
            e = replace(e, eax=(e.eax & 0x03FFFFFF) | ((cpus - 1) << 26))
        elif e.function == 0xB:
            if e.index == 0:
                e = replace(e, eax=0, ebx=1, ecx=(1 << 8) | 0, edx=index)
            elif e.index == 1:
                e = replace(e, eax=shift, ebx=cpus, ecx=(2 << 8) | 1, edx=index)
            else:
                e = replace(e, eax=0, ebx=0, ecx=e.index & 0xFF, edx=index)
        elif e.function == 0x80000008 and amd:
            e = replace(e, ecx=(e.ecx & ~0xF0FF) | (shift << 12) | (cpus - 1))
        out.append(e)
    return out


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


def _run_one(cpu, timeout, trace, control) -> exits.Exit:
    """Runs ``cpu`` until it stops for good.  Before each KVM_RUN it passes
    ``control`` (:class:`pyvt.run_control.RunControl`), which parks it while
    the VM is paused; a pause does not count against ``timeout``."""
    deadline = None if timeout is None else time.monotonic() + timeout
    if control.open_stats:
        # KVM_GET_STATS_FD waits for the vCPU to leave KVM_RUN: open it now
        # (0.2 ms), so that query-stats gets KVM's statistics while it runs.
        cpu._open_stats()
    control.join(cpu)
    try:
        while True:
            parked = control.hold(cpu)
            if deadline is not None:
                deadline += parked
            if control.ending:
                return exits.Stopped(cpu._rip())
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            exit = cpu.run(timeout=left)
            if isinstance(exit, exits.Stopped) and control.claims_stop(cpu):
                continue  # pause() or end_run() kicked it: park, or leave above
            if trace is not None and _answer_unclaimed(cpu, exit, trace):
                continue
            if isinstance(exit, exits.Timeout) and timeout is not None:
                return exits.Timeout(float(timeout), exit.rip)  # the whole run's budget
            return exit
    finally:
        control.leave(cpu)


def run(vm, timeout: Optional[float] = None, trace_io=None) -> exits.Exit:
    """Runs every vCPU until one stops; see :meth:`pyvt.Vm.run`."""
    from . import run_control

    vm._check_open()
    if not vm.vcpus:
        raise Error("no vCPU to run: call vm.boot() (or vm.vcpu()) first")
    if trace_io is True:
        trace_io = sys.stderr
    control = run_control.of(vm)
    ended = control.run_started()
    if ended is not None:  # vm.end_run() came before this run
        return control.run_finished(ended)
    as_pc = vm._machine.unclaimed_as_pc
    if trace_io is not None:
        vm._machine.unclaimed_as_pc = False  # unclaimed accesses come to _answer_unclaimed
    try:
        exit = _run_all(vm, timeout, trace_io, control)
    except BaseException as e:
        control.run_finished(None, e)
        raise
    finally:
        if not vm.closed:
            vm._machine.unclaimed_as_pc = as_pc
    return control.run_finished(exit)


def _run_all(vm, timeout, trace_io, control) -> exits.Exit:
    cpus = [vm.vcpus[i] for i in sorted(vm.vcpus)]
    if len(cpus) == 1:
        return _run_one(cpus[0], timeout, trace_io, control)

    Outcome = Union[exits.Exit, BaseException]
    results: List[Tuple[int, Outcome]] = []  # (cpu, exit or exception), first wins
    lock = threading.Lock()

    def finish(index, outcome):
        with lock:
            first = not results
            results.append((index, outcome))
        if first:
            control.finishing()  # parked vCPUs leave too
            for other in cpus:
                if other.index != index:
                    other.stop()

    def worker(cpu):
        outcome: Outcome
        try:
            outcome = _run_one(cpu, None, trace_io, control)
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
        outcome = _run_one(cpus[0], timeout, trace_io, control)
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


__all__ = ["boot", "run", "cpuid_topology", "BootError"]
