/* SPDX-License-Identifier: GPL-2.0 */
/*
 * What the VT-x backend's files share: the settled controls, the per-CPU
 * and per-vCPU state, and the functions one file calls in another.
 *
 *   vmx.c       the vendor ops: per-CPU VMXON, one entry, round trips
 *   vmx_caps.c  capability probing: controls from the VMX MSRs
 *   vmx_vmcs.c  VMCS access and setup: making it current, guest state
 *   vmx_exit.c  the exit handlers
 */
#ifndef PYVT_VMX_H
#define PYVT_VMX_H

#include <linux/idr.h>
#include <linux/list.h>
#include <linux/percpu.h>
#include <linux/types.h>
#include "core.h"
#include "vmx_ops.h"

#define VM_INSTRUCTION_ERROR_FIELD	0x4400
#define VM_EXIT_REASON_FIELD	0x4402
#define EXIT_REASON_ENTRY_FAILED	BIT(31)

/* The syscall MSRs VMX does not switch: loaded and stored by lists. */
#define NR_AUTOLOAD		5
#define AUTOLOAD_KERNEL_GS	0
extern const u32 vmx_autoload_msrs[];

/* What the capability MSRs allow, settled once at load. */
struct vmx_config {
	u32 revision;
	u32 pin, proc, proc2, exit, entry;
	u64 cr0_fixed0, cr0_fixed1, cr4_fixed0, cr4_fixed1;
	u64 ept_vpid;
	bool ins_outs_info;	/* VM-exit instruction info for INS/OUTS */
	bool true_ctls;		/* the IA32_VMX_TRUE_*_CTLS MSRs exist */
	u32 time_slice;		/* VMX-preemption timer ticks in 1 ms */
	int invept_type;
};

extern struct vmx_config vmx_conf;

struct vmx_cpu {
	struct page *vmxon_region;	/* NULL while VMX is off here */
	u64 current_vmcs;		/* physical address, 0 if none */
	struct list_head active;	/* VMCSs active on this CPU */
};
DECLARE_PER_CPU(struct vmx_cpu, vmx_cpu);

struct vmx_vcpu {
	struct pyvt_vcpu *vcpu;
	struct page *vmcs;
	u64 vmcs_pa;
	int cpu;			/* where the VMCS is active, or -1 */
	bool launched;
	struct list_head active_link;
	struct vmx_msr_entry *guest_msrs;	/* entry load and exit store */
	struct vmx_msr_entry *host_msrs;	/* exit load */
	struct page *msr_page;
	u16 vpid;
	u64 cr8;
	u64 cr2;			/* VMX leaves CR2 to us */
	u64 exit_rip;			/* RIP at the last exit */
	/* Exception to inject on the next entry, VM-entry format. */
	u32 inject_info;
	u32 inject_error;
	/* Read right after each exit, while the VMCS is current. */
	u32 exit_reason;
	u32 exit_intr_info;
	u32 idt_info;
	u32 idt_error;
	u32 insn_len;
	u32 insn_info;
	u64 exit_qual;
	u64 exit_gpa;
	/* Host state last written, to skip unchanged VMWRITEs. */
	unsigned long host_cr3, host_cr4, host_fs_base;
};

extern struct page *vmx_msr_bitmap;
extern struct ida vmx_vpid_ida;

static inline struct vmx_vcpu *to_vmx(struct pyvt_vcpu *vcpu)
{
	return vcpu->priv;
}

/* Write-back memory type, in each EPT leaf (npt_leaf_flags). */
#define EPT_LEAF_WB		(VMX_EPTP_MT_WB << VMX_EPT_MT_EPTE_SHIFT)

static inline u64 eptp_of(struct pyvt_vm *vm)
{
	return vm->npt_root | VMX_EPTP_MT_WB | VMX_EPTP_PWL_4;
}

/* vmx_caps.c */
int vmx_probe(void);
void vmx_cleanup(void);
int vmx_firmware_check(void);
void vmx_read_caps(struct pyvt_cpu_caps *caps);

/* vmx_vmcs.c */
void vmcs_clear_here(void *arg);
bool vmx_load(struct vmx_vcpu *vmx);
void vmx_get(struct vmx_vcpu *vmx);
void vmx_put(void);
u64 vmx_guest_cr0(void);
u64 vmx_guest_cr4(void);
void vmx_set_cr0(u64 cr0);
void vmx_set_cr4(u64 cr4);
void vmx_set_efer(u64 efer);
int vmx_load_pdptrs(struct pyvt_vcpu *vcpu, u64 cr0, u64 cr4, u64 efer,
		    u64 cr3);
int vmx_vcpu_create(struct pyvt_vcpu *vcpu);
void vmx_vcpu_free(struct pyvt_vcpu *vcpu);
void vmx_get_sregs(struct pyvt_vcpu *vcpu, struct kvm_sregs *k);
int vmx_set_sregs(struct pyvt_vcpu *vcpu, const struct kvm_sregs *k);
void vmx_queue_exception(struct pyvt_vcpu *vcpu, u8 vector, bool has_error,
			 u32 error);
int vmx_get_msr(struct pyvt_vcpu *vcpu, u32 msr, u64 *val);
int vmx_set_msr(struct pyvt_vcpu *vcpu, u32 msr, u64 val);

/* vmx_exit.c */
void dump_vmcs(struct pyvt_vcpu *vcpu, const char *why);
int vmx_handle_exit(struct pyvt_vcpu *vcpu, u32 reason);
bool vmx_exit_resumes(u32 reason);

#endif /* PYVT_VMX_H */
