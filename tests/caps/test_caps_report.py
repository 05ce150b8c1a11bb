"""Report assembly from recorded data: verdict, sources, features, --require, schema."""

import datetime
import json
import pathlib

import pytest
from capsfixtures import cpuid_fixture, vmx_fixture

from pyvt._kvm import lib as uapi
from pyvt.caps import report as rep
from pyvt.caps.feature_control import IA32_FEATURE_CONTROL
from pyvt.caps.report import (
    KvmRaw,
    RawCaps,
    build_report,
    evaluate_requirements,
    exit_status,
    render_text,
)
from pyvt.caps.svm import MSR_VM_CR

SCHEMA = pathlib.Path(rep.__file__).with_name("report.schema.json")
NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)

GOOD_CAPS = {"KVM_CAP_IRQCHIP": 1, "KVM_CAP_MAX_VCPUS": 1024, "KVM_CAP_NR_VCPUS": 2,
             "KVM_CAP_NR_MEMSLOTS": 32764, "KVM_CAP_SET_GUEST_DEBUG": 1, "KVM_CAP_NESTED_STATE": 0,
             "KVM_CAP_IOEVENTFD": 1}
KVM_SIG = (0x40000001, 0x4B4D564B, 0x564B4D56, 0x4D)


def ok_kvm(**kw) -> KvmRaw:
    supported = {(0x80000000, 0): (0x80000001, 0, 0, 0), (0x80000001, 0): (0, 0, 0, 1 << 29)}
    return KvmRaw(device="/dev/kvm", status="ok", api_version=12, capabilities=dict(GOOD_CAPS),
                  supported_cpuid=supported, interface="test", **kw)


def missing_kvm() -> KvmRaw:
    return KvmRaw(device="/dev/kvm", status="missing", error="/dev/kvm: No such file or directory", errno=2)


def intel_host(**kw) -> RawCaps:
    _, dump = cpuid_fixture("intel_haswell_i7_4770")
    _, msrs = vmx_fixture("intel_coffee_lake_i7_9750h_vbox61")
    raw = RawCaps(kvm=ok_kvm(), host_cpuid=dump, host_cpuid_source="test", msr_device=msrs,
                  modules={"kvm": {}, "kvm_intel": {"ept": "Y", "nested": "N"}}, kernel="6.1.0")
    for k, v in kw.items():
        setattr(raw, k, v)
    return raw


def pvm_host() -> RawCaps:
    """Shaped like the project's machines: KVM signature in CPUID, no VMX/SVM, kvm_pvm loaded."""
    _, dump = cpuid_fixture("intel_sapphire_rapids")
    dump = dict(dump)
    eax, ebx, ecx, edx = dump[(1, 0)]
    dump[(1, 0)] = (eax, ebx, (ecx & ~(1 << 5)) | (1 << 31), edx)
    dump[(0x40000000, 0)] = KVM_SIG
    return RawCaps(kvm=ok_kvm(), host_cpuid=dump, host_cpuid_source="test",
                   msr_device_error="/dev/cpu/0/msr: No such file or directory",
                   modules={"kvm": {"halt_poll_ns": "200000"}, "kvm_pvm": {"pvm_native": "Y"}})


def validate(report: dict) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(json.loads(json.dumps(report)), schema)


def test_intel_bare_metal():
    r = build_report(intel_host(), now=NOW)
    validate(r)
    assert r["schema_version"] == 1
    assert r["verdict"]["line"] == "KVM usable: yes, via Intel VT-x (kvm_intel), VT-x exposed to this machine"
    assert r["verdict"]["kind"] == "vmx"
    assert r["vmx"]["source"] == "msr_device"
    assert r["vmx"]["feature_control"]["state"] == "enabled"
    f = r["features"]
    assert f["ept"] and f["vpid"] and f["unrestricted_guest"] and f["irqchip"] and f["smp"] and f["long_mode"]
    assert f["npt"] is False and f["pvm"] is False and f["nested_state"] is False
    assert f["real_mode"] is None  # only the probe can tell
    assert exit_status(r) == 0
    assert render_text(r).startswith("KVM usable: yes, via Intel VT-x")


def test_pvm_machine():
    r = build_report(pvm_host(), now=NOW)
    validate(r)
    assert r["verdict"]["line"] == ("KVM usable: yes, via PVM (software-assisted KVM, kvm_pvm), "
                                    "no VT-x/AMD-V exposed to this machine")
    assert r["host"]["cpu"]["hypervisor"]["name"] == "KVM"
    assert r["vmx"] is None and r["svm"] is None
    assert r["features"]["pvm"] and not r["features"]["ept"] and not r["features"]["npt"]
    assert r["features"]["nested"] is False
    sources = {s["name"]: s["status"] for s in r["sources"]}
    assert sources["msr_device"] == "unavailable" and sources["kvm"] == "ok"
    assert sources["kvm_module_parameters"] == "ok"
    assert r["kvm"]["module_parameters"]["kvm_pvm"] == {"pvm_native": "Y"}


