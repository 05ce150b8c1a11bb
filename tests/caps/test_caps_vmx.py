"""VMX capability MSR decoding, checked on recorded values from real Intel CPUs.

Each fixture holds the raw MSRs a VirtualBox release log printed on a bare
metal host, and VirtualBox's own reading of every bit printed under them.
The tests check that pyvt's SDM-named decode says the same thing.
"""

import pytest
from capsfixtures import VMX_FIXTURES, vmx_fixture

from pyvt.caps import vmx

# VirtualBox's HM names -> the SDM names pyvt uses, per section.
VBOX_TO_SDM = {
    "pin_based_controls": {
        "EXT_INT_EXIT": "External-interrupt exiting", "NMI_EXIT": "NMI exiting",
        "VIRTUAL_NMI": "Virtual NMIs", "PREEMPT_TIMER": "Activate VMX-preemption timer",
        "POSTED_INT": "Process posted interrupts",
    },
    "primary_processor_based_controls": {
        "INT_WINDOW_EXIT": "Interrupt-window exiting", "USE_TSC_OFFSETTING": "Use TSC offsetting",
        "HLT_EXIT": "HLT exiting", "INVLPG_EXIT": "INVLPG exiting", "MWAIT_EXIT": "MWAIT exiting",
        "RDPMC_EXIT": "RDPMC exiting", "RDTSC_EXIT": "RDTSC exiting", "CR3_LOAD_EXIT": "CR3-load exiting",
        "CR3_STORE_EXIT": "CR3-store exiting", "USE_TERTIARY_CTLS": "Activate tertiary controls",
        "CR8_LOAD_EXIT": "CR8-load exiting", "CR8_STORE_EXIT": "CR8-store exiting",
        "USE_TPR_SHADOW": "Use TPR shadow", "NMI_WINDOW_EXIT": "NMI-window exiting",
        "MOV_DR_EXIT": "MOV-DR exiting", "UNCOND_IO_EXIT": "Unconditional I/O exiting",
        "USE_IO_BITMAPS": "Use I/O bitmaps", "MONITOR_TRAP_FLAG": "Monitor trap flag",
        "USE_MSR_BITMAPS": "Use MSR bitmaps", "MONITOR_EXIT": "MONITOR exiting",
        "PAUSE_EXIT": "PAUSE exiting", "USE_SECONDARY_CTLS": "Activate secondary controls",
    },
    "secondary_processor_based_controls": {
        "VIRT_APIC_ACCESS": "Virtualize APIC accesses", "EPT": "Enable EPT",
        "DESC_TABLE_EXIT": "Descriptor-table exiting", "RDTSCP": "Enable RDTSCP",
        "VIRT_X2APIC_MODE": "Virtualize x2APIC mode", "VPID": "Enable VPID",
        "WBINVD_EXIT": "WBINVD exiting", "UNRESTRICTED_GUEST": "Unrestricted guest",
        "APIC_REG_VIRT": "APIC-register virtualization", "VIRT_INT_DELIVERY": "Virtual-interrupt delivery",
        "PAUSE_LOOP_EXIT": "PAUSE-loop exiting", "RDRAND_EXIT": "RDRAND exiting",
        "INVPCID": "Enable INVPCID", "VMFUNC": "Enable VM functions", "VMCS_SHADOWING": "VMCS shadowing",
        "ENCLS_EXIT": "Enable ENCLS exiting", "RDSEED_EXIT": "RDSEED exiting", "PML": "Enable PML",
        "EPT_VE": "EPT-violation #VE", "EPT_XCPT_VE": "EPT-violation #VE",
        "CONCEAL_VMX_FROM_PT": "Conceal VMX from PT", "XSAVES_XRSTORS": "Enable XSAVES/XRSTORS",
        "PASID_TRANSLATE": "PASID translation", "MODE_BASED_EPT_PERM": "Mode-based execute control for EPT",
        "SPPTP_EPT": "Sub-page write permissions for EPT", "SPP_EPT": "Sub-page write permissions for EPT",
        "PT_EPT": "Intel PT uses guest physical addresses", "TSC_SCALING": "Use TSC scaling",
        "USER_WAIT_PAUSE": "Enable user wait and pause", "PCONFIG": "Enable PCONFIG",
        "ENCLV_EXIT": "Enable ENCLV exiting", "BUS_LOCK_DETECT": "VMM bus-lock detection",
        "INSTR_TIMEOUT": "Instruction timeout",
    },
    "vm_entry_controls": {
        "LOAD_DEBUG": "Load debug controls", "IA32E_MODE_GUEST": "IA-32e mode guest",
        "ENTRY_TO_SMM": "Entry to SMM", "DEACTIVATE_DUAL_MON": "Deactivate dual-monitor treatment",
        "LOAD_PERF_MSR": "Load IA32_PERF_GLOBAL_CTRL", "LOAD_PAT_MSR": "Load IA32_PAT",
        "LOAD_EFER_MSR": "Load IA32_EFER", "LOAD_BNDCFGS_MSR": "Load IA32_BNDCFGS",
        "CONCEAL_VMX_FROM_PT": "Conceal VMX from PT", "LOAD_RTIT_CTL_MSR": "Load IA32_RTIT_CTL",
        "LOAD_UINV": "Load UINV", "LOAD_CET_STATE": "Load CET state",
        "LOAD_LBR_CTL_MSR": "Load guest IA32_LBR_CTL", "LOAD_PKRS_MSR": "Load PKRS",
    },
    "vm_exit_controls": {
        "SAVE_DEBUG": "Save debug controls", "HOST_ADDR_SPACE_SIZE": "Host address-space size",
        "LOAD_PERF_MSR": "Load IA32_PERF_GLOBAL_CTRL", "ACK_EXT_INT": "Acknowledge interrupt on exit",
        "SAVE_PAT_MSR": "Save IA32_PAT", "LOAD_PAT_MSR": "Load IA32_PAT", "SAVE_EFER_MSR": "Save IA32_EFER",
        "LOAD_EFER_MSR": "Load IA32_EFER", "SAVE_PREEMPT_TIMER": "Save VMX-preemption timer value",
        "CLEAR_BNDCFGS_MSR": "Clear IA32_BNDCFGS", "CONCEAL_VMX_FROM_PT": "Conceal VMX from PT",
        "CLEAR_RTIT_CTL_MSR": "Clear IA32_RTIT_CTL", "CLEAR_LBR_CTL_MSR": "Clear IA32_LBR_CTL",
        "CLEAR_UINV": "Clear UINV", "LOAD_CET_STATE": "Load CET state", "LOAD_PKRS_MSR": "Load PKRS",
        "SAVE_PERF_MSR": "Save IA32_PERF_GLOBAL_CTL",
    },
}

