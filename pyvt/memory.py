"""Guest memory: memfd-backed regions mapped into KVM memory slots.

Each region is a ``memfd`` mapped shared into this process and registered
with ``KVM_SET_USER_MEMORY_REGION``.  Keeping guest RAM in a memfd (not
anonymous memory) is what lets a snapshot be mapped copy-on-write later.
Every access from Python is checked against the regions: nothing outside
guest memory is ever touched.
"""

from __future__ import annotations

import fcntl
import errno
import functools
import mmap
import operator
import os
import re
import stat
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple, Union

from . import dirty_pages as _dirty_pages
from . import _native, pageset, snapshot_memory
from ._kvm import ffi, lib
from .dirty_pages import DirtyPages
from .dirty_rate import DirtyRate
from .dirty_ring import DirtyRing
from .errors import (
    ArgumentError,
    ArgumentTypeError,
    BackendError,
    ClosedError,
    KvmError,
    MemoryConfigError,
    OutOfRangeError,
    RegionOverlapError,
)

PAGE_SIZE = mmap.PAGESIZE
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(size: Union[int, str]) -> int:
    """``"64M"`` -> 67108864.  Accepts ints and K/M/G/T (binary) suffixes,
    optionally followed by ``iB`` or ``B`` (``"16MiB"``, ``"2GB"``)."""
    if isinstance(size, bool):
        raise MemoryConfigError(f"memory size must be a number of bytes or a string like '64M', not {size!r}")
    if isinstance(size, int):
        value = size
    elif isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", size, re.IGNORECASE)
        if not m:
            raise MemoryConfigError(
                f"cannot read memory size {size!r}: use bytes or a number with "
                "K, M, G or T (e.g. '64M')")
        value = int(m.group(1)) * _UNITS[m.group(2).upper()]
    else:
        raise MemoryConfigError(f"memory size must be an int or a string like '64M', not {size!r}")
    if value <= 0:
        raise MemoryConfigError(f"memory size must be positive, not {value}")
    if value % PAGE_SIZE:
        raise MemoryConfigError(
            f"memory size {value:#x} is not a multiple of the page size ({PAGE_SIZE:#x}); "
            f"round it up to {(value + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE:#x}")
    return value


@functools.lru_cache(maxsize=None)
def _host_memory_limit() -> int:
    """RAM plus swap: guest memory beyond this could never be backed."""
    total = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("MemTotal", "SwapTotal"):
                    total += int(rest.split()[0]) * 1024
    except OSError:
        return 1 << 62
    return total or 1 << 62


@dataclass
class Region:
    """One memory slot: ``size`` bytes of guest RAM at guest-physical ``gpa``."""

    slot: int
    gpa: int
    size: int
    readonly: bool
    memfd: int  # -1 for a copy-on-write view of a snapshot's memory, or mapped host memory
    #: The host memory: pyvt's mmap, or for GuestMemory.map() the user's
    #: memory (a memoryview export of it, or pyvt's mmap of their file).
    mapping: Union[mmap.mmap, memoryview, None]
    host_address: int
    # Dirty tracking, for snapshot restore (see GuestMemory.track_dirty_pages).
    #: KVM logs the guest's writes (the slot has KVM_MEM_LOG_DIRTY_PAGES).
    dirty_logging: bool = False
    #: Pages ``write()`` changed since the last fold, as a bitmap (bit n is
    #: page n); None until tracking starts.
    host_dirty: Optional[bytearray] = None
    #: The backend refused KVM_MEM_LOG_DIRTY_PAGES (pyvt.ko has no dirty log).
    dirty_log_refused: bool = False
    #: Pages written since the last GuestMemory.dirty_pages() (a pyvt.pageset).
    unreported: int = 0
    #: Baselines: for each snapshot image (held weakly) this region's contents
    #: are known against, the pages that may differ from it (a pyvt.pageset).
    baselines: "weakref.WeakKeyDictionary[Any, int]" = field(
        default_factory=weakref.WeakKeyDictionary)
    #: The snapshot image a copy-on-write region maps (set by pyvt.snapshot).
    origin: Any = None
    #: For GuestMemory.map(): the user's object (mmap, buffer, file), kept
    #: alive while mapped.  The host can write it behind pyvt's back.
    source: Any = None
    #: False where the host side is read-only too (a read-only buffer or
    #: file): neither vm.memory.write nor a restore can change it.
    host_writable: bool = True

    @property
    def tracked(self) -> bool:
        """Every write to the region is seen: the guest cannot write a
        read-only one, and KVM logs its writes to the others."""
        return self.host_dirty is not None and (self.readonly or self.dirty_logging)

    @property
    def pages(self) -> int:
        return self.size // PAGE_SIZE

    @property
    def end(self) -> int:
        return self.gpa + self.size

    @property
    def buffer(self) -> Union[mmap.mmap, memoryview]:
        """The region's host mapping; ClosedError once the VM is closed."""
        if self.mapping is None:
            raise ClosedError(f"the memory of {self!r} is gone: the VM was closed "
                              "or the region removed")
        return self.mapping

    def __repr__(self) -> str:
        ro = ", readonly" if self.readonly else ""
        mapped = f", maps a {type(self.source).__name__}" if self.source is not None else ""
        return f"Region(slot={self.slot}, gpa={self.gpa:#x}, size={self.size:#x}{ro}{mapped})"


