"""Restores with nothing to undo (``vm.restore(snap)`` again, the vCPUs not
run since): what they skip (the native devices' states, KVM_IRQ_LINE
without an irqchip, the bitmap conversions) and that everything that may
differ still comes back: host accesses to devices, guest runs, device
states and memory edited in place, another thread's access during a
restore."""

import threading

import pytest

import pyvt
from pyvt import devices, exits
from pyvt._kvm import lib
from pyvt.kvm import struct_bytes

pytestmark = pytest.mark.requires_kvm

CODE = 0x1000
DATA = 0x5000
COM1_SCRATCH = 0x3FF
COM1_IER, COM1_MCR = 0x3F9, 0x3FC
#: MCR.OUT2, then IER.ETBEI: the THR-empty interrupt is pending at once and
#: the UART drives its line high (level 1).
RAISE_COM1_LINE = f"""
    mov $0x08, %al
    mov ${COM1_MCR}, %dx
    out %al, %dx
    mov $0x02, %al
    mov ${COM1_IER}, %dx
    out %al, %dx
    hlt
"""


def _guest(vm, source):
    vm.memory.write(CODE, pyvt.assemble(source, at=CODE, bits=64))
    cpu = vm.vcpu(0, mode="long")
    cpu.regs.rip = CODE
    return cpu


def _count_puts(vm):
    """{name: puts} that grows as restores put each device's state."""
    puts = {}
    for name, device in vm.devices.items():
        if device.has_state:
            put = device._put_state

            def counted(state, name=name, put=put):
                puts[name] = puts.get(name, 0) + 1
                put(state)
            device._put_state = counted
    return puts


def test_an_idle_restore_puts_no_device_state_and_writes_only_the_tsc(vm):
    cpu = _guest(vm, "hlt")
    snap = vm.snapshot()
    puts = _count_puts(vm)
    vm.restore(snap)  # after the snapshot: everything is put
    vm.restore(snap)  # again, keeping a copy of the states
    assert puts == {name: 2 for name in snap.devices}
    puts.clear()
    writes = cpu.fd.writes
    vm.restore(snap)
    vm.restore(snap)
    assert puts == {}
    # Per restore IA32_TSC, and the registers where they do not travel in
    # the run page (pyvt.ko: KVM_SET_REGS).
    assert cpu.fd.writes == writes + 2 * (1 if cpu._sync_regs else 2)


def test_host_accesses_to_devices_are_undone_by_an_idle_restore(vm):
    _guest(vm, "hlt")
    snap = vm.snapshot()
    vm.restore(snap)
    vm.restore(snap)
    vm.console.feed(b"abc")
    vm.fw_cfg.cpu_count = 4
    vm.restore(snap)
    assert vm.console.save_state() == snap.devices["console"]
    assert vm.fw_cfg.cpu_count == 1
    vm.restore(snap)
    before = vm.cmos[0x40]
    vm.restore(snap)
    vm.cmos[0x40] = before ^ 0xFF  # CMOS RAM, written as the guest would
    vm.restore(snap)
    assert vm.cmos[0x40] == before
    vm.restore(snap)
    assert vm.post.last == 0  # a read counts too: the next restore puts everything
    puts = _count_puts(vm)
    vm.restore(snap)
    assert set(puts) == set(snap.devices)


def test_a_guest_run_after_idle_restores_is_undone(vm):
    cpu = _guest(vm, f"""
        mov $0x55, %al
        mov ${COM1_SCRATCH}, %dx
        out %al, %dx
        out %al, $0x80
        movb $0x77, {DATA}
        hlt
    """)
    snap = vm.snapshot()
    vm.restore(snap)
    vm.restore(snap)
    assert isinstance(cpu.run(timeout=30), exits.Hlt)
    assert vm.post.last == 0x55 and vm.memory.read(DATA, 1) == b"\x77"
    vm.restore(snap)
    assert vm.console.save_state() == snap.devices["console"]
    assert vm.post.save_state() == snap.devices["post"]
    assert vm.memory.read(DATA, 1) == b"\0"
    assert cpu.regs.rip == CODE


def test_host_memory_writes_are_undone_by_an_idle_restore(vm):
    _guest(vm, "hlt")
    snap = vm.snapshot()
    vm.restore(snap)
    vm.restore(snap)
    vm.memory.write(DATA, b"host")
    vm.restore(snap)
    assert vm.memory.read(DATA, 4) == bytes(4)
    vm.restore(snap)
    assert vm.memory.read(DATA, 4) == bytes(4)


