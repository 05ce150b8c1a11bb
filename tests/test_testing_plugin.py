"""pyvt.testing, the pytest plugin users get: fixtures and skip markers."""

import os

import pytest

import pyvt

pytest_plugins = ["pytester"]


@pytest.fixture(autouse=True)
def plugin_loaded_explicitly(monkeypatch):
    # Inner runs load the plugin with -p, installed or not, and find this
    # very pyvt package.
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("PYTHONPATH", os.path.dirname(os.path.dirname(pyvt.__file__)))


@pytest.mark.requires_kvm
def test_fixtures_give_a_device_and_a_vm(kvm, vm):
    assert kvm.api_version() == 12
    assert isinstance(vm, pyvt.Vm) and vm.memory.size == 16 << 20


@pytest.mark.requires_cap("USER_MEMORY")
def test_requires_cap_runs_when_present(kvm):
    assert kvm.check_extension("USER_MEMORY")


def test_markers_skip_with_the_reason(pytester):
    pytester.makepyfile("""
        import pytest

        @pytest.mark.requires_cpu("no_such_cpu_flag")
        def test_cpu():
            pass

        @pytest.mark.requires_cap("KVM_CAP_NO_SUCH_THING")
        def test_cap():
            pass
    """)
    result = pytester.runpytest("-rs", "-p", "pyvt.testing")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(["*host CPU lacks no_such_cpu_flag*",
                                 "*KVM_CAP_NO_SUCH_THING*"])


def test_missing_device_skips_with_the_reason(pytester, monkeypatch):
    monkeypatch.setenv("PYVT_BACKEND", "/nonexistent/kvm")
    pytester.makepyfile("""
        def test_needs_vm(vm):
            pass
    """)
    result = pytester.runpytest_subprocess("-rs", "-p", "pyvt.testing")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*no usable KVM device*/nonexistent/kvm does not exist*"])
