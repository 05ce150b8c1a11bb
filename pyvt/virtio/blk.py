"""virtio-blk (virtio 1.x section 5.2) over a raw image file or block device,
served by pyvt._virtio's BlkWorker."""

from __future__ import annotations

import errno
import os
import stat
import struct
from typing import Optional

from .constants import BLK_F_FLUSH, BLK_F_RO, BLK_F_SEG_MAX, BLK_ID_BYTES, SECTOR_SIZE, TYPE_BLOCK
from .errors import DiskImageError, VirtioError
from .native import NativeVirtioDevice, native_module

QUEUE_SIZE = 256


def open_image(path, readonly: bool) -> int:
    """An fd on the raw image ``path``, or DiskImageError saying why not."""
    path = os.fspath(path)
    try:
        fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
    except FileNotFoundError:
        raise DiskImageError(errno.ENOENT, f"disk image {path!r} does not exist") from None
    except IsADirectoryError:
        raise DiskImageError(errno.EISDIR, f"disk image {path!r} is a directory: give a raw "
                             "image file or a block device") from None
    except PermissionError:
        raise DiskImageError(errno.EACCES, f"disk image {path!r} cannot be opened "
                             f"{'for reading' if readonly else 'for reading and writing'} "
                             f"(permission denied{'' if readonly else '; add readonly=True / ,readonly'})") from None
    except OSError as error:
        raise DiskImageError(error.errno, f"disk image {path!r} cannot be opened: "
                             f"{error.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        os.close(fd)
        raise DiskImageError(errno.EINVAL, f"disk image {path!r} is not a regular file "
                             "or a block device")
    return fd


class BlockDevice(NativeVirtioDevice):
    """A virtio disk on the raw image ``path`` (``readonly``: the guest sees
    VIRTIO_BLK_F_RO and writes fail).  Its capacity is the image's size in
    512-byte sectors (a partial last sector is not seen).  ``serial`` (at
    most 20 bytes) is what VIRTIO_BLK_T_GET_ID returns (default: the
    image's file name)."""

    device_type = TYPE_BLOCK
    queue_sizes = (QUEUE_SIZE,)
    worker_class = "BlkWorker"

    def __init__(self, path, readonly: bool = False, serial: Optional[str] = None):
        super().__init__()
        self.path = os.fspath(path)
        self.readonly = bool(readonly)
        name = serial if serial is not None else os.path.basename(self.path)
        self.serial = name.encode()[:BLK_ID_BYTES]
        if serial is not None and len(serial.encode()) > BLK_ID_BYTES:
            raise VirtioError(f"a virtio-blk serial has at most {BLK_ID_BYTES} bytes, not "
                              f"{len(serial.encode())} ({serial!r})")
        self.fd = self.own(open_image(self.path, self.readonly))
        self.size = os.lseek(self.fd, 0, os.SEEK_END)
        self.features = 1 << BLK_F_FLUSH | 1 << BLK_F_SEG_MAX | (1 << BLK_F_RO if self.readonly else 0)

    @property
    def capacity(self) -> int:
        """Sectors of 512 bytes the guest sees."""
        return self.size // SECTOR_SIZE

    def config(self) -> bytes:
        # struct virtio_blk_config: capacity, size_max, seg_max (data
        # buffers per request, what the worker takes), then geometry and
        # blk_size, which no feature bit offered makes valid
        seg_max = native_module().BlkWorker.SEG_MAX
        return struct.pack("<QII", self.capacity, 0, seg_max)

    def make_worker(self, memory):
        return native_module().BlkWorker(memory, self.fd, self.readonly,
                                         sector_count=self.capacity, serial=self.serial)

    def __repr__(self) -> str:
        return f"BlockDevice({self.path!r}{', readonly' if self.readonly else ''})"
