// SPDX-License-Identifier: GPL-2.0
/*
 * VT-x exit handlers, one per exit reason, and the table that picks
 * them.  They run with preemption back on, so whatever they read or
 * write in the VMCS goes through vmx_get()/vmx_put().
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/module.h>
#include <asm/msr-index.h>
#include <asm/processor-flags.h>
#include <asm/traps.h>
#include "vmx.h"

static bool dump_invalid_vmcs;
module_param(dump_invalid_vmcs, bool, 0644);
MODULE_PARM_DESC(dump_invalid_vmcs,
		 "Log the guest state when VM entry fails or an exit is not handled");

#define EXIT_REASON_GETSEC	11

/* CR access exit qualification (SDM Table 28-3). */
#define CR_ACCESS_MOV_TO	0
#define CR_ACCESS_MOV_FROM	1
#define CR_ACCESS_CLTS		2
#define CR_ACCESS_LMSW		3

/* EPT violation exit qualification (SDM Table 28-7). */
#define EPT_QUAL_WRITE		BIT(1)
#define EPT_QUAL_FETCH		BIT(2)
#define EPT_QUAL_LINEAR_VALID	BIT(7)
#define EPT_QUAL_TRANSLATED	BIT(8)

void dump_vmcs(struct pyvt_vcpu *vcpu, const char *why)
{
	struct vmx_vcpu *vmx = to_vmx(vcpu);

	if (!dump_invalid_vmcs)
		return;
	vmx_get(vmx);
	pr_info("%s: exit %#x qual %#llx gpa %#llx idt %#x error %llu\n", why,
		vmx->exit_reason, vmx->exit_qual,
		vmcs_read(GUEST_PHYSICAL_ADDRESS), vmx->idt_info,
		vmcs_read(VM_INSTRUCTION_ERROR_FIELD));
	pr_info("rip %#llx rsp %#llx rflags %#llx intr %#llx entry %#llx\n",
		vmcs_read(GUEST_RIP), vmcs_read(GUEST_RSP), vmcs_read(GUEST_RFLAGS),
		vmcs_read(GUEST_INTERRUPTIBILITY_INFO), vmcs_read(VM_ENTRY_CONTROLS));
	pr_info("cr0 %#llx cr3 %#llx cr4 %#llx efer %#llx\n",
		vmcs_read(GUEST_CR0), vmcs_read(GUEST_CR3), vmcs_read(GUEST_CR4),
		vmcs_read(GUEST_IA32_EFER));
	pr_info("cs %04llx %05llx %08llx %016llx ss %04llx %05llx %08llx %016llx\n",
		vmcs_read(GUEST_CS_SELECTOR), vmcs_read(GUEST_CS_AR_BYTES),
		vmcs_read(GUEST_CS_LIMIT), vmcs_read(GUEST_CS_BASE),
		vmcs_read(GUEST_SS_SELECTOR), vmcs_read(GUEST_SS_AR_BYTES),
		vmcs_read(GUEST_SS_LIMIT), vmcs_read(GUEST_SS_BASE));
	pr_info("tr %04llx %05llx %08llx ldtr %04llx %05llx\n",
		vmcs_read(GUEST_TR_SELECTOR), vmcs_read(GUEST_TR_AR_BYTES),
		vmcs_read(GUEST_TR_LIMIT), vmcs_read(GUEST_LDTR_SELECTOR),
		vmcs_read(GUEST_LDTR_AR_BYTES));
	vmx_put();
}

static int unexpected_exit(struct pyvt_vcpu *vcpu)
{
	struct vmx_vcpu *vmx = to_vmx(vcpu);
	u64 data[3] = { vmx->exit_reason, vmx->exit_qual, vcpu->last_cpu };

	dump_vmcs(vcpu, "unhandled exit");
	pyvt_internal_error(vcpu, KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON,
			    3, data);
	return 0;
}

static void skip_insn(struct pyvt_vcpu *vcpu)
{
	vcpu->rip += to_vmx(vcpu)->insn_len;
}