VBOX_EPT = {
    "RWX_X_ONLY": "Execute-only EPT translations", "PAGE_WALK_LENGTH_4": "Page-walk length 4",
    "EMT_UC": "EPT paging-structure memory type UC", "MEMTYPE_UC": "EPT paging-structure memory type UC",
    "EMT_WB": "EPT paging-structure memory type WB", "MEMTYPE_WB": "EPT paging-structure memory type WB",
    "PDE_2M": "EPT 2-MByte pages", "PDPTE_1G": "EPT 1-GByte pages", "INVEPT": "INVEPT",
    "EPT_ACCESS_DIRTY": "EPT accessed and dirty flags",
    "ADVEXITINFO_EPT": "Advanced VM-exit information for EPT violations",
    "INVEPT_SINGLE_CONTEXT": "Single-context INVEPT", "INVEPT_ALL_CONTEXTS": "All-context INVEPT",
    "INVVPID": "INVVPID", "INVVPID_INDIV_ADDR": "Individual-address INVVPID",
    "INVVPID_SINGLE_CONTEXT": "Single-context INVVPID", "INVVPID_ALL_CONTEXTS": "All-context INVVPID",
    "INVVPID_SINGLE_CONTEXT_RETAIN_GLOBALS": "Single-context-retaining-globals INVVPID",
}

NON_TRUE_MSR = {
    "pin_based_controls": (vmx.IA32_VMX_PINBASED_CTLS, vmx.PIN_BASED_CONTROLS),
    "primary_processor_based_controls": (vmx.IA32_VMX_PROCBASED_CTLS, vmx.PRIMARY_PROCESSOR_BASED_CONTROLS),
    "secondary_processor_based_controls": (vmx.IA32_VMX_PROCBASED_CTLS2, vmx.SECONDARY_PROCESSOR_BASED_CONTROLS),
    "vm_entry_controls": (vmx.IA32_VMX_ENTRY_CTLS, vmx.VM_ENTRY_CONTROLS),
    "vm_exit_controls": (vmx.IA32_VMX_EXIT_CTLS, vmx.VM_EXIT_CONTROLS),
}


