"""CPUID decoding, checked on recorded dumps of real CPUs (InstLatx64 collection).

Expected values come from the same source: its "CPUID CPU Name" / brand
annotation, the CPUID revision in its file name (family/model/stepping),
and its "Instruction Set" summary line where it has one.
"""

import pytest
from capsfixtures import CPUID_FIXTURES, cpuid_fixture

from pyvt.caps import cpuid

# name -> (vendor, brand, family, model, stepping)
EXPECTED = {
    "amd_k10_deneb_phenom_ii_x4_940": ("AuthenticAMD", "AMD Phenom(tm) II X4 940 Processor", 0x10, 4, 2),
    "amd_k15_piledriver_a10_4600m": ("AuthenticAMD", "AMD A10-4600M APU with Radeon(tm) HD Graphics", 0x15, 0x10, 1),
    "amd_k17_matisse_ryzen_9_pro_3900": ("AuthenticAMD", "AMD Ryzen 9 PRO 3900 12-Core Processor", 0x17, 0x71, 0),
    "amd_k19_genoa_epyc_9654": ("AuthenticAMD", "AMD EPYC 9654 96-Core Processor", 0x19, 0x11, 1),
    "intel_conroe_core2_x6800": ("GenuineIntel", "Intel(R) Core(TM)2 CPU         X6800  @ 2.93GHz", 6, 0x0F, 6),
    "intel_haswell_i7_4770": ("GenuineIntel", "Intel(R) Core(TM) i7-4770 CPU @ 3.40GHz", 6, 0x3C, 3),
    "intel_skylake_x": ("GenuineIntel", "Intel(R) Core(TM) i9-7900X CPU @ 3.30GHz", 6, 0x55, 4),
    "intel_sapphire_rapids": ("GenuineIntel", "Intel(R) Xeon(R) w7-2475X", 6, 0x8F, 8),
}

# The source's "Instruction Set" words -> pyvt (Linux cpuinfo) flag names.
INSTRUCTION_SET_WORDS = {
    "x86-64": "lm", "MMX": "mmx", "3DNow!": "3dnow", "SSE": "sse", "SSE2": "sse2", "SSE3": "pni",
    "SSSE3": "ssse3", "SSE4.1": "sse4_1", "SSE4.2": "sse4_2", "SSE4A": "sse4a", "AVX": "avx",
    "AVX2": "avx2", "FMA": "fma", "AES": "aes", "SHA": "sha_ni",
}


def test_every_fixture_has_expectations():
    assert sorted(EXPECTED) == CPUID_FIXTURES


@pytest.mark.parametrize("name", CPUID_FIXTURES)
def test_identity(name):
    _, dump = cpuid_fixture(name)
    vendor, brand, family, model, stepping = EXPECTED[name]
    d = cpuid.decode_cpuid(dump)
    assert d["vendor"] == vendor
    assert d["brand"] == brand
    assert (d["signature"]["family"], d["signature"]["model"], d["signature"]["stepping"]) == (family, model, stepping)


@pytest.mark.parametrize("name", CPUID_FIXTURES)
def test_virtualization_flags_follow_the_vendor(name):
    """Every CPU here is bare metal with hardware virtualization: VMX on Intel, SVM on AMD."""
    _, dump = cpuid_fixture(name)
    d = cpuid.decode_cpuid(dump)
    intel = d["vendor"] == "GenuineIntel"
    assert d["vmx"] is intel
    assert d["svm"] is (not intel)
    assert d["hypervisor"] == {"present": False, "signature": None, "name": None}
    assert "lm" in d["flags"] and "nx" in d["flags"]


WITH_SUMMARY = [n for n in CPUID_FIXTURES if cpuid_fixture(n)[0]["source"].get("instruction_set_line")]


@pytest.mark.parametrize("name", WITH_SUMMARY)
def test_instruction_set_summary_agrees(name):
    doc, dump = cpuid_fixture(name)
    line = doc["source"]["instruction_set_line"]
    flags = set(cpuid.decode_cpuid(dump)["flags"])
    for word in (w.strip() for w in line.split(",")):
        if word in INSTRUCTION_SET_WORDS:
            assert INSTRUCTION_SET_WORDS[word] in flags, word
    listed = {INSTRUCTION_SET_WORDS[w.strip()] for w in line.split(",") if w.strip() in INSTRUCTION_SET_WORDS}
    for flag in ("avx2", "avx", "sse4_2", "sha_ni", "fma", "aes", "sse4a"):
        if flag not in listed:
            assert flag not in flags, flag


def test_leaf7_needs_max_leaf_seven():
    """Conroe's max basic leaf is 0Ah: leaf 7 features must not be read (SDM: leaf above max)."""
    _, dump = cpuid_fixture("intel_conroe_core2_x6800")
    assert (7, 0) not in dump or cpuid._leaf_valid(dump, 7)
    assert "avx2" not in cpuid.decode_cpuid(dump)["flags"]


def test_signature_extended_family_only_for_family_f():
    # Family 6: extended model used, extended family ignored.
    assert cpuid.decode_signature(0x000906EA) == {"raw": "0x000906ea", "family": 6, "model": 0x9E, "stepping": 0xA}
    # Family 0Fh (AMD K8+): family = 0Fh + extended family.
    assert cpuid.decode_signature(0x00A10F11)["family"] == 0x19
    # Family 5 (K5): neither extension applies.
    assert cpuid.decode_signature(0x00000514) == {"raw": "0x00000514", "family": 5, "model": 1, "stepping": 4}


def test_hypervisor_signatures():
    """CPUID.1:ECX[31] plus leaf 0x40000000 (values as KVM documents them)."""
    dump = {
        (0, 0): (0xD, 0x756E6547, 0x6C65746E, 0x49656E69),
        (1, 0): (0x000306C3, 0, 1 << 31, 0),
        (0x40000000, 0): (0x40000001, 0x4B4D564B, 0x564B4D56, 0x4D),
        (0x40000001, 0): (0x01007EFB, 0, 0, 0),
    }
    hv = cpuid.hypervisor(dump)
    assert hv["present"] and hv["signature"] == "KVMKVMKVM" and hv["name"] == "KVM"
    assert "KVM_FEATURE_CLOCKSOURCE2" in hv["kvm_pv_features"]
    assert "KVM_FEATURE_CLOCKSOURCE_STABLE_BIT" in hv["kvm_pv_features"]
    hv_bytes = b"Microsoft Hv"
    regs = [int.from_bytes(hv_bytes[i:i + 4], "little") for i in (0, 4, 8)]
    dump[(0x40000000, 0)] = (0x4000000B, *regs)
    assert cpuid.hypervisor(dump)["name"] == "Hyper-V"
    dump[(1, 0)] = (0x000306C3, 0, 0, 0)
    assert cpuid.hypervisor(dump)["present"] is False


def test_dump_from_kvm_entries():
    entries = [{"function": 0, "index": 0, "flags": 0, "eax": 0xD, "ebx": 1, "ecx": 2, "edx": 3},
               {"function": 7, "index": 0, "flags": 1, "eax": 0, "ebx": 1 << 5, "ecx": 0, "edx": 0}]
    dump = cpuid.dump_from_entries(entries)
    assert dump[(7, 0)] == (0, 32, 0, 0)
    assert "avx2" in cpuid.feature_flags(dump)
