"""ACPI S3 (issue 15, part 2): a guest suspends to RAM through PM1a_CNT,
pyvt waits for the RTC alarm and restarts it in real mode at its FACS
waking vector; the alarm arithmetic with no VM."""

import pytest

import pyvt
from pyvt import acpi, acpi_sleep, exits, modes, pc

CODE = modes.LOAD_ADDRESS
WAKE = 0x3000
WOKE_PORT = 0x501


def test_seconds_until_the_alarm_matches():
    assert acpi_sleep.seconds_until((10, 0, 0), (10, 0, 2)) == 2
    assert acpi_sleep.seconds_until((10, 0, 0), (10, 0, 0)) == 0
    assert acpi_sleep.seconds_until((23, 59, 59), (0, 0, 1)) == 2  # over midnight
    assert acpi_sleep.seconds_until((10, 0, 5), (None, None, 3)) == 58  # every minute
    assert acpi_sleep.seconds_until((10, 59, 30), (None, 0, 0)) == 30
    assert acpi_sleep.seconds_until((10, 0, 0), (None, None, None)) == 0
    assert acpi_sleep.seconds_until((10, 0, 0), (25, 0, 0)) is None


def _bcd(value: int) -> int:
    return (value // 10) << 4 | value % 10


def _arm_alarm(vm, delay: int):
    """What the guest's RTC driver does (here from the host, in BCD as the
    CMOS is): an alarm ``delay`` seconds ahead, AIE on."""
    h, m, s = acpi_sleep.rtc_time(vm)
    t = (h * 3600 + m * 60 + s + delay) % acpi_sleep.DAY
    alarm = (t // 3600, t // 60 % 60, t % 60)
    for index, value in zip((0x05, 0x03, 0x01), alarm, strict=True):
        vm.cmos[index] = _bcd(value)
    vm.cmos[0x0B] = vm.cmos[0x0B] | acpi_sleep.STATUS_B_AIE
    assert acpi_sleep.rtc_alarm(vm) == alarm
    return alarm


def _suspending_vm(kvm, rtc_wake: bool = True):
    vm = pyvt.Vm("16M", backend=kvm.path)
    acpi.install(vm, 1, irqchip=False)
    enable = pc.PM1_EN_RTC if rtc_wake else 0
    vm.memory.write(CODE, pyvt.assemble(f"""
        movl ${WAKE:#x}, {acpi.FACS_ADDRESS + 12:#x}   /* the FACS waking vector */
        mov ${pc.PM1_EVENT_PORT + 2:#x}, %dx
        mov ${enable:#x}, %ax
        out %ax, %dx                                   /* PM1_EN */
        mov ${pc.PM1_CONTROL_PORT:#x}, %dx
        mov ${pc.SLP_TYP_S3 << 10 | 1 << 13:#x}, %ax
        out %ax, %dx                                   /* SLP_TYP S3, SLP_EN */
        hlt                                            /* never reached */
    """, at=CODE, name="s3_suspend"))
    vm.memory.write(WAKE, pyvt.assemble(f"""
        .code16
        mov ${WOKE_PORT:#x}, %dx
        mov $0x5a, %al
        out %al, %dx
        hlt
    """, at=WAKE, name="s3_wake"))
    cpu = vm.vcpu(0, mode="long")
    cpu.regs.rip = CODE
    return vm, cpu


@pytest.mark.requires_kvm
def test_a_suspended_guest_wakes_at_its_rtc_alarm_through_the_waking_vector(kvm):
    vm, cpu = _suspending_vm(kvm)
    with vm:
        exit = cpu.run(timeout=60)
        assert isinstance(exit, exits.Suspend), exit
        assert (exit.source, exit.port) == ("acpi_pm1", pc.PM1_CONTROL_PORT)
        alarm = _arm_alarm(vm, 2)
        assert vm.acpi_pm1.status & pc.PM1_STS_WAK == 0
        assert acpi_sleep.resume(vm, timeout=0) is False  # not yet: still asleep
        assert acpi_sleep.resume(vm, timeout=30) is True
        # The clock reached the alarm (or just passed it) before the wake-up.
        assert acpi_sleep.seconds_until(acpi_sleep.rtc_time(vm), alarm) in (0, *range(
            acpi_sleep.DAY - 5, acpi_sleep.DAY))
        assert vm.acpi_pm1.status & (pc.PM1_STS_WAK | pc.PM1_STS_RTC) == (
            pc.PM1_STS_WAK | pc.PM1_STS_RTC)
        exit = cpu.run(timeout=60)
        assert isinstance(exit, exits.Io) and (exit.port, exit.data) == (WOKE_PORT, b"\x5a"), exit
        assert cpu.sregs.cs.selector == WAKE >> 4 and cpu.sregs.cr0 & 1 == 0  # real mode
        assert isinstance(cpu.run(timeout=60), exits.Hlt)


@pytest.mark.requires_kvm
def test_resume_refuses_a_guest_nothing_can_wake(kvm):
    vm, cpu = _suspending_vm(kvm, rtc_wake=False)
    with vm:
        assert isinstance(cpu.run(timeout=60), exits.Suspend)
        with pytest.raises(pyvt.Error, match="nothing can wake"):
            acpi_sleep.resume(vm)  # no alarm armed
        _arm_alarm(vm, 2)
        with pytest.raises(pyvt.Error, match="RTC_EN"):
            acpi_sleep.resume(vm)  # armed, but the RTC event is disabled
        vm.memory.write(acpi.FACS_ADDRESS + 12, bytes(4))
        vm.acpi_pm1._native.load_state(b"\0\0\0\x04\0\0")  # PM1_EN.RTC_EN
        with pytest.raises(pyvt.Error, match="waking vector"):
            acpi_sleep.resume(vm)
    with pyvt.Vm("16M", backend=kvm.path, pc_devices=False) as bare:
        with pytest.raises(pyvt.Error, match="pc_devices=False"):
            acpi_sleep.resume(bare)