def parse_vbox_line(line: str) -> tuple[str, str]:
    """'CR3_LOAD_EXIT (must be set)' -> ('CR3_LOAD_EXIT', 'must_be_1')."""
    if line.endswith(" (must be set)"):
        return line[: -len(" (must be set)")], "must_be_1"
    if line.endswith(" (must be cleared)"):
        return line[: -len(" (must be cleared)")], "must_be_0"
    return line, "may_be_1"


@pytest.mark.parametrize("name", VMX_FIXTURES)
@pytest.mark.parametrize("section", sorted(NON_TRUE_MSR))
def test_controls_match_virtualbox_reading(name, section):
    """Every control VirtualBox names reads the same in pyvt's SDM-named decode."""
    doc, msrs = vmx_fixture(name)
    index, names = NON_TRUE_MSR[section]
    decoded = {c["name"]: c for c in vmx.decode_controls(msrs[index], names)["controls"]}
    for line in doc["vbox_decoded"][section]:
        vbox_name, what = parse_vbox_line(line)
        control = decoded[VBOX_TO_SDM[section][vbox_name]]
        if what == "must_be_1":
            assert control["allowed_1"] and not control["allowed_0"], line
        elif what == "must_be_0":
            assert not control["allowed_1"], line
        else:
            assert control["allowed_1"], line


@pytest.mark.parametrize("name", VMX_FIXTURES)
def test_controls_virtualbox_did_not_list_are_not_allowed(name):
    """Controls absent from VirtualBox's list (it prints all the allowed ones) are not allowed."""
    doc, msrs = vmx_fixture(name)
    for section, (index, names) in NON_TRUE_MSR.items():
        listed = {VBOX_TO_SDM[section][parse_vbox_line(line)[0]] for line in doc["vbox_decoded"][section]}
        for c in vmx.decode_controls(msrs[index], names)["controls"]:
            if c["name"] not in listed:
                assert not c["allowed_1"], (section, c["name"])


@pytest.mark.parametrize("name", VMX_FIXTURES)
def test_basic(name):
    doc, msrs = vmx_fixture(name)
    want = doc["vbox_decoded"]["basic"]
    basic = vmx.decode_basic(msrs[vmx.IA32_VMX_BASIC])
    assert basic["vmcs_revision_id"] == want["vmcs_id"]
    assert basic["vmcs_region_size"] == want["vmcs_size"]
    assert basic["physical_address_width_32bit"] is want["phys_addr_limit_32bit"]
    assert basic["vmcs_memory_type"] == want["memory_type"]
    assert basic["dual_monitor_smm"] is want["dual_monitor"]
    assert basic["ins_outs_exit_information"] is want["ins_outs_info"]
    assert basic["true_controls"] is want["true_controls"]
    assert basic["hardware_exception_without_error_code"] is want["xcpt_error_code_optional"]


@pytest.mark.parametrize("name", VMX_FIXTURES)
def test_misc(name):
    doc, msrs = vmx_fixture(name)
    want = doc["vbox_decoded"]["misc"]
    misc = vmx.decode_misc(msrs[vmx.IA32_VMX_MISC])
    assert misc["preemption_timer_tsc_shift"] == want["preempt_timer_tsc"]
    assert misc["store_efer_lma_on_exit"] is want["exit_save_efer_lma"]
    assert misc["activity_states"] == ["HLT", "shutdown", "wait-for-SIPI"]
    assert want["activity_states"] == ["HLT", "SHUTDOWN", "SIPI_WAIT"]
    assert misc["intel_pt_in_vmx"] is want["intel_pt"]
    assert misc["rdmsr_smbase_in_smm"] is want["smm_read_smbase_msr"]
    assert misc["cr3_target_count"] == want["cr3_target"]
    assert misc["max_msr_list_entries"] == want["max_msr"]
    assert misc["vmxoff_blocks_smi"] is want["vmxoff_block_smi"]
    assert misc["vmwrite_any_field"] is want["vmwrite_all"]
    assert misc["inject_zero_length_instruction"] is want["entry_inject_soft_int"]
    assert misc["mseg_revision_id"] == want["mseg_id"]


