"""AMD SVM decoding: CPUID Fn8000_000A from real AMD CPUs, and VM_CR.

Bit meanings: AMD APM Vol. 3, Appendix E.4.9 (Fn8000_000A_EDX) and Vol. 2,
15.30.1 (VM_CR). The expected features per CPU are the APM names of the
bits set in each recorded EDX, cross-checked with Linux's names for the
same bits (arch/x86/include/asm/cpufeatures.h word 15: npt lbrv svm_lock
nrip_save tsc_scale vmcb_clean flushbyasid decodeassists pausefilter
pfthreshold avic v_vmsave_vmload vgif x2avic v_spec_ctrl vnmi).
"""

import pytest
from capsfixtures import cpuid_fixture

from pyvt.caps import cpuid, svm

LINUX_NAME = {
    "NP": "npt", "LbrVirt": "lbrv", "SVML": "svm_lock", "NRIPS": "nrip_save", "TscRateMsr": "tsc_scale",
    "VmcbClean": "vmcb_clean", "FlushByAsid": "flushbyasid", "DecodeAssists": "decodeassists",
    "PauseFilter": "pausefilter", "PauseFilterThreshold": "pfthreshold", "AVIC": "avic",
    "VMSAVEvirt": "v_vmsave_vmload", "VGIF": "vgif", "x2AVIC": "x2avic", "SpecCtrl": "v_spec_ctrl",
    "VNMI": "vnmi",
}
# Bit positions Linux gives the names above (cpufeatures.h, word 15).
LINUX_BIT = {"npt": 0, "lbrv": 1, "svm_lock": 2, "nrip_save": 3, "tsc_scale": 4, "vmcb_clean": 5,
             "flushbyasid": 6, "decodeassists": 7, "pausefilter": 10, "pfthreshold": 12, "avic": 13,
             "v_vmsave_vmload": 15, "vgif": 16, "x2avic": 18, "v_spec_ctrl": 20, "vnmi": 25}

BASE = ["NP", "LbrVirt", "SVML", "NRIPS"]
K15 = BASE + ["TscRateMsr", "VmcbClean", "FlushByAsid", "DecodeAssists", "PauseFilter", "PauseFilterThreshold"]
ZEN2 = K15 + ["AVIC", "VMSAVEvirt", "VGIF", "GMET", "SpecCtrl"]
ZEN4 = K15 + ["AVIC", "VMSAVEvirt", "VGIF", "GMET", "x2AVIC", "SSSCheck", "SpecCtrl", "ROGPT",
              "HOST_MCE_OVERRIDE", "TlbiCtl", "VNMI", "IbsVirt", "ExtLvtAvicAccessChg", "NestedVirtVmcbAddrChk"]

# name -> (EDX as recorded, revision, NASID, features)
EXPECTED = {
    "amd_k10_deneb_phenom_ii_x4_940": (0x0000000F, 1, 64, BASE),
    "amd_k15_piledriver_a10_4600m": (0x00001CFF, 1, 65536, K15),
    "amd_k17_matisse_ryzen_9_pro_3900": (0x0013BCFF, 1, 32768, ZEN2),
    "amd_k19_genoa_epyc_9654": (0x1FBFBCFF, 1, 32768, ZEN4),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_svm_leaf(name):
    _, dump = cpuid_fixture(name)
    edx, revision, nasid, features = EXPECTED[name]
    assert dump[(0x8000000A, 0)][3] == edx
    d = cpuid.decode_cpuid(dump)["svm_features"]
    assert d["revision"] == revision
    assert d["nasid"] == nasid
    assert d["features"] == features
    # Bit 11 is set on every family-15h-and-later part here but is reserved in the APM.
    assert d["unknown_feature_bits"] == ([] if name.startswith("amd_k10") else [11])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_names_agree_with_linux_bit_positions(name):
    _, dump = cpuid_fixture(name)
    edx = dump[(0x8000000A, 0)][3]
    for apm in cpuid.decode_cpuid(dump)["svm_features"]["features"]:
        if apm in LINUX_NAME:
            assert edx >> LINUX_BIT[LINUX_NAME[apm]] & 1, apm


def test_svm_leaf_ignored_without_svm_flag():
    _, dump = cpuid_fixture("intel_haswell_i7_4770")
    dump = dict(dump)
    dump[(0x8000000A, 0)] = (1, 64, 0, 0xF)
    assert cpuid.decode_cpuid(dump)["svm_features"] is None


def test_headline_features():
    _, dump = cpuid_fixture("amd_k19_genoa_epyc_9654")
    f = svm.svm_features(cpuid.decode_cpuid(dump)["svm_features"])
    assert f["npt"] and f["nrip_save"] and f["vnmi"] and f["x2avic"] and f["decode_assists"]
    _, dump = cpuid_fixture("amd_k10_deneb_phenom_ii_x4_940")
    f = svm.svm_features(cpuid.decode_cpuid(dump)["svm_features"])
    assert f["npt"] and f["nrip_save"] and not f["vmcb_clean"] and not f["decode_assists"]
    assert svm.svm_features(None)["svm"] is False


# VM_CR values below are constructed from APM Vol. 2, 15.30.1 (bit 3 LOCK,
# bit 4 SVMDIS), not recorded: no published dump of this MSR was found.
@pytest.mark.parametrize("value, disabled, lock, svmdis", [
    (0x00, False, False, False),
    (0x08, False, True, False),
    (0x10, False, False, True),
    (0x18, True, True, True),
])
def test_vm_cr(value, disabled, lock, svmdis):
    d = svm.decode_vm_cr(value)
    assert (d["disabled_by_firmware"], d["lock"], d["svmdis"]) == (disabled, lock, svmdis)
    if disabled:
        assert "BIOS" in d["explanation"]
