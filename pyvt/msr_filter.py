"""The MSR filter behind ``vm.on_msr``: KVM sends exactly the MSRs that have
a Python handler to user space, and handles every other MSR itself.

KVM's filter (``KVM_X86_SET_MSR_FILTER``) holds at most
``KVM_MSR_FILTER_MAX_RANGES`` ranges of at most ``8 *
KVM_MSR_FILTER_MAX_BITMAP_SIZE`` MSRs each; inside a range, a 0 bit denies
the MSR (with ``KVM_MSR_EXIT_REASON_FILTER`` enabled: an exit to user space)
and a 1 bit leaves it to KVM, as if no range covered it.  So handled MSRs
close together share one range, and the MSRs between them are allowed.
"""

from __future__ import annotations

from typing import Iterable, List, Tuple

from ._kvm import lib
from .errors import ArgumentError

#: MSRs KVM never filters (the x2APIC registers, 0x800-0x8ff): its filter
#: lets them through whatever it says, so a handler there would never run.
X2APIC_MSRS = range(0x800, 0x900)

#: MSRs one filter range covers at most.
RANGE_MSRS = 8 * lib.KVM_MSR_FILTER_MAX_BITMAP_SIZE


def check_filterable(start: int, length: int) -> None:
    """Refuses MSRs that no filter can send to user space."""
    if start < X2APIC_MSRS.stop and X2APIC_MSRS.start < start + length:
        raise ArgumentError(
            f"MSRs {start:#x}-{start + length - 1:#x} include x2APIC registers "
            f"({X2APIC_MSRS.start:#x}-{X2APIC_MSRS.stop - 1:#x}), which KVM's MSR filter "
            "never sends to user space: a handler there would never run")


def filter_ranges(spans: Iterable[Tuple[int, int]]) -> List[Tuple[int, int, int, bytes]]:
    """The fewest filter ranges, ``(base, nmsrs, flags, bitmap)`` as
    ``VmFd.x86_set_msr_filter`` takes them, that deny exactly the MSRs in
    ``spans`` (``(start, length)`` pairs that do not overlap) and allow the
    rest.  Raises ArgumentError if KVM's limit of ranges is not enough."""
    limit = lib.KVM_MSR_FILTER_MAX_RANGES
    # Greedy, from the lowest MSR: each range reaches as far as it can.
    windows: List[Tuple[int, int, List[Tuple[int, int]]]] = []  # (base, nmsrs, handled)
    for start, length in sorted(spans):
        while length:
            if not windows or start - windows[-1][0] >= RANGE_MSRS:
                if len(windows) == limit:
                    raise ArgumentError(
                        f"these MSR handlers need more than {limit} MSR filter ranges, KVM's "
                        f"limit (of {RANGE_MSRS:#x} MSRs each): handle fewer, or closer, MSRs")
                windows.append((start, 0, []))
            base, _, handled = windows[-1]
            end = min(start + length, base + RANGE_MSRS)
            handled.append((start, end - start))
            windows[-1] = (base, end - base, handled)
            length -= end - start
            start = end
    flags = lib.KVM_MSR_FILTER_READ | lib.KVM_MSR_FILTER_WRITE
    return [(base, nmsrs, flags, _bitmap(base, nmsrs, handled))
            for base, nmsrs, handled in windows]


def _bitmap(base: int, nmsrs: int, handled) -> bytes:
    """All ones (allowed) but for the handled MSRs."""
    bits = (1 << nmsrs) - 1
    for start, length in handled:
        bits &= ~(((1 << length) - 1) << (start - base))
    return bits.to_bytes((nmsrs + 7) // 8, "little")