static int handle_exception_nmi(struct pyvt_vcpu *vcpu)
{
	u32 info = to_vmx(vcpu)->exit_intr_info;

	if ((info & INTR_INFO_INTR_TYPE_MASK) == INTR_TYPE_NMI_INTR)
		return 1;	/* handed to Linux in enter_guest() */
	switch (info & INTR_INFO_VECTOR_MASK) {
	case DB_VECTOR:
		return pyvt_exit_db(vcpu);
	case AC_VECTOR:
		return pyvt_exit_ac(vcpu);
	default:
		return unexpected_exit(vcpu);
	}
}

static int handle_triple_fault(struct pyvt_vcpu *vcpu)
{
	vcpu->run->exit_reason = KVM_EXIT_SHUTDOWN;
	return 0;
}

static int handle_cpuid(struct pyvt_vcpu *vcpu)
{
	pyvt_set_cpuid_result(vcpu);
	skip_insn(vcpu);
	return 1;
}

static int handle_invd(struct pyvt_vcpu *vcpu)
{
	skip_insn(vcpu);	/* INVD: never drop dirty host cache lines */
	return 1;
}

static int handle_invlpg(struct pyvt_vcpu *vcpu)
{
	struct vmx_vcpu *vmx = to_vmx(vcpu);

	/* Only CPUs that force INVLPG exiting get here. */
	if (vmx->vpid) {
		vmx_get(vmx);
		vpid_flush(VMX_VPID_EXTENT_SINGLE_CONTEXT, vmx->vpid);
		vmx_put();
	}
	skip_insn(vcpu);
	return 1;
}

static int handle_halt(struct pyvt_vcpu *vcpu)
{
	skip_insn(vcpu);
	vcpu->run->exit_reason = KVM_EXIT_HLT;
	return 0;
}

/* MOV to CR0, CLTS or LMSW touching a bit the host owns.  VMCS current. */
static int emulate_cr0(struct pyvt_vcpu *vcpu, u64 val)
{
	u64 old = vmx_guest_cr0(), cr4 = vmx_guest_cr4();
	u64 efer = vmcs_read(GUEST_IA32_EFER);

	val |= X86_CR0_ET;
	if (!pyvt_cr0_valid(val))
		return -EINVAL;
	if (!(old & X86_CR0_PG) && (val & X86_CR0_PG) && (efer & EFER_LME)) {
		if (!(cr4 & X86_CR4_PAE))
			return -EINVAL;
		vmx_set_efer(efer | EFER_LMA);
		efer |= EFER_LMA;
	} else if ((old & X86_CR0_PG) && !(val & X86_CR0_PG) &&
		   (efer & EFER_LMA)) {
		vmx_set_efer(efer & ~EFER_LMA);
		efer &= ~EFER_LMA;
	}
	if (vmx_load_pdptrs(vcpu, val, cr4, efer, vmcs_read(GUEST_CR3)))
		return -EINVAL;
	vmx_set_cr0(val);
	return 0;
}

/* MOV to CR4 setting a bit the host owns (VMXE, reserved).  VMCS current. */
static int emulate_cr4(struct pyvt_vcpu *vcpu, u64 val)
{
	u64 allowed = vmx_conf.cr4_fixed1 & ~(u64)X86_CR4_VMXE;
	u64 efer = vmcs_read(GUEST_IA32_EFER);

	if ((val & ~allowed) || ((efer & EFER_LMA) && !(val & X86_CR4_PAE)))
		return -EINVAL;
	if (vmx_load_pdptrs(vcpu, vmx_guest_cr0(), val, efer,
			    vmcs_read(GUEST_CR3)))
		return -EINVAL;
	vmx_set_cr4(val);
	return 0;
}