def test_vmx_disabled_by_firmware():
    raw = intel_host(kvm=missing_kvm(), modules={})
    raw.msr_device = dict(raw.msr_device)
    raw.msr_device[IA32_FEATURE_CONTROL] = 0x1
    r = build_report(raw, now=NOW)
    validate(r)
    assert r["verdict"]["line"].startswith("KVM usable: no, /dev/kvm does not exist")
    assert any("disabled by firmware" in p for p in r["verdict"]["problems"])
    assert any("modprobe kvm_intel" in p for p in r["verdict"]["problems"])
    assert r["features"]["kvm"] is False and r["features"]["irqchip"] is False
    assert exit_status(r) == 1


def test_svm_disabled_by_firmware():
    _, dump = cpuid_fixture("amd_k19_genoa_epyc_9654")
    raw = RawCaps(kvm=missing_kvm(), host_cpuid=dump, host_cpuid_source="test",
                  msr_device={MSR_VM_CR: 0x18})
    r = build_report(raw, now=NOW)
    validate(r)
    assert r["svm"]["cpuid"]["nasid"] == 32768
    assert r["svm"]["vm_cr"]["disabled_by_firmware"]
    assert r["features"]["npt"] is True
    assert any("SVM is disabled by firmware" in p for p in r["verdict"]["problems"])
    assert "AMD-V exposed" in r["verdict"]["line"]


def test_permission_denied():
    raw = pvm_host()
    raw.kvm = KvmRaw(device="/dev/kvm", status="permission_denied", error="/dev/kvm: Permission denied", errno=13)
    r = build_report(raw, now=NOW)
    validate(r)
    assert r["verdict"]["line"].startswith("KVM usable: no, no permission to open /dev/kvm")
    assert any("kvm" in p for p in r["verdict"]["problems"])
    assert exit_status(r) == 1


def test_source_precedence_and_labels():
    """/dev/pyvt's raw values win over /dev/cpu/N/msr, which wins over KVM's feature MSRs."""
    _, coffee = vmx_fixture("intel_coffee_lake_i7_9750h_vbox61")
    _, ivy = vmx_fixture("intel_ivy_bridge_306a9_vbox72")
    raw = intel_host(msr_device=ivy, kvm_feature_msrs=ivy,
                     pyvt_hw_caps={"msrs": {f"0x{k:x}": v for k, v in coffee.items()}})
    r = build_report(raw, now=NOW)
    validate(r)
    assert r["vmx"]["source"] == "pyvt_hw_caps"
    assert r["vmx"]["basic"]["vmcs_revision_id"] == 4  # Coffee Lake's, not Ivy Bridge's 16
    raw.pyvt_hw_caps = None
    assert build_report(raw, now=NOW)["vmx"]["source"] == "msr_device"
    raw.msr_device = None
    r = build_report(raw, now=NOW)
    assert r["vmx"]["source"] == "kvm_feature_msrs"
    assert r["vmx"]["feature_control"] is None  # KVM's feature MSRs are not the host's lock state
    named = {"IA32_VMX_BASIC": coffee[0x480], "IA32_VMX_PINBASED_CTLS": coffee[0x481]}
    raw.pyvt_hw_caps = {"msrs": named}
    assert build_report(raw, now=NOW)["vmx"]["pin_based_controls"]["raw"] == "0x0000007f00000016"


def test_cpuid_says_vmx_but_no_msrs():
    raw = intel_host(msr_device=None, msr_device_error="/dev/cpu/0/msr: No such file or directory")
    r = build_report(raw, now=NOW)
    validate(r)
    assert r["vmx"]["source"] is None and "msr module" in r["vmx"]["note"]
    assert r["features"]["ept"] is True  # from kvm_intel's ept=Y parameter


@pytest.mark.parametrize("required, satisfied, missing", [
    (["kvm", "irqchip", "smp", "long_mode"], True, []),
    (["ept", "unrestricted_guest"], False, ["ept", "unrestricted_guest"]),
    (["KVM_CAP_IRQCHIP", "KVM_CAP_NESTED_STATE"], False, ["KVM_CAP_NESTED_STATE"]),
    (["no_such_thing"], False, ["no_such_thing"]),
    (["real-mode"], False, ["real-mode"]),
])
def test_requirements_on_pvm(required, satisfied, missing):
    r = build_report(pvm_host(), require=required, now=NOW)
    validate(r)
    req = r["requirements"]
    assert req["satisfied"] is satisfied and req["missing"] == missing
    assert exit_status(r) == (0 if satisfied else 1)
    if "no_such_thing" in required:
        assert req["unknown_names"] == ["no_such_thing"]
    if "real-mode" in required:
        assert req["undetermined"] == ["real-mode"]  # needs the probe
    text = render_text(r)
    assert ("Requirements: all met" in text) is satisfied


