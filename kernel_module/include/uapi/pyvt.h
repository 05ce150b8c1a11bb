/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * pyvt.ko user-space ABI: the extras KVM has no word for.
 *
 * /dev/pyvt otherwise speaks the KVM ioctl ABI of <linux/kvm.h>.  These
 * ioctls are issued on the /dev/pyvt system fd and use their own magic,
 * so they can never be confused with a KVM ioctl.  Every struct has
 * fixed-width members only and no implicit padding.
 */
#ifndef _UAPI_LINUX_PYVT_H
#define _UAPI_LINUX_PYVT_H

#include <linux/types.h>
#include <linux/ioctl.h>

#define PYVT_IO			0xAF

/* Bumped when an ioctl or struct below changes incompatibly. */
#define PYVT_ABI_VERSION	1

#define PYVT_VENDOR_UNKNOWN	0
#define PYVT_VENDOR_AMD		1
#define PYVT_VENDOR_INTEL	2

/* IA32_VMX_BASIC (0x480) ... IA32_VMX_VMFUNC (0x491), in MSR order. */
#define PYVT_VMX_MSR_FIRST	0x480
#define PYVT_VMX_NR_MSRS	18

/* pyvt_cpu_caps.flags */
#define PYVT_CPU_CAPS_VM_CR_VALID	(1u << 0)  /* vm_cr was read */
#define PYVT_CPU_CAPS_VMX_VALID		(1u << 1)  /* vmx_msrs[] were read */

/* What one host CPU reports about its virtualization hardware. */
struct pyvt_cpu_caps {
	__u32 cpu;		/* Linux CPU number */
	__u32 flags;		/* PYVT_CPU_CAPS_* */
	__u32 ext_ecx;		/* CPUID 0x80000001 ECX (bit 2: SVM) */
	__u32 feat_ecx;		/* CPUID 0x00000001 ECX (bit 5: VMX) */
	__u32 svm_eax;		/* CPUID 0x8000000A EAX: SVM revision */
	__u32 svm_ebx;		/* CPUID 0x8000000A EBX: number of ASIDs */
	__u32 svm_ecx;		/* CPUID 0x8000000A ECX */
	__u32 svm_edx;		/* CPUID 0x8000000A EDX: SVM features */
	__u64 vm_cr;		/* MSR VM_CR (0xC0010114), AMD only */
	__u64 feature_control;	/* IA32_FEATURE_CONTROL (0x3A), Intel only */
	__u64 vmx_msrs[PYVT_VMX_NR_MSRS]; /* Intel only */
};

/*
 * PYVT_GET_HW_CAPS: fill up to @max_cpus entries at @cpus (a user pointer
 * to an array of struct pyvt_cpu_caps), one per online CPU.  @nr_cpus
 * returns the number of online CPUs; if it exceeds @max_cpus only the
 * first @max_cpus entries are written (call again with a larger array).
 */
struct pyvt_hw_caps {
	__u32 abi_version;	/* out: PYVT_ABI_VERSION */
	__u32 vendor;		/* out: PYVT_VENDOR_* */
	__u32 max_cpus;		/* in: entries available at @cpus */
	__u32 nr_cpus;		/* out: online CPUs */
	__u64 cpus;		/* in: user address of the array */
	__u32 npt_levels;	/* out: nested paging depth used (4 or 5) */
	__u32 reserved;
};

/*
 * PYVT_MEASURE_ROUNDTRIP: run a trivial guest (one intercepted VMMCALL on
 * AMD, VMCALL on Intel) @iterations times with interrupts off and time
 * each world switch with the TSC: on AMD VMSAVE host, VMLOAD guest, VMRUN,
 * #VMEXIT, VMSAVE guest, VMLOAD host; on Intel VMLAUNCH/VMRESUME to the
 * VM exit.  Needs no VM; fails with EBUSY while another hypervisor owns
 * the extensions.
 */
#define PYVT_ROUNDTRIP_MAX_ITERATIONS	100000

struct pyvt_roundtrip {
	__u32 iterations;	/* in: 1 ... PYVT_ROUNDTRIP_MAX_ITERATIONS */
	__u32 cpu;		/* out: CPU it ran on */
	__u64 min_cycles;	/* out: TSC cycles */
	__u64 median_cycles;	/* out */
	__u64 max_cycles;	/* out */
	__u64 tsc_khz;		/* out: to convert cycles to time */
	__u32 exit_code;	/* out: exit code of the last run (AMD 0x81 VMMCALL, Intel 18 VMCALL) */
	__u32 reserved;
};

#define PYVT_GET_HW_CAPS	_IOWR(PYVT_IO, 0x00, struct pyvt_hw_caps)
#define PYVT_MEASURE_ROUNDTRIP	_IOWR(PYVT_IO, 0x01, struct pyvt_roundtrip)

#endif /* _UAPI_LINUX_PYVT_H */
