"""Sets of guest pages as bitmaps: a Python int whose bit n stands for page n.

That is the layout of KVM's dirty log (``int.from_bytes(log, "little")``), and
it makes union and intersection one big-int operation each, however many
pages a region has.  Listing a set visits only its non-zero bytes (found with
``bytes.translate`` and ``find``, which run at memory speed), so a sparse set
of a 1 GiB region lists in microseconds.
"""

from __future__ import annotations

from typing import Iterable, List, Tuple

Runs = List[Tuple[int, int]]

# Byte -> 1 if any / all of its bits are set: for bytes.translate.
_ANY_BIT = bytes([0]) + b"\x01" * 255
_ALL_BITS = b"\x00" * 255 + b"\x01"


def _bit_runs(value: int) -> Tuple[Tuple[int, int], ...]:
    """(first bit, count) of each stretch of set bits in one byte."""
    out, bit = [], 0
    while bit < 8:
        if value >> bit & 1:
            start = bit
            while bit < 8 and value >> bit & 1:
                bit += 1
            out.append((start, bit - start))
        bit += 1
    return tuple(out)


_BYTE_RUNS = tuple(_bit_runs(v) for v in range(256))


def runs(pages: int) -> Runs:
    """``(first page, count)`` of each stretch of consecutive pages in
    ``pages``, ascending."""
    out: Runs = []
    if pages <= 0:
        return out
    raw = pages.to_bytes((pages.bit_length() + 7) // 8, "little")
    any_bit, all_bits = raw.translate(_ANY_BIT), raw.translate(_ALL_BITS)
    first = end = -1  # the run being built: pages [first, end)

    def add(start: int, count: int) -> None:
        nonlocal first, end
        if start == end:
            end += count
            return
        if first >= 0:
            out.append((first, end - first))
        first, end = start, start + count

    at = any_bit.find(1)
    while at >= 0:
        stop = any_bit.find(0, at)
        stop = len(raw) if stop < 0 else stop
        while at < stop:
            if all_bits[at]:  # a stretch of 0xff bytes is one run
                full_end = all_bits.find(0, at, stop)
                full_end = stop if full_end < 0 else full_end
                add(at * 8, (full_end - at) * 8)
                at = full_end
            else:
                for bit, count in _BYTE_RUNS[raw[at]]:
                    add(at * 8 + bit, count)
                at += 1
        at = any_bit.find(1, stop)
    if first >= 0:
        out.append((first, end - first))
    return out


def mark(bitmap: bytearray, first: int, last: int) -> None:
    """Sets the bits of pages ``first``-``last`` (inclusive) in ``bitmap``."""
    low, high = first >> 3, last >> 3
    if low == high:
        bitmap[low] |= ((1 << (last - first + 1)) - 1) << (first & 7)
        return
    bitmap[low] |= (0xFF << (first & 7)) & 0xFF
    if high > low + 1:
        bitmap[low + 1:high] = b"\xff" * (high - low - 1)
    bitmap[high] |= (1 << ((last & 7) + 1)) - 1


def bitmap_bytes(page_count: int) -> int:
    """Bytes of a bitmap of ``page_count`` pages."""
    return (page_count + 7) // 8


def from_runs(stretches: Iterable[Tuple[int, int]], page_count: int) -> int:
    """The set of pages ``stretches`` (``(first, count)`` pairs) cover;
    ``page_count`` bounds them."""
    bitmap = bytearray(bitmap_bytes(page_count))
    for first, n in stretches:
        if n > 0:
            mark(bitmap, first, first + n - 1)
    return int.from_bytes(bitmap, "little")


def from_flags(flags: bytes) -> int:
    """The set of pages whose byte in ``flags`` (one byte per page) is not 0."""
    found: Runs = []
    ones = flags.translate(_ANY_BIT)
    at = ones.find(1)
    while at >= 0:
        stop = ones.find(0, at)
        stop = len(ones) if stop < 0 else stop
        found.append((at, stop - at))
        at = ones.find(1, stop)
    return from_runs(found, len(flags))


def whole(page_count: int) -> int:
    """Every page of a region of ``page_count`` pages."""
    return (1 << page_count) - 1
