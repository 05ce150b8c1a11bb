"""IA32_FEATURE_CONTROL (MSR 0x3A): has firmware allowed VMXON?

Reference: Intel SDM Vol. 3C, 24.7 ("Enabling and Entering VMX Operation")
and Vol. 4, Table 2-2. VMXON faults unless the lock bit is 1 and the
enable bit for the current mode (inside or outside SMX) is 1. Once locked,
the MSR cannot change until reset: a locked MSR with VMX off is what
"VT-x disabled in the BIOS" means.
"""

from __future__ import annotations

from ._bits import bit, field, hex64

IA32_FEATURE_CONTROL = 0x3A

FEATURE_CONTROL_BITS: dict[int, str] = {
    0: "Lock",
    1: "Enable VMX inside SMX operation",
    2: "Enable VMX outside SMX operation",
    15: "SENTER global enable",
    17: "SGX launch control enable",
    18: "SGX global enable",
    20: "LMCE on",
}


def decode_feature_control(value: int) -> dict:
    """Decode IA32_FEATURE_CONTROL and explain what it means for VMX."""
    lock = bit(value, 0)
    in_smx = bit(value, 1)
    outside_smx = bit(value, 2)
    if lock and outside_smx:
        state = "enabled"
        explanation = "VMX is enabled by firmware (IA32_FEATURE_CONTROL locked with VMX outside SMX on)."
    elif lock:
        state = "disabled_by_firmware"
        explanation = ("VMX is disabled by firmware: IA32_FEATURE_CONTROL is locked with "
                       "'VMX outside SMX' off. Enable 'Intel Virtualization Technology' "
                       "(VT-x) in the BIOS/UEFI setup and power-cycle; nothing can change "
                       "it until reset.")
    else:
        state = "unlocked"
        explanation = ("IA32_FEATURE_CONTROL is not locked: the kernel (kvm_intel) sets the "
                       "VMX enable bit and locks it itself, so VMX is usable.")
    return {
        "raw": hex64(value),
        "lock": lock,
        "vmx_inside_smx": in_smx,
        "vmx_outside_smx": outside_smx,
        "senter_local_functions": field(value, 8, 14),
        "senter_global": bit(value, 15),
        "sgx_launch_control": bit(value, 17),
        "sgx_global": bit(value, 18),
        "lmce": bit(value, 20),
        "state": state,
        "vmx_allowed": state != "disabled_by_firmware",
        "explanation": explanation,
    }
