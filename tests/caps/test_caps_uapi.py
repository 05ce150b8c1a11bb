"""pyvt.ko's uapi (kernel_module/include/uapi/pyvt.h) as pyvt sees it.

pyvt keeps one copy of the module's constants and structs: the cffi module
``pyvt._kvm`` (declared in ``pyvt/_kvm_build.py``), which ``pyvt.kvm`` and
``pyvt.caps`` both read.  These tests hold that copy to the header as the
system C compiler reads it, so a header change that the build did not pick
up (or a new ``#define`` nobody declared) fails here.
"""

import pathlib
import re
import shutil
import subprocess

import pytest

from pyvt._kvm import ffi, lib
from pyvt.caps import collect
from pyvt.caps import report as rep

HEADER = pathlib.Path(__file__).resolve().parents[2] / "kernel_module" / "include" / "uapi" / "pyvt.h"
STRUCTS = ("pyvt_cpu_caps", "pyvt_hw_caps", "pyvt_roundtrip")


def header_constants() -> list[str]:
    """Every object-like ``PYVT_*`` macro the header defines, in order."""
    return re.findall(r"^#define\s+(PYVT_\w+)\s", HEADER.read_text(), flags=re.MULTILINE)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, int]:
    """The header's constants and struct layouts, printed by a C program."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler (cc) to read the header with")
    lines = [f'\tprintf("{name} %llu\\n", (unsigned long long)({name}));' for name in header_constants()]
    for struct in STRUCTS:
        lines.append(f'\tprintf("sizeof {struct} %zu\\n", sizeof(struct {struct}));')
        for field, _ in ffi.typeof(f"struct {struct}").fields:
            lines.append(f'\tprintf("offsetof {struct}.{field} %zu\\n", offsetof(struct {struct}, {field}));')
    tmp = tmp_path_factory.mktemp("uapi")
    source = tmp / "uapi.c"
    source.write_text(f'#include <stddef.h>\n#include <stdio.h>\n#include "{HEADER}"\n\n'
                      "int main(void)\n{\n" + "\n".join(lines) + "\n\treturn 0;\n}\n")
    subprocess.run([cc, "-Wall", "-Werror", "-o", str(tmp / "uapi"), str(source)], check=True)
    out = subprocess.run([str(tmp / "uapi")], check=True, capture_output=True, text=True).stdout
    return {key: int(value) for key, value in (line.rsplit(" ", 1) for line in out.splitlines())}


def test_every_header_constant_is_declared_once_for_python():
    """The cffi declarations name exactly the header's PYVT_* constants: none missing, none extra."""
    declared = {name for name in dir(lib) if name.startswith("PYVT_")}
    assert set(header_constants()) == declared
    assert len(header_constants()) >= 12  # the parse found the header's defines


def test_constants_match_the_header(compiled):
    for name in header_constants():
        assert getattr(lib, name) == compiled[name], name
    # The ioctl numbers carry the struct sizes: spot-check one by hand.
    assert lib.PYVT_GET_HW_CAPS == (3 << 30) | (compiled["sizeof pyvt_hw_caps"] << 16) | (lib.PYVT_IO << 8) | 0


def test_struct_layouts_match_the_header(compiled):
    for struct in STRUCTS:
        assert ffi.sizeof(f"struct {struct}") == compiled[f"sizeof {struct}"], struct
        for field, _ in ffi.typeof(f"struct {struct}").fields:
            assert ffi.offsetof(f"struct {struct}", field) == compiled[f"offsetof {struct}.{field}"], (struct, field)


def test_caps_reads_the_shared_constants():
    """pyvt.caps has no copy of its own: the report and the dump check use the cffi values."""
    assert not [name for name in vars(rep) if name.startswith("PYVT_") and name != "PYVT_VENDORS"]
    assert rep.PYVT_VENDORS[lib.PYVT_VENDOR_INTEL] == "Intel"
    assert rep.PYVT_VENDORS[lib.PYVT_VENDOR_AMD] == "AMD"
    cpu = {key: 0 for key in collect._CPU_CAPS_FIELDS}
    doc = {"abi_version": lib.PYVT_ABI_VERSION, "vendor": lib.PYVT_VENDOR_INTEL, "nr_cpus": 1, "npt_levels": 4,
           "cpus": [{**cpu, "vmx_msrs": [0] * lib.PYVT_VMX_NR_MSRS}]}
    assert collect.parse_hw_caps(doc)["cpus"][0]["vmx_msrs"] == [0] * lib.PYVT_VMX_NR_MSRS
    with pytest.raises(collect.HwCapsFileError, match=f"list of {lib.PYVT_VMX_NR_MSRS} unsigned"):
        collect.parse_hw_caps({**doc, "cpus": [{**cpu, "vmx_msrs": [0] * (lib.PYVT_VMX_NR_MSRS - 1)}]})
    with pytest.raises(collect.HwCapsFileError, match=f"this pyvt reads ABI {lib.PYVT_ABI_VERSION}"):
        collect.parse_hw_caps({**doc, "abi_version": lib.PYVT_ABI_VERSION + 1})
