"""IA32_FEATURE_CONTROL: recorded values from the VirtualBox logs, plus the firmware-off case."""

import pytest
from capsfixtures import vmx_fixture

from pyvt.caps.feature_control import IA32_FEATURE_CONTROL, decode_feature_control


@pytest.mark.parametrize("name, sgx_lc", [("intel_coffee_lake_i7_9750h_vbox61", True),
                                           ("intel_ivy_bridge_306a9_vbox72", False)])
def test_recorded_values(name, sgx_lc):
    doc, msrs = vmx_fixture(name)
    d = decode_feature_control(msrs[IA32_FEATURE_CONTROL])
    vbox = doc["vbox_decoded"]["feature_control"]
    assert d["lock"] is ("LOCK" in vbox)
    assert d["vmx_outside_smx"] is ("VMXON" in vbox)
    assert d["sgx_launch_control"] is sgx_lc is ("SGX_LAUNCH_EN" in vbox)
    assert d["state"] == "enabled" and d["vmx_allowed"]


def test_locked_with_vmx_off_is_firmware_disabled():
    """SDM 24.7: VMXON #GPs when the lock bit is set and VMX-outside-SMX is clear."""
    d = decode_feature_control(0x1)
    assert d["state"] == "disabled_by_firmware" and not d["vmx_allowed"]
    assert "BIOS" in d["explanation"]


def test_unlocked_is_usable():
    d = decode_feature_control(0x0)
    assert d["state"] == "unlocked" and d["vmx_allowed"]
