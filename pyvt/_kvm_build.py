"""cffi (API mode) build script for ``pyvt._kvm``.

The module is compiled against the system's ``<linux/kvm.h>``: every struct
below is declared *partial* (``...;``) and every constant as ``...``, so the
C compiler supplies the real layouts and values.  No offset or ioctl number
is written by hand here.  The structs of the project's own kernel module are
declared exactly, from its uapi header, so the compiler checks them.
"""

import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# The anonymous members of kvm_run's exit union, given names so that cffi can
# describe them; their layout still comes from the compiler.
RUN_UNION_MEMBERS = [
    "hw", "fail_entry", "ex", "io", "debug", "mmio", "hypercall",
    "internal", "emulation_failure", "system_event", "msr", "s",
]

# KVM_CAP_* numbers newer than this machine's <linux/kvm.h> (Linux 6.1) that
# pyvt uses, from the kernel's uapi header: (name, number, Linux version that
# added it).  The one list: SOURCE defines each where the header lacks it, and
# capability_names() adds them, so pyvt.kvm.caps and `pyvt caps` list them.
NEWER_CAPABILITIES = [
    ("KVM_CAP_USER_MEMORY2", 231, "6.8"),
    ("KVM_CAP_MEMORY_FAULT_INFO", 232, "6.8"),
    ("KVM_CAP_MEMORY_ATTRIBUTES", 233, "6.8"),
    ("KVM_CAP_GUEST_MEMFD", 234, "6.8"),
    ("KVM_CAP_VM_TYPES", 235, "6.8"),
    ("KVM_CAP_GUEST_MEMFD_FLAGS", 244, "6.18"),
]

# Memory slots v2, guest_memfd and memory attributes (Linux 6.8; the
# guest_memfd mmap flags 6.18), from the documented ABI
# (Documentation/virt/kvm/api.rst 4.140-4.142, include/uapi/linux/kvm.h),
# for headers older than that.  Each block is skipped where the header has it.
NEWER_ABI = """
#ifndef KVM_SET_USER_MEMORY_REGION2  /* Linux 6.8 */
struct kvm_userspace_memory_region2 {
    __u32 slot;
    __u32 flags;
    __u64 guest_phys_addr;
    __u64 memory_size;
    __u64 userspace_addr;
    __u64 guest_memfd_offset;
    __u32 guest_memfd;
    __u32 pad1;
    __u64 pad2[14];
};
#define KVM_SET_USER_MEMORY_REGION2 _IOW(KVMIO, 0x49, struct kvm_userspace_memory_region2)
#endif
#ifndef KVM_MEM_GUEST_MEMFD  /* Linux 6.8 */
#define KVM_MEM_GUEST_MEMFD (1UL << 2)
#endif
#ifndef KVM_CREATE_GUEST_MEMFD  /* Linux 6.8 */
struct kvm_create_guest_memfd {
    __u64 size;
    __u64 flags;
    __u64 reserved[6];
};
#define KVM_CREATE_GUEST_MEMFD _IOWR(KVMIO, 0xd4, struct kvm_create_guest_memfd)
#endif
#ifndef GUEST_MEMFD_FLAG_MMAP  /* Linux 6.18 */
#define GUEST_MEMFD_FLAG_MMAP (1ULL << 0)
#endif
#ifndef GUEST_MEMFD_FLAG_INIT_SHARED  /* Linux 6.18 */
#define GUEST_MEMFD_FLAG_INIT_SHARED (1ULL << 1)
#endif
#ifndef KVM_SET_MEMORY_ATTRIBUTES  /* Linux 6.8 */
struct kvm_memory_attributes {
    __u64 address;
    __u64 size;
    __u64 attributes;
    __u64 flags;
};
#define KVM_SET_MEMORY_ATTRIBUTES _IOW(KVMIO, 0xd2, struct kvm_memory_attributes)
#define KVM_MEMORY_ATTRIBUTE_PRIVATE (1ULL << 3)
#endif
#ifndef KVM_X86_DEFAULT_VM  /* Linux 6.8: VM types, bits of KVM_CAP_VM_TYPES */
#define KVM_X86_DEFAULT_VM 0
#define KVM_X86_SW_PROTECTED_VM 1
#endif
""" + "".join(
    f"#ifndef {name}  /* Linux {version} */\n#define {name} {number}\n#endif\n"
    for name, number, version in NEWER_CAPABILITIES
)