@pytest.mark.parametrize("name", VMX_FIXTURES)
def test_ept_vpid_and_vmfunc(name):
    doc, msrs = vmx_fixture(name)
    decoded = vmx.decode_vmx(msrs)
    want = [VBOX_EPT[n] for n in doc["vbox_decoded"]["ept_vpid"]]
    assert decoded["ept_vpid"]["capabilities"] == sorted(want, key=list(vmx.EPT_VPID_CAPABILITIES.values()).index)
    assert decoded["ept_vpid"]["unknown_bits"] == []
    if doc["vbox_decoded"]["vmfunc"] is None:
        assert "vm_functions" not in decoded
    else:
        assert decoded["vm_functions"]["functions"] == ["EPTP switching"]
    assert decoded["vmcs_enum"]["highest_index"] == doc["vbox_decoded"]["vmcs_enum_highest_idx"]


@pytest.mark.parametrize("name", VMX_FIXTURES)
def test_cr_fixed_bits(name):
    """SDM A.7/A.8: PE, NE, PG forced on in CR0 and VMXE in CR4, on every VMX CPU so far."""
    _, msrs = vmx_fixture(name)
    decoded = vmx.decode_vmx(msrs)
    assert decoded["cr0_fixed"]["must_be_1"] == ["PE", "NE", "PG"]
    assert decoded["cr0_fixed"]["must_be_0"] == []
    assert decoded["cr4_fixed"]["must_be_1"] == ["VMXE"]
    assert "VMXE" not in decoded["cr4_fixed"]["flexible"]


def test_true_controls_let_the_default1_bits_go():
    """With BASIC[55]=1, TRUE_PROCBASED lets CR3-load/store exiting be 0 (SDM A.3.2)."""
    _, msrs = vmx_fixture("intel_coffee_lake_i7_9750h_vbox61")
    decoded = vmx.decode_vmx(msrs)
    primary = {c["name"]: c for c in decoded["primary_processor_based_controls"]["controls"]}
    assert primary["CR3-load exiting"]["setting"] == "flexible"
    assert primary["CR3-store exiting"]["setting"] == "flexible"
    assert decoded["primary_processor_based_controls"]["true_raw"] == "0xfff9fffe04006172"
    entry = {c["name"]: c for c in decoded["vm_entry_controls"]["controls"]}
    exit_ = {c["name"]: c for c in decoded["vm_exit_controls"]["controls"]}
    assert entry["Load debug controls"]["setting"] == "flexible"  # TRUE_ENTRY low bit 2 clear
    assert exit_["Save debug controls"]["setting"] == "flexible"
    # Without the TRUE MSR the same control is forced on.
    plain = vmx.decode_controls(msrs[vmx.IA32_VMX_PROCBASED_CTLS], vmx.PRIMARY_PROCESSOR_BASED_CONTROLS)
    assert {c["name"]: c["setting"] for c in plain["controls"]}["CR3-load exiting"] == "must_be_1"


def test_headline_features():
    _, coffee = vmx_fixture("intel_coffee_lake_i7_9750h_vbox61")
    _, ivy = vmx_fixture("intel_ivy_bridge_306a9_vbox72")
    f = vmx.decode_vmx(coffee)["features"]
    assert f["ept"] and f["vpid"] and f["unrestricted_guest"] and f["ept_ad_bits"] and f["ept_1g_pages"]
    assert f["pml"] and f["eptp_switching"] and f["vm_functions"] and f["preemption_timer"]
    assert not f["posted_interrupts"] and not f["vmcs_shadowing"] and not f["tsc_scaling"]
    assert not f["apic_register_virtualization"] and not f["tertiary_controls"]
    g = vmx.decode_vmx(ivy)["features"]
    assert g["ept"] and g["vpid"] and g["unrestricted_guest"]
    assert not g["ept_ad_bits"] and not g["ept_1g_pages"] and not g["pml"] and not g["vm_functions"]


