"""AMD SVM capabilities: CPUID Fn8000_000A and the VM_CR MSR.

References: AMD64 Architecture Programmer's Manual (APM) Vol. 2, 15.4
("Enabling SVM") and 15.30.1 (VM_CR MSR); Vol. 3, Appendix E.4.9
("Function 8000_000Ah - SVM Features"). Feature names are the APM's.
"""

from __future__ import annotations

from ._bits import bit, field, flags, hex32, hex64, unknown_bits

CPUID_SVM_LEAF = 0x8000000A

MSR_VM_CR = 0xC0010114
MSR_VM_HSAVE_PA = 0xC0010117
MSR_EFER = 0xC0000080
EFER_SVME = 12

#: CPUID Fn8000_000A_EDX, by the APM's names.
SVM_FEATURES: dict[int, str] = {
    0: "NP",
    1: "LbrVirt",
    2: "SVML",
    3: "NRIPS",
    4: "TscRateMsr",
    5: "VmcbClean",
    6: "FlushByAsid",
    7: "DecodeAssists",
    10: "PauseFilter",
    12: "PauseFilterThreshold",
    13: "AVIC",
    15: "VMSAVEvirt",
    16: "VGIF",
    17: "GMET",
    18: "x2AVIC",
    19: "SSSCheck",
    20: "SpecCtrl",
    21: "ROGPT",
    23: "HOST_MCE_OVERRIDE",
    24: "TlbiCtl",
    25: "VNMI",
    26: "IbsVirt",
    27: "ExtLvtAvicAccessChg",
    28: "NestedVirtVmcbAddrChk",
    29: "BusLockThreshold",
    30: "IdleHltIntercept",
}

SVM_FEATURE_DESCRIPTIONS: dict[str, str] = {
    "NP": "nested paging",
    "LbrVirt": "LBR virtualization",
    "SVML": "SVM lock (VM_CR.LOCK/SVMDIS can be locked with a key)",
    "NRIPS": "next RIP saved on #VMEXIT",
    "TscRateMsr": "TSC ratio MSR",
    "VmcbClean": "VMCB clean bits",
    "FlushByAsid": "flush by ASID (TLB_CONTROL 3/7)",
    "DecodeAssists": "decode assists",
    "PauseFilter": "PAUSE intercept filter",
    "PauseFilterThreshold": "PAUSE filter cycle threshold",
    "AVIC": "advanced virtual interrupt controller",
    "VMSAVEvirt": "virtualized VMSAVE/VMLOAD",
    "VGIF": "virtualized GIF",
    "GMET": "guest mode execute trap",
    "x2AVIC": "AVIC in x2APIC mode",
    "SSSCheck": "supervisor shadow stack restrictions",
    "SpecCtrl": "SPEC_CTRL virtualization",
    "ROGPT": "read-only guest page table",
    "HOST_MCE_OVERRIDE": "guest #MC can be intercepted",
    "TlbiCtl": "INVLPGB/TLBSYNC enable and intercept",
    "VNMI": "NMI virtualization",
    "IbsVirt": "IBS virtualization",
    "ExtLvtAvicAccessChg": "extended LVT AVIC access changes",
    "NestedVirtVmcbAddrChk": "guest VMCB address check",
    "BusLockThreshold": "bus lock threshold",
    "IdleHltIntercept": "idle HLT intercept",
}

#: VM_CR MSR (APM Vol. 2, 15.30.1).
VM_CR_BITS: dict[int, str] = {0: "DPD", 1: "R_INIT", 2: "DIS_A20M", 3: "LOCK", 4: "SVMDIS"}


def decode_svm_cpuid(eax: int, ebx: int, ecx: int, edx: int) -> dict:
    """Decode CPUID Fn8000_000A (valid only when Fn8000_0001_ECX[SVM] is 1)."""
    names = flags(edx, SVM_FEATURES)
    return {
        "revision": field(eax, 0, 7),
        "nasid": ebx,
        "edx": hex32(edx),
        "features": names,
        "unknown_feature_bits": unknown_bits(edx, SVM_FEATURES),
        "feature_flags": {name: bit(edx, n) for n, name in sorted(SVM_FEATURES.items())},
    }


def decode_vm_cr(value: int) -> dict:
    """Decode VM_CR and say whether firmware has switched SVM off.

    SVMDIS=1 makes EFER.SVME=1 fault; with LOCK=1 as well only firmware
    (or the SVM-lock key, when SVML is supported) can change it back: this
    is what "SVM disabled in BIOS" means.
    """
    svmdis = bit(value, 4)
    lock = bit(value, 3)
    if svmdis and lock:
        explanation = ("SVM is disabled by firmware (VM_CR.SVMDIS=1 and locked): enable "
                       "'SVM Mode' / 'AMD-V' in the BIOS/UEFI setup and power-cycle.")
    elif svmdis:
        explanation = ("VM_CR.SVMDIS=1 but not locked: software could clear it; "
                       "the firmware left SVM switched off.")
    else:
        explanation = "SVM is enabled (VM_CR.SVMDIS=0)."
    return {
        "raw": hex64(value),
        "dpd": bit(value, 0),
        "r_init": bit(value, 1),
        "dis_a20m": bit(value, 2),
        "lock": lock,
        "svmdis": svmdis,
        "disabled_by_firmware": bool(svmdis and lock),
        "explanation": explanation,
    }


def svm_features(decoded: dict | None) -> dict[str, bool]:
    """Headline SVM features for the verdict and ``--require``."""
    f = (decoded or {}).get("feature_flags", {})
    return {
        "svm": decoded is not None,
        "npt": bool(f.get("NP")),
        "nrip_save": bool(f.get("NRIPS")),
        "vmcb_clean": bool(f.get("VmcbClean")),
        "flush_by_asid": bool(f.get("FlushByAsid")),
        "decode_assists": bool(f.get("DecodeAssists")),
        "tsc_scaling": bool(f.get("TscRateMsr")),
        "avic": bool(f.get("AVIC")),
        "x2avic": bool(f.get("x2AVIC")),
        "vgif": bool(f.get("VGIF")),
        "vnmi": bool(f.get("VNMI")),
        "vmsave_virt": bool(f.get("VMSAVEvirt")),
    }