static int handle_cr(struct pyvt_vcpu *vcpu)
{
	struct vmx_vcpu *vmx = to_vmx(vcpu);
	u64 q = vmx->exit_qual;
	int cr = q & 15, reg = (q >> 8) & 15, ret = 0;
	unsigned long *gpr = &vcpu->gprs[reg];

	vmx_get(vmx);
	switch ((q >> 4) & 3) {
	case CR_ACCESS_MOV_TO:
		if (cr == 0)
			ret = emulate_cr0(vcpu, *gpr);
		else if (cr == 4)
			ret = emulate_cr4(vcpu, *gpr);
		else if (cr == 3)	/* CPUs forcing CR3-load exiting */
			vmcs_write(GUEST_CR3, *gpr);
		else if (cr == 8 && *gpr <= 15)
			vmx->cr8 = *gpr;
		else
			ret = -EINVAL;
		break;
	case CR_ACCESS_MOV_FROM:
		if (cr == 3)
			*gpr = vmcs_read(GUEST_CR3);
		else
			*gpr = vmx->cr8;
		break;
	case CR_ACCESS_CLTS:
		vmx_set_cr0(vmx_guest_cr0() & ~(u64)X86_CR0_TS);
		break;
	case CR_ACCESS_LMSW:
		/* LMSW sets PE, MP, EM and TS; it cannot clear PE. */
		ret = emulate_cr0(vcpu, (vmx_guest_cr0() & ~0xeULL) |
				  ((q >> 16) & 0xf));
		break;
	}
	vmx_put();
	if (ret)
		return pyvt_exit_gp(vcpu);
	skip_insn(vcpu);
	return 1;
}

static int handle_io(struct pyvt_vcpu *vcpu)
{
	struct vmx_vcpu *vmx = to_vmx(vcpu);
	u64 q = vmx->exit_qual;
	u8 asize;

	if (vmx_conf.ins_outs_info) {
		asize = 2 << ((vmx->insn_info >> 7) & 3);
	} else {
		u32 cs_ar;
		bool lm;

		vmx_get(vmx);
		cs_ar = vmcs_read(GUEST_CS_AR_BYTES);
		lm = (vmcs_read(GUEST_IA32_EFER) & EFER_LMA) && (cs_ar & VMX_AR_L_MASK);
		vmx_put();
		asize = lm ? 8 : (cs_ar & VMX_AR_DB_MASK) ? 4 : 2;
	}
	return pyvt_emulate_io(vcpu, q >> 16, (q & 7) + 1, q & 8, q & 16,
			       q & 32, asize, vcpu->rip + vmx->insn_len);
}

static int handle_msr(struct pyvt_vcpu *vcpu, bool write)
{
	if (!pyvt_emulate_msr(vcpu, write))
		return pyvt_exit_gp(vcpu);
	skip_insn(vcpu);
	return 1;
}

static int handle_rdmsr(struct pyvt_vcpu *vcpu)
{
	return handle_msr(vcpu, false);
}

static int handle_wrmsr(struct pyvt_vcpu *vcpu)
{
	return handle_msr(vcpu, true);
}

static int handle_ept_violation(struct pyvt_vcpu *vcpu)
{
	struct vmx_vcpu *vmx = to_vmx(vcpu);
	u64 q = vmx->exit_qual;
	unsigned int access = 0;

	if (q & EPT_QUAL_WRITE)
		access |= PYVT_NPF_WRITE;
	if (q & EPT_QUAL_FETCH)
		access |= PYVT_NPF_FETCH;
	/* A linear address that did not translate: the guest's walk. */
	if ((q & EPT_QUAL_LINEAR_VALID) && !(q & EPT_QUAL_TRANSLATED))
		access |= PYVT_NPF_GUEST_WALK;
	return pyvt_handle_npf(vcpu, vmx->exit_gpa, access,
			       EXIT_REASON_EPT_VIOLATION, q);
}