def test_existence_rules_drop_msrs_that_cannot_exist():
    """SDM A.10/A.11: EPT_VPID_CAP needs EPT or VPID, VMFUNC needs 'enable VM functions'."""
    _, msrs = vmx_fixture("intel_ivy_bridge_306a9_vbox72")
    msrs = dict(msrs)
    msrs[vmx.IA32_VMX_VMFUNC] = 1  # Ivy Bridge cannot set "enable VM functions"
    assert "vm_functions" not in vmx.decode_vmx(msrs)
    msrs[vmx.IA32_VMX_PROCBASED_CTLS2] = 0  # neither EPT nor VPID
    assert "ept_vpid" not in vmx.decode_vmx(msrs)
    basic_only = {vmx.IA32_VMX_BASIC: msrs[vmx.IA32_VMX_BASIC] & ~(1 << 55),
                  vmx.IA32_VMX_PINBASED_CTLS: 0x7f00000016, vmx.IA32_VMX_TRUE_PINBASED_CTLS: 0}
    assert vmx.decode_vmx(basic_only)["pin_based_controls"]["true_raw"] is None


def test_tertiary_controls_constructed_from_sdm():
    """Not a recorded value: a CTLS3 built from SDM Table 25-8 (bit 4 = IPI virtualization).

    The recorded CPUs predate tertiary controls (Ivy Bridge's log says
    'USE_TERTIARY_CTLS (must be cleared)'), so this checks the 64-bit
    allowed-1 layout of SDM A.3.4 on a value made for the purpose.
    """
    _, msrs = vmx_fixture("intel_coffee_lake_i7_9750h_vbox61")
    msrs = dict(msrs)
    msrs[vmx.IA32_VMX_PROCBASED_CTLS] |= 1 << (32 + 17)
    msrs[vmx.IA32_VMX_TRUE_PROCBASED_CTLS] |= 1 << (32 + 17)
    msrs[vmx.IA32_VMX_PROCBASED_CTLS3] = (1 << 4) | (1 << 40)
    decoded = vmx.decode_vmx(msrs)
    tert = decoded["tertiary_processor_based_controls"]
    assert {c["name"] for c in tert["controls"] if c["allowed_1"]} == {"IPI virtualization"}
    assert tert["unknown_allowed_1_bits"] == [40]
    assert decoded["features"]["ipi_virtualization"] and decoded["features"]["tertiary_controls"]


def test_no_basic_msr_means_no_vmx():
    assert vmx.decode_vmx({}) == {"present": False}


def test_msr_indices_are_the_sdm_ones():
    assert vmx.MSR_INDICES["IA32_VMX_BASIC"] == 0x480
    assert vmx.MSR_INDICES["IA32_VMX_PROCBASED_CTLS2"] == 0x48B
    assert vmx.MSR_INDICES["IA32_VMX_TRUE_ENTRY_CTLS"] == 0x490
    assert vmx.MSR_INDICES["IA32_VMX_VMFUNC"] == 0x491
    assert vmx.MSR_INDICES["IA32_VMX_PROCBASED_CTLS3"] == 0x492


def _norm(name: str) -> str:
    return " ".join(name.lower().replace("-", " ").split())


# Where the module's printed name differs from the SDM's by more than case and hyphens.
PRINTED_ALIASES = {"virtualize apic access": "Virtualize APIC accesses"}


def test_nested_kvm_l1_values_match_their_can_set_can_clear_reading():
    """VMX MSRs as nested KVM shows them to an L1 guest, decoded by an independent module.

    Source: github.com/jasonliu96/linux cmpe283/MODULE_OUTPUT.md (see the fixture).
    """
    doc, msrs = vmx_fixture("nested_kvm_l1_cmpe283")
    sections = {section: (index, names) for section, (index, names) in NON_TRUE_MSR.items()}
    checked = 0
    for section, rows in doc["decoded"].items():
        index, names = sections[section]
        ours = {_norm(c["name"]): c for c in vmx.decode_controls(msrs[index], names)["controls"]}
        for printed, can_set, can_clear in rows:
            key = _norm(PRINTED_ALIASES.get(_norm(printed), printed))
            assert ours[key]["allowed_1"] is can_set, (section, printed)
            assert ours[key]["allowed_0"] is can_clear, (section, printed)
            checked += 1
    assert checked == 5 + 21 + 27 + 14 + 12  # every control the module printed
    # Without IA32_VMX_BASIC nothing else can be decoded, and nothing is invented.
    assert vmx.decode_vmx(msrs) == {"present": False}
