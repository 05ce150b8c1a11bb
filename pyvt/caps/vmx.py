"""Intel VMX capability MSRs, decoded the way the Intel SDM names them.

References: Intel SDM Vol. 3D, Appendix A ("VMX Capability Reporting
Facility"), and Vol. 3C, Chapter 25 ("Virtual Machine Control Structures"),
tables 25-5 (pin-based), 25-6 (primary processor-based), 25-7 (secondary),
25-8 (tertiary), 25-13 (VM-exit) and 25-15 (VM-entry controls).

Every function here is pure: raw register values in, plain dicts out.
"""

from __future__ import annotations

from collections.abc import Mapping

from ._bits import bit, field, hex64, unknown_bits

# --- MSR indices (SDM Vol. 4, Table 2-2; Vol. 3D, Appendix A) -------------

IA32_FEATURE_CONTROL = 0x3A
IA32_VMX_BASIC = 0x480
IA32_VMX_PINBASED_CTLS = 0x481
IA32_VMX_PROCBASED_CTLS = 0x482
IA32_VMX_EXIT_CTLS = 0x483
IA32_VMX_ENTRY_CTLS = 0x484
IA32_VMX_MISC = 0x485
IA32_VMX_CR0_FIXED0 = 0x486
IA32_VMX_CR0_FIXED1 = 0x487
IA32_VMX_CR4_FIXED0 = 0x488
IA32_VMX_CR4_FIXED1 = 0x489
IA32_VMX_VMCS_ENUM = 0x48A
IA32_VMX_PROCBASED_CTLS2 = 0x48B
IA32_VMX_EPT_VPID_CAP = 0x48C
IA32_VMX_TRUE_PINBASED_CTLS = 0x48D
IA32_VMX_TRUE_PROCBASED_CTLS = 0x48E
IA32_VMX_TRUE_EXIT_CTLS = 0x48F
IA32_VMX_TRUE_ENTRY_CTLS = 0x490
IA32_VMX_VMFUNC = 0x491
IA32_VMX_PROCBASED_CTLS3 = 0x492
IA32_VMX_EXIT_CTLS2 = 0x493

#: Every VMX capability MSR by its SDM name.
MSR_NAMES: dict[int, str] = {
    IA32_VMX_BASIC: "IA32_VMX_BASIC",
    IA32_VMX_PINBASED_CTLS: "IA32_VMX_PINBASED_CTLS",
    IA32_VMX_PROCBASED_CTLS: "IA32_VMX_PROCBASED_CTLS",
    IA32_VMX_EXIT_CTLS: "IA32_VMX_EXIT_CTLS",
    IA32_VMX_ENTRY_CTLS: "IA32_VMX_ENTRY_CTLS",
    IA32_VMX_MISC: "IA32_VMX_MISC",
    IA32_VMX_CR0_FIXED0: "IA32_VMX_CR0_FIXED0",
    IA32_VMX_CR0_FIXED1: "IA32_VMX_CR0_FIXED1",
    IA32_VMX_CR4_FIXED0: "IA32_VMX_CR4_FIXED0",
    IA32_VMX_CR4_FIXED1: "IA32_VMX_CR4_FIXED1",
    IA32_VMX_VMCS_ENUM: "IA32_VMX_VMCS_ENUM",
    IA32_VMX_PROCBASED_CTLS2: "IA32_VMX_PROCBASED_CTLS2",
    IA32_VMX_EPT_VPID_CAP: "IA32_VMX_EPT_VPID_CAP",
    IA32_VMX_TRUE_PINBASED_CTLS: "IA32_VMX_TRUE_PINBASED_CTLS",
    IA32_VMX_TRUE_PROCBASED_CTLS: "IA32_VMX_TRUE_PROCBASED_CTLS",
    IA32_VMX_TRUE_EXIT_CTLS: "IA32_VMX_TRUE_EXIT_CTLS",
    IA32_VMX_TRUE_ENTRY_CTLS: "IA32_VMX_TRUE_ENTRY_CTLS",
    IA32_VMX_VMFUNC: "IA32_VMX_VMFUNC",
    IA32_VMX_PROCBASED_CTLS3: "IA32_VMX_PROCBASED_CTLS3",
    IA32_VMX_EXIT_CTLS2: "IA32_VMX_EXIT_CTLS2",
}
MSR_INDICES: dict[str, int] = {name: index for index, name in MSR_NAMES.items()}

