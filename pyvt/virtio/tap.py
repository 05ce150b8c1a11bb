"""Attaching to an existing tap device (/dev/net/tun, TUNSETIFF) with the
virtio-net header, so that frames go between the tap and the guest as they
are (the 12-byte struct virtio_net_hdr first)."""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from .constants import NET_HDR_SIZE
from .errors import TapError

TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA        # _IOW('T', 202, int)
TUNSETVNETHDRSZ = 0x400454D8  # _IOW('T', 216, int)
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16


def open_tap(name: str) -> int:
    """A non-blocking fd on the existing tap ``name``, or TapError.

    TUNSETIFF would create a missing tap; the check first keeps an attach
    from making one behind the user's back (their network setup would not
    know it)."""
    if not isinstance(name, str) or not name or len(name.encode()) >= IFNAMSIZ or "/" in name:
        raise TapError(errno.EINVAL, f"{name!r} is not a network interface name")
    sysfs = f"/sys/class/net/{name}"
    if not os.path.exists(sysfs):
        raise TapError(errno.ENODEV, f"there is no network interface {name!r}: create the tap "
                       f"first (ip tuntap add dev {name} mode tap)")
    if not os.path.exists(f"{sysfs}/tun_flags"):
        raise TapError(errno.EINVAL, f"network interface {name!r} is not a tap device")
    try:
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        raise TapError(error.errno, f"cannot open {TUN_DEVICE}: {error.strerror}") from None
    try:
        ifreq = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        fcntl.ioctl(fd, TUNSETIFF, ifreq)
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", NET_HDR_SIZE))
    except OSError as error:
        os.close(fd)
        hint = " (is it a tun device, or owned by another user?)" if error.errno in (
            errno.EINVAL, errno.EPERM, errno.EBUSY) else ""
        raise TapError(error.errno, f"cannot attach to tap {name!r}: {error.strerror}{hint}") from None
    return fd
