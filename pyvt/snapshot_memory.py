"""Snapshot memory: guest RAM copied into sparse memfds, and copied back.

A snapshot keeps each memory region in a memfd of its own (a
:class:`RegionImage`) holding only the pages that are not zero; every other
page is a hole, which costs nothing and reads as zeros.  So a snapshot costs
what the guest uses, not what it was given.

Taking one visits only the pages a region may hold data in:

- a region with a memfd of its own: the memfd's data extents
  (``SEEK_DATA``/``SEEK_HOLE``); pages nobody touched are holes there too;
- a clone's region (a private mapping of a snapshot image): the image's data
  pages and the pages the clone has private copies of (the pages written
  since it was made, from ``/proc/self/pagemap``).

and skips the zero pages among them.  Restoring copies back:

- the pages the region's baseline for the image says may differ (the fast
  path: :mod:`pyvt.memory`'s dirty tracking knows how the region relates to
  every snapshot taken from it or restored into it since tracking began);
- for a clone restoring the image it maps: the pages it has private copies of;
- otherwise (another VM's snapshot, a loaded file, a backend without a dirty
  log): the pages that differ, comparing only those either side may hold
  data in.

Images are never written after they are made: clones map them, and the
comparisons above rely on it.
"""

from __future__ import annotations

import errno
import mmap
import os
from dataclasses import dataclass, field
from typing import Optional

from . import pageset
from .errors import SnapshotError

PAGE_SIZE = mmap.PAGESIZE
#: Pages handled at a time: buffers stay small whatever the region's size.
CHUNK_PAGES = 256
_ZERO_CHUNK = bytes(CHUNK_PAGES * PAGE_SIZE)
_ZERO_PAGE = bytes(PAGE_SIZE)

# /proc/self/pagemap: one u64 per page; its top byte holds bit 63 (present),
# 62 (swapped) and 61 (a file page, e.g. the snapshot's memfd): a private
# copy is present or swapped and not a file page.
_PAGEMAP = "/proc/self/pagemap"
_PAGEMAP_ENTRY = 8
_PRIVATE_COPY = bytes(1 if byte & 0xC0 and not byte & 0x20 else 0 for byte in range(256))


@dataclass(eq=False)  # compared by identity: images are the keys of baselines
class RegionImage:
    """One memory region's contents, in a sparse memfd the snapshot owns."""

    gpa: int
    size: int
    readonly: bool
    memfd: int
    #: Read-only view of the memfd: restores copy from its data pages.
    mapping: Optional[mmap.mmap] = field(default=None, repr=False)
    #: The pages holding data (a :mod:`pyvt.pageset`); all others are holes.
    data: int = field(default=0, repr=False)
    #: (data, its page bitmap as bytes): see data_bitmap().
    _data_bitmap: Optional[tuple] = field(default=None, init=False, repr=False)

    @property
    def pages(self) -> int:
        return self.size // PAGE_SIZE

    @property
    def closed(self) -> bool:
        return self.memfd < 0

    def read(self, offset: int = 0, length: Optional[int] = None) -> bytes:
        """``length`` bytes (default: to the end) from ``offset``; holes read
        as zeros without being allocated."""
        if self.closed:
            raise SnapshotError("this snapshot was closed: its memory is gone")
        length = self.size - offset if length is None else length
        if offset < 0 or length < 0 or offset + length > self.size:
            raise SnapshotError(f"{offset:#x}+{length:#x} is outside the region "
                                f"({self.size:#x} bytes)")
        parts, done = [], 0
        while done < length:
            part = os.pread(self.memfd, min(length - done, 1 << 24), offset + done)
            parts.append(part)
            done += len(part)
        return b"".join(parts)

    def close(self) -> None:
        if self.mapping is not None:
            try:
                self.mapping.close()
            except BufferError:
                pass  # a memoryview still exports it: unmapped when released
            self.mapping = None
        if self.memfd >= 0:
            os.close(self.memfd)
            self.memfd = -1


def allocation_error(what: str, error: OSError) -> SnapshotError:
    """A SnapshotError for an OS failure while making snapshot memory."""
    reason = os.strerror(error.errno) if error.errno else str(error)
    hint = ""
    if error.errno in (errno.EMFILE, errno.ENFILE):
        hint = ("; each snapshot region is a file descriptor: close snapshots and VMs "
                "you no longer need, or raise the open-file limit (ulimit -n)")
    elif error.errno in (errno.ENOMEM, errno.ENOSPC):
        hint = "; the host is out of memory"
    return SnapshotError(f"cannot {what}: {reason}{hint}")