# --- Control names (SDM Vol. 3C, Chapter 25) ------------------------------

PIN_BASED_CONTROLS: dict[int, str] = {
    0: "External-interrupt exiting",
    3: "NMI exiting",
    5: "Virtual NMIs",
    6: "Activate VMX-preemption timer",
    7: "Process posted interrupts",
}
#: Bits that the first VMX processors forced to 1 (SDM A.2, "default1" class).
PIN_BASED_DEFAULT1 = frozenset({1, 2, 4})

PRIMARY_PROCESSOR_BASED_CONTROLS: dict[int, str] = {
    2: "Interrupt-window exiting",
    3: "Use TSC offsetting",
    7: "HLT exiting",
    9: "INVLPG exiting",
    10: "MWAIT exiting",
    11: "RDPMC exiting",
    12: "RDTSC exiting",
    15: "CR3-load exiting",
    16: "CR3-store exiting",
    17: "Activate tertiary controls",
    19: "CR8-load exiting",
    20: "CR8-store exiting",
    21: "Use TPR shadow",
    22: "NMI-window exiting",
    23: "MOV-DR exiting",
    24: "Unconditional I/O exiting",
    25: "Use I/O bitmaps",
    27: "Monitor trap flag",
    28: "Use MSR bitmaps",
    29: "MONITOR exiting",
    30: "PAUSE exiting",
    31: "Activate secondary controls",
}
PRIMARY_PROCESSOR_BASED_DEFAULT1 = frozenset({1, 4, 5, 6, 8, 13, 14, 15, 16, 26})

SECONDARY_PROCESSOR_BASED_CONTROLS: dict[int, str] = {
    0: "Virtualize APIC accesses",
    1: "Enable EPT",
    2: "Descriptor-table exiting",
    3: "Enable RDTSCP",
    4: "Virtualize x2APIC mode",
    5: "Enable VPID",
    6: "WBINVD exiting",
    7: "Unrestricted guest",
    8: "APIC-register virtualization",
    9: "Virtual-interrupt delivery",
    10: "PAUSE-loop exiting",
    11: "RDRAND exiting",
    12: "Enable INVPCID",
    13: "Enable VM functions",
    14: "VMCS shadowing",
    15: "Enable ENCLS exiting",
    16: "RDSEED exiting",
    17: "Enable PML",
    18: "EPT-violation #VE",
    19: "Conceal VMX from PT",
    20: "Enable XSAVES/XRSTORS",
    21: "PASID translation",
    22: "Mode-based execute control for EPT",
    23: "Sub-page write permissions for EPT",
    24: "Intel PT uses guest physical addresses",
    25: "Use TSC scaling",
    26: "Enable user wait and pause",
    27: "Enable PCONFIG",
    28: "Enable ENCLV exiting",
    30: "VMM bus-lock detection",
    31: "Instruction timeout",
}

TERTIARY_PROCESSOR_BASED_CONTROLS: dict[int, str] = {
    0: "LOADIWKEY exiting",
    1: "Enable HLAT",
    2: "EPT paging-write control",
    3: "Guest-paging verification",
    4: "IPI virtualization",
    7: "Virtualize IA32_SPEC_CTRL",
}

VM_EXIT_CONTROLS: dict[int, str] = {
    2: "Save debug controls",
    9: "Host address-space size",
    12: "Load IA32_PERF_GLOBAL_CTRL",
    15: "Acknowledge interrupt on exit",
    18: "Save IA32_PAT",
    19: "Load IA32_PAT",
    20: "Save IA32_EFER",
    21: "Load IA32_EFER",
    22: "Save VMX-preemption timer value",
    23: "Clear IA32_BNDCFGS",
    24: "Conceal VMX from PT",
    25: "Clear IA32_RTIT_CTL",
    26: "Clear IA32_LBR_CTL",
    27: "Clear UINV",
    28: "Load CET state",
    29: "Load PKRS",
    30: "Save IA32_PERF_GLOBAL_CTL",
    31: "Activate secondary controls",
}
VM_EXIT_DEFAULT1 = frozenset({0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 13, 14, 16, 17})