def test_device_states_edited_in_place_or_replaced_are_put(vm):
    cpu = _guest(vm, "out %al, $0x80\nhlt")
    cpu.regs.rax = 0x42
    first = vm.snapshot()
    assert isinstance(cpu.run(timeout=30), exits.Hlt)
    second = vm.snapshot()
    assert second.devices["post"] != first.devices["post"]
    vm.restore(first)
    vm.restore(first)
    first.devices["console"]["output"] = b"edited"  # the same dict, another value
    vm.restore(first)
    assert vm.console.output == b"edited"
    items = first.devices["fw_cfg"]["items"]
    cpu_count = next(item for item in items if item[0] == 0x05)  # FW_CFG_NB_CPUS
    cpu_count[1] = (2).to_bytes(2, "little")  # a list inside the state, edited
    vm.restore(first)
    assert vm.fw_cfg.get(0x05) == (2).to_bytes(2, "little")
    first.devices["post"] = second.devices["post"]  # replaced
    vm.restore(first)
    assert vm.post.last == 0x42


def test_another_threads_access_during_the_puts_is_undone_by_the_next_restore(vm):
    _guest(vm, "hlt")
    snap = vm.snapshot()
    post = vm.post
    put = post._put_state

    def put_while_another_thread_feeds(state):
        feeder = threading.Thread(target=vm.console.feed, args=(b"z",))
        feeder.start()
        feeder.join()
        put(state)

    vm.restore(snap)
    post._put_state = put_while_another_thread_feeds  # post comes after the console
    vm.restore(snap)  # puts again (and keeps a copy): nothing changed but the copy
    del post._put_state
    # Read past the handle (which would count as an access itself): "z"
    # waits in the FIFO.
    registers = snap.devices["console"]["registers"]
    assert vm.console._device.save_state() != registers
    vm.restore(snap)
    assert vm.console._device.save_state() == registers


@pytest.mark.requires_cap("IRQCHIP")
def test_with_an_irqchip_every_restore_puts_the_device_states(kvm):
    with pyvt.Vm("16M", backend=kvm.path) as vm:
        vm.fd.create_irqchip()
        _guest(vm, "hlt")
        snap = vm.snapshot()
        puts = _count_puts(vm)
        vm.restore(snap)
        vm.restore(snap)
        assert puts == {name: 2 for name in snap.devices}


def test_the_uart_line_level_comes_back_without_an_irqchip(vm):
    cpu = _guest(vm, RAISE_COM1_LINE)
    quiet = vm.snapshot()
    assert isinstance(cpu.run(timeout=30), exits.Hlt)
    assert vm.console.irq_level == 1  # THR empty, enabled, OUT2 set
    raised = vm.snapshot()
    vm.restore(quiet)
    assert vm.console.irq_level == 0
    vm.restore(raised)
    assert vm.console.irq_level == 1
    assert vm.console.save_state() == raised.devices["console"]


def test_state_copy_is_not_reached_by_edits_of_the_original():
    state = {"items": [[3, b"a"]], "position": (0, [1]), "raw": bytearray(b"x"), "n": None}
    copy = devices.state_copy(state)
    assert copy == state
    state["items"][0][1] = b"b"
    state["position"][1].append(2)
    state["raw"][0] = ord("y")
    assert copy == {"items": [[3, b"a"]], "position": (0, [1]), "raw": b"x", "n": None}
    assert devices.state_copy({"odd": {1, 2}}) != {"odd": {1, 2}}  # not a state type


#: struct kvm_irqchip: chip_id, pad, then struct kvm_pic_state, whose
#: first byte is last_irr (the lines' levels as the PIC saw them last).
_PIC_LAST_IRR = 8


def _pic_line_seen(vm) -> bool:
    """Whether the master PIC saw ISA line 4 (COM1's) high last."""
    master = struct_bytes(vm.fd.get_irqchip(lib.KVM_IRQCHIP_PIC_MASTER))
    return bool(master[_PIC_LAST_IRR] & 1 << 4)


@pytest.mark.requires_cap("IRQCHIP")
def test_with_an_irqchip_a_loaded_uart_state_drives_its_line(kvm):
    """The load that leaves KVM_IRQ_LINE out without an irqchip still
    drives the line where there is one."""
    with pyvt.Vm("16M", backend=kvm.path) as source:
        cpu = _guest(source, RAISE_COM1_LINE)
        assert isinstance(cpu.run(timeout=30), exits.Hlt)
        raised = source.console.save_state()
    with pyvt.Vm("16M", backend=kvm.path) as vm:
        vm.fd.create_irqchip()
        assert not _pic_line_seen(vm)
        vm.console.load_state(raised)
        assert vm.console.irq_level == 1
        assert _pic_line_seen(vm)