SOURCE = "\n".join(
    [
        "#include <linux/kvm.h>",
        "#include <sys/ioctl.h>",
        "#include <errno.h>",
        '#include "host_cpuid.h"',
        "#include <uapi/pyvt.h>",
        "",
        # Names older headers lack: a PVT_HAVE_* flag says whether the
        # header has the name; without it the name is defined as 0 and the
        # wrapper refuses to issue it (see pyvt.kvm).
        "#ifdef KVM_GET_XSAVE2",
        "#define PVT_HAVE_KVM_GET_XSAVE2 1",
        "#else",
        "#define PVT_HAVE_KVM_GET_XSAVE2 0  /* Linux < 5.17 headers */",
        "#define KVM_GET_XSAVE2 0",
        "#endif",
        "",
        NEWER_ABI,
    ]
    + [
        f"typedef __typeof__(((struct kvm_run *)0)->{m}) pvt_run_{m};"
        for m in RUN_UNION_MEMBERS
    ]
)

TYPES = """
typedef int... __u8;
typedef int... __u16;
typedef int... __u32;
typedef int... __u64;
typedef int... __s32;
"""

CONSTANTS = """
#define KVM_API_VERSION ...

/* system ioctls */
#define KVM_GET_API_VERSION ...
#define KVM_CREATE_VM ...
#define KVM_CHECK_EXTENSION ...
#define KVM_GET_VCPU_MMAP_SIZE ...
#define KVM_GET_SUPPORTED_CPUID ...
#define KVM_GET_EMULATED_CPUID ...
#define KVM_GET_MSR_INDEX_LIST ...
#define KVM_GET_MSR_FEATURE_INDEX_LIST ...

/* VM ioctls */
#define KVM_CREATE_VCPU ...
#define KVM_SET_USER_MEMORY_REGION ...
#define KVM_SET_TSS_ADDR ...
#define KVM_SET_IDENTITY_MAP_ADDR ...
#define KVM_CREATE_IRQCHIP ...
#define KVM_CREATE_PIT2 ...
#define KVM_GET_IRQCHIP ...
#define KVM_SET_IRQCHIP ...
#define KVM_GET_PIT2 ...
#define KVM_SET_PIT2 ...
#define KVM_IRQCHIP_PIC_MASTER ...
#define KVM_IRQCHIP_PIC_SLAVE ...
#define KVM_IRQCHIP_IOAPIC ...
#define KVM_IRQ_LINE ...
#define KVM_IOEVENTFD ...
#define KVM_IRQFD ...
#define KVM_GET_DIRTY_LOG ...
#define KVM_ENABLE_CAP ...
#define KVM_REGISTER_COALESCED_MMIO ...
#define KVM_UNREGISTER_COALESCED_MMIO ...

/* vCPU ioctls */
#define KVM_RUN ...
#define KVM_GET_REGS ...
#define KVM_SET_REGS ...
#define KVM_GET_SREGS ...
#define KVM_SET_SREGS ...
#define KVM_GET_FPU ...
#define KVM_SET_FPU ...
#define KVM_GET_MSRS ...
#define KVM_SET_MSRS ...
#define KVM_GET_CPUID2 ...
#define KVM_SET_CPUID2 ...
#define KVM_SET_GUEST_DEBUG ...
#define KVM_GET_MP_STATE ...
#define KVM_SET_MP_STATE ...
#define KVM_GET_LAPIC ...
#define KVM_SET_LAPIC ...
#define KVM_GET_VCPU_EVENTS ...
#define KVM_SET_VCPU_EVENTS ...
#define KVM_GET_DEBUGREGS ...
#define KVM_SET_DEBUGREGS ...
#define KVM_GET_XCRS ...
#define KVM_SET_XCRS ...
#define KVM_GET_XSAVE ...
#define KVM_SET_XSAVE ...
#define KVM_GET_XSAVE2 ...  /* 0 where PVT_HAVE_KVM_GET_XSAVE2 is 0 */
#define PVT_HAVE_KVM_GET_XSAVE2 ...

/* exits */
#define KVM_EXIT_UNKNOWN ...
#define KVM_EXIT_EXCEPTION ...
#define KVM_EXIT_IO ...
#define KVM_EXIT_HYPERCALL ...
#define KVM_EXIT_DEBUG ...
#define KVM_EXIT_HLT ...
#define KVM_EXIT_MMIO ...
#define KVM_EXIT_IRQ_WINDOW_OPEN ...
#define KVM_EXIT_SHUTDOWN ...
#define KVM_EXIT_FAIL_ENTRY ...
#define KVM_EXIT_INTR ...
#define KVM_EXIT_SET_TPR ...
#define KVM_EXIT_TPR_ACCESS ...
#define KVM_EXIT_NMI ...
#define KVM_EXIT_INTERNAL_ERROR ...
#define KVM_EXIT_SYSTEM_EVENT ...
#define KVM_EXIT_IOAPIC_EOI ...
#define KVM_EXIT_X86_RDMSR ...
#define KVM_EXIT_X86_WRMSR ...
#define KVM_EXIT_DIRTY_RING_FULL ...
#define KVM_EXIT_X86_BUS_LOCK ...
#define KVM_EXIT_NOTIFY ...
#define KVM_EXIT_IO_IN ...
#define KVM_EXIT_IO_OUT ...

#define KVM_INTERNAL_ERROR_EMULATION ...
#define KVM_INTERNAL_ERROR_SIMUL_EX ...
#define KVM_INTERNAL_ERROR_DELIVERY_EV ...
#define KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON ...
#define KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES ...

#define KVM_SYSTEM_EVENT_SHUTDOWN ...
#define KVM_SYSTEM_EVENT_RESET ...
#define KVM_SYSTEM_EVENT_CRASH ...

#define KVM_MEM_LOG_DIRTY_PAGES ...
#define KVM_MEM_READONLY ...

#define KVM_GUESTDBG_ENABLE ...
#define KVM_GUESTDBG_SINGLESTEP ...
#define KVM_GUESTDBG_USE_SW_BP ...
#define KVM_GUESTDBG_USE_HW_BP ...

#define KVM_MP_STATE_RUNNABLE ...
#define KVM_MP_STATE_UNINITIALIZED ...
#define KVM_MP_STATE_INIT_RECEIVED ...
#define KVM_MP_STATE_HALTED ...
#define KVM_MP_STATE_SIPI_RECEIVED ...

#define KVM_IOEVENTFD_FLAG_DATAMATCH ...
#define KVM_IOEVENTFD_FLAG_PIO ...
#define KVM_IOEVENTFD_FLAG_DEASSIGN ...
#define KVM_IRQFD_FLAG_DEASSIGN ...

#define KVM_COALESCED_MMIO_PAGE_OFFSET ...
#define KVM_SYNC_X86_REGS ...
#define KVM_SYNC_X86_SREGS ...
#define KVM_SYNC_X86_EVENTS ...

/* -- interrupts, NMI/SMI, MSI and GSI routing, translation, the clocks, nested state, sregs2 (issue 12) -- */
/* (section A: its constants go below this line, above the next section) */

/* -- memory slots v2, guest_memfd, memory attributes, devices, memory encryption (issue 12) -- */
/* (section B: its constants go below this line, above the next section) */
#define KVM_SET_USER_MEMORY_REGION2 ...  /* Linux 6.8: NEWER_ABI where the header lacks it */
#define KVM_MEM_GUEST_MEMFD ...
#define KVM_CREATE_GUEST_MEMFD ...
#define GUEST_MEMFD_FLAG_MMAP ...
#define GUEST_MEMFD_FLAG_INIT_SHARED ...
#define KVM_SET_MEMORY_ATTRIBUTES ...
#define KVM_MEMORY_ATTRIBUTE_PRIVATE ...
#define KVM_X86_DEFAULT_VM ...
#define KVM_X86_SW_PROTECTED_VM ...
#define KVM_MEMORY_ENCRYPT_OP ...
#define KVM_MEMORY_ENCRYPT_REG_REGION ...
#define KVM_MEMORY_ENCRYPT_UNREG_REGION ...
#define KVM_CREATE_DEVICE ...
#define KVM_CREATE_DEVICE_TEST ...
#define KVM_SET_DEVICE_ATTR ...
#define KVM_GET_DEVICE_ATTR ...
#define KVM_HAS_DEVICE_ATTR ...
#define KVM_DEV_TYPE_FSL_MPIC_20 ...
#define KVM_DEV_TYPE_FSL_MPIC_42 ...
#define KVM_DEV_TYPE_XICS ...
#define KVM_DEV_TYPE_VFIO ...
#define KVM_DEV_TYPE_ARM_VGIC_V2 ...
#define KVM_DEV_TYPE_FLIC ...
#define KVM_DEV_TYPE_ARM_VGIC_V3 ...
#define KVM_DEV_TYPE_ARM_VGIC_ITS ...
#define KVM_DEV_TYPE_XIVE ...
#define KVM_DEV_TYPE_ARM_PV_TIME ...
#define KVM_DEV_VFIO_GROUP ...
#define KVM_DEV_VFIO_GROUP_ADD ...
#define KVM_DEV_VFIO_GROUP_DEL ...
#define KVM_VCPU_TSC_CTRL ...
#define KVM_VCPU_TSC_OFFSET ...
#define KVM_X86_XCOMP_GUEST_SUPP ...

/* -- the dirty ring (issue 12) -- */
/* (section C: its constants go below this line, above the next section) */

/* -- binary statistics (issue 12) -- */
/* (section D: its constants go below this line, above the next section) */

/* -- MSR filters and user-space MSR exits (issue 12) -- */
/* (section E: its constants go below this line, above the next section) */
"""