def new_image(gpa: int, size: int, readonly: bool) -> RegionImage:
    """An empty image (all holes) of ``size`` bytes."""
    try:
        memfd = os.memfd_create(f"pyvt-snapshot-{gpa:#x}", os.MFD_CLOEXEC)
    except OSError as e:
        raise allocation_error(f"create a snapshot region of {size:#x} bytes", e) from None
    image = RegionImage(gpa, size, readonly, memfd)
    try:
        os.ftruncate(memfd, size)
        image.mapping = mmap.mmap(memfd, size, mmap.MAP_SHARED, mmap.PROT_READ)
    except (OSError, OverflowError, ValueError) as e:
        image.close()
        if isinstance(e, OSError):
            raise allocation_error(f"create a snapshot region of {size:#x} bytes", e) from None
        raise SnapshotError(f"a snapshot region of {size:#x} bytes cannot be mapped") from None
    return image


def write_pages(image: RegionImage, first: int, data) -> None:
    """Writes ``data`` (whole pages) into ``image`` from page ``first`` on.
    The caller records them in ``image.data``."""
    offset = first * PAGE_SIZE
    try:
        with memoryview(data) as view:
            while len(view):
                done = os.pwrite(image.memfd, view, offset)
                view, offset = view[done:], offset + done
    except OSError as e:
        raise allocation_error("fill snapshot memory", e) from None


# -- which pages may hold data ------------------------------------------------


