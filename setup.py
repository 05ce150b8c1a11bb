"""Builds pyvt's three native modules.

- ``pyvt._native``: the Cython bridge, compiled together with the C core in
  ``csrc/`` (the run loop and the native devices);
- ``pyvt._virtio``: the native virtio device workers (``csrc/virtio_*.c``),
  threads that serve virtqueues without the GIL;
- ``pyvt._kvm``: cffi in API mode over ``<linux/kvm.h>`` (exact struct views
  and ioctl numbers), built by ``pyvt/_kvm_build.py``.

Everything else (name, version from git via setuptools-scm, dependencies) is
in pyproject.toml.
"""

import glob
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

# The native virtio workers (csrc/virtio_*.c) are their own module.
VIRTIO_SOURCES = sorted(glob.glob(os.path.join("csrc", "virtio_*.c")))
CORE_SOURCES = sorted(
    path for path in glob.glob(os.path.join("csrc", "*.c"))
    if os.path.basename(path) != "host_cpuid.c"  # linked into pyvt._kvm
    and path not in VIRTIO_SOURCES
)

native = Extension(
    "pyvt._native",
    sources=[os.path.join("pyvt", "_native.pyx")] + CORE_SOURCES,
    include_dirs=["csrc"],
    extra_compile_args=["-O2", "-Wall", "-Wno-unused-function"],
)

virtio = Extension(
    "pyvt._virtio",
    sources=[os.path.join("pyvt", "_virtio.pyx")] + VIRTIO_SOURCES,
    include_dirs=["csrc"],
    extra_compile_args=["-O2", "-Wall", "-Wno-unused-function"],
    extra_link_args=["-pthread"],
)

setup(
    ext_modules=cythonize(
        [native, virtio],
        compiler_directives={"language_level": "3"},
        include_path=["."],
    ),
    cffi_modules=["pyvt/_kvm_build.py:ffibuilder"],
)