static int (*const vmx_exit_handlers[])(struct pyvt_vcpu *vcpu) = {
	[EXIT_REASON_EXCEPTION_NMI]		= handle_exception_nmi,
	/*
	 * An interrupt (the host took it once interrupts were back on) or
	 * the end of a time slice: go round, checking for signals.
	 */
	[EXIT_REASON_EXTERNAL_INTERRUPT]	= pyvt_exit_resume,
	[EXIT_REASON_PREEMPTION_TIMER]		= pyvt_exit_resume,
	[EXIT_REASON_TRIPLE_FAULT]		= handle_triple_fault,
	[EXIT_REASON_CPUID]			= handle_cpuid,
	[EXIT_REASON_GETSEC]			= pyvt_exit_ud,
	[EXIT_REASON_HLT]			= handle_halt,
	[EXIT_REASON_INVD]			= handle_invd,
	[EXIT_REASON_INVLPG]			= handle_invlpg,
	[EXIT_REASON_RDPMC]			= pyvt_exit_gp,
	[EXIT_REASON_VMCALL]			= pyvt_exit_ud,
	[EXIT_REASON_VMCLEAR]			= pyvt_exit_ud,
	[EXIT_REASON_VMLAUNCH]			= pyvt_exit_ud,
	[EXIT_REASON_VMPTRLD]			= pyvt_exit_ud,
	[EXIT_REASON_VMPTRST]			= pyvt_exit_ud,
	[EXIT_REASON_VMREAD]			= pyvt_exit_ud,
	[EXIT_REASON_VMRESUME]			= pyvt_exit_ud,
	[EXIT_REASON_VMWRITE]			= pyvt_exit_ud,
	[EXIT_REASON_VMOFF]			= pyvt_exit_ud,
	[EXIT_REASON_VMON]			= pyvt_exit_ud,
	[EXIT_REASON_CR_ACCESS]			= handle_cr,
	[EXIT_REASON_IO_INSTRUCTION]		= handle_io,
	[EXIT_REASON_MSR_READ]			= handle_rdmsr,
	[EXIT_REASON_MSR_WRITE]			= handle_wrmsr,
	[EXIT_REASON_MWAIT_INSTRUCTION]		= pyvt_exit_ud,
	[EXIT_REASON_MONITOR_INSTRUCTION]	= pyvt_exit_ud,
	[EXIT_REASON_EPT_VIOLATION]		= handle_ept_violation,
	[EXIT_REASON_INVEPT]			= pyvt_exit_ud,
	[EXIT_REASON_INVVPID]			= pyvt_exit_ud,
	[EXIT_REASON_VMFUNC]			= pyvt_exit_ud,
};

/* Keep an event the exit interrupted, so it is delivered on re-entry. */
static void save_interrupted_event(struct vmx_vcpu *vmx)
{
	u32 type = vmx->idt_info & INTR_INFO_INTR_TYPE_MASK;

	if (!(vmx->idt_info & INTR_INFO_VALID_MASK))
		return;
	/* INTn, INT3 and INTO re-execute, and regenerate the event. */
	if (type == INTR_TYPE_SOFT_INTR || type == INTR_TYPE_SOFT_EXCEPTION ||
	    type == INTR_TYPE_PRIV_SW_EXCEPTION)
		return;
	vmx->inject_info = vmx->idt_info & (INTR_INFO_VECTOR_MASK |
					    INTR_INFO_INTR_TYPE_MASK |
					    INTR_INFO_DELIVER_CODE_MASK |
					    INTR_INFO_VALID_MASK);
	vmx->inject_error = vmx->idt_error;
}

/* After an entry that did not fail: handle exit @reason. */
int vmx_handle_exit(struct pyvt_vcpu *vcpu, u32 reason)
{
	save_interrupted_event(to_vmx(vcpu));
	reason &= 0xffff;
	if (reason >= ARRAY_SIZE(vmx_exit_handlers) ||
	    !vmx_exit_handlers[reason])
		return unexpected_exit(vcpu);
	return vmx_exit_handlers[reason](vcpu);
}

/* Exits that only go round: an interrupt, the end of a time slice. */
bool vmx_exit_resumes(u32 reason)
{
	return reason < ARRAY_SIZE(vmx_exit_handlers) &&
	       vmx_exit_handlers[reason] == pyvt_exit_resume;
}
