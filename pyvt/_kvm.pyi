# Type stub for the cffi module pyvt._kvm (built by pyvt/_kvm_build.py): its
# contents come from <linux/kvm.h> at build time.
from typing import Any

ffi: Any
lib: Any