def test_probe_results_decide_probe_features():
    raw = pvm_host()
    raw.probe = [{"name": "real_mode", "status": "ok", "detail": ""},
                 {"name": "single_step", "status": "unsupported", "detail": "no API"},
                 {"name": "long_mode", "status": "failed", "detail": "InternalError"}]
    r = build_report(raw, require=["real_mode", "single_step", "long_mode"], now=NOW)
    validate(r)
    assert r["features"]["real_mode"] is True
    assert r["features"]["single_step"] is False
    assert r["features"]["long_mode"] is False  # the probe overrides the CPUID guess
    assert r["requirements"]["missing"] == ["single_step", "long_mode"]
    assert "Probe (tiny guests)" in render_text(r)


def test_evaluate_requirements_directly():
    req = evaluate_requirements({"ept": True, "smp": None}, {"KVM_CAP_IRQCHIP": 1}, ["ept", "SMP", "kvm_cap_irqchip"])
    assert req["missing"] == ["SMP"] and req["undetermined"] == ["SMP"]


def hw_caps_struct(msrs: dict, cpus: int = 2) -> dict:
    """A PYVT_GET_HW_CAPS result in the ioctl's own shape (kernel_module/include/uapi/pyvt.h)."""
    cpu = {"flags": uapi.PYVT_CPU_CAPS_VMX_VALID, "feat_ecx": 1 << 5, "ext_ecx": 0,
           "svm_eax": 0, "svm_ebx": 0, "svm_ecx": 0, "svm_edx": 0, "vm_cr": 0,
           "feature_control": msrs[IA32_FEATURE_CONTROL],
           "vmx_msrs": [msrs.get(0x480 + i, 0) for i in range(18)]}
    return {"abi_version": 1, "vendor": 2, "max_cpus": cpus, "nr_cpus": cpus, "npt_levels": 4,
            "cpus": [dict(cpu, cpu=i) for i in range(cpus)]}


def test_pyvt_hw_caps_struct_shape():
    _, coffee = vmx_fixture("intel_coffee_lake_i7_9750h_vbox61")
    raw = intel_host(msr_device=None, pyvt_hw_caps=hw_caps_struct(coffee))
    raw.kvm.device = "/dev/pyvt"
    r = build_report(raw, now=NOW)
    validate(r)
    assert r["verdict"]["kind"] == "pyvt"
    assert r["vmx"]["source"] == "pyvt_hw_caps"
    assert r["vmx"]["feature_control"]["source"] == "pyvt_hw_caps"
    assert r["vmx"]["features"]["ept"] and r["vmx"]["ept_vpid"]["capabilities"]
    hw = r["host"]["pyvt_hw_caps"]
    assert hw == {"abi_version": 1, "vendor": "Intel", "nr_cpus": 2, "cpus_reported": 2, "npt_levels": 4,
                  "cpus_consistent": True, "differing_cpus": []}
    assert "/dev/pyvt: ABI 1, Intel, 2 CPUs (all report the same registers)" in render_text(r)


def test_pyvt_hw_caps_cpus_that_disagree():
    """Firmware that enabled VMX on some cores only: the CPUs that differ are named."""
    _, coffee = vmx_fixture("intel_coffee_lake_i7_9750h_vbox61")
    hw = hw_caps_struct(coffee, cpus=4)
    hw["cpus"][2]["feature_control"] = 0x1
    raw = intel_host(pyvt_hw_caps=hw)
    r = build_report(raw, now=NOW)
    validate(r)
    assert r["host"]["pyvt_hw_caps"]["differing_cpus"] == [2]
    assert any("CPUs 2 differ from CPU 0" in p for p in r["verdict"]["problems"])


def test_module_parameters_can_turn_hardware_features_off():
    """kvm_intel ept=N: the CPU has EPT, but KVM guests do not get it."""
    raw = intel_host(modules={"kvm": {}, "kvm_intel": {"ept": "N", "unrestricted_guest": "N", "nested": "N"}})
    f = build_report(raw, now=NOW)["features"]
    assert f["ept"] is False and f["unrestricted_guest"] is False and f["vpid"] is True
    assert f["nested"] is False
    raw.modules["kvm_intel"]["nested"] = "Y"
    assert build_report(raw, now=NOW)["features"]["nested"] is True
