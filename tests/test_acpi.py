"""ACPI tables and the AML encoder (issue 15, part 2), with no VM: AML bytes
against known encodings and against what ACPICA's iasl compiles from the
same ASL; every table disassembled by iasl; the FADT's PM1 blocks, the FACS,
the MCFG; and a booted VM's tables gaining the PCI root when vm.pci appears."""

import shutil
import struct
import subprocess

import pytest

import pyvt
from pyvt import acpi, aml, pc, pci

IASL = shutil.which("iasl")
needs_iasl = pytest.mark.skipif(IASL is None, reason="iasl missing: apt-get install acpica-tools")


# -- the encoder -------------------------------------------------------------------

def test_pkg_length_takes_one_to_four_bytes_and_counts_itself():
    assert aml.pkg_length(0) == b"\x01"
    assert aml.pkg_length(0x3E) == b"\x3F"           # 63 with itself: one byte
    assert aml.pkg_length(0x3F) == b"\x41\x04"       # 0x41: two bytes, low nibble 1
    assert aml.pkg_length(0x6D) == b"\x4F\x06"       # 0x6F, as iasl encodes a 111-byte scope
    assert aml.pkg_length(0xFFD) == b"\x4F\xFF"
    assert aml.pkg_length(0xFFE) == b"\x81\x00\x01"  # 0x1001 with three bytes
    assert aml.pkg_length(0xFFFFC) == b"\x8F\xFF\xFF"
    assert aml.pkg_length(0xFFFFD) == b"\xC1\x00\x00\x01"  # four bytes
    with pytest.raises(pyvt.ArgumentError):
        aml.pkg_length(1 << 28)


def test_names_integers_strings_and_eisa_ids():
    assert aml.name_string("_SB") == b"_SB_"
    assert aml.name_string("\\_SB.PCI0") == b"\\\x2E_SB_PCI0"
    assert aml.name_string("\\_SB.PCI0.S08") == b"\\\x2F\x03_SB_PCI0S08_"
    assert aml.name_string("^FOO") == b"^FOO_"
    assert aml.name_string("\\") == b"\\\x00"
    for bad in ("TOOLONG", "0ABC", "a", "A.B-C"):
        with pytest.raises(pyvt.ArgumentError):
            aml.name_string(bad)
    assert [aml.integer(v) for v in (0, 1, 2, 0xFF, 0x100, 0x10000, 1 << 32)] == [
        b"\x00", b"\x01", b"\x0A\x02", b"\x0A\xFF", b"\x0B\x00\x01", b"\x0C\x00\x00\x01\x00",
        b"\x0E" + (1 << 32).to_bytes(8, "little")]
    with pytest.raises(pyvt.ArgumentError):
        aml.integer(-1)
    assert aml.string("PYVT") == b"\x0DPYVT\x00"
    # The IDs Linux matches: PNP0A08 is 0x080AD041 (byte-swapped compressed).
    assert aml.eisa_id("PNP0A08") == b"\x0C\x41\xD0\x0A\x08"
    assert aml.eisa_id("PNP0A03") == b"\x0C\x41\xD0\x0A\x03"
    assert aml.eisa_id("PNP0C02") == b"\x0C\x41\xD0\x0C\x02"
    with pytest.raises(pyvt.ArgumentError):
        aml.eisa_id("pnp0a08")


def test_resource_descriptors_have_their_spec_layouts():
    assert aml.word_bus_number(0, 0) == bytes.fromhex("880d00020c0000000000000000000100")
    assert aml.io(0xCF8, 0xCF8, 1, 8) == bytes.fromhex("4701f80cf80c0108")
    dword = aml.dword_memory(0xC0000000, 0xFEBFFFFF)
    assert dword[:6] == bytes.fromhex("871700000c01") and len(dword) == 3 + 0x17
    assert struct.unpack_from("<5I", dword, 6) == (0, 0xC0000000, 0xFEBFFFFF, 0, 0x3EC00000)
    qword = aml.qword_memory(1 << 36, (1 << 37) - 1)
    assert qword[:6] == bytes.fromhex("8a2b00000c01") and len(qword) == 3 + 0x2B
    assert aml.memory32_fixed(0xB0000000, 1 << 20) == bytes.fromhex("86090001000000b000001000")
    template = aml.resource_template(aml.io(0x60, 0x60, 1, 1))
    assert template == bytes.fromhex("110d0a0a") + aml.io(0x60, 0x60, 1, 1) + b"\x79\x00"
    with pytest.raises(pyvt.ArgumentError):
        aml.word_io(0x100, 0xFF)