VM_ENTRY_CONTROLS: dict[int, str] = {
    2: "Load debug controls",
    9: "IA-32e mode guest",
    10: "Entry to SMM",
    11: "Deactivate dual-monitor treatment",
    13: "Load IA32_PERF_GLOBAL_CTRL",
    14: "Load IA32_PAT",
    15: "Load IA32_EFER",
    16: "Load IA32_BNDCFGS",
    17: "Conceal VMX from PT",
    18: "Load IA32_RTIT_CTL",
    19: "Load UINV",
    20: "Load CET state",
    21: "Load guest IA32_LBR_CTL",
    22: "Load PKRS",
}
VM_ENTRY_DEFAULT1 = frozenset({0, 1, 2, 3, 4, 5, 6, 7, 8, 12})

VM_FUNCTIONS: dict[int, str] = {
    0: "EPTP switching",
}

#: IA32_VMX_EPT_VPID_CAP (SDM A.10).
EPT_VPID_CAPABILITIES: dict[int, str] = {
    0: "Execute-only EPT translations",
    6: "Page-walk length 4",
    7: "Page-walk length 5",
    8: "EPT paging-structure memory type UC",
    14: "EPT paging-structure memory type WB",
    16: "EPT 2-MByte pages",
    17: "EPT 1-GByte pages",
    20: "INVEPT",
    21: "EPT accessed and dirty flags",
    22: "Advanced VM-exit information for EPT violations",
    23: "Supervisor shadow-stack control",
    25: "Single-context INVEPT",
    26: "All-context INVEPT",
    32: "INVVPID",
    40: "Individual-address INVVPID",
    41: "Single-context INVVPID",
    42: "All-context INVVPID",
    43: "Single-context-retaining-globals INVVPID",
}

#: CR0 and CR4 bit names (SDM Vol. 3A, 2.5), for the VMX fixed-bit MSRs.
CR0_BITS: dict[int, str] = {
    0: "PE", 1: "MP", 2: "EM", 3: "TS", 4: "ET", 5: "NE", 16: "WP", 18: "AM",
    29: "NW", 30: "CD", 31: "PG",
}
CR4_BITS: dict[int, str] = {
    0: "VME", 1: "PVI", 2: "TSD", 3: "DE", 4: "PSE", 5: "PAE", 6: "MCE", 7: "PGE",
    8: "PCE", 9: "OSFXSR", 10: "OSXMMEXCPT", 11: "UMIP", 12: "LA57", 13: "VMXE",
    14: "SMXE", 16: "FSGSBASE", 17: "PCIDE", 18: "OSXSAVE", 19: "KL", 20: "SMEP",
    21: "SMAP", 22: "PKE", 23: "CET", 24: "PKS", 25: "UINTR", 28: "LAM_SUP",
}

#: SDM A.1 memory types for the VMCS (bits 53:50 of IA32_VMX_BASIC).
MEMORY_TYPES = {0: "UC", 6: "WB"}


def decode_basic(value: int) -> dict:
    """Decode IA32_VMX_BASIC (SDM A.1)."""
    memory_type = field(value, 50, 53)
    return {
        "raw": hex64(value),
        "vmcs_revision_id": field(value, 0, 30),
        "vmcs_region_size": field(value, 32, 44),
        "physical_address_width_32bit": bit(value, 48),
        "dual_monitor_smm": bit(value, 49),
        "vmcs_memory_type": MEMORY_TYPES.get(memory_type, f"reserved ({memory_type})"),
        "ins_outs_exit_information": bit(value, 54),
        "true_controls": bit(value, 55),
        "hardware_exception_without_error_code": bit(value, 56),
    }