def _data_extents(fd: int, size: int, pages: int) -> pageset.Runs:
    """The pages of ``fd`` that are not holes (SEEK_DATA/SEEK_HOLE)."""
    found: pageset.Runs = []
    at = 0
    while at < size:
        try:
            start = os.lseek(fd, at, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after `at`
                break
            return [(0, pages)]  # a filesystem without SEEK_DATA: everything
        if start >= size:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        first, stop = start // PAGE_SIZE, (end + PAGE_SIZE - 1) // PAGE_SIZE
        found.append((first, stop - first))
        at = stop * PAGE_SIZE
    return found


def private_pages(region) -> Optional[int]:
    """For a copy-on-write region (a clone's): the pages it holds private
    copies of, i.e. every page written since it was mapped, whoever wrote
    it.  None if ``/proc/self/pagemap`` cannot be read."""
    try:
        pagemap = os.open(_PAGEMAP, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        first = region.host_address // PAGE_SIZE
        flags = bytearray()
        step = 1 << 16
        for at in range(0, region.pages, step):
            n = min(step, region.pages - at)
            raw = os.pread(pagemap, n * _PAGEMAP_ENTRY, (first + at) * _PAGEMAP_ENTRY)
            if len(raw) != n * _PAGEMAP_ENTRY:
                return None
            flags += raw[_PAGEMAP_ENTRY - 1::_PAGEMAP_ENTRY].translate(_PRIVATE_COPY)
    except OSError:
        return None
    finally:
        os.close(pagemap)
    return pageset.from_flags(bytes(flags))


def possibly_nonzero(region) -> int:
    """The pages of a guest memory region that may hold anything but zeros."""
    if region.memfd >= 0:
        return pageset.from_runs(_data_extents(region.memfd, region.size, region.pages),
                                 region.pages)
    if region.origin is not None:
        private = private_pages(region)
        if private is not None:
            return region.origin.data | private
    return pageset.whole(region.pages)


def _nonzero_runs(chunk: bytes) -> pageset.Runs:
    """(first, count) of the stretches of non-zero pages in ``chunk``."""
    zero = _ZERO_CHUNK if len(chunk) == len(_ZERO_CHUNK) else bytes(len(chunk))
    if chunk == zero:
        return []
    found: pageset.Runs = []
    for page in range(len(chunk) // PAGE_SIZE):
        if chunk[page * PAGE_SIZE:(page + 1) * PAGE_SIZE] != _ZERO_PAGE:
            if found and found[-1][0] + found[-1][1] == page:
                found[-1] = (found[-1][0], found[-1][1] + 1)
            else:
                found.append((page, 1))
    return found


def _chunks(pages: int):
    """(first page, count) pieces of ``pages``, at most CHUNK_PAGES each."""
    for first, count in pageset.runs(pages):
        for at in range(first, first + count, CHUNK_PAGES):
            yield at, min(CHUNK_PAGES, first + count - at)


def _span(first: int, count: int) -> slice:
    return slice(first * PAGE_SIZE, (first + count) * PAGE_SIZE)


# -- taking ------------------------------------------------------------------------
#
# A region's buffer may be a memoryview (pyvt.memory.GuestMemory.map), whose
# slices compare with bytes byte by byte: its chunks are read as bytes here
# and in differing_pages (bytes() of an mmap's slice, already bytes, copies
# nothing).


def capture(region) -> RegionImage:
    """A new image holding ``region``'s current contents (zero pages as holes)."""
    image = new_image(region.gpa, region.size, region.readonly)
    found: pageset.Runs = []
    try:
        source = region.buffer
        for first, count in _chunks(possibly_nonzero(region)):
            chunk = bytes(source[_span(first, count)])
            for page, run in _nonzero_runs(chunk):
                write_pages(image, first + page, memoryview(chunk)[_span(page, run)])
                found.append((first + page, run))
    except BaseException:
        image.close()
        raise
    image.data = pageset.from_runs(found, image.pages)
    return image


# -- restoring -----------------------------------------------------------------------


def differing_pages(region, image: RegionImage) -> int:
    """The pages where ``region`` and ``image`` differ (or may: an image
    page loaded from a file may be zero), comparing only the pages either
    side may hold data in."""
    assert image.mapping is not None
    mine = possibly_nonzero(region)
    found: pageset.Runs = []
    here, there = region.buffer, image.mapping
    for first, count in _chunks(mine & image.data):
        ours, theirs = bytes(here[_span(first, count)]), there[_span(first, count)]
        if ours != theirs:
            found.extend((first + page, 1) for page in range(count)
                         if ours[_span(page, 1)] != theirs[_span(page, 1)])
    for first, count in _chunks(mine & ~image.data):  # data here, zero there
        found.extend((first + page, run)
                     for page, run in _nonzero_runs(bytes(here[_span(first, count)])))
    return pageset.from_runs(found, region.pages) | (image.data & ~mine)


def copy_back(region, image: RegionImage, pages: int) -> None:
    """Copies ``pages`` of ``image`` into ``region``: data pages from the
    image's mapping (which never reads a hole), zeros for the rest."""
    assert image.mapping is not None
    with memoryview(region.buffer) as target, memoryview(image.mapping) as source, \
            memoryview(_ZERO_CHUNK) as zeros:
        for first, count in pageset.runs(pages & image.data):
            span = _span(first, count)
            target[span] = source[span]
        for first, count in _chunks(pages & ~image.data):
            target[_span(first, count)] = zeros[:count * PAGE_SIZE]


def data_bitmap(image: RegionImage) -> bytes:
    """``image.data`` as a little-endian bitmap of whole 64-bit words (KVM's
    dirty-log layout), kept while ``data`` is the same object."""
    cached = image._data_bitmap
    if cached is None or cached[0] is not image.data:
        size = (image.pages + 63) // 64 * 8
        cached = image._data_bitmap = (image.data, image.data.to_bytes(size, "little"))
    return cached[1]


_ZERO_BITMAPS: dict = {}


def zero_bitmap(size: int) -> bytes:
    """``size`` zero bytes, kept: what an idle VM's page bitmaps compare to."""
    zeros = _ZERO_BITMAPS.get(size)
    if zeros is None:
        zeros = _ZERO_BITMAPS[size] = bytes(size)
    return zeros


def restore_region(memory, region, image: RegionImage) -> None:
    """Makes ``region`` hold exactly ``image``'s contents, copying only the
    pages that may differ (see the module docstring for how they are found).
    The caller folds the writes so far in first (``memory.fold()``)."""
    pages = memory.changed_since(region, image)
    if pages is None and region.origin is image:
        pages = private_pages(region)
    if pages is None:
        pages = differing_pages(region, image)
    if pages and not region.host_writable:
        raise SnapshotError(
            f"cannot restore {region!r}: it maps host memory that is read-only on the host "
            f"too, and {pages.bit_count()} of its pages differ from the snapshot's (the "
            "file or buffer was changed outside pyvt).  The VM is half restored (the "
            "regions below this one): restore a snapshot that matches the file")
    memory.note_written(region, pages)
    copy_back(region, image, pages)