def test_methods_packages_and_devices():
    assert aml.method("_STA", 0, aml.return_(0x0F)) == bytes.fromhex("1409") + b"_STA" + bytes.fromhex("00a40a0f")
    assert aml.method("FOO", 2, serialized=True) == b"\x14\x06FOO_\x0A"
    assert aml.package(0, 0, 0, 0) == bytes.fromhex("12060400000000")
    assert aml.device("DEV0") == b"\x5B\x82\x05DEV0"
    with pytest.raises(pyvt.ArgumentError):
        aml.package(*range(256))
    with pytest.raises(pyvt.ArgumentError):
        aml.method("X", 8)


def _reference_asl() -> str:
    """The DSDT pyvt means to build, written independently as ASL: the
    swizzle here is the PCI-to-PCI bridge spec's (INTx of slot s is
    GSI 16 + (s + pin) mod 4, pin 0 = INTA)."""
    prt = ",\n".join(f"Package () {{ 0x{slot:04X}FFFF, {pin}, 0, {16 + (slot + pin) % 4} }}"
                     for slot in range(32) for pin in range(4))
    return f"""
DefinitionBlock ("", "DSDT", 2, "PYVT  ", "PYVTMACH", 1)
{{
    Name (_S3, Package (4) {{ 1, 1, 0, 0 }})
    Name (_S5, Package (4) {{ 0, 0, 0, 0 }})
    Scope (\\_SB)
    {{
        Device (PCI0)
        {{
            Name (_HID, EisaId ("PNP0A08"))
            Name (_CID, EisaId ("PNP0A03"))
            Name (_SEG, 0)
            Name (_BBN, 0)
            Name (_UID, 0)
            Name (_CRS, ResourceTemplate () {{
                WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode, 0, 0, 0, 0, 1)
                IO (Decode16, 0xCF8, 0xCF8, 1, 8)
                WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange,
                        0, 0, 0xCF7, 0, 0xCF8)
                WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange,
                        0, 0xD00, 0xFFFF, 0, 0xF300)
                DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable,
                             ReadWrite, 0, 0xC0000000, 0xFEBFFFFF, 0, 0x3EC00000)
                QWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable,
                             ReadWrite, 0, 0x1000000000, 0x1FFFFFFFFF, 0, 0x1000000000)
            }})
            Name (_PRT, Package () {{
{prt}
            }})
        }}
        Device (MRES)
        {{
            Name (_HID, EisaId ("PNP0C02"))
            Name (_UID, 1)
            Name (_CRS, ResourceTemplate () {{
                Memory32Fixed (ReadWrite, 0xB0000000, 0x100000)
            }})
        }}
    }}
}}
"""


