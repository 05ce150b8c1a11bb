"""KVM's binary statistics: reading the fd ``KVM_GET_STATS_FD`` returns.

A VM or vCPU stats fd (api.rst "4.133 KVM_GET_STATS_FD", needs
KVM_CAP_BINARY_STATS_FD) is a read-only file of three parts, found through
``struct kvm_stats_header`` at offset 0: an id string (``name_size`` bytes
at ``id_offset``), ``num_desc`` descriptors (``struct kvm_stats_desc``, each
followed by its ``name_size``-byte name, at ``desc_offset``) and the data
(``__u64`` items at ``data_offset``; descriptor ``offset`` counts from there).
The header, id and descriptors never change for the life of the fd, so
:class:`StatsFd` decodes them once; :meth:`StatsFd.read` preads the data.

Values are plain ints (lists of ints for histograms and other multi-item
statistics); what a value means is in its :class:`StatsDescriptor`:
``type`` (cumulative, instant, peak, linear_histogram, log_histogram),
``unit`` (none, bytes, seconds, cycles, boolean) and the scale
``base ** exponent`` (``halt_wait_ns`` is seconds with exponent -9).
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

from ._kvm import ffi, lib
from .errors import ArgumentError, BackendError, ClosedError, KvmError
from .kvm_base import _Fd, _require_cap

CAPABILITY = "KVM_CAP_BINARY_STATS_FD"

#: ``KVM_STATS_TYPE_*`` -> the names :attr:`StatsDescriptor.type` uses.
TYPES = {
    lib.KVM_STATS_TYPE_CUMULATIVE: "cumulative",
    lib.KVM_STATS_TYPE_INSTANT: "instant",
    lib.KVM_STATS_TYPE_PEAK: "peak",
    lib.KVM_STATS_TYPE_LINEAR_HIST: "linear_histogram",
    lib.KVM_STATS_TYPE_LOG_HIST: "log_histogram",
}
#: ``KVM_STATS_UNIT_*`` -> the names :attr:`StatsDescriptor.unit` uses.
UNITS = {
    lib.KVM_STATS_UNIT_NONE: "none",
    lib.KVM_STATS_UNIT_BYTES: "bytes",
    lib.KVM_STATS_UNIT_SECONDS: "seconds",
    lib.KVM_STATS_UNIT_CYCLES: "cycles",
    lib.KVM_STATS_UNIT_BOOLEAN: "boolean",
}
#: ``KVM_STATS_BASE_*`` -> the base the exponent applies to.
BASES = {lib.KVM_STATS_BASE_POW10: 10, lib.KVM_STATS_BASE_POW2: 2}

HISTOGRAMS = ("linear_histogram", "log_histogram")

#: A statistic's value: a count, a histogram's buckets, or (pyvt's
#: ``exits_by_reason``) counts by name.
StatValue = Union[int, List[int], Dict[str, int]]


@dataclass(frozen=True)
class StatsDescriptor:
    """What one statistic is.  ``type``/``unit`` are the names above, or
    ``"unknown (0x..)"`` for a value newer than pyvt (``flags`` has it raw).

    ``scale`` (``base ** exponent``) turns a value into ``unit``s:
    ``halt_wait_ns`` counts 10**-9 seconds.  A histogram's items count
    samples; its unit and scale apply to the bucket ranges
    (:meth:`bucket_ranges`).  ``offset`` is the byte offset in the stats
    fd's data block (None for pyvt's own counters, which no stats fd holds)."""

    name: str
    type: str = "cumulative"
    unit: str = "none"
    base: int = 10
    exponent: int = 0
    size: int = 1
    bucket_size: int = 0
    offset: Optional[int] = None
    flags: int = 0

    @property
    def is_histogram(self) -> bool:
        return self.type in HISTOGRAMS

    @property
    def scale(self) -> Union[int, float]:
        """``base ** exponent``: an int for exponent >= 0, else a float."""
        return self.base ** self.exponent

    def bucket_ranges(self) -> List[Tuple[int, float]]:
        """A histogram's bucket ranges ``[(low, high), ...]`` (low included,
        high not), unscaled, as api.rst defines them: linear bucket i covers
        [i, i + 1) * ``bucket_size``; log bucket 0 covers [0, 1) and bucket
        i > 0 [2**(i-1), 2**i).  The last bucket reaches infinity."""
        if self.type == "linear_histogram":
            lows = [i * self.bucket_size for i in range(self.size)]
        elif self.type == "log_histogram":
            lows = [0] + [1 << (i - 1) for i in range(1, self.size)]
        else:
            raise ArgumentError(f"{self.name} is a {self.type} statistic, not a histogram")
        return [(low, float(high)) for low, high in zip(lows, lows[1:] + [math.inf], strict=True)]

    @classmethod
    def from_struct(cls, desc) -> "StatsDescriptor":
        """Decodes a ``struct kvm_stats_desc`` (cffi)."""
        flags = desc.flags
        kind = flags & lib.KVM_STATS_TYPE_MASK
        unit = flags & lib.KVM_STATS_UNIT_MASK
        base = flags & lib.KVM_STATS_BASE_MASK
        return cls(
            name=ffi.string(desc.name).decode("ascii", "replace"),
            type=TYPES.get(kind, f"unknown ({kind:#x})"),
            unit=UNITS.get(unit, f"unknown ({unit:#x})"),
            # An unknown base cannot be scaled; 1 keeps scale at 1.
            base=BASES.get(base, 1),
            exponent=desc.exponent, size=desc.size, bucket_size=desc.bucket_size,
            offset=desc.offset, flags=flags,
        )


def counter(name: str) -> StatsDescriptor:
    """The descriptor of a plain event count (pyvt's own counters)."""
    return StatsDescriptor(name)


class StatsFd(_Fd):
    """A stats fd, as :meth:`pyvt.kvm.VmFd.get_stats_fd` and
    :meth:`pyvt.kvm.VcpuFd.get_stats_fd` return it; closing is idempotent.

    ``header`` is the ``struct kvm_stats_header`` (cffi), ``id`` the id
    string (``"kvm-<pid>"``, ``"kvm-<pid>/vcpu-<n>"``), ``descriptors``
    ``{name: StatsDescriptor}`` in the kernel's order.  Reading and closing
    are serialized, so a read racing a close never reads a reused fd number.
    """

    def __init__(self, fd: int):
        self._lock = threading.Lock()
        self._fd = fd
        try:
            self.header = ffi.new("struct kvm_stats_header *")
            ffi.buffer(self.header)[:] = self._pread(ffi.sizeof("struct kvm_stats_header"), 0)
            self.id = self._pread(self.header.name_size, self.header.id_offset) \
                .split(b"\0", 1)[0].decode("ascii", "replace")
            #: Where each value is: (name, first __u64 item, item count, a list?).
            self._layout: List[Tuple[str, int, int, bool]] = []
            self.descriptors = self._read_descriptors()
        except BaseException:
            self.close()
            raise
        # The data block reaches as far as its furthest statistic.
        self._data_size = 8 * max((first + count for _, first, count, _ in self._layout),
                                  default=0)

    def __repr__(self) -> str:
        return f"<StatsFd {self.id!r} fd={self._fd}, {len(self.descriptors)} statistics>"

    def _pread(self, size: int, offset: int) -> bytes:
        try:
            data = os.pread(self.fileno(), size, offset)
        except OSError as e:
            raise KvmError("pread(stats fd)", e.errno) from None
        if len(data) != size:
            raise BackendError(f"the stats fd gave {len(data)} of the {size} bytes at "
                               f"offset {offset} its header promises")
        return data

    def _read_descriptors(self) -> Dict[str, StatsDescriptor]:
        header = self.header
        stride = ffi.sizeof("struct kvm_stats_desc") + header.name_size
        block = self._pread(stride * header.num_desc, header.desc_offset)
        descriptors = {}
        for i in range(header.num_desc):
            # A copy one byte longer: the name stays terminated even if the
            # kernel filled all name_size bytes.
            raw = ffi.new("char[]", block[i * stride:(i + 1) * stride] + b"\0")
            struct = ffi.cast("struct kvm_stats_desc *", raw)
            desc = StatsDescriptor.from_struct(struct)
            descriptors[desc.name] = desc
            self._layout.append((desc.name, struct.offset // 8, struct.size,
                                 struct.size != 1 or desc.is_histogram))
        return descriptors

    def read(self) -> Dict[str, StatValue]:
        """The current values, ``{name: value}`` (one pread of the data
        block): an int, or a list of ints for a histogram or any other
        statistic of more than one item."""
        with self._lock:
            data = self._pread(self._data_size, self.header.data_offset)
        items = ffi.cast("uint64_t *", ffi.from_buffer(data))
        values: Dict[str, StatValue] = {}
        for name, first, count, is_list in self._layout:
            values[name] = list(items[first:first + count]) if is_list else items[first]
        return values

    def close(self) -> None:
        with self._lock:
            super().close()


def open_stats_fd(source: _Fd, kvm, what: str) -> StatsFd:
    """``KVM_GET_STATS_FD`` on ``source`` (a VmFd or VcpuFd) of system fd
    ``kvm``; ``what`` ("VM", "vCPU 0") names it in errors."""
    _require_cap(kvm, CAPABILITY, "KVM_GET_STATS_FD",
                 f"it has no binary statistics for the {what}")
    fd = source._ioctl("KVM_GET_STATS_FD", lib.KVM_GET_STATS_FD,
                       hint=f"the {what}'s statistics fd could not be made")
    return StatsFd(fd)


class CachedStats:
    """The stats fd behind ``pyvt.Vm.stats`` / ``pyvt.Vcpu.stats``: opened by
    the first read and kept (one fd for the life of its owner, not one per
    read), closed with the owner.  ``own_counters`` names the owner's own
    counters, which :meth:`descriptors` describes too.  On a backend without
    KVM_CAP_BINARY_STATS_FD (pyvt.ko) there is none: reads give ``{}``."""

    def __init__(self, source: _Fd, kvm, what: str, own_counters: Sequence[str] = ()):
        self._source = source
        self._own_counters = tuple(own_counters)
        self._kvm = kvm
        self._what = what
        self._lock = threading.Lock()
        self._file: Optional[StatsFd] = None
        self._closed = False

    @property
    def is_open(self) -> bool:
        """Whether the stats fd is open (reading it then needs no ioctl)."""
        return self._file is not None

    def _open(self) -> Optional[StatsFd]:
        with self._lock:
            if self._file is None and not self._closed and self._kvm.check_extension(CAPABILITY):
                self._file = open_stats_fd(self._source, self._kvm, self._what)
            return self._file

    def read(self) -> Dict[str, StatValue]:
        """KVM's values, or ``{}`` without a stats fd."""
        stats = self._open()
        if stats is None:
            return {}
        try:
            return stats.read()
        except ClosedError:
            raise ClosedError(f"the {self._what} was closed while its statistics "
                              "were read") from None

    def descriptors(self) -> Dict[str, StatsDescriptor]:
        """KVM's descriptors (none without a stats fd), then those of the
        owner's own counters (``own_counters``: plain event counts)."""
        stats = self._open()
        descriptors = dict(stats.descriptors) if stats is not None else {}
        descriptors.update((name, counter(name)) for name in self._own_counters)
        return descriptors

    def close(self) -> None:
        with self._lock:
            self._closed = True
            stats, self._file = self._file, None
        if stats is not None:
            stats.close()