def decode_controls(
    value: int,
    names: Mapping[int, str],
    *,
    true_value: int | None = None,
    default1: frozenset = frozenset(),
) -> dict:
    """Decode a 32-bit VM-execution/exit/entry control capability MSR (SDM A.3-A.5).

    Bits 31:0 are the allowed 0-settings (a 1 there means the control must
    be 1) and bits 63:32 the allowed 1-settings. When the IA32_VMX_TRUE_*
    variant exists (IA32_VMX_BASIC bit 55), it alone describes every control
    and is used in preference, as the SDM says.
    """
    effective = true_value if true_value is not None else value
    allowed0_mask = effective & 0xFFFFFFFF
    allowed1_mask = effective >> 32
    controls = []
    for n in sorted(names):
        may_be_0 = not bit(allowed0_mask, n)
        may_be_1 = bit(allowed1_mask, n)
        controls.append({
            "bit": n,
            "name": names[n],
            "allowed_0": may_be_0,
            "allowed_1": may_be_1,
            "setting": _setting(may_be_0, may_be_1),
        })
    result = {
        "raw": hex64(value),
        "true_raw": hex64(true_value) if true_value is not None else None,
        "allowed_0_settings": f"0x{allowed0_mask:08x}",
        "allowed_1_settings": f"0x{allowed1_mask:08x}",
        "controls": controls,
        "unknown_allowed_1_bits": unknown_bits(allowed1_mask, {**names, **{b: "" for b in default1}}),
    }
    if default1:
        # Reserved default1 bits the TRUE MSR lets software clear (SDM A.2).
        result["default1_clearable"] = sorted(b for b in default1 if not bit(allowed0_mask, b))
    return result


def decode_allowed1_64(value: int, names: Mapping[int, str]) -> dict:
    """Decode a 64-bit allowed-1-only capability MSR (tertiary controls, SDM A.3.4)."""
    return {
        "raw": hex64(value),
        "controls": [
            {"bit": n, "name": names[n], "allowed_0": True, "allowed_1": bit(value, n),
             "setting": _setting(True, bit(value, n))}
            for n in sorted(names)
        ],
        "unknown_allowed_1_bits": unknown_bits(value, names, width=64),
    }


def decode_misc(value: int) -> dict:
    """Decode IA32_VMX_MISC (SDM A.6)."""
    max_msr_list = 512 * (field(value, 25, 27) + 1)
    activity = [name for n, name in ((6, "HLT"), (7, "shutdown"), (8, "wait-for-SIPI")) if bit(value, n)]
    return {
        "raw": hex64(value),
        "preemption_timer_tsc_shift": field(value, 0, 4),
        "store_efer_lma_on_exit": bit(value, 5),
        "activity_states": activity,
        "intel_pt_in_vmx": bit(value, 14),
        "rdmsr_smbase_in_smm": bit(value, 15),
        "cr3_target_count": field(value, 16, 24),
        "max_msr_list_entries": max_msr_list,
        "vmxoff_blocks_smi": bit(value, 28),
        "vmwrite_any_field": bit(value, 29),
        "inject_zero_length_instruction": bit(value, 30),
        "mseg_revision_id": field(value, 32, 63),
    }


def decode_fixed(fixed0: int, fixed1: int, names: Mapping[int, str], width: int = 64) -> dict:
    """Decode a pair of IA32_VMX_CRn_FIXED0/1 MSRs (SDM A.7, A.8).

    A bit set in FIXED0 must be 1 in VMX operation; a bit clear in FIXED1
    must be 0; anything else is free.
    """
    def name(n: int) -> str:
        return names.get(n, f"bit{n}")

    fixed_1 = [name(n) for n in range(width) if bit(fixed0, n)]
    flexible = [name(n) for n in range(width) if not bit(fixed0, n) and bit(fixed1, n)]
    # Only named bits are listed as fixed to 0: the rest are reserved anyway.
    fixed_0 = [names[n] for n in sorted(names) if not bit(fixed1, n)]
    return {
        "fixed0_raw": hex64(fixed0),
        "fixed1_raw": hex64(fixed1),
        "must_be_1": fixed_1,
        "must_be_0": fixed_0,
        "flexible": flexible,
    }