STRUCTS = """
struct kvm_regs {
    __u64 rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp;
    __u64 r8, r9, r10, r11, r12, r13, r14, r15;
    __u64 rip, rflags;
    ...;
};
struct kvm_segment {
    __u64 base; __u32 limit; __u16 selector;
    __u8 type, present, dpl, db, s, l, g, avl, unusable;
    ...;
};
struct kvm_dtable { __u64 base; __u16 limit; ...; };
struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss, tr, ldt;
    struct kvm_dtable gdt, idt;
    __u64 cr0, cr2, cr3, cr4, cr8, efer, apic_base;
    __u64 interrupt_bitmap[...];
    ...;
};
struct kvm_fpu {
    __u8 fpr[8][16]; __u16 fcw, fsw; __u8 ftwx; __u16 last_opcode;
    __u64 last_ip, last_dp; __u8 xmm[16][16]; __u32 mxcsr;
    ...;
};
struct kvm_msr_entry { __u32 index; __u64 data; ...; };
struct kvm_msrs { __u32 nmsrs; struct kvm_msr_entry entries[]; ...; };
struct kvm_msr_list { __u32 nmsrs; __u32 indices[]; ...; };
struct kvm_cpuid_entry2 {
    __u32 function, index, flags, eax, ebx, ecx, edx;
    ...;
};
struct kvm_cpuid2 { __u32 nent; struct kvm_cpuid_entry2 entries[]; ...; };
struct kvm_userspace_memory_region {
    __u32 slot, flags; __u64 guest_phys_addr, memory_size, userspace_addr;
    ...;
};
struct kvm_debug_exit_arch { __u32 exception; __u64 pc, dr6, dr7; ...; };
struct kvm_guest_debug_arch { __u64 debugreg[8]; ...; };
struct kvm_guest_debug {
    __u32 control; struct kvm_guest_debug_arch arch; ...;
};
struct kvm_mp_state { __u32 mp_state; ...; };
struct kvm_irq_level { __u32 irq, level; ...; };
struct kvm_pit_config { __u32 flags; ...; };
struct kvm_ioeventfd {
    __u64 datamatch, addr; __u32 len; __s32 fd; __u32 flags; ...;
};
struct kvm_irqfd { __u32 fd, gsi, flags, resamplefd; ...; };
struct kvm_dirty_log { __u32 slot; void *dirty_bitmap; ...; };
struct kvm_enable_cap { __u32 cap, flags; __u64 args[4]; ...; };
struct kvm_coalesced_mmio_zone { __u64 addr; __u32 size; __u32 pio; ...; };
struct kvm_lapic_state { char regs[...]; ...; };
struct kvm_debugregs { __u64 db[4]; __u64 dr6, dr7, flags; ...; };
struct kvm_xcr { __u32 xcr; __u64 value; ...; };
struct kvm_xcrs { __u32 nr_xcrs, flags; struct kvm_xcr xcrs[...]; ...; };
struct kvm_xsave { __u32 region[...]; ...; };
struct kvm_vcpu_events { __u32 flags; ...; };
struct kvm_irqchip { __u32 chip_id; ...; };
struct kvm_pit_state2 { __u32 flags; ...; };

typedef struct { __u64 hardware_exit_reason; ...; } pvt_run_hw;
typedef struct {
    __u64 hardware_entry_failure_reason; __u32 cpu; ...;
} pvt_run_fail_entry;
typedef struct { __u32 exception, error_code; ...; } pvt_run_ex;
typedef struct {
    __u8 direction, size; __u16 port; __u32 count; __u64 data_offset; ...;
} pvt_run_io;
typedef struct { struct kvm_debug_exit_arch arch; ...; } pvt_run_debug;
typedef struct {
    __u64 phys_addr; __u8 data[8]; __u32 len; __u8 is_write; ...;
} pvt_run_mmio;
typedef struct { __u64 nr; __u64 args[6]; __u64 ret; ...; } pvt_run_hypercall;
typedef struct { __u32 suberror, ndata; __u64 data[16]; ...; } pvt_run_internal;
typedef struct {
    __u32 suberror, ndata; __u64 flags; __u8 insn_size; __u8 insn_bytes[15];
    ...;
} pvt_run_emulation_failure;
typedef struct { __u32 type; ...; } pvt_run_system_event;
typedef struct { __u8 error; __u32 reason, index; __u64 data; ...; } pvt_run_msr;
struct kvm_sync_regs { struct kvm_regs regs; struct kvm_sregs sregs; ...; };
typedef union { struct kvm_sync_regs regs; ...; } pvt_run_s;

struct kvm_run {
    __u8 request_interrupt_window, immediate_exit;
    __u32 exit_reason;
    __u8 ready_for_interrupt_injection, if_flag;
    __u16 flags;
    __u64 cr8, apic_base;
    pvt_run_hw hw;
    pvt_run_fail_entry fail_entry;
    pvt_run_ex ex;
    pvt_run_io io;
    pvt_run_debug debug;
    pvt_run_mmio mmio;
    pvt_run_hypercall hypercall;
    pvt_run_internal internal;
    pvt_run_emulation_failure emulation_failure;
    pvt_run_system_event system_event;
    pvt_run_msr msr;
    __u64 kvm_valid_regs, kvm_dirty_regs;
    pvt_run_s s;
    ...;
};

struct kvm_coalesced_mmio {
    __u64 phys_addr; __u32 len; __u32 pio; __u8 data[8]; ...;
};
struct kvm_coalesced_mmio_ring {
    __u32 first, last; struct kvm_coalesced_mmio coalesced_mmio[]; ...;
};

/* -- interrupts, NMI/SMI, MSI and GSI routing, translation, the clocks, nested state, sregs2 (issue 12) -- */
/* (section A: its structs go below this line, above the next section) */

/* -- memory slots v2, guest_memfd, memory attributes, devices, memory encryption (issue 12) -- */
/* (section B: its structs go below this line, above the next section) */
struct kvm_userspace_memory_region2 {
    __u32 slot, flags; __u64 guest_phys_addr, memory_size, userspace_addr;
    __u64 guest_memfd_offset; __u32 guest_memfd;
    ...;
};
struct kvm_create_guest_memfd { __u64 size, flags; ...; };
struct kvm_memory_attributes { __u64 address, size, attributes, flags; ...; };
struct kvm_enc_region { __u64 addr, size; ...; };
struct kvm_sev_cmd { __u32 id; __u64 data; __u32 error, sev_fd; ...; };
struct kvm_create_device { __u32 type, fd, flags; ...; };
struct kvm_device_attr { __u32 flags, group; __u64 attr, addr; ...; };

/* -- the dirty ring (issue 12) -- */
/* (section C: its structs go below this line, above the next section) */

/* -- binary statistics (issue 12) -- */
/* (section D: its structs go below this line, above the next section) */

/* -- MSR filters and user-space MSR exits (issue 12) -- */
/* (section E: its structs go below this line, above the next section) */
"""

