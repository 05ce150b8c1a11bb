"""Builds pyvt's two native modules.

- ``pyvt._native``: the Cython bridge, compiled together with the C core in
  ``csrc/`` (the run loop and the native devices);
- ``pyvt._kvm``: cffi in API mode over ``<linux/kvm.h>`` (exact struct views
  and ioctl numbers), built by ``pyvt/_kvm_build.py``.

Everything else (name, version from git via setuptools-scm, dependencies) is
in pyproject.toml.
"""

import glob
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

CORE_SOURCES = sorted(
    path for path in glob.glob(os.path.join("csrc", "*.c"))
    if os.path.basename(path) != "host_cpuid.c"  # linked into pyvt._kvm
)

native = Extension(
    "pyvt._native",
    sources=[os.path.join("pyvt", "_native.pyx")] + CORE_SOURCES,
    include_dirs=["csrc"],
    extra_compile_args=["-O2", "-Wall", "-Wno-unused-function"],
)

setup(
    ext_modules=cythonize(
        [native],
        compiler_directives={"language_level": "3"},
        include_path=["."],
    ),
    cffi_modules=["pyvt/_kvm_build.py:ffibuilder"],
)