def decode_ept_vpid(value: int) -> dict:
    """Decode IA32_VMX_EPT_VPID_CAP (SDM A.10)."""
    return {
        "raw": hex64(value),
        "capabilities": [EPT_VPID_CAPABILITIES[n] for n in sorted(EPT_VPID_CAPABILITIES) if bit(value, n)],
        "max_hlat_prefix_size": field(value, 48, 53),
        "unknown_bits": unknown_bits(value, {**EPT_VPID_CAPABILITIES, **{n: "" for n in range(48, 54)}}, width=64),
    }


def decode_vmfunc(value: int) -> dict:
    """Decode IA32_VMX_VMFUNC (SDM A.11): one allowed-1 bit per VM function."""
    return {
        "raw": hex64(value),
        "functions": [VM_FUNCTIONS[n] for n in sorted(VM_FUNCTIONS) if bit(value, n)],
        "unknown_bits": unknown_bits(value, VM_FUNCTIONS, width=64),
    }


def decode_vmx(msrs: Mapping[int, int]) -> dict:
    """Decode every VMX capability MSR present in *msrs* (index -> value).

    Follows the SDM's existence rules: TRUE_* MSRs only when BASIC bit 55
    is 1, PROCBASED_CTLS2 only with "activate secondary controls", CTLS3
    only with "activate tertiary controls", EPT_VPID_CAP with EPT or VPID,
    VMFUNC with "enable VM functions". A value present in *msrs* that the
    rules say cannot exist is ignored.
    """
    if IA32_VMX_BASIC not in msrs:
        return {"present": False}
    basic = msrs[IA32_VMX_BASIC]
    true_ok = bit(basic, 55)

    def true(index: int) -> int | None:
        return msrs.get(index) if true_ok else None

    out: dict = {"present": True, "basic": decode_basic(basic)}
    if IA32_VMX_PINBASED_CTLS in msrs:
        out["pin_based_controls"] = decode_controls(
            msrs[IA32_VMX_PINBASED_CTLS], PIN_BASED_CONTROLS,
            true_value=true(IA32_VMX_TRUE_PINBASED_CTLS), default1=PIN_BASED_DEFAULT1)
    proc = msrs.get(IA32_VMX_PROCBASED_CTLS)
    if proc is not None:
        out["primary_processor_based_controls"] = decode_controls(
            proc, PRIMARY_PROCESSOR_BASED_CONTROLS,
            true_value=true(IA32_VMX_TRUE_PROCBASED_CTLS),
            default1=PRIMARY_PROCESSOR_BASED_DEFAULT1)
    secondary_ok = proc is not None and bit(proc, 63)
    tertiary_ok = proc is not None and bit(proc, 32 + 17)
    proc2 = msrs.get(IA32_VMX_PROCBASED_CTLS2) if secondary_ok else None
    if proc2 is not None:
        out["secondary_processor_based_controls"] = decode_controls(
            proc2, SECONDARY_PROCESSOR_BASED_CONTROLS)
    if tertiary_ok and IA32_VMX_PROCBASED_CTLS3 in msrs:
        out["tertiary_processor_based_controls"] = decode_allowed1_64(
            msrs[IA32_VMX_PROCBASED_CTLS3], TERTIARY_PROCESSOR_BASED_CONTROLS)
    if IA32_VMX_EXIT_CTLS in msrs:
        out["vm_exit_controls"] = decode_controls(
            msrs[IA32_VMX_EXIT_CTLS], VM_EXIT_CONTROLS,
            true_value=true(IA32_VMX_TRUE_EXIT_CTLS), default1=VM_EXIT_DEFAULT1)
    if IA32_VMX_ENTRY_CTLS in msrs:
        out["vm_entry_controls"] = decode_controls(
            msrs[IA32_VMX_ENTRY_CTLS], VM_ENTRY_CONTROLS,
            true_value=true(IA32_VMX_TRUE_ENTRY_CTLS), default1=VM_ENTRY_DEFAULT1)
    if IA32_VMX_MISC in msrs:
        out["misc"] = decode_misc(msrs[IA32_VMX_MISC])
    if IA32_VMX_CR0_FIXED0 in msrs and IA32_VMX_CR0_FIXED1 in msrs:
        out["cr0_fixed"] = decode_fixed(msrs[IA32_VMX_CR0_FIXED0], msrs[IA32_VMX_CR0_FIXED1], CR0_BITS)
    if IA32_VMX_CR4_FIXED0 in msrs and IA32_VMX_CR4_FIXED1 in msrs:
        out["cr4_fixed"] = decode_fixed(msrs[IA32_VMX_CR4_FIXED0], msrs[IA32_VMX_CR4_FIXED1], CR4_BITS)
    if IA32_VMX_VMCS_ENUM in msrs:
        out["vmcs_enum"] = {"raw": hex64(msrs[IA32_VMX_VMCS_ENUM]),
                            "highest_index": field(msrs[IA32_VMX_VMCS_ENUM], 1, 9)}
    ept_or_vpid = proc2 is not None and (bit(proc2, 32 + 1) or bit(proc2, 32 + 5))
    if ept_or_vpid and IA32_VMX_EPT_VPID_CAP in msrs:
        out["ept_vpid"] = decode_ept_vpid(msrs[IA32_VMX_EPT_VPID_CAP])
    if proc2 is not None and bit(proc2, 32 + 13) and IA32_VMX_VMFUNC in msrs:
        out["vm_functions"] = decode_vmfunc(msrs[IA32_VMX_VMFUNC])
    out["features"] = vmx_features(out)
    return out


