"""Each CPU mode runs a real guest; registers read and write through."""

import pytest

import pyvt
from pyvt import exits, modes

pytestmark = pytest.mark.requires_kvm


@pytest.mark.parametrize("mode", ["real", "protected", "long"])
def test_uart_hello_in_each_mode(vm, load, mode):
    cpu = load(f"uart_hello_{mode}", mode)
    exit = cpu.run(timeout=5)
    assert isinstance(exit, exits.Hlt), exit
    assert vm.console.output == f"hello from {mode} mode\n".encode()


@pytest.mark.parametrize("mode,cr0_pe,cr0_pg,efer_lma,cs_l,cs_db", [
    ("real", 0, 0, 0, 0, 0),
    ("protected", 1, 0, 0, 0, 1),
    ("long", 1, 1, 1, 1, 0),
])
def test_mode_state(vm, mode, cr0_pe, cr0_pg, efer_lma, cs_l, cs_db):
    cpu = vm.vcpu(0, mode=mode)
    assert cpu.sregs.cr0 & modes.CR0_PE == cr0_pe * modes.CR0_PE
    assert bool(cpu.sregs.cr0 & modes.CR0_PG) == bool(cr0_pg)
    assert bool(cpu.sregs.efer & modes.EFER_LMA) == bool(efer_lma)
    assert cpu.sregs.cs.l == cs_l
    assert cpu.sregs.cs.db == cs_db
    assert cpu.regs.rflags == 0x2


def test_long_mode_identity_maps_4gib(vm):
    vm.vcpu(0, mode="long")
    pml4 = vm.memory.read_int(modes.PML4_ADDRESS)
    assert pml4 & ~0xFFF == modes.PDPT_ADDRESS and pml4 & modes.PTE_PRESENT
    # The last 2 MiB page below 4 GiB maps to itself.
    last_pde = vm.memory.read_int(modes.PD_ADDRESS + 8 * (2048 - 1))
    assert last_pde & ~0xFFF == (4 << 30) - (2 << 20)
    assert last_pde & modes.PTE_LARGE


def test_registers_write_through(vm, guest):
    # add %rbx, %rax; hlt
    vm.memory.write(0x1000, bytes([0x48, 0x01, 0xD8, 0xF4]))
    cpu = vm.vcpu(0, mode="long")
    cpu.regs.rip = 0x1000
    cpu.regs.rax = 40
    cpu.regs.rbx = 2
    assert (cpu.regs.rax, cpu.regs.rbx) == (40, 2)
    assert isinstance(cpu.run(timeout=5), exits.Hlt)
    assert cpu.regs.rax == 42
    assert cpu.regs.rip == 0x1004
    snapshot = cpu.regs.snapshot()
    assert snapshot.rax == 42 and "RAX=000000000000002a" in snapshot.dump()


def test_register_values_are_checked(vm):
    cpu = vm.vcpu(0, mode="long")
    with pytest.raises(pyvt.ArgumentError):
        cpu.regs.rax = "zero"
    with pytest.raises(pyvt.ArgumentError):
        cpu.regs.rax = 1 << 64
    with pytest.raises(AttributeError, match="no field 'rxx'"):
        cpu.regs.rxx = 1
    with pytest.raises(AttributeError):
        cpu.sregs.cs = 0
    cpu.regs.rax = -1
    assert cpu.regs.rax == (1 << 64) - 1


def test_sregs_segment_write(vm):
    cpu = vm.vcpu(0, mode="real")
    cpu.sregs.cs.base = 0x10000
    cpu.sregs.cs.selector = 0x1000
    assert cpu.sregs.cs.base == 0x10000
    assert cpu.fd.get_sregs().cs.selector == 0x1000


def test_real_mode_code_above_64k(guest):
    # pyvt.run places CS so that CS:IP reaches code anywhere below 1 MiB.
    result = pyvt.run(guest("uart_hello_real", 0x1000), mode="real")
    assert result.console == b"hello from real mode\n"
    # mov $0x1234, %ax; hlt -- position independent
    result = pyvt.run(bytes([0xB8, 0x34, 0x12, 0xF4]), mode="real", at=0x23450)
    assert isinstance(result.exit, exits.Hlt)
    assert result.regs.rax & 0xFFFF == 0x1234


def test_fpu_and_msrs(vm):
    cpu = vm.vcpu(0, mode="long")
    cpu.fpu.fcw = 0x37F
    assert cpu.fpu.fcw == 0x37F
    assert len(cpu.fpu.xmm) == 256
    cpu.fpu.xmm = bytes(range(256))
    assert cpu.fpu.xmm == bytes(range(256))
    EFER, TSC_AUX = 0xC0000080, 0xC0000103
    assert cpu.get_msrs([EFER])[EFER] & modes.EFER_LMA
    cpu.set_msrs({TSC_AUX: 7})
    assert cpu.get_msrs([TSC_AUX]) == {TSC_AUX: 7}
    with pytest.raises(pyvt.KvmError, match="MSR 0xdeadbeef"):
        cpu.get_msrs([0xDEADBEEF])


def test_cpuid_has_apic_id_and_can_be_replaced(vm):
    cpu0 = vm.vcpu(0, mode="long")
    cpu1 = vm.vcpu(1, mode="long")
    leaf1 = [e for e in cpu1.cpuid if e.function == 1][0]
    assert leaf1.ebx >> 24 == 1
    # cpuid leaf 0: the vendor string comes from the table we set.
    table = [e for e in cpu0.cpuid if e.function != 0]
    table.append(pyvt.kvm.CpuidEntry(0, 0, 0, 0xD, 0x74766270, 0x21212121, 0x74766270))
    cpu0.cpuid = table
    # xor %eax,%eax; cpuid; hlt
    vm.memory.write(0x1000, bytes([0x31, 0xC0, 0x0F, 0xA2, 0xF4]))
    cpu0.regs.rip = 0x1000
    assert isinstance(cpu0.run(timeout=5), exits.Hlt)
    assert (cpu0.regs.rbx, cpu0.regs.rdx, cpu0.regs.rcx) == (0x74766270, 0x74766270, 0x21212121)


def test_setup_area_is_documented_and_guarded():
    with pyvt.Vm("16M") as vm:
        start, end = modes.setup_area()
        assert (start, end) == (0x90000, 0xA0000)
        vm.memory.write(modes.PML4_ADDRESS, b"user data")
        with pytest.raises(pyvt.MemoryConfigError, match="reserved area"):
            vm.vcpu(0, mode="long")
        assert vm.memory.read(modes.PML4_ADDRESS, 9) == b"user data"
    with pyvt.Vm("64K") as small:
        with pytest.raises(pyvt.MemoryConfigError, match="needs guest RAM up to 0xa0000"):
            small.vcpu(0, mode="protected")
        small.vcpu(0, mode="real")  # real mode needs no tables