def _byte_view(data) -> memoryview:
    """``data`` (any bytes-like object) as a flat memoryview of bytes."""
    try:
        return memoryview(data).cast("B")
    except TypeError:
        raise ArgumentTypeError(f"data must be bytes-like, not {type(data).__name__}") from None


def _slice_bounds(key: slice, need_stop: bool) -> Tuple[int, Optional[int]]:
    """(start, stop) of a guest memory slice: int bounds, no step."""
    if key.step not in (None, 1) or key.start is None or (need_stop and key.stop is None):
        raise ArgumentError("guest memory slices need a start" + (" and a stop" if need_stop else "")
                            + " and no step")
    for bound in (key.start, key.stop):
        if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int)):
            raise ArgumentTypeError(f"guest memory slice bounds must be ints, not {key!r}")
    return key.start, key.stop


class GuestMemory:
    """The guest's physical memory as seen from the host.

    ``read(gpa, n)`` and ``write(gpa, data)`` work across adjacent regions;
    ``view`` is a writable memoryview of the main RAM region (at gpa 0);
    ``memory[a:b]`` reads and ``memory[a:b] = data`` writes.
    """

    def __init__(self, vm_fd, size: int, max_address: int,
                 copy_on_write_of: Optional[int] = None):
        self._vm_fd = vm_fd
        self._max_address = max_address
        self.regions: List[Region] = []
        # One harvest at a time: a full dirty ring is emptied from its vCPU's
        # thread while others run (pyvt.dirty_pages).
        self._dirty_lock = threading.Lock()
        #: Pages the dirty log reported, for vm.stats (pyvt.dirty_rate).
        self.dirty_rate = DirtyRate()
        # The VM's I/O claims, {(space, start): (length, owner)}, which its
        # Vm hands over: regions that are not read-only stay clear of MMIO
        # handlers (the guest would never exit there).
        self._io_claims: dict = {}
        self._main = self.add_region(0, size, copy_on_write_of=copy_on_write_of)

    @property
    def size(self) -> int:
        """Size of the main RAM region at guest-physical 0."""
        return self._main.size

    @property
    def view(self) -> memoryview:
        """Writable memoryview of the main RAM region.  Snapshot restores do
        not see writes made through it: write with :meth:`write`."""
        self._check_open()
        return memoryview(self._main.buffer)

    def _check_open(self) -> None:
        if self._vm_fd is None:
            raise ClosedError("guest memory is gone: the VM was closed")

    def add_region(self, gpa: int, size: Union[int, str], readonly: bool = False,
                   copy_on_write_of: Optional[int] = None) -> Region:
        """Adds a memory slot of ``size`` bytes at guest-physical ``gpa``.

        Wraps ``KVM_SET_USER_MEMORY_REGION``.  Guest writes to a read-only
        region come back as MMIO exits (``KVM_MEM_READONLY``).
        ``copy_on_write_of`` (a snapshot's memfd) maps that memory privately
        instead of allocating: pages are shared until someone writes them.
        """
        self._check_open()
        size = parse_size(size)
        self._check_placement(gpa, size, readonly)
        limit = _host_memory_limit()
        if sum(r.size for r in self.regions) + size > limit:
            raise MemoryConfigError(
                f"{size:#x} bytes of guest memory cannot be allocated: this host has "
                f"{limit >> 20} MiB of RAM and swap in all")

        if copy_on_write_of is None:
            memfd = os.memfd_create(f"pyvt-guest-{gpa:#x}", os.MFD_CLOEXEC)
        else:
            memfd = -1
        mapping = None
        try:
            if copy_on_write_of is None:
                os.ftruncate(memfd, size)
                mapping = mmap.mmap(memfd, size, mmap.MAP_SHARED,
                                    mmap.PROT_READ | mmap.PROT_WRITE)
            else:
                mapping = mmap.mmap(copy_on_write_of, size, mmap.MAP_PRIVATE,
                                    mmap.PROT_READ | mmap.PROT_WRITE)
            region = Region(self._free_slot(), gpa, size, readonly, memfd, mapping,
                            _address_of(mapping))
            self._install(region)
        except OSError as e:
            if mapping is not None:
                mapping.close()
            if memfd >= 0:
                os.close(memfd)
            if isinstance(e, KvmError):
                raise
            raise MemoryConfigError(f"cannot allocate {size:#x} bytes of guest memory: {e.strerror}") from None
        return region

    def map(self, gpa: int, obj, readonly: bool = False, *,
            size: Union[int, str, None] = None, offset: int = 0) -> Region:
        """Maps host memory into the guest at guest-physical ``gpa``, without
        copying (Unicorn's ``mem_map_ptr``): the guest's writes are in
        ``obj`` at once, and the host's writes to ``obj`` in the guest.

        ``obj`` is an ``mmap.mmap``, any C-contiguous buffer-protocol object
        whose memory starts on a page boundary and is a whole number of
        pages (a numpy array, a ctypes array, a memoryview slice...), or a
        file descriptor (an int or an object with ``fileno()``), which is
        mapped shared: the guest's writes land in the file.  ``offset`` and
        ``size`` (bytes, page multiples) pick a part of it; by default all
        of a buffer, or a file from ``offset`` to its end.  A file shorter
        than ``offset + size`` is refused (past its end, accesses would
        fault): extend it first with ``os.ftruncate``.  Shrinking a mapped
        file later is the caller's mistake: the guest's accesses past the
        new end stop ``run()`` (an ``Mmio`` exit on PVM; KVM may fail the
        run with EFAULT instead), and pyvt's own reads there would crash
        the process (SIGBUS), as with any mmap.  The guest sees the file as
        the kernel has it: flush a file object's buffered writes first.

        pyvt keeps ``obj`` alive and holds a buffer export of it (so a
        bytearray or numpy array cannot be resized or freed under the guest)
        until :meth:`remove_region` or the VM's close, which release it but
        never close the user's mmap or file descriptor (a file is mapped
        through pyvt's own mmap, which holds a duplicate of the descriptor).

        ``readonly=True`` makes the slot read-only to the guest: its writes
        come back as MMIO exits, as with :meth:`add_region`.  A read-only
        host object (``bytes``, an ``ACCESS_READ`` mmap, a file opened
        read-only) can only be mapped so; pyvt then cannot write it either
        (``write()`` refuses, and so does a restore that would change it).

        Snapshots copy the region's contents like any other region's and
        restore them into ``obj``; since the host can write ``obj`` behind
        pyvt's back, a restore compares the region's pages with the
        snapshot's instead of trusting the dirty log (it reads the whole
        region each time, where other regions copy only the pages written
        since).  A snapshot of a read-only file that changed outside pyvt
        cannot be restored (SnapshotError).  A clone
        (``Vm.from_snapshot``) gets an ordinary region with the contents.
        Returns the new :class:`Region`.
        """
        self._check_open()
        mapping, length, host_writable = _host_memory(obj, readonly, size, offset)
        try:
            self._check_placement(gpa, length, readonly)
            region = Region(self._free_slot(), gpa, length, readonly, -1, mapping,
                            _address_of(mapping), source=obj, host_writable=host_writable)
            self._install(region)
        except BaseException:
            _release(mapping)
            raise
        return region

    def remove_region(self, gpa: int) -> None:
        """Removes the region that starts at guest-physical ``gpa`` (made
        by :meth:`add_region` or :meth:`map`; the main RAM at 0 stays):
        ``KVM_SET_USER_MEMORY_REGION`` with size 0 deletes the slot, whose
        number the next region reuses, and pyvt lets go of the memory (a
        mapped object's export and reference; the user's mmap or file stays
        open).  From then on the guest's accesses there are MMIO exits.

        KVM allows this while vCPUs run (it waits until none uses the slot
        any more), and so does pyvt: the guest sees the memory vanish
        between two instructions.  A ``vm.memory.read()`` racing with it in
        another thread gets an exception, never freed memory.  Snapshots
        taken before no longer fit this VM: ``restore()`` refuses them (the
        memory's shape changed); ``Vm.from_snapshot`` still works."""
        self._check_open()
        index = next((i for i, r in enumerate(self.regions)
                      if not isinstance(gpa, bool) and r.gpa == gpa), None)
        if index is None:
            raise ArgumentError(
                f"no memory region starts at {gpa!r}: regions start at "
                f"{', '.join(f'{r.gpa:#x}' for r in self.regions)}")
        region = self.regions[index]
        if region is self._main:
            raise MemoryConfigError(
                "the main RAM at guest-physical 0 cannot be removed (it is the VM's "
                "memory size); remove only regions added with add_region() or map()")
        with self._dirty_lock:
            if region.dirty_logging:
                # The writes logged so far reach the other regions' baselines,
                # and no ring entry for this slot is left to name its reuser.
                self._collect(self.regions)
            self._vm_fd.set_user_memory_region(region.slot, region.gpa, 0,
                                               region.host_address, 0)
            del self.regions[index]  # by position: Regions compare by value
        _release(region.mapping)
        region.mapping = None
        region.source = None
        region.baselines.clear()
        if region.memfd >= 0:
            os.close(region.memfd)
            region.memfd = -1

    def _check_placement(self, gpa: int, size: int, readonly: bool) -> None:
        """A region of ``size`` bytes fits at ``gpa``: aligned, inside the
        guest's physical address space, clear of every region (and, unless
        read-only, of MMIO handlers, where the guest would never exit)."""
        if isinstance(gpa, bool) or not isinstance(gpa, int) or gpa < 0:
            raise MemoryConfigError(f"region address must be a non-negative int, not {gpa!r}")
        if gpa % PAGE_SIZE:
            raise MemoryConfigError(f"region address {gpa:#x} is not page-aligned ({PAGE_SIZE:#x})")
        if gpa + size > self._max_address:
            raise MemoryConfigError(
                f"region {gpa:#x}-{gpa + size - 1:#x} is beyond the guest's physical "
                f"address space (up to {self._max_address - 1:#x})")
        for region in self.regions:
            if gpa < region.end and region.gpa < gpa + size:
                raise RegionOverlapError(
                    f"region {gpa:#x}-{gpa + size - 1:#x} overlaps {region!r}")
        if not readonly:
            for (space, start), (length, owner) in list(self._io_claims.items()):
                if space == _native.SPACE_MMIO and gpa < start + length and start < gpa + size:
                    raise RegionOverlapError(
                        f"region {gpa:#x}-{gpa + size - 1:#x} overlaps MMIO "
                        f"{start:#x}-{start + length - 1:#x}, which {owner} holds: the guest "
                        "would never exit there; remove it first (vm.off_mmio), or map "
                        "the region readonly=True")
        if readonly and not self._vm_fd.kvm.check_extension("KVM_CAP_READONLY_MEM"):
            raise MemoryConfigError("this backend has no read-only memory (KVM_CAP_READONLY_MEM)")

    def _free_slot(self) -> int:
        """The lowest slot number no region uses (remove_region frees them)."""
        used = {r.slot for r in self.regions}
        return next(slot for slot in range(len(used) + 1) if slot not in used)

    def _install(self, region: Region) -> None:
        """Registers ``region``'s slot with KVM and adds it to the regions."""
        try:
            self._vm_fd.set_user_memory_region(
                region.slot, region.gpa, region.size, region.host_address,
                lib.KVM_MEM_READONLY if region.readonly else 0)
        except KvmError as e:
            if e.errno == errno.EFAULT and not getattr(region, "host_writable", True):
                # pyvt.ko pins guest pages writable, even for read-only slots.
                raise MemoryConfigError(
                    f"{self._vm_fd.kvm.path} cannot map memory that is read-only on the "
                    "host (it refused the slot with EFAULT): map a writable object with "
                    "readonly=True") from None
            raise
        self.regions.append(region)
        self.regions.sort(key=lambda r: r.gpa)
        if self._vm_fd.dirty_ring_size:
            # A VM with a dirty ring tracks from the start: nothing written yet.
            self._start_tracking(region, unreported=0)

    def host_regions(self) -> List[Tuple[int, int, int]]:
        """``[(gpa, size, host_address)]`` of the RAM a device may read and
        write: every region the guest can write and the host maps writable
        (read-only slots are left out).  Native virtio workers
        (:mod:`pyvt._virtio`) check every guest buffer against it.  The
        addresses are valid until the region is removed or the VM closed:
        stop the workers first."""
        self._check_open()
        return [(r.gpa, r.size, r.host_address) for r in self.regions
                if not r.readonly and r.host_writable and r.mapping is not None]

    def _pieces(self, gpa: int, n: int) -> List[Tuple[Region, int, int]]:
        """(region, offset, length) covering [gpa, gpa+n), or OutOfRangeError."""
        self._check_open()
        if isinstance(gpa, bool) or not isinstance(gpa, int) or isinstance(n, bool) or not isinstance(n, int):
            raise ArgumentTypeError(f"address and length must be ints, not {gpa!r}, {n!r}")
        if gpa < 0 or n < 0:
            raise OutOfRangeError(f"negative address or length: {gpa:#x}, {n}")
        pieces = []
        at, left = gpa, n
        while left:
            region = next((r for r in self.regions if r.gpa <= at < r.end), None)
            if region is None:
                raise OutOfRangeError(
                    f"guest memory access {gpa:#x}-{gpa + n - 1:#x} touches {at:#x}, "
                    f"which no memory region holds (regions: "
                    f"{', '.join(f'{r.gpa:#x}-{r.end - 1:#x}' for r in self.regions)})")
            length = min(left, region.end - at)
            pieces.append((region, at - region.gpa, length))
            at += length
            left -= length
        return pieces

    def read(self, gpa: int, n: int) -> bytes:
        """Reads ``n`` bytes of guest-physical memory at ``gpa``."""
        return b"".join(bytes(r.buffer[o:o + length]) for r, o, length in self._pieces(gpa, n))

    def write(self, gpa: int, data) -> None:
        """Writes bytes-like ``data`` to guest-physical memory at ``gpa``."""
        data = _byte_view(data)
        pieces = self._pieces(gpa, len(data))
        for region, _, _ in pieces:
            if not region.host_writable:
                raise ArgumentError(
                    f"cannot write {gpa:#x}-{gpa + len(data) - 1:#x}: {region!r} maps "
                    "host memory that is read-only on the host too (map a writable "
                    "object to write it from the host)")
        done = 0
        for region, offset, length in pieces:
            region.buffer[offset:offset + length] = data[done:done + length]
            if region.host_dirty is not None and length:
                pageset.mark(region.host_dirty, offset // PAGE_SIZE,
                             (offset + length - 1) // PAGE_SIZE)
            done += length

    def read_int(self, gpa: int, size: int = 8) -> int:
        """Reads a little-endian unsigned integer of ``size`` bytes."""
        return int.from_bytes(self.read(gpa, size), "little")

    def write_int(self, gpa: int, value: int, size: int = 8) -> None:
        """Writes ``value`` as a little-endian integer of ``size`` bytes: 0 to
        2**(8*size) - 1, or a negative value that fits ``size`` bytes as a
        signed one (written in two's complement: -1 is all ones)."""
        try:
            value = operator.index(value)
        except TypeError:
            raise ArgumentTypeError(f"value must be an int, not {value!r}") from None
        self._pieces(gpa, size)  # the range first: a huge size must not allocate
        if size < 1:
            raise ArgumentError(f"size must be at least 1 byte, not {size}")
        try:
            data = value.to_bytes(size, "little", signed=value < 0)
        except OverflowError:
            bits = 8 * size
            raise ArgumentError(
                f"{value:#x} does not fit in {size} bytes: write 0 to {(1 << bits) - 1:#x}, "
                f"or -{1 << (bits - 1):#x} to -1 (two's complement)") from None
        self.write(gpa, data)

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop = _slice_bounds(key, need_stop=True)
            return self.read(start, max(0, stop - start))
        return self.read(key, 1)[0]

    def __setitem__(self, key, data) -> None:
        if isinstance(key, slice):
            start, stop = _slice_bounds(key, need_stop=False)
            data = _byte_view(data)
            if stop is not None and max(0, stop - start) != len(data):
                raise ArgumentError(f"guest memory slice {start:#x}:{stop:#x} holds "
                                    f"{max(0, stop - start)} bytes, not {len(data)}")
            self.write(start, data)
        else:
            try:
                byte = operator.index(data)
            except TypeError:
                raise ArgumentTypeError(f"a guest memory byte takes an int 0-255, not {data!r}") from None
            if not 0 <= byte <= 255:
                raise ArgumentError(f"a guest memory byte takes an int 0-255, not {byte}")
            self.write(key, bytes([byte]))

    # -- dirty tracking, for snapshots ------------------------------------------
    #
    # A snapshot restore copies back only the pages that may differ from the
    # snapshot.  For that each region keeps baselines (Region.baselines):
    # snapshot images it is known against, each with the pages that may have
    # changed since the region last equalled it.  Writes reach every baseline
    # when they are folded in (fold: KVM's dirty log plus write()'s pages);
    # take and restore fold before they look, so no write is ever lost to a
    # baseline, whichever snapshot came later.

    def track_dirty_pages(self) -> None:
        """Starts tracking writes on every region (idempotent): from now on
        the guest's writes (KVM's dirty log: the ring or the bitmap) and
        ``write()``'s reach the baselines and :meth:`dirty_pages`.  Writes
        through ``view`` are not seen."""
        self._check_open()
        for region in self.regions:
            if region.host_dirty is None:
                # What happened before is unknown: every page that may have
                # been written counts as written.
                self._start_tracking(region, _written_so_far(region))

    def _start_tracking(self, region: Region, unreported: int) -> None:
        if region.host_dirty is None:
            region.host_dirty = bytearray(pageset.bitmap_bytes(region.pages))
            region.unreported = unreported
        if region.readonly or region.dirty_logging or region.dirty_log_refused:
            return
        try:
            self._vm_fd.set_user_memory_region(
                region.slot, region.gpa, region.size, region.host_address,
                lib.KVM_MEM_LOG_DIRTY_PAGES)
            region.dirty_logging = True
        except KvmError:
            # Without a dirty log, snapshot restore compares pages.
            region.dirty_log_refused = True

    def dirty_pages(self) -> List[DirtyPages]:
        """The pages written since the last call, one :class:`DirtyPages` per
        region (in address order): by the guest, as KVM logged them (through
        the VM's dirty ring, or its dirty bitmap), and by the host through
        :meth:`write` (and a snapshot restore's copy).  Writes through
        ``view`` are not seen.  A vCPU that is running meanwhile may have
        written pages that only a later call reports (KVM hands over a
        vCPU's entries when it leaves KVM_RUN): call it with the vCPUs
        stopped for every write up to now.

        The first call starts tracking (see :meth:`track_dirty_pages`) and,
        unless the VM has a dirty ring (which tracks from its creation),
        reports every page that may have been written before.  Raises
        :class:`pyvt.BackendError` where the backend keeps no dirty log."""
        self.track_dirty_pages()
        blind = [r for r in self.regions if not r.tracked]
        if blind:
            raise BackendError(
                f"this backend keeps no dirty log (it refused KVM_MEM_LOG_DIRTY_PAGES), so "
                f"the guest's writes to {blind[0]!r} cannot be known")
        with self._dirty_lock:
            self._collect(self.regions)
            found = [DirtyPages(r.gpa, r.size, r.unreported) for r in self.regions]
            for region in self.regions:
                region.unreported = 0
        return found

    def fold(self) -> None:
        """Adds the pages written since the last fold to every baseline, in
        every region (one collection: a dirty ring mixes them all)."""
        self._check_open()
        with self._dirty_lock:
            self._collect(self.regions)

    def harvest_dirty_rings(self, full_ring: "DirtyRing") -> None:
        """Empties ``full_ring`` into the baselines and :meth:`dirty_pages`.
        The run loop calls it when ``full_ring``'s vCPU stopped with
        ``KVM_EXIT_DIRTY_RING_FULL``: only
        that ring, whose vCPU is not running, is read (a backend that
        overruns rings could write over entries of a running vCPU's ring
        while they are harvested).  If that ring gives nothing
        again and again after an overrun (see :mod:`pyvt.dirty_ring`), KVM
        counts entries it already reset: each call then moves past one of
        them, until KVM lets the vCPU run.  Raises rather than loop forever."""
        self._check_open()
        with self._dirty_lock:
            before = full_ring.fetch
            self._collect(self.regions, [full_ring])
            if full_ring.fetch != before:
                full_ring.futile_exits = 0
                return
            # Nothing new: another thread emptied the ring since the exit
            # (once; the next run goes on), or KVM is ahead of the ring.
            full_ring.futile_exits += 1
            if full_ring.futile_exits > 2 * full_ring.entries + 1:
                raise BackendError(
                    f"vCPU {full_ring.vcpu_index} keeps stopping because its dirty ring "
                    f"({full_ring.size} bytes) is full, but the ring holds nothing to "
                    "harvest; use a larger ring, pyvt.Vm(dirty_ring=...)")
            if full_ring.futile_exits >= 2 and full_ring.skip_reset_entry():
                self._vm_fd.reset_dirty_rings()

    def _collect(self, regions: List[Region], rings: Optional[List["DirtyRing"]] = None) -> None:
        """Moves the writes logged since the last collection (KVM's and
        ``write()``'s; only ``rings``' with a dirty ring) into each region's
        baselines and unreported pages.  Caller holds _dirty_lock."""
        if self._vm_fd.dirty_ring_size:
            regions = self.regions  # a ring mixes every slot: take them all
        logged = _dirty_pages.harvester(self._vm_fd)(self._vm_fd, regions, rings)
        self.dirty_rate.record(logged)
        for region in regions:
            written = logged.get(region.slot, 0)
            if region.host_dirty is not None:
                host = int.from_bytes(region.host_dirty, "little")
                if host:
                    written |= host
                    region.host_dirty = bytearray(len(region.host_dirty))
            self._add_written(region, written)

    @staticmethod
    def _add_written(region: Region, written: int) -> None:
        if written and region.host_dirty is not None:
            region.unreported |= written
        for key, pages in list(region.baselines.items()):
            if getattr(key, "closed", False):
                del region.baselines[key]  # a closed snapshot is never restored
            elif written:
                region.baselines[key] = pages | written

    def changed_since(self, region: Region, baseline) -> Optional[int]:
        """The pages (a :mod:`pyvt.pageset`) of ``region`` that may differ
        from snapshot image ``baseline``, or None when the region's relation
        to it is unknown (never equal to it while tracked).  Call
        :meth:`fold` first: writes not folded in yet are not counted."""
        if not region.tracked or region.source is not None:
            return None  # mapped host memory: the host writes it unseen
        return region.baselines.get(baseline)

    def note_written(self, region: Region, pages: int) -> None:
        """Records that the caller is about to write ``pages`` of ``region``
        through its mapping (a restore's copy): they may change against
        every baseline, even if the copy stops half-way."""
        if region.tracked and pages:
            with self._dirty_lock:
                self._add_written(region, pages)

    def now_equals(self, region: Region, baseline) -> None:
        """Records that ``region`` now holds exactly ``baseline``'s contents
        (just snapshotted into it, or restored from it).  Fold first: writes
        still unfolded would count against ``baseline`` (which only makes a
        restore copy more than it needs).  Does nothing while untracked."""
        if region.tracked:
            region.baselines[baseline] = 0

    def close(self) -> None:
        """Unmaps every region.  A region still exported through a memoryview
        stays mapped until that view is released (never a dangling pointer)."""
        self._vm_fd = None
        for region in self.regions:
            _release(region.mapping)  # a user's memoryview may keep it alive; GC unmaps it
            region.mapping = None
            region.source = None
            if region.memfd >= 0:
                os.close(region.memfd)
                region.memfd = -1

    def __repr__(self) -> str:
        return f"GuestMemory({', '.join(map(repr, self.regions))})"


# -- host memory for GuestMemory.map() ------------------------------------------


def _address_of(memory) -> int:
    """The host address of a buffer (an mmap or a memoryview)."""
    buf = ffi.from_buffer(memory)
    try:
        return int(ffi.cast("uintptr_t", buf))
    finally:
        ffi.release(buf)


def _release(mapping) -> None:
    """Lets go of a region's host memory: unmaps pyvt's own mmap, releases
    the export of a user's buffer.  If someone still exports it (a
    memoryview of ``region.buffer``), the GC does it when they let go."""
    if mapping is None:
        return
    try:
        if isinstance(mapping, memoryview):
            mapping.release()
        else:
            mapping.close()
    except BufferError:
        pass


def _page_multiple(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(f"{what} must be an int, not {value!r}")
    if value < 0 or value % PAGE_SIZE:
        raise MemoryConfigError(f"{what} {value:#x} is not a non-negative multiple of the "
                                f"page size ({PAGE_SIZE:#x})")
    return value


def _host_memory(obj, readonly: bool, size, offset) -> Tuple[Union[mmap.mmap, memoryview], int, bool]:
    """(mapping, length, host writable) for GuestMemory.map(obj): a buffer
    export of a buffer-protocol object, or pyvt's own shared mmap of a file."""
    offset = _page_multiple(offset, "offset")
    size = None if size is None else parse_size(size)
    if isinstance(obj, bool):
        raise ArgumentTypeError("cannot map a bool: pass an mmap, a page-aligned buffer "
                                "or a file descriptor")
    if isinstance(obj, int) or (hasattr(obj, "fileno") and not isinstance(obj, mmap.mmap)
                                and not _is_buffer(obj)):
        return _map_file(obj, readonly, size, offset)
    if isinstance(obj, mmap.mmap) and obj.closed:
        raise ClosedError("cannot map a closed mmap")
    try:
        whole = memoryview(obj)
    except TypeError:
        raise ArgumentTypeError(
            f"cannot map a {type(obj).__name__}: pass an mmap.mmap, a buffer-protocol "
            "object with page-aligned memory (numpy array, ctypes array...) or a file "
            "descriptor") from None
    with whole:
        if not whole.c_contiguous:
            raise MemoryConfigError("cannot map a buffer that is not C-contiguous: the "
                                    "guest sees one flat run of bytes")
        with whole.cast("B") as flat:
            size = len(flat) - offset if size is None else size
            if size <= 0 or offset + size > len(flat):
                raise MemoryConfigError(f"the buffer holds {len(flat):#x} bytes: there is no "
                                        f"{size:#x}-byte piece of it at offset {offset:#x}")
            # The slice outlives flat and whole: it is the export pyvt holds.
            piece = flat[offset:offset + size]
    try:
        if size % PAGE_SIZE:
            raise MemoryConfigError(
                f"cannot map {size:#x} bytes: KVM maps whole pages; use a buffer of a "
                f"multiple of {PAGE_SIZE:#x} bytes (or pass size=)")
        address = _address_of(piece)
        if address % PAGE_SIZE:
            raise MemoryConfigError(
                f"cannot map a buffer at host address {address:#x}: KVM maps whole pages, "
                f"so it must start on a page boundary ({PAGE_SIZE:#x}); allocate it with "
                "mmap.mmap(-1, n) (or numpy.frombuffer/ctypes from_buffer of one)")
        if piece.readonly and not readonly:
            raise MemoryConfigError(
                f"the {type(obj).__name__} is read-only on the host, so the guest cannot "
                "write it either: map it with readonly=True, or pass a writable buffer")
    except BaseException:
        piece.release()
        raise
    return piece, size, not piece.readonly


def _is_buffer(obj) -> bool:
    try:
        memoryview(obj).release()
    except (TypeError, ValueError):
        return False
    return True


def _map_file(file, readonly: bool, size: Optional[int], offset: int) -> Tuple[mmap.mmap, int, bool]:
    """pyvt's own shared mmap of a file (the whole file from ``offset`` by
    default).  mmap holds a duplicate of the descriptor: the user's stays theirs."""
    try:
        fd = file if isinstance(file, int) else file.fileno()
        info = os.fstat(fd)
        access = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    except (OSError, ValueError) as e:
        raise ArgumentError(f"cannot map {file!r}: it is not an open file "
                            f"({getattr(e, 'strerror', None) or e})") from None
    if size is None:
        size = info.st_size - offset
        if size <= 0:
            raise MemoryConfigError(
                f"the file is {info.st_size:#x} bytes: nothing to map from offset {offset:#x} "
                "(extend it with os.ftruncate, or pass size=)")
    if stat.S_ISREG(info.st_mode) and offset + size > info.st_size:
        raise MemoryConfigError(
            f"the file is {info.st_size:#x} bytes, shorter than offset + size "
            f"({offset + size:#x}): the guest's accesses past its end would fault; extend it "
            f"first (os.ftruncate(fd, {offset + size:#x}))")
    if size % PAGE_SIZE:
        raise MemoryConfigError(
            f"cannot map {size:#x} bytes: KVM maps whole pages; pass size= a multiple of "
            f"{PAGE_SIZE:#x}, with the file at least that long")
    writable = access == os.O_RDWR
    if not readonly and not writable:
        raise MemoryConfigError(
            "the file is not open for reading and writing, so the guest could not write it: "
            "open it with os.O_RDWR (or 'r+b'), or map it with readonly=True")
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    try:
        mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, prot, offset=offset)
    except (OSError, ValueError, OverflowError) as e:
        raise MemoryConfigError(f"cannot map {size:#x} bytes of the file at offset "
                                f"{offset:#x}: {getattr(e, 'strerror', None) or e}") from None
    return mapping, size, writable


def _written_so_far(region: Region) -> int:
    """Every page of ``region`` that may have been written since it was
    mapped: a clone's private copies, or a memfd's allocated pages."""
    if region.memfd < 0 and region.origin is not None:
        private = snapshot_memory.private_pages(region)
        if private is not None:
            return private
    return snapshot_memory.possibly_nonzero(region)
