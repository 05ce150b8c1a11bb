# cython: language_level=3, boundscheck=False, wraparound=False
"""Native virtio device workers: the virtio data path without the GIL.

Each worker is a C thread (``csrc/virtio_worker.c``) serving one device's
split virtqueues.  A queue's kick eventfd (registered by the PCI transport
as a KVM ioeventfd) wakes it; it walks the chains in guest memory, does the
I/O (a raw image, a tap, pipes, getrandom) and writes the queue's call
eventfd (a KVM irqfd) when the guest wants an interrupt.  Python only sets
queues up, starts and stops the thread, and reads the ISR and stats.

Every guest address is checked against the memory table given to the
worker: the VM's ``GuestMemory`` (best: the worker then keeps the regions
mapped while it lives, whatever happens to the VM), or a list of
``(gpa, size, host_address)`` (``GuestMemory.host_regions()``: the caller
keeps that memory mapped).  After a region is added or removed, stop the
worker and ``set_memory()`` again.  The worker's writes to guest RAM are
not in KVM's dirty log: ``report_written()`` hands them to the VM's
snapshot tracking.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free

from pyvt.includes.virtio cimport *
from libc.stddef cimport size_t

import errno
import os

from pyvt.errors import ArgumentError, ArgumentTypeError, DeviceError, VirtqueueError

#: The largest split virtqueue a worker serves.
MAX_QUEUE_SIZE = PVT_VQ_MAX_SIZE
#: The most buffers one request may have.
MAX_SEGMENTS = PVT_VQ_MAX_SEGS
#: The most RAM regions a worker's memory table holds.
MAX_REGIONS = PVT_VMEM_MAX_REGIONS


def _bits(*numbers):
    """A feature mask with those bit numbers set."""
    mask = 0
    for n in numbers:
        mask |= 1 << n
    return mask


#: Ring features every worker implements (virtio 1.x; split rings only).
RING_FEATURES = _bits(VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC, VIRTIO_RING_F_EVENT_IDX)

#: The ISR bit a worker sets when it interrupts the guest for a queue.
ISR_QUEUE = 1


# -- errors: a native -errno becomes an exception here, and only here ---------

cdef int check(int rc, str what) except -1:
    if rc == 0:
        return 0
    if rc == -errno.EBUSY:
        raise DeviceError(f"{what}: the worker is running; stop() it first")
    if rc == -errno.ENOENT:
        raise ArgumentError(f"{what}: the device has no such queue")
    if rc == -errno.ENODEV:
        raise ArgumentError(f"{what}: that queue is not set up; set_queue() it first")
    if rc == -errno.EFAULT:
        raise VirtqueueError(f"{what}: a ring lies outside guest RAM")
    if rc == -errno.EINVAL:
        raise VirtqueueError(f"{what}: the queue size must be a power of two up to "
                             f"{PVT_VQ_MAX_SIZE}, the descriptor table 16-byte aligned, the "
                             "available ring 2-byte and the used ring 4-byte aligned")
    raise DeviceError(f"{what} failed: {os.strerror(-rc)}")


cdef uint64_t _uint(object value, str name, uint64_t limit) except? 0xFFFFFFFFFFFFFFFF:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < 0 or value > limit:
        raise ArgumentError(f"{name} must be between 0 and {limit:#x}, not {value:#x}")
    return value


cdef int _fd(object value, str name, bint optional) except -2:
    if value is None and optional:
        return -1
    if isinstance(value, bool) or not isinstance(value, int):
        if hasattr(value, "fileno"):
            value = value.fileno()
        else:
            raise ArgumentTypeError(f"{name} must be a file descriptor (an int), not "
                                    f"{type(value).__name__}")
    if value < 0:
        raise ArgumentError(f"{name} must be an open file descriptor, not {value}")
    try:
        os.fstat(value)
    except OSError:
        raise ArgumentError(f"{name} {value} is not an open file descriptor") from None
    return value


def memory_table(memory):
    """``memory`` as a checked list of ``(gpa, size, host_address)``: a
    list of such tuples, or a ``GuestMemory`` (its ``host_regions()``)."""
    if hasattr(memory, "host_regions"):
        memory = memory.host_regions()
    try:
        regions = [tuple(r) for r in memory]
    except TypeError:
        raise ArgumentTypeError("memory must be a GuestMemory or a list of (gpa, size, "
                                f"host_address), not {type(memory).__name__}") from None
    if not regions:
        raise ArgumentError("memory holds no RAM region: a worker needs guest RAM")
    if len(regions) > PVT_VMEM_MAX_REGIONS:
        raise ArgumentError(f"memory has {len(regions)} regions; a worker takes at most "
                            f"{PVT_VMEM_MAX_REGIONS}")
    table = []
    for r in regions:
        if len(r) != 3:
            raise ArgumentError(f"a memory region is (gpa, size, host_address), not {r!r}")
        gpa = _uint(r[0], "a region's gpa", 0xFFFFFFFFFFFFFFFF)
        size = _uint(r[1], "a region's size", 0xFFFFFFFFFFFFFFFF)
        host = _uint(r[2], "a region's host_address", 0xFFFFFFFFFFFFFFFF)
        if size == 0 or gpa + size > 1 << 64 or host == 0:
            raise ArgumentError(f"memory region {r!r} is empty, wraps or has no host address")
        table.append((gpa, size, host))
    return table


def _pin(memory, table):
    """Memoryviews of the GuestMemory regions in ``table``: while one is
    held, closing the region defers its munmap (pyvt.memory._release)."""
    regions = getattr(memory, "regions", None)
    if regions is None:
        return []
    wanted = {(gpa, size, host) for gpa, size, host in table}
    return [memoryview(r.buffer) for r in regions
            if (r.gpa, r.size, r.host_address) in wanted and r.mapping is not None]


cdef class _Worker:
    """What every native virtio worker shares: queues, features, the thread."""

    cdef pvt_vworker *w   # NULL until the device's C side is set up
    cdef void *dev        # the device struct that holds *w
    cdef readonly list memory
    cdef readonly str name
    # Exports of the regions' host mappings, when the worker was given a
    # GuestMemory: a VM closed (or a region removed) under a running worker
    # then stays mapped until the worker goes.
    cdef list pins

    #: Feature bits this worker implements (ring bits and device bits).
    supported_features = RING_FEATURES

    def __dealloc__(self):
        if self.w != NULL:
            with nogil:
                pvt_vw_destroy(self.w)
        free(self.dev)

    cdef int _attach(self, void *dev, pvt_vworker *w, int rc, object memory) except -1:
        """Takes the device struct `dev` its init returned `rc` for."""
        if self.dev != NULL:
            free(dev)
            raise DeviceError(f"the {self.name} worker is set up already")
        if rc:
            free(dev)
            check(rc, f"cannot set up the {self.name} worker")
        self.dev = dev
        self.w = w
        self.set_memory(memory)
        return 0

    cdef pvt_vworker *_live(self) except NULL:
        if self.w == NULL:
            raise DeviceError(f"the {self.name} worker was not set up")
        return self.w

    def set_memory(self, memory):
        """Replaces the memory table (after a region was added or removed);
        only while stopped.  Given the VM's ``GuestMemory`` (rather than a
        list), the worker keeps its regions mapped for as long as it uses
        them, even if the VM is closed meanwhile."""
        cdef pvt_vworker *w = self._live()
        table = memory_table(memory)
        cdef pvt_vmem_region *regions = <pvt_vmem_region *>calloc(len(table),
                                                                  sizeof(pvt_vmem_region))
        if regions == NULL:
            raise MemoryError()
        try:
            for i, (gpa, size, host) in enumerate(table):
                regions[i].gpa = gpa
                regions[i].size = size
                regions[i].host = <uint8_t *><size_t>host
                regions[i].written = NULL
            pins = _pin(memory, table)
            check(pvt_vw_set_memory(w, regions, len(table)), f"{self.name}: set_memory")
        finally:
            free(regions)
        self.memory = table
        self.pins = pins

    def take_written(self):
        """``[(region_gpa, pages)]``: the pages of guest RAM the device
        wrote since the last call, per region of its memory table, as a
        :mod:`pyvt.pageset` (bit n: the region's page n); regions with none
        are left out.  KVM's dirty log sees only the guest's own writes: a
        snapshot or migration must add these (:meth:`report_written`).
        Safe while the worker runs (a page written meanwhile comes in this
        call or the next)."""
        cdef pvt_vworker *w = self._live()
        result = []
        cdef size_t words
        cdef uint64_t *pages
        for i, (gpa, size, _) in enumerate(self.memory):
            words = ((size + PVT_VMEM_PAGE_SIZE - 1) // PVT_VMEM_PAGE_SIZE + 63) // 64
            pages = <uint64_t *>calloc(words, 8)
            if pages == NULL:
                raise MemoryError()
            try:
                check(pvt_vw_take_written(w, i, pages, words), f"{self.name}: take_written")
                written = int.from_bytes((<char *>pages)[:words * 8], "little")
            finally:
                free(pages)
            if written:
                result.append((gpa, written))
        return result

    def report_written(self, memory):
        """Hands :meth:`take_written` to ``memory`` (the VM's
        ``GuestMemory``): the pages reach its snapshot baselines and
        ``dirty_pages()``, as host writes through ``memory.write`` do."""
        regions = {r.gpa: r for r in memory.regions}
        for gpa, pages in self.take_written():
            region = regions.get(gpa)
            if region is not None:
                memory.note_written(region, pages)

    @property
    def queues(self):
        """How many queues the device has."""
        return self._live().nqueues

    @property
    def running(self):
        return bool(self._live().running)

    @property
    def features(self):
        """The negotiated features the worker was given."""
        return self._live().features

    def set_queue(self, index, size, desc_gpa, avail_gpa, used_gpa, kick_fd, call_fd):
        """Sets queue ``index`` up at those guest-physical addresses; its
        positions start at 0.  The worker keeps its own duplicates of
        ``kick_fd`` (an eventfd, the ioeventfd) and ``call_fd`` (an eventfd
        it writes for an interrupt, the irqfd); either may be None."""
        cdef pvt_vworker *w = self._live()
        cdef unsigned q = self._index(index)
        cdef uint32_t n = _uint(size, "size", 0xFFFFFFFF)
        cdef uint64_t desc = _uint(desc_gpa, "desc_gpa", 0xFFFFFFFFFFFFFFFF)
        cdef uint64_t avail = _uint(avail_gpa, "avail_gpa", 0xFFFFFFFFFFFFFFFF)
        cdef uint64_t used = _uint(used_gpa, "used_gpa", 0xFFFFFFFFFFFFFFFF)
        cdef int kick = _fd(kick_fd, "kick_fd", True)
        cdef int call = _fd(call_fd, "call_fd", True)
        check(pvt_vw_set_queue(w, q, n, desc, avail, used, kick, call),
              f"{self.name}: set_queue({index}, size={size}, desc={desc_gpa:#x}, "
              f"avail={avail_gpa:#x}, used={used_gpa:#x})")

    cdef unsigned _index(self, object index) except? 0xFFFFFFFF:
        cdef unsigned q = _uint(index, "queue index", 0xFFFF)
        if q >= self._live().nqueues:
            raise ArgumentError(f"the {self.name} device has {self._live().nqueues} "
                                f"queue(s); there is no queue {index}")
        return q

    def set_features(self, negotiated):
        """The features the driver accepted.  Bits the worker does not
        implement (config-space bits the transport handles) are ignored."""
        check(pvt_vw_set_features(self._live(), _uint(negotiated, "features",
                                                      0xFFFFFFFFFFFFFFFF)),
              f"{self.name}: set_features")

    def start(self):
        """Starts the worker thread; it first serves what is already available."""
        check(pvt_vw_start(self._live()), f"{self.name}: start")

    def stop(self):
        """Stops and joins the thread.  Queue positions are kept."""
        cdef pvt_vworker *w = self._live()
        with nogil:
            pvt_vw_stop(w)

    def reset(self):
        """Forgets queues, features and the ISR (a device reset); stats stay."""
        check(pvt_vw_reset(self._live()), f"{self.name}: reset")

    def take_isr(self):
        """Reads and clears the ISR bits (bit 0: a queue interrupt)."""
        return pvt_vw_take_isr(self._live())

    def queue_state(self, index):
        """``(last_avail_idx, used_idx)`` of queue ``index``."""
        cdef unsigned q = self._index(index)
        cdef pvt_vq *vq = &self._live().q[q]
        return (vq.last_avail, vq.used_idx)

    def set_queue_state(self, index, last_avail_idx):
        """Restores queue ``index``'s position (only while stopped): the
        next chain taken is ``last_avail_idx``; the used index is read back
        from the used ring in guest memory."""
        cdef unsigned q = self._index(index)
        check(pvt_vw_set_position(self._live(), q, _uint(last_avail_idx, "last_avail_idx",
                                                         0xFFFF)),
              f"{self.name}: set_queue_state({index})")

    @property
    def stats(self):
        """``{queue index: {"requests", "bytes", "errors", "notifies",
        "kicks", "broken"}}``; counts run over the worker's life."""
        cdef pvt_vworker *w = self._live()
        result = {}
        for q in range(w.nqueues):
            s = w.q[q].stats
            result[q] = {"requests": s.requests, "bytes": s.bytes, "errors": s.errors,
                         "notifies": s.notifies, "kicks": s.kicks,
                         "broken": bool(w.q[q].broken)}
        return result

    def __repr__(self):
        if self.w == NULL:
            return f"<{type(self).__name__} (not set up)>"
        state = "running" if self.w.running else "stopped"
        return f"<{type(self).__name__} {state}, {self.w.nqueues} queue(s)>"


cdef class RngWorker(_Worker):
    """virtio-rng: one request queue, filled from getrandom()."""

    def __init__(self, memory):
        cdef pvt_vrng *rng = <pvt_vrng *>calloc(1, sizeof(pvt_vrng))
        if rng == NULL:
            raise MemoryError()
        self.name = "virtio-rng"
        self._attach(rng, &rng.w, pvt_vrng_init(rng), memory)


cdef class BlkWorker(_Worker):
    """virtio-blk over a raw image: IN, OUT, FLUSH (fdatasync), GET_ID
    (``serial``); other request types are UNSUPP, OUT on a read-only disk
    IOERR.  ``sector_count`` (512-byte sectors) defaults to the image's
    size; reads past the end of a shorter image read zeros.  The worker
    keeps its own duplicate of ``fd``."""

    supported_features = RING_FEATURES | _bits(VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_RO,
                                               VIRTIO_BLK_F_FLUSH)
    #: Data buffers per request the worker takes: the config's seg_max.
    SEG_MAX = PVT_VBLK_SEG_MAX
    SECTOR_SIZE = PVT_VBLK_SECTOR_SIZE

    def __init__(self, memory, fd, readonly=False, sector_count=None, serial=b""):
        self.name = "virtio-blk"
        cdef int image = _fd(fd, "fd", False)
        if sector_count is None:
            try:
                size = os.lseek(image, 0, os.SEEK_END)
            except OSError as e:
                raise ArgumentError(f"cannot find the size of disk image fd {image}: "
                                    f"{e.strerror}") from None
            if size % PVT_VBLK_SECTOR_SIZE:
                raise ArgumentError(f"disk image fd {image} is {size} bytes, not a multiple of "
                                    f"{PVT_VBLK_SECTOR_SIZE}: pass sector_count, or pad it")
            sector_count = size // PVT_VBLK_SECTOR_SIZE
        cdef uint64_t sectors = _uint(sector_count, "sector_count", (1 << 64) // 512 - 1)
        if isinstance(serial, str):
            serial = serial.encode()
        if not isinstance(serial, bytes):
            raise ArgumentTypeError(f"serial must be bytes or str, not {type(serial).__name__}")
        if len(serial) > VIRTIO_BLK_ID_BYTES:
            raise ArgumentError(f"a virtio-blk serial holds {VIRTIO_BLK_ID_BYTES} bytes; "
                                f"{serial!r} is {len(serial)}")
        cdef pvt_vblk *blk = <pvt_vblk *>calloc(1, sizeof(pvt_vblk))
        if blk == NULL:
            raise MemoryError()
        self._attach(blk, &blk.w, pvt_vblk_init(blk, image, bool(readonly), sectors,
                                                serial, len(serial)), memory)

    @property
    def readonly(self):
        return bool((<pvt_vblk *>self.dev).readonly)

    @property
    def sector_count(self):
        """The capacity, in 512-byte sectors (the config's ``capacity``)."""
        return (<pvt_vblk *>self.dev).sectors


cdef class NetWorker(_Worker):
    """virtio-net over a tap opened with IFF_VNET_HDR (its TUNSETVNETHDRSZ
    set to ``vnet_hdr_len``): receiveq 0 reads the tap, transmitq 1 writes
    it; the header passes through as it is.  One packet per receive chain
    (no VIRTIO_NET_F_MRG_RXBUF: num_buffers is 1), no control queue.  The
    worker keeps its own duplicate of ``tap_fd``."""

    supported_features = RING_FEATURES | _bits(VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM)
    RX_QUEUE = PVT_VNET_RX_QUEUE
    TX_QUEUE = PVT_VNET_TX_QUEUE

    def __init__(self, memory, tap_fd, vnet_hdr_len=PVT_VNET_HDR_LEN):
        self.name = "virtio-net"
        cdef int tap = _fd(tap_fd, "tap_fd", False)
        if vnet_hdr_len not in (PVT_VNET_HDR_LEN, PVT_VNET_LEGACY_HDR_LEN):
            raise ArgumentError(f"vnet_hdr_len must be {PVT_VNET_HDR_LEN} (virtio 1.x) or "
                                f"{PVT_VNET_LEGACY_HDR_LEN} (legacy), not {vnet_hdr_len!r}")
        cdef pvt_vnet *net = <pvt_vnet *>calloc(1, sizeof(pvt_vnet))
        if net == NULL:
            raise MemoryError()
        self._attach(net, &net.w, pvt_vnet_init(net, tap, vnet_hdr_len), memory)

    @property
    def vnet_hdr_len(self):
        return (<pvt_vnet *>self.dev).hdr_len


cdef class ConsoleWorker(_Worker):
    """virtio-console, port 0 only: receiveq 0 takes what ``in_fd`` reads,
    transmitq 1 goes to ``out_fd``.  Either may be None (no input; output
    dropped).  At the end of input the worker stops reading ``in_fd``
    (``input_closed``).  The worker keeps its own duplicates."""

    RX_QUEUE = PVT_VCONSOLE_RX_QUEUE
    TX_QUEUE = PVT_VCONSOLE_TX_QUEUE

    def __init__(self, memory, in_fd, out_fd):
        self.name = "virtio-console"
        cdef int source = _fd(in_fd, "in_fd", True)
        cdef int sink = _fd(out_fd, "out_fd", True)
        cdef pvt_vconsole *con = <pvt_vconsole *>calloc(1, sizeof(pvt_vconsole))
        if con == NULL:
            raise MemoryError()
        self._attach(con, &con.w, pvt_vconsole_init(con, source, sink), memory)

    @property
    def input_closed(self):
        """in_fd reached its end (or failed): it is no longer read."""
        return bool(self._live().input_closed)