# The project's kernel module (kernel_module/include/uapi/pyvt.h): declared
# exactly, so a header change that moves a field fails this build.
PYVT_MODULE = """
#define PYVT_ABI_VERSION ...
#define PYVT_VENDOR_UNKNOWN ...
#define PYVT_VENDOR_AMD ...
#define PYVT_VENDOR_INTEL ...
#define PYVT_VMX_MSR_FIRST ...
#define PYVT_VMX_NR_MSRS ...
#define PYVT_CPU_CAPS_VM_CR_VALID ...
#define PYVT_CPU_CAPS_VMX_VALID ...
#define PYVT_ROUNDTRIP_MAX_ITERATIONS ...
#define PYVT_GET_HW_CAPS ...
#define PYVT_MEASURE_ROUNDTRIP ...

struct pyvt_cpu_caps {
    __u32 cpu; __u32 flags; __u32 ext_ecx; __u32 feat_ecx;
    __u32 svm_eax; __u32 svm_ebx; __u32 svm_ecx; __u32 svm_edx;
    __u64 vm_cr; __u64 feature_control; __u64 vmx_msrs[18];
};
struct pyvt_hw_caps {
    __u32 abi_version; __u32 vendor; __u32 max_cpus; __u32 nr_cpus;
    __u64 cpus; __u32 npt_levels; __u32 reserved;
};
struct pyvt_roundtrip {
    __u32 iterations; __u32 cpu;
    __u64 min_cycles; __u64 median_cycles; __u64 max_cycles; __u64 tsc_khz;
    __u32 exit_code; __u32 reserved;
};
"""

