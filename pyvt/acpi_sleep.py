"""Waking a guest from ACPI S3 (suspend to RAM) at its RTC alarm.

A guest suspends by writing ``\\_S3``'s sleep type with SLP_EN to the PM1a
control block; ``run()`` then returns :class:`pyvt.exits.Suspend` with
every vCPU stopped and RAM kept.  :func:`resume` plays the firmware's part
of the wake-up, as a PC does:

1. it waits until the CMOS clock reaches the alarm the guest armed (alarm
   registers 0x01/0x03/0x05, "don't care" from 0xc0; register B's AIE) with
   the RTC wake event enabled (PM1_EN.RTC_EN);
2. it sets PM1_STS.WAK_STS and RTC_STS;
3. it restarts the boot vCPU in real mode at the FACS firmware waking
   vector (CS = vector >> 4, IP = vector & 0xf) and puts the others back to
   waiting for INIT/SIPI.

Then ``run()`` again: the guest's wake-up code runs.
"""

from __future__ import annotations

import time
from typing import List, Optional, Tuple

from . import acpi, modes, pc
from ._kvm import lib
from .errors import Error

CMOS_SECONDS, CMOS_ALARM_SECONDS = 0x00, 0x01
CMOS_MINUTES, CMOS_ALARM_MINUTES = 0x02, 0x03
CMOS_HOURS, CMOS_ALARM_HOURS = 0x04, 0x05
CMOS_STATUS_B = 0x0B
STATUS_B_AIE, STATUS_B_24H, STATUS_B_BINARY = 0x20, 0x02, 0x04
ALARM_DONT_CARE = 0xC0
FACS_WAKING_VECTOR = 12
DAY = 24 * 3600

Alarm = Tuple[Optional[int], Optional[int], Optional[int]]  # hours, minutes, seconds; None: any


def _decode(value: int, status_b: int) -> int:
    return value if status_b & STATUS_B_BINARY else (value >> 4) * 10 + (value & 0xF)


def _hour(value: int, status_b: int) -> int:
    if status_b & STATUS_B_24H:
        return _decode(value, status_b)
    return _decode(value & 0x7F, status_b) % 12 + (12 if value & 0x80 else 0)


def rtc_alarm(vm) -> Optional[Alarm]:
    """The alarm the guest armed in the CMOS, or None (AIE off)."""
    status_b = vm.cmos[CMOS_STATUS_B]
    if not status_b & STATUS_B_AIE:
        return None
    fields: List[Optional[int]] = []
    for index in (CMOS_ALARM_HOURS, CMOS_ALARM_MINUTES, CMOS_ALARM_SECONDS):
        raw = vm.cmos[index]
        if raw >= ALARM_DONT_CARE:
            fields.append(None)
        else:
            fields.append(_hour(raw, status_b) if index == CMOS_ALARM_HOURS
                          else _decode(raw, status_b))
    return fields[0], fields[1], fields[2]


def rtc_time(vm) -> Tuple[int, int, int]:
    """The CMOS clock's (hours, minutes, seconds) as the guest reads it."""
    status_b = vm.cmos[CMOS_STATUS_B]
    return (_hour(vm.cmos[CMOS_HOURS], status_b), _decode(vm.cmos[CMOS_MINUTES], status_b),
            _decode(vm.cmos[CMOS_SECONDS], status_b))


def seconds_until(now: Tuple[int, int, int], alarm: Alarm) -> Optional[int]:
    """Whole seconds from ``now`` until the clock first matches ``alarm``
    (0: it matches now); None if it never does (a field out of range)."""
    start = now[0] * 3600 + now[1] * 60 + now[2]
    for delay in range(DAY):
        t = (start + delay) % DAY
        clock = (t // 3600, t // 60 % 60, t % 60)
        if all(want is None or want == got for want, got in zip(alarm, clock, strict=True)):
            return delay
    return None


def resume(vm, timeout: Optional[float] = None) -> bool:
    """Waits for the guest's RTC alarm (at most ``timeout`` seconds: then
    returns False, still asleep), then wakes the guest: WAK_STS and RTC_STS,
    and the boot vCPU at the FACS waking vector.  Returns True; ``run()``
    goes on from there.  Raises :class:`pyvt.Error` when nothing can wake
    the guest (no RTC alarm armed, or the RTC event disabled) or it left no
    waking vector."""
    pm, cmos = vm.acpi_pm1, vm.cmos
    if pm is None or cmos is None:
        raise Error("resume needs the PC devices (acpi_pm1, cmos): the VM was made with "
                    "pc_devices=False")
    alarm = rtc_alarm(vm)
    if alarm is None or not pm.enable & pc.PM1_EN_RTC:
        raise Error("nothing can wake this guest: it armed no RTC alarm (CMOS register B "
                    "AIE) with the RTC wake event enabled (PM1_EN.RTC_EN)")
    vector = int.from_bytes(vm.memory.read(acpi.FACS_ADDRESS + FACS_WAKING_VECTOR, 4), "little")
    if not vector or vector >= 1 << 20:
        raise Error(f"the guest's FACS waking vector is {vector:#x}: it must be a real-mode "
                    "address (below 1 MiB) its wake-up code starts at")
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        delay = seconds_until(rtc_time(vm), alarm)
        if delay is None:
            raise Error(f"the guest's RTC alarm {alarm} never matches the clock")
        if delay == 0:
            break
        # The clock ticks in whole seconds: look again just after the next ticks.
        wait = max(delay - 1, 0.05) if delay > 1 else 0.05
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            wait = min(wait, left)
        time.sleep(wait)
    pm.set_status(pc.PM1_STS_WAK | pc.PM1_STS_RTC)
    _restart(vm, vector)
    return True


def _restart(vm, vector: int) -> None:
    """The boot vCPU as after a reset, at ``vector`` in real mode; the
    others wait for INIT/SIPI."""
    for index, cpu in sorted(vm.vcpus.items()):
        if index:
            cpu.fd.set_mp_state(lib.KVM_MP_STATE_UNINITIALIZED)
            continue
        # One KVM_SET_SREGS: field by field, long mode would pass through
        # states KVM refuses (paging off with EFER.LMA still set).
        cpu._settle_pending_io()
        sregs = cpu._load_sregs()
        modes.apply_sregs("real", sregs)
        sregs.cs.selector = vector >> 4
        sregs.cs.base = (vector >> 4) << 4
        sregs.ss.selector = 0
        sregs.ss.base = 0
        sregs.idt.base = 0
        sregs.idt.limit = 0x3FF
        cpu._store_sregs(sregs)
        regs = cpu.regs
        regs.rip = vector & 0xF
        regs.rflags = modes.RFLAGS_RESERVED
        regs.rsp = 0
        cpu.fd.set_mp_state(lib.KVM_MP_STATE_RUNNABLE)
