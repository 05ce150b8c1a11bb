"""``pyvt caps --hw-caps-json FILE``: the report from a PYVT_GET_HW_CAPS dump.

The dump is what ``kernel_module/tests/hwcaps_json`` prints inside the Bochs
test VM (which is too slow for Python), in the shape of
``pyvt.kvm.Kvm.get_hw_caps()``. Here it is written from the published
Ivy Bridge VMX registers (EPT, VPID and unrestricted guest, like the
Haswell model Bochs emulates) and the Haswell i7-4770's CPUID leaf 1.
"""

import io
import json
import os
import pathlib

import pytest
from capsfixtures import cpuid_fixture, vmx_fixture

from pyvt._kvm import lib as uapi
from pyvt.caps import report as rep
from pyvt.caps.cli import main
from pyvt.caps.feature_control import IA32_FEATURE_CONTROL

SCHEMA = pathlib.Path(rep.__file__).with_name("report.schema.json")
CPUS = 2
#: What hwcaps_json printed inside kernel_module/tests/run-in-bochs (Bochs 2.7,
#: cpu model corei7_haswell_4770, 2 CPUs), cut from the serial log as the script does.
BOCHS_DUMP = pathlib.Path(__file__).parent / "fixtures" / "hw_caps" / "bochs_corei7_haswell_4770.json"


def hwcaps_json_text(abi_version: int = 1, nr_msrs: int = 18) -> str:
    """The dump as hwcaps_json.c prints it: decimal integers, one CPU a line."""
    _, msrs = vmx_fixture("intel_ivy_bridge_306a9_vbox72")
    _, cpuid = cpuid_fixture("intel_haswell_i7_4770")
    lines = [f'{{"abi_version": {abi_version}, "vendor": 2, "nr_cpus": {CPUS}, "npt_levels": 4, "cpus": [']
    for cpu in range(CPUS):
        vmx = ", ".join(str(msrs.get(0x480 + i, 0)) for i in range(nr_msrs))
        lines.append(
            f'  {{"cpu": {cpu}, "flags": {uapi.PYVT_CPU_CAPS_VMX_VALID}, "ext_ecx": {cpuid[(0x80000001, 0)][2]},'
            f' "feat_ecx": {cpuid[(1, 0)][2]}, "svm_eax": 0, "svm_ebx": 0, "svm_ecx": 0, "svm_edx": 0,'
            f' "vm_cr": 0, "feature_control": {msrs[IA32_FEATURE_CONTROL]}, "vmx_msrs": [{vmx}]}}'
            + ("," if cpu + 1 < CPUS else ""))
    lines.append("]}")
    return "\n".join(lines) + "\n"


@pytest.fixture
def dump(tmp_path) -> pathlib.Path:
    path = tmp_path / "hwcaps.json"
    path.write_text(hwcaps_json_text())
    return path


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    status = main(list(argv), stdout=out)
    return status, out.getvalue()


def expected_status() -> int:
    """Exit status as ever: 0 only if the device itself is usable (it is not opened from the dump)."""
    return 1 if not os.path.exists("/dev/pyvt") else 0


def test_report_from_dump_json(dump):
    status, out = run("--device", "/dev/pyvt", "--hw-caps-json", str(dump), "--json")
    assert status == expected_status()
    doc = json.loads(out)
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(doc, json.loads(SCHEMA.read_text()))
    vmx = doc["vmx"]
    assert vmx["source"] == "pyvt_hw_caps"
    assert vmx["basic"]["vmcs_revision_id"] == 16  # Ivy Bridge's, so read from the file
    assert vmx["features"]["ept"] is True
    assert vmx["features"]["vpid"] is True
    assert vmx["features"]["unrestricted_guest"] is True
    assert vmx["feature_control"]["source"] == "pyvt_hw_caps"
    assert vmx["feature_control"]["state"] == "enabled"
    sources = {s["name"]: s for s in doc["sources"]}
    assert sources["pyvt_hw_caps"] == {"name": "pyvt_hw_caps", "status": "ok",
                                       "detail": "PYVT_GET_HW_CAPS on /dev/pyvt"}
    assert doc["host"]["pyvt_hw_caps"] == {
        "abi_version": 1, "vendor": "Intel", "nr_cpus": CPUS, "cpus_reported": CPUS, "npt_levels": 4,
        "cpus_consistent": True, "differing_cpus": []}
    assert doc["verdict"]["kind"] == "pyvt"
    assert doc["features"]["ept"] is True and doc["features"]["vpid"] is True
    assert doc["features"]["unrestricted_guest"] is True


