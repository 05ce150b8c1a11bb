"""The device options of ``pyvt boot``: ``--disk FILE[,readonly]``,
``--net tap:NAME`` (both repeatable), ``--rng`` and ``--console
serial|virtio``.

The option text is checked when it is parsed (a usage error, status 2);
that the files and taps exist is checked before the VM is made, so a
typo costs no boot.  The devices themselves are the virtio ones of
:mod:`pyvt.virtio`, attached through ``vm.add_disk``/``add_net``/``add_rng``
in the order given: the first disk is the guest's /dev/vda.

``--console virtio`` moves the host's terminal input from the UART to a
virtio console (Linux's hvc0: the user passes ``console=hvc0``), whose
output goes to stdout too; the UART keeps writing to stdout, so the early
boot messages of a ``console=ttyS0 console=hvc0`` kernel still show.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import List

from .errors import ArgumentError

# The consoles --console chooses from; the first is the default.
CONSOLES = ("serial", "virtio")


@dataclass(frozen=True)
class DiskOption:
    path: str
    readonly: bool = False


def disk_option(text: str) -> DiskOption:
    """``FILE`` or ``FILE,readonly`` (argparse type)."""
    path, sep, flag = text.rpartition(",")
    if sep and flag == "readonly":
        readonly = True
    elif sep and "/" not in flag and not os.path.exists(text):
        raise argparse.ArgumentTypeError(
            f"unknown disk option {flag!r} in {text!r}: use FILE or FILE,readonly")
    else:
        path, readonly = text, False  # a file name with a comma in it
    if not path:
        raise argparse.ArgumentTypeError(f"no disk image file in {text!r}: use FILE[,readonly]")
    return DiskOption(path, readonly)


def net_option(text: str) -> str:
    """``tap:NAME`` (argparse type) -> NAME."""
    kind, sep, name = text.partition(":")
    if kind != "tap" or not sep:
        raise argparse.ArgumentTypeError(f"unknown network backend {text!r}: use tap:NAME "
                                         "(an existing tap device)")
    if not name or "/" in name or len(name.encode()) > 15:
        raise argparse.ArgumentTypeError(f"{text!r} names no tap device: use tap:NAME, NAME "
                                         "an interface name of 1-15 bytes")
    return name


def check_disks(disks: List[DiskOption]) -> None:
    """Raises ArgumentError unless every image is a file pyvt can open the
    way it is asked (read-only, or for reading and writing)."""
    for disk in disks:
        if not os.path.exists(disk.path):
            raise ArgumentError(f"disk image {disk.path}: no such file")
        if os.path.isdir(disk.path):
            raise ArgumentError(f"disk image {disk.path} is a directory, not a raw image")
        mode = os.R_OK if disk.readonly else os.R_OK | os.W_OK
        if not os.access(disk.path, mode):
            raise ArgumentError(
                f"disk image {disk.path} cannot be opened for "
                f"{'reading' if disk.readonly else 'reading and writing'}: check its "
                f"permissions{'' if disk.readonly else ', or add ,readonly'}")


def check_taps(names: List[str]) -> None:
    """Raises ArgumentError unless every name is an existing tap device."""
    for name in names:
        if not os.path.exists(f"/sys/class/net/{name}"):
            raise ArgumentError(f"no network interface {name}: create the tap first "
                                f"(ip tuntap add {name} mode tap)")
        if not os.path.exists(f"/sys/class/net/{name}/tun_flags"):
            raise ArgumentError(f"network interface {name} is not a tap device "
                                f"(ip tuntap add NAME mode tap makes one)")


def attach(vm, disks: List[DiskOption], taps: List[str], rng: bool,
           console: str = "serial", stdin: bool = True) -> None:
    """Adds the virtio devices the options ask for to ``vm``.  With
    ``console="virtio"``, a virtio console between the host's stdin (or
    nothing, when ``stdin`` is false) and stdout, added last so that the
    disks and NICs keep their guest names."""
    if console not in CONSOLES:
        raise ArgumentError(f"unknown console {console!r}: use one of {', '.join(CONSOLES)}")
    virtio_console = console == "virtio"
    if not (disks or taps or rng or virtio_console):
        return
    if not hasattr(vm, "add_disk"):
        raise ArgumentError("this pyvt has no virtio devices (pyvt.virtio): --disk, --net, "
                            "--rng and --console virtio are not available")
    for disk in disks:
        vm.add_disk(disk.path, readonly=disk.readonly)
    for name in taps:
        vm.add_net(tap=name)
    if rng:
        vm.add_rng()
    if virtio_console:
        if stdin:
            vm.add_console()
        else:
            with open(os.devnull, "rb") as nothing:  # the device keeps its own copy
                vm.add_console(input=nothing)


__all__ = ["CONSOLES", "DiskOption", "disk_option", "net_option", "check_disks", "check_taps", "attach"]
