"""The report on this machine, checked against what is true here.

Gated on /dev/kvm actually working (never on cpuinfo flags). The PVM
assertions hold on the project's machines (see shared/MACHINES.md) and
are skipped elsewhere.
"""

import json
import os
import pathlib

import pytest
from capsfixtures import PVM_HOST

from pyvt.caps import collect_report
from pyvt.caps import report as rep

SCHEMA = pathlib.Path(rep.__file__).with_name("report.schema.json")
PVM = PVM_HOST


def cpuinfo_flags() -> set:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


@pytest.fixture(scope="module")
def host_report(real_kvm):
    return collect_report(real_kvm)


def test_schema_valid(host_report):
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(json.loads(json.dumps(host_report)), json.loads(SCHEMA.read_text()))


def test_kvm_is_usable(host_report):
    k = host_report["kvm"]
    assert host_report["verdict"]["kvm_usable"] is True
    assert host_report["verdict"]["line"].startswith("KVM usable: yes, via ")
    assert k["status"] == "ok" and k["api_version"] == 12
    assert k["capabilities"]["KVM_CAP_USER_MEMORY"] == 1
    assert k["max_vcpus"] and k["max_memslots"]


def test_cpu_flags_agree_with_proc_cpuinfo(host_report):
    ours = set(host_report["host"]["cpu"]["flags"])
    theirs = cpuinfo_flags()
    for flag in ("vmx", "svm", "hypervisor", "lm", "nx", "pae", "sse2", "avx2", "avx512f", "x2apic"):
        assert (flag in ours) == (flag in theirs), flag


@pytest.mark.skipif(not PVM, reason="this machine's KVM is not PVM")
def test_pvm_detected(host_report):
    assert host_report["verdict"]["kind"] == "pvm"
    assert host_report["verdict"]["line"] == ("KVM usable: yes, via PVM (software-assisted KVM, kvm_pvm), "
                                              "no VT-x/AMD-V exposed to this machine")
    cpu = host_report["host"]["cpu"]
    assert cpu["vmx"] is False and cpu["svm"] is False
    assert cpu["hypervisor"]["present"] is True
    assert host_report["vmx"] is None and host_report["svm"] is None
    f = host_report["features"]
    assert f["pvm"] and f["kvm"] and not f["ept"] and not f["npt"] and not f["vmx"]
    assert "pvm_native" in host_report["kvm"]["module_parameters"]["kvm_pvm"]


@pytest.mark.skipif(not PVM, reason="capability values recorded in MACHINES.md for the PVM machines")
def test_capabilities_recorded_in_machines_md(host_report):
    caps = host_report["kvm"]["capabilities"]
    for name in ("IRQCHIP", "IOEVENTFD", "IRQFD", "IMMEDIATE_EXIT", "COALESCED_MMIO",
                 "DIRTY_LOG_RING", "X86_USER_SPACE_MSR", "SET_GUEST_DEBUG"):
        assert caps["KVM_CAP_" + name], name
    assert caps["KVM_CAP_SYNC_REGS"] == 7
    assert caps["KVM_CAP_MAX_VCPUS"] == 1024
    assert caps["KVM_CAP_NESTED_STATE"] == 0 and caps["KVM_CAP_TSC_CONTROL"] == 0


def test_sources_are_labelled(host_report):
    names = [s["name"] for s in host_report["sources"]]
    assert names[:6] == ["host_cpuid", "msr_device", "kvm_feature_msrs", "pyvt_hw_caps", "kvm",
                         "kvm_module_parameters"]
    by = {s["name"]: s for s in host_report["sources"]}
    assert by["host_cpuid"]["status"] == "ok" and by["kvm"]["status"] == "ok"
    if not os.path.exists("/dev/cpu/0/msr"):
        assert by["msr_device"]["status"] == "unavailable"
        assert "modprobe msr" in by["msr_device"]["detail"]


def test_supported_cpuid_decoded(host_report):
    sup = host_report["kvm"]["supported_cpuid"]
    if sup is None:
        pytest.skip("the KVM interface in use cannot read KVM_GET_SUPPORTED_CPUID: "
                    + str(host_report["kvm"]["query_errors"]))
    assert sup["entries"] > 0 and "lm" in sup["flags"]
    assert host_report["features"]["long_mode"] is True


def test_fallback_readers_without_the_extension(real_kvm, monkeypatch):
    """With pyvt.kvm unimportable (extension not built), CPUID comes from /dev/cpu/0/cpuid
    and KVM is asked through plain fcntl ioctls; the answers are the same."""
    if not os.access("/dev/cpu/0/cpuid", os.R_OK):
        pytest.skip("/dev/cpu/0/cpuid is not readable (cpuid module or root missing)")
    import sys

    from pyvt.caps import collect

    normal = collect.collect(real_kvm)
    import pyvt

    # Make "from pyvt import kvm" fail, as it does when the extension is not built.
    monkeypatch.setitem(sys.modules, "pyvt.kvm", None)
    monkeypatch.delattr(pyvt, "kvm", raising=False)
    fallback = collect.collect(real_kvm)
    assert fallback.host_cpuid_source == "/dev/cpu/0/cpuid"
    assert fallback.kvm.interface.startswith("fcntl fallback")
    assert fallback.host_cpuid[(1, 0)][2] == normal.host_cpuid[(1, 0)][2]  # same feature bits
    assert fallback.kvm.api_version == 12
    for name in ("KVM_CAP_IRQCHIP", "KVM_CAP_USER_MEMORY", "KVM_CAP_MAX_VCPUS"):
        assert fallback.kvm.capabilities[name] == normal.kvm.capabilities[name], name
    assert fallback.kvm.vcpu_mmap_size == normal.kvm.vcpu_mmap_size
