"""CPUID decoding: vendor, family/model/stepping, feature flags, hypervisor.

Feature flag names follow Linux's ``/proc/cpuinfo`` spelling (``vmx``,
``svm``, ``lm``, ``pdpe1gb`` ...), which is what users already grep for.
Bit positions: Intel SDM Vol. 2A, CPUID instruction, tables 3-10/3-11 and
the leaf 07H and 80000001H descriptions; AMD APM Vol. 3, Appendix E.

A CPUID dump is a mapping ``{(leaf, subleaf): (eax, ebx, ecx, edx)}``;
leaves without subleaves use subleaf 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ._bits import ascii_string, bit, field, flags, hex32, regs_to_bytes
from .svm import CPUID_SVM_LEAF, decode_svm_cpuid

Regs = tuple[int, int, int, int]
CpuidDump = Mapping[tuple[int, int], Regs]

LEAF1_EDX: dict[int, str] = {
    0: "fpu", 1: "vme", 2: "de", 3: "pse", 4: "tsc", 5: "msr", 6: "pae", 7: "mce",
    8: "cx8", 9: "apic", 11: "sep", 12: "mtrr", 13: "pge", 14: "mca", 15: "cmov",
    16: "pat", 17: "pse36", 18: "pn", 19: "clflush", 21: "dts", 22: "acpi", 23: "mmx",
    24: "fxsr", 25: "sse", 26: "sse2", 27: "ss", 28: "ht", 29: "tm", 30: "ia64", 31: "pbe",
}
LEAF1_ECX: dict[int, str] = {
    0: "pni", 1: "pclmulqdq", 2: "dtes64", 3: "monitor", 4: "ds_cpl", 5: "vmx", 6: "smx",
    7: "est", 8: "tm2", 9: "ssse3", 10: "cid", 11: "sdbg", 12: "fma", 13: "cx16",
    14: "xtpr", 15: "pdcm", 17: "pcid", 18: "dca", 19: "sse4_1", 20: "sse4_2",
    21: "x2apic", 22: "movbe", 23: "popcnt", 24: "tsc_deadline_timer", 25: "aes",
    26: "xsave", 27: "osxsave", 28: "avx", 29: "f16c", 30: "rdrand", 31: "hypervisor",
}
LEAF7_EBX: dict[int, str] = {
    0: "fsgsbase", 1: "tsc_adjust", 2: "sgx", 3: "bmi1", 4: "hle", 5: "avx2",
    6: "fdp_excptn_only", 7: "smep", 8: "bmi2", 9: "erms", 10: "invpcid", 11: "rtm",
    12: "cqm", 13: "zero_fcs_fds", 14: "mpx", 15: "rdt_a", 16: "avx512f", 17: "avx512dq",
    18: "rdseed", 19: "adx", 20: "smap", 21: "avx512ifma", 22: "pcommit", 23: "clflushopt",
    24: "clwb", 25: "intel_pt", 26: "avx512pf", 27: "avx512er", 28: "avx512cd",
    29: "sha_ni", 30: "avx512bw", 31: "avx512vl",
}
LEAF7_ECX: dict[int, str] = {
    0: "prefetchwt1", 1: "avx512vbmi", 2: "umip", 3: "pku", 4: "ospke", 5: "waitpkg",
    6: "avx512_vbmi2", 7: "shstk", 8: "gfni", 9: "vaes", 10: "vpclmulqdq",
    11: "avx512_vnni", 12: "avx512_bitalg", 13: "tme", 14: "avx512_vpopcntdq",
    16: "la57", 22: "rdpid", 23: "kl", 24: "bus_lock_detect", 25: "cldemote",
    27: "movdiri", 28: "movdir64b", 29: "enqcmd", 30: "sgx_lc", 31: "pks",
}
LEAF7_EDX: dict[int, str] = {
    2: "avx512_4vnniw", 3: "avx512_4fmaps", 4: "fsrm", 5: "uintr",
    8: "avx512_vp2intersect", 9: "srbds_ctrl", 10: "md_clear", 11: "rtm_always_abort",
    13: "tsx_force_abort", 14: "serialize", 15: "hybrid_cpu", 16: "tsxldtrk",
    18: "pconfig", 19: "arch_lbr", 20: "ibt", 22: "amx_bf16", 23: "avx512_fp16",
    24: "amx_tile", 25: "amx_int8", 26: "spec_ctrl", 27: "intel_stibp", 28: "flush_l1d",
    29: "arch_capabilities", 30: "core_capabilities", 31: "spec_ctrl_ssbd",
}
EXT1_EDX: dict[int, str] = {
    11: "syscall", 19: "mp", 20: "nx", 22: "mmxext", 25: "fxsr_opt", 26: "pdpe1gb",
    27: "rdtscp", 29: "lm", 30: "3dnowext", 31: "3dnow",
}
EXT1_ECX: dict[int, str] = {
    0: "lahf_lm", 1: "cmp_legacy", 2: "svm", 3: "extapic", 4: "cr8_legacy", 5: "abm",
    6: "sse4a", 7: "misalignsse", 8: "3dnowprefetch", 9: "osvw", 10: "ibs", 11: "xop",
    12: "skinit", 13: "wdt", 15: "lwp", 16: "fma4", 17: "tce", 19: "nodeid_msr",
    21: "tbm", 22: "topoext", 23: "perfctr_core", 24: "perfctr_nb", 26: "bpext",
    27: "ptsc", 28: "perfctr_llc", 29: "mwaitx",
}

#: (leaf, subleaf, register index 0..3 = eax..edx) -> names
FEATURE_REGISTERS: dict[tuple[int, int, int], dict[int, str]] = {
    (0x1, 0, 3): LEAF1_EDX,
    (0x1, 0, 2): LEAF1_ECX,
    (0x7, 0, 1): LEAF7_EBX,
    (0x7, 0, 2): LEAF7_ECX,
    (0x7, 0, 3): LEAF7_EDX,
    (0x80000001, 0, 3): EXT1_EDX,
    (0x80000001, 0, 2): EXT1_ECX,
}
_REG_NAMES = ("eax", "ebx", "ecx", "edx")

HYPERVISOR_LEAF = 0x40000000
KVM_FEATURES_LEAF = 0x40000001

#: CPUID 0x40000000 EBX:ECX:EDX signatures of known hypervisors.
HYPERVISOR_SIGNATURES: dict[str, str] = {
    "KVMKVMKVM": "KVM",
    "Microsoft Hv": "Hyper-V",
    "VMwareVMware": "VMware",
    "XenVMMXenVMM": "Xen",
    "TCGTCGTCGTCG": "QEMU TCG",
    "bhyve bhyve": "bhyve",
    "VBoxVBoxVBox": "VirtualBox",
    "ACRNACRNACRN": "ACRN",
    "lrpepyh  vr": "Parallels",
    "QNXQVMBSQG": "QNX",
    "Jailhouse": "Jailhouse",
}

#: CPUID 0x40000001 EAX when the signature is KVM (Linux Documentation/virt/kvm/x86/cpuid.rst).
KVM_PV_FEATURES: dict[int, str] = {
    0: "KVM_FEATURE_CLOCKSOURCE", 1: "KVM_FEATURE_NOP_IO_DELAY", 2: "KVM_FEATURE_MMU_OP",
    3: "KVM_FEATURE_CLOCKSOURCE2", 4: "KVM_FEATURE_ASYNC_PF", 5: "KVM_FEATURE_STEAL_TIME",
    6: "KVM_FEATURE_PV_EOI", 7: "KVM_FEATURE_PV_UNHALT", 9: "KVM_FEATURE_PV_TLB_FLUSH",
    10: "KVM_FEATURE_ASYNC_PF_VMEXIT", 11: "KVM_FEATURE_PV_SEND_IPI",
    12: "KVM_FEATURE_POLL_CONTROL", 13: "KVM_FEATURE_PV_SCHED_YIELD",
    14: "KVM_FEATURE_ASYNC_PF_INT", 15: "KVM_FEATURE_MSI_EXT_DEST_ID",
    16: "KVM_FEATURE_HC_MAP_GPA_RANGE", 17: "KVM_FEATURE_MIGRATION_CONTROL",
    24: "KVM_FEATURE_CLOCKSOURCE_STABLE_BIT",
}


def get(dump: CpuidDump, leaf: int, subleaf: int = 0) -> Regs | None:
    """Registers for (leaf, subleaf), or None when the dump lacks them."""
    return dump.get((leaf, subleaf))


def decode_signature(eax: int) -> dict:
    """Family/model/stepping from CPUID.1:EAX (SDM Vol. 2A, figure 3-6).

    The extended family is added only when the base family is 0Fh; the
    extended model is used when the base family is 06h or 0Fh. AMD applies
    the same rule (APM Vol. 3, CPUID Fn0000_0001_EAX).
    """
    stepping = field(eax, 0, 3)
    base_model = field(eax, 4, 7)
    base_family = field(eax, 8, 11)
    ext_model = field(eax, 16, 19)
    ext_family = field(eax, 20, 27)
    family = base_family + (ext_family if base_family == 0xF else 0)
    model = base_model | (ext_model << 4 if base_family in (0x6, 0xF) else 0)
    return {"raw": hex32(eax), "family": family, "model": model, "stepping": stepping}


def vendor(dump: CpuidDump) -> str | None:
    regs = get(dump, 0)
    if regs is None:
        return None
    _, ebx, ecx, edx = regs
    return regs_to_bytes(ebx, edx, ecx).decode("ascii", errors="replace")


def brand(dump: CpuidDump) -> str | None:
    parts = [get(dump, leaf) for leaf in (0x80000002, 0x80000003, 0x80000004)]
    if any(p is None for p in parts):
        return None
    return ascii_string(*[r for p in parts for r in p]) or None  # type: ignore[union-attr]


def feature_flags(dump: CpuidDump) -> list[str]:
    """Every named feature flag that is set, in leaf/register/bit order."""
    out: list[str] = []
    for (leaf, sub, reg), names in FEATURE_REGISTERS.items():
        regs = get(dump, leaf, sub)
        if regs is not None and _leaf_valid(dump, leaf):
            out.extend(flags(regs[reg], names))
    return out


def feature_registers(dump: CpuidDump) -> dict[str, list[str]]:
    """Set flags grouped per register, keyed like ``"0x00000007.0.ebx"``."""
    out = {}
    for (leaf, sub, reg), names in FEATURE_REGISTERS.items():
        regs = get(dump, leaf, sub)
        if regs is not None and _leaf_valid(dump, leaf):
            out[f"0x{leaf:08x}.{sub}.{_REG_NAMES[reg]}"] = flags(regs[reg], names)
    return out


def hypervisor(dump: CpuidDump) -> dict:
    """Hypervisor presence (CPUID.1:ECX[31]) and its 0x40000000 signature."""
    leaf1 = get(dump, 1)
    present = bool(leaf1 and bit(leaf1[2], 31))
    out: dict = {"present": present, "signature": None, "name": None}
    regs = get(dump, HYPERVISOR_LEAF)
    if present and regs is not None:
        max_leaf, ebx, ecx, edx = regs
        raw = regs_to_bytes(ebx, ecx, edx)
        signature = raw.rstrip(b"\0").decode("ascii", errors="replace")
        out["signature"] = signature
        out["name"] = HYPERVISOR_SIGNATURES.get(signature.strip(), None)
        out["max_leaf"] = hex32(max_leaf)
        kvm = get(dump, KVM_FEATURES_LEAF)
        if out["name"] == "KVM" and kvm is not None:
            out["kvm_pv_features"] = flags(kvm[0], KVM_PV_FEATURES)
    return out


def decode_cpuid(dump: CpuidDump) -> dict:
    """Everything the report says about a CPU from its CPUID dump."""
    leaf0 = get(dump, 0)
    ext0 = get(dump, 0x80000000)
    leaf1 = get(dump, 1)
    flag_list = feature_flags(dump)
    out: dict = {
        "vendor": vendor(dump),
        "brand": brand(dump),
        "max_leaf": hex32(leaf0[0]) if leaf0 else None,
        "max_extended_leaf": hex32(ext0[0]) if ext0 else None,
        "signature": decode_signature(leaf1[0]) if leaf1 else None,
        "flags": flag_list,
        "flags_by_register": feature_registers(dump),
        "vmx": "vmx" in flag_list,
        "svm": "svm" in flag_list,
        "hypervisor": hypervisor(dump),
        "physical_address_bits": None,
        "svm_features": None,
    }
    ext8 = get(dump, 0x80000008)
    if ext8 is not None and _leaf_valid(dump, 0x80000008):
        out["physical_address_bits"] = field(ext8[0], 0, 7)
        out["linear_address_bits"] = field(ext8[0], 8, 15)
    svm_leaf = get(dump, CPUID_SVM_LEAF)
    if out["svm"] and svm_leaf is not None and _leaf_valid(dump, CPUID_SVM_LEAF):
        out["svm_features"] = decode_svm_cpuid(*svm_leaf)
    return out


def dump_from_entries(entries: Iterable) -> dict[tuple[int, int], Regs]:
    """Build a CPUID dump from KVM_GET_SUPPORTED_CPUID-style entries.

    Entries may be objects or dicts with ``function, index, eax, ebx, ecx, edx``.
    """
    dump: dict[tuple[int, int], Regs] = {}
    for e in entries:
        f = e if isinstance(e, Mapping) else vars(e) if hasattr(e, "__dict__") else {
            k: getattr(e, k) for k in ("function", "index", "eax", "ebx", "ecx", "edx")}
        dump[(int(f["function"]), int(f["index"]))] = (
            int(f["eax"]), int(f["ebx"]), int(f["ecx"]), int(f["edx"]))
    return dump


def _leaf_valid(dump: CpuidDump, leaf: int) -> bool:
    """A leaf counts only when the max-leaf value of its range covers it."""
    base = leaf & 0xFFFF0000
    if base not in (0, 0x80000000):
        return True
    top = get(dump, base)
    return top is not None and top[0] >= leaf