@needs_iasl
def test_the_dsdt_is_what_iasl_compiles_from_the_same_asl(tmp_path):
    source = tmp_path / "dsdt.asl"
    source.write_text(_reference_asl())
    out = subprocess.run([IASL, "-p", str(tmp_path / "ref"), str(source)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    reference = (tmp_path / "ref.aml").read_bytes()
    ours = acpi.dsdt(with_pci=True)
    assert ours[36:] == reference[36:]  # the AML; headers differ in the compiler fields
    assert (pci.ECAM_BASE, pci.ECAM_SIZE, pci.MMIO32_WINDOW, pci.MMIO64_WINDOW) == (
        0xB0000000, 1 << 20, (0xC0000000, 0xFEC00000), (1 << 36, 1 << 37))
    without = acpi.dsdt(with_pci=False)
    assert b"PCI0" not in without and without[36:] == (
        aml.name("_S3", aml.package(1, 1, 0, 0)) + aml.name("_S5", aml.package(0, 0, 0, 0)))


@needs_iasl
def test_iasl_disassembles_every_table_without_complaint(tmp_path):
    tables = acpi.build(4, irqchip=True, with_pci=True)
    names = {acpi.FADT_ADDRESS: "facp", acpi.FACS_ADDRESS: "facs", acpi.MADT_ADDRESS: "apic",
             acpi.MCFG_ADDRESS: "mcfg", acpi.DSDT_ADDRESS: "dsdt", acpi.XSDT_ADDRESS: "xsdt",
             acpi.RSDT_ADDRESS: "rsdt"}
    text = {}
    for address, name in names.items():
        path = tmp_path / f"{name}.dat"
        path.write_bytes(tables[address])
        out = subprocess.run([IASL, "-d", str(path)], capture_output=True, text=True,
                             cwd=tmp_path)
        assert out.returncode == 0, out.stdout + out.stderr
        text[name] = (tmp_path / f"{name}.dsl").read_text()
        assert "Error" not in text[name] and "Invalid" not in text[name], text[name]
    assert "PM1A Event Block Address : 00000600" in text["facp"]
    assert "PM1A Control Block Address : 00000604" in text["facp"]
    assert "FACS Address : 000E0200" in text["facp"]
    assert "Base Address : 00000000B0000000" in text["mcfg"]
    assert text["dsdt"].count("Package (0x04)") == 2 + 32 * 4  # _S3, _S5, the _PRT entries


# -- the tables ------------------------------------------------------------------

def test_fadt_points_at_the_pm1_blocks_the_facs_and_the_reset_register():
    fadt = acpi.fadt()
    firmware_ctrl, dsdt = struct.unpack_from("<II", fadt, 36)
    assert (firmware_ctrl, dsdt) == (acpi.FACS_ADDRESS, acpi.DSDT_ADDRESS)
    assert struct.unpack_from("<I", fadt, 56)[0] == pc.PM1_EVENT_PORT == 0x600
    assert struct.unpack_from("<I", fadt, 64)[0] == pc.PM1_CONTROL_PORT == 0x604
    assert struct.unpack_from("<I", fadt, 76)[0] == pc.PM_TIMER_PORT == 0x608
    assert fadt[88:92] == bytes([4, 2, 0, 4])  # PM1_EVT_LEN, PM1_CNT_LEN, PM2, PM_TMR_LEN
    assert struct.unpack_from("<BBBBQ", fadt, 148) == (1, 32, 0, 2, 0x600)  # X_PM1a_EVT_BLK
    assert struct.unpack_from("<BBBBQ", fadt, 172) == (1, 16, 0, 2, 0x604)  # X_PM1a_CNT_BLK
    assert struct.unpack_from("<BBBBQ", fadt, 116) == (1, 8, 0, 1, 0x64) and fadt[128] == 0xFE
    assert sum(fadt) % 256 == 0


def test_facs_is_aligned_and_holds_a_zero_waking_vector():
    facs = acpi.facs()
    assert acpi.FACS_ADDRESS % 64 == 0 and len(facs) == 64
    signature, length, _, vector, _, flags, x_vector, version = struct.unpack_from(
        "<4sIIIIIQB", facs)
    assert (signature, length, vector, flags, x_vector, version) == (b"FACS", 64, 0, 0, 0, 2)


def test_the_pci_root_and_mcfg_come_only_with_pci():
    plain = acpi.build(2)
    assert acpi.MCFG_ADDRESS not in plain and b"PCI0" not in plain[acpi.DSDT_ADDRESS]
    tables = acpi.build(2, with_pci=True)
    mcfg = tables[acpi.MCFG_ADDRESS]
    assert mcfg[:4] == b"MCFG" and sum(mcfg) % 256 == 0
    assert struct.unpack_from("<QHBB", mcfg, 44) == (pci.ECAM_BASE, 0, 0, 0)
    xsdt = tables[acpi.XSDT_ADDRESS]
    assert struct.unpack_from("<3Q", xsdt, 36) == (
        acpi.FADT_ADDRESS, acpi.MADT_ADDRESS, acpi.MCFG_ADDRESS)
    # The largest MADT (255 vCPUs) still fits below the MCFG.
    assert acpi.MADT_ADDRESS + len(acpi.madt(255)) <= acpi.MCFG_ADDRESS
    acpi.build(255, with_pci=True)


@pytest.mark.requires_kvm
def test_a_booted_vm_gains_the_pci_root_when_vm_pci_appears(kvm):
    code = pyvt.assemble("hlt", name="acpi_hlt")
    with pyvt.Vm("16M", backend=kvm.path) as vm:
        vm.boot(code, format="flat", load_address=0x1000, irqchip=False)
        rsdt = vm.memory.read(acpi.RSDT_ADDRESS, 36 + 4)
        assert struct.unpack_from("<I", rsdt, 4)[0] == 36 + 4  # the FADT only
        assert b"PCI0" not in vm.memory.read(acpi.DSDT_ADDRESS, 64)
        bus = vm.pci
        assert vm.pci is bus
        rsdt = vm.memory.read(acpi.RSDT_ADDRESS, 36 + 8)
        assert struct.unpack_from("<I", rsdt, 4)[0] == 36 + 8
        assert struct.unpack_from("<2I", rsdt, 36) == (acpi.FADT_ADDRESS, acpi.MCFG_ADDRESS)
        assert vm.memory.read(acpi.MCFG_ADDRESS, 4) == b"MCFG"
        dsdt_length = struct.unpack("<I", vm.memory.read(acpi.DSDT_ADDRESS + 4, 4))[0]
        assert vm.memory.read(acpi.DSDT_ADDRESS, dsdt_length) == acpi.dsdt(with_pci=True)