def vmx_features(decoded: Mapping) -> dict[str, bool]:
    """The headline VMX features, as booleans, for the verdict and ``--require``."""
    def can_set(section: str, name: str) -> bool:
        for c in decoded.get(section, {}).get("controls", []):
            if c["name"] == name:
                return bool(c["allowed_1"])
        return False

    def ept_cap(name: str) -> bool:
        return name in decoded.get("ept_vpid", {}).get("capabilities", [])

    secondary = "secondary_processor_based_controls"
    return {
        "vmx": bool(decoded.get("present")),
        "true_controls": bool(decoded.get("basic", {}).get("true_controls")),
        "ept": can_set(secondary, "Enable EPT"),
        "vpid": can_set(secondary, "Enable VPID"),
        "unrestricted_guest": can_set(secondary, "Unrestricted guest"),
        "ept_ad_bits": ept_cap("EPT accessed and dirty flags"),
        "ept_1g_pages": ept_cap("EPT 1-GByte pages"),
        "ept_5level": ept_cap("Page-walk length 5"),
        "preemption_timer": can_set("pin_based_controls", "Activate VMX-preemption timer"),
        "posted_interrupts": can_set("pin_based_controls", "Process posted interrupts"),
        "virtual_nmis": can_set("pin_based_controls", "Virtual NMIs"),
        "tpr_shadow": can_set("primary_processor_based_controls", "Use TPR shadow"),
        "monitor_trap_flag": can_set("primary_processor_based_controls", "Monitor trap flag"),
        "apic_register_virtualization": can_set(secondary, "APIC-register virtualization"),
        "virtual_interrupt_delivery": can_set(secondary, "Virtual-interrupt delivery"),
        "vmcs_shadowing": can_set(secondary, "VMCS shadowing"),
        "pml": can_set(secondary, "Enable PML"),
        "tsc_scaling": can_set(secondary, "Use TSC scaling"),
        "mode_based_ept_exec": can_set(secondary, "Mode-based execute control for EPT"),
        "vm_functions": can_set(secondary, "Enable VM functions"),
        "eptp_switching": "EPTP switching" in decoded.get("vm_functions", {}).get("functions", []),
        "tertiary_controls": can_set("primary_processor_based_controls", "Activate tertiary controls"),
        "ipi_virtualization": can_set("tertiary_processor_based_controls", "IPI virtualization"),
    }


def _setting(may_be_0: bool, may_be_1: bool) -> str:
    if may_be_0 and may_be_1:
        return "flexible"
    if may_be_1:
        return "must_be_1"
    if may_be_0:
        return "must_be_0"
    return "inconsistent"