def test_report_from_dump_text(dump):
    status, out = run("--device", "/dev/pyvt", "--hw-caps-json", str(dump))
    assert status == expected_status()
    assert "Intel VMX  [source: pyvt_hw_caps, the host CPU's own registers read by pyvt.ko]" in out
    assert "/dev/pyvt: ABI 1, Intel, 2 CPUs (all report the same registers), nested paging 4 levels" in out
    lines = out.splitlines()
    assert any(line.startswith("  pyvt_hw_caps") and "ok" in line and "PYVT_GET_HW_CAPS on /dev/pyvt" in line
               for line in lines)
    for control in ("Enable EPT", "Enable VPID", "Unrestricted guest"):
        assert any(line.split() == control.split() + ["yes"] for line in lines), control


def test_dump_from_stdin(monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(hwcaps_json_text()))
    status, out = run("--device", "/dev/pyvt", "--hw-caps-json", "-", "--json")
    assert status == expected_status()
    assert json.loads(out)["vmx"]["features"]["ept"] is True


def test_require_from_dump(dump):
    """--require judges the dump's VMX features; kvm itself depends on the device, as always."""
    status, out = run("--device", "/dev/pyvt", "--hw-caps-json", str(dump), "--json",
                      "--require", "ept", "vpid", "unrestricted_guest")
    assert status == 0
    assert json.loads(out)["requirements"]["satisfied"] is True


@pytest.mark.parametrize("text, message", [
    (None, "No such file or directory"),
    ("{not json", "not JSON"),
    ("[]", "expected a JSON object"),
    (hwcaps_json_text(abi_version=2), "ABI 2"),
    (hwcaps_json_text(nr_msrs=17), "vmx_msrs must be a list of 18"),
    ('{"abi_version": 1, "vendor": 2, "nr_cpus": 1, "npt_levels": 4, "cpus": []}', "non-empty"),
    ('{"abi_version": 1, "vendor": -2, "nr_cpus": 1, "npt_levels": 4, "cpus": [{}]}', "'vendor'"),
])
def test_unusable_dump_is_a_usage_error(tmp_path, capsys, text, message):
    path = tmp_path / "hwcaps.json"
    if text is not None:
        path.write_text(text)
    status, out = run("--device", "/dev/pyvt", "--hw-caps-json", str(path))
    err = capsys.readouterr().err
    assert status == 2
    assert out == ""
    assert err.startswith("pyvt caps: --hw-caps-json: ") and message in err
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_dump_recorded_in_bochs():
    """hwcaps_json's real output parses; Bochs's Haswell has the EPT extras Ivy Bridge lacks."""
    status, out = run("--device", "/dev/pyvt", "--hw-caps-json", str(BOCHS_DUMP), "--json")
    assert status == expected_status()
    doc = json.loads(out)
    features = doc["vmx"]["features"]
    assert doc["vmx"]["source"] == "pyvt_hw_caps"
    assert features["ept"] and features["vpid"] and features["unrestricted_guest"]
    assert features["ept_ad_bits"] and features["ept_1g_pages"] and features["vmcs_shadowing"]
    assert doc["host"]["pyvt_hw_caps"]["nr_cpus"] == 2 and doc["host"]["pyvt_hw_caps"]["cpus_consistent"]