FUNCTIONS = """
int ioctl(int fd, unsigned long request, ...);
void pvt_host_cpuid(uint32_t leaf, uint32_t subleaf, uint32_t out[4]);
"""


def capability_names(header="/usr/include/linux/kvm.h"):
    """Every KVM_CAP_* the installed header defines, in header order, then
    those of NEWER_CAPABILITIES it lacks."""
    import re

    names = []
    with open(header) as f:
        for line in f:
            m = re.match(r"#define\s+(KVM_CAP_[A-Z0-9_]+)\s+\d+", line)
            if m:
                names.append(m.group(1))
    return names + [name for name, _, _ in NEWER_CAPABILITIES if name not in names]


ffibuilder = FFI()
ffibuilder.cdef(
    TYPES
    + CONSTANTS
    + "".join(f"#define {name} ...\n" for name in capability_names())
    + STRUCTS
    + PYVT_MODULE
    + FUNCTIONS
)
ffibuilder.set_source(
    "pyvt._kvm",
    SOURCE,
    sources=[os.path.join("csrc", "host_cpuid.c")],
    include_dirs=[os.path.join(ROOT, "csrc"), os.path.join(ROOT, "kernel_module", "include")],
    extra_compile_args=["-O2"],
)

if __name__ == "__main__":
    os.chdir(ROOT)
    ffibuilder.compile(tmpdir=".", verbose=False)
