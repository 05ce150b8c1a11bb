// SPDX-License-Identifier: GPL-2.0
/*
 * AMD-V (SVM) backend: per-CPU enabling, the VMCB, one guest entry and
 * the exit handlers.  Nested paging is required; every vCPU uses ASID 1
 * and the whole TLB is flushed whenever a CPU switches vCPU, a vCPU
 * moves to another CPU, or a mapping was removed.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/module.h>
#include <linux/mm.h>
#include <linux/slab.h>
#include <linux/mem_encrypt.h>
#include <linux/io.h>

/* Physical address as the CPU uses it, with the SME C-bit if active. */
#define sme_page_pa(page)	__sme_set(page_to_phys(page))
#include <asm/svm.h>
#include <asm/msr.h>
#include <asm/msr-index.h>
#include <asm/cpufeature.h>
#include <asm/fpu/api.h>
#include <asm/processor-flags.h>
#include <asm/traps.h>
#include <asm/tsc.h>
#include "core.h"

static bool dump_invalid_vmcb;
module_param(dump_invalid_vmcb, bool, 0644);
MODULE_PARM_DESC(dump_invalid_vmcb,
		 "Log the VMCB when VMRUN fails or an exit is not handled");

#define SVM_ASID		1
#define IOPM_ORDER		2	/* 12 KiB used */
#define MSRPM_ORDER		1	/* 8 KiB */
#define DEFAULT_PAT		0x0007040600070406ULL
#define SEG_TYPE_LDT		2
#define SEG_TYPE_BUSY_TSS16	3

struct svm_cpu {
	struct page *hsave;		/* MSR_VM_HSAVE_PA */
	struct page *host_save;		/* VMSAVE/VMLOAD of host state */
	struct pyvt_vcpu *last_vcpu;	/* whose translations the TLB holds */
};
static DEFINE_PER_CPU(struct svm_cpu, svm_cpu);

struct svm_vcpu {
	struct vmcb *vmcb;
	u64 vmcb_pa;
	u32 event_inj;			/* pending event, SVM_EVTINJ_* */
	u32 event_inj_err;
};

static struct page *iopm_pages, *msrpm_pages;

static struct svm_vcpu *to_svm(struct pyvt_vcpu *vcpu)
{
	return vcpu->priv;
}

static void clgi(void)
{
	asm volatile("clgi" ::: "memory");
}

static void stgi(void)
{
	asm volatile("stgi" ::: "memory");
}

/* Guest writes to these go to the VMCB and VMLOAD/VMSAVE swaps them. */
static const u32 passthrough_msrs[] = {
	MSR_FS_BASE, MSR_GS_BASE, MSR_KERNEL_GS_BASE,
	MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_SYSCALL_MASK,
	MSR_IA32_SYSENTER_CS, MSR_IA32_SYSENTER_ESP, MSR_IA32_SYSENTER_EIP,
};

static void msrpm_allow(u8 *msrpm, u32 msr)
{
	u32 base;

	if (msr <= 0x1fff)
		base = 0;
	else if (msr >= 0xc0000000 && msr <= 0xc0001fff)
		base = 0x800 * 8;
	else
		return;
	base += (msr & 0x1fff) * 2;	/* read bit, then write bit */
	msrpm[base / 8] &= ~(3 << (base % 8));
}

static int svm_probe(void)
{
	u64 vm_cr;
	int i;

	if (boot_cpu_data.x86_vendor != X86_VENDOR_AMD &&
	    boot_cpu_data.x86_vendor != X86_VENDOR_HYGON)
		return -ENODEV;
	if (!boot_cpu_has(X86_FEATURE_SVM) || !boot_cpu_has(X86_FEATURE_NPT))
		return -ENODEV;
	rdmsrl(MSR_VM_CR, vm_cr);
	if (vm_cr & SVM_VM_CR_SVM_DIS_MASK)
		return -EPERM;

	iopm_pages = alloc_pages(GFP_KERNEL, IOPM_ORDER);
	msrpm_pages = alloc_pages(GFP_KERNEL, MSRPM_ORDER);
	if (!iopm_pages || !msrpm_pages) {
		if (iopm_pages)
			__free_pages(iopm_pages, IOPM_ORDER);
		if (msrpm_pages)
			__free_pages(msrpm_pages, MSRPM_ORDER);
		return -ENOMEM;
	}
	memset(page_address(iopm_pages), 0xff, PAGE_SIZE << IOPM_ORDER);
	memset(page_address(msrpm_pages), 0xff, PAGE_SIZE << MSRPM_ORDER);
	for (i = 0; i < ARRAY_SIZE(passthrough_msrs); i++)
		msrpm_allow(page_address(msrpm_pages), passthrough_msrs[i]);
	return 0;
}

static void svm_cleanup(void)
{
	__free_pages(iopm_pages, IOPM_ORDER);
	__free_pages(msrpm_pages, MSRPM_ORDER);
}

static int svm_cpu_enable(void)
{
	struct svm_cpu *sd = this_cpu_ptr(&svm_cpu);
	u64 efer;

	rdmsrl(MSR_EFER, efer);
	if (efer & EFER_SVME) {
		pr_warn("CPU %d: SVM already in use by another hypervisor\n",
			smp_processor_id());
		return -EBUSY;
	}
	sd->hsave = pyvt_alloc_page();
	sd->host_save = pyvt_alloc_page();
	if (!sd->hsave || !sd->host_save) {
		pyvt_free_page(sd->hsave);
		pyvt_free_page(sd->host_save);
		sd->hsave = NULL;
		sd->host_save = NULL;
		return -ENOMEM;
	}
	sd->last_vcpu = NULL;
	wrmsrl(MSR_EFER, efer | EFER_SVME);
	wrmsrl(MSR_VM_HSAVE_PA, sme_page_pa(sd->hsave));
	return 0;
}

static void svm_cpu_disable(void)
{
	struct svm_cpu *sd = this_cpu_ptr(&svm_cpu);
	u64 efer;

	if (!sd->hsave)
		return;
	wrmsrl(MSR_VM_HSAVE_PA, 0);
	rdmsrl(MSR_EFER, efer);
	wrmsrl(MSR_EFER, efer & ~EFER_SVME);
	pyvt_free_page(sd->hsave);
	pyvt_free_page(sd->host_save);
	sd->hsave = NULL;
	sd->host_save = NULL;
	sd->last_vcpu = NULL;
}

static void set_intercept(struct vmcb_control_area *c, u32 bit)
{
	c->intercepts[bit / 32] |= BIT(bit % 32);
}

static void init_seg(struct vmcb_seg *seg, u16 attrib)
{
	seg->selector = 0;
	seg->attrib = SVM_SELECTOR_P_MASK | attrib;
	seg->limit = 0xffff;
	seg->base = 0;
}

/* Power-on state, as KVM shows it after KVM_CREATE_VCPU. */
static void svm_reset(struct pyvt_vcpu *vcpu)
{
	struct vmcb *vmcb = to_svm(vcpu)->vmcb;
	struct vmcb_control_area *c = &vmcb->control;
	struct vmcb_save_area *s = &vmcb->save;
	u16 data = SVM_SELECTOR_S_MASK | SVM_SELECTOR_WRITE_MASK;

	memset(vmcb, 0, PAGE_SIZE);

	c->intercepts[INTERCEPT_DR] = 0xffffffff;
	c->intercepts[INTERCEPT_EXCEPTION] = BIT(DB_VECTOR) | BIT(AC_VECTOR);
	set_intercept(c, INTERCEPT_INTR);
	set_intercept(c, INTERCEPT_NMI);
	set_intercept(c, INTERCEPT_SMI);
	set_intercept(c, INTERCEPT_CPUID);
	set_intercept(c, INTERCEPT_INVD);
	set_intercept(c, INTERCEPT_HLT);
	set_intercept(c, INTERCEPT_INVLPGA);
	set_intercept(c, INTERCEPT_IOIO_PROT);
	set_intercept(c, INTERCEPT_MSR_PROT);
	set_intercept(c, INTERCEPT_TASK_SWITCH);
	set_intercept(c, INTERCEPT_SHUTDOWN);
	set_intercept(c, INTERCEPT_VMRUN);
	set_intercept(c, INTERCEPT_VMMCALL);
	set_intercept(c, INTERCEPT_VMLOAD);
	set_intercept(c, INTERCEPT_VMSAVE);
	set_intercept(c, INTERCEPT_STGI);
	set_intercept(c, INTERCEPT_CLGI);
	set_intercept(c, INTERCEPT_SKINIT);
	set_intercept(c, INTERCEPT_MONITOR);
	set_intercept(c, INTERCEPT_MWAIT);
	set_intercept(c, INTERCEPT_XSETBV);
	c->iopm_base_pa = sme_page_pa(iopm_pages);
	c->msrpm_base_pa = sme_page_pa(msrpm_pages);
	c->asid = SVM_ASID;
	/* Guest IF and TPR never mask host interrupts. */
	c->int_ctl = V_INTR_MASKING_MASK;

	/* Nested paging. */
	c->nested_ctl = SVM_NESTED_CTL_NP_ENABLE;
	c->nested_cr3 = __sme_set(vcpu->vm->npt_root);

	init_seg(&s->es, data);
	init_seg(&s->ss, data);
	init_seg(&s->ds, data);
	init_seg(&s->fs, data);
	init_seg(&s->gs, data);
	init_seg(&s->cs, SVM_SELECTOR_S_MASK | SVM_SELECTOR_READ_MASK |
		 SVM_SELECTOR_CODE_MASK);
	s->cs.selector = 0xf000;
	s->cs.base = 0xffff0000;
	init_seg(&s->ldtr, SEG_TYPE_LDT);
	init_seg(&s->tr, SEG_TYPE_BUSY_TSS16);
	s->gdtr.limit = 0xffff;
	s->idtr.limit = 0xffff;
	s->efer = EFER_SVME;
	s->cr0 = X86_CR0_NW | X86_CR0_CD | X86_CR0_ET;
	s->dr6 = 0xffff0ff0;
	s->dr7 = 0x400;
	s->g_pat = DEFAULT_PAT;

	memset(vcpu->gprs, 0, sizeof(vcpu->gprs));
	vcpu->gprs[PYVT_RDX] = 0x600;
	vcpu->rip = 0xfff0;
	vcpu->rflags = X86_EFLAGS_FIXED;
	vcpu->pending.kind = PYVT_PENDING_NONE;
	to_svm(vcpu)->event_inj = 0;
}

static int svm_vcpu_create(struct pyvt_vcpu *vcpu)
{
	struct svm_vcpu *svm;
	struct page *page;

	svm = kzalloc(sizeof(*svm), GFP_KERNEL_ACCOUNT);
	if (!svm)
		return -ENOMEM;
	page = pyvt_alloc_page();
	if (!page) {
		kfree(svm);
		return -ENOMEM;
	}
	svm->vmcb = page_address(page);
	svm->vmcb_pa = sme_page_pa(page);
	vcpu->priv = svm;
	svm_reset(vcpu);
	return 0;
}

static void svm_vcpu_free(struct pyvt_vcpu *vcpu)
{
	struct svm_vcpu *svm = to_svm(vcpu);
	int cpu;

	/* Forget it as the TLB owner, so a new vCPU here gets a flush. */
	for_each_possible_cpu(cpu)
		cmpxchg(&per_cpu(svm_cpu, cpu).last_vcpu, vcpu, NULL);
	pyvt_free_page(virt_to_page(svm->vmcb));
	kfree(svm);
	vcpu->priv = NULL;
}

static void seg_to_kvm(const struct vmcb_seg *s, struct kvm_segment *k)
{
	k->base = s->base;
	k->limit = s->limit;
	k->selector = s->selector;
	k->type = s->attrib & SVM_SELECTOR_TYPE_MASK;
	k->s = (s->attrib >> SVM_SELECTOR_S_SHIFT) & 1;
	k->dpl = (s->attrib >> SVM_SELECTOR_DPL_SHIFT) & 3;
	k->present = (s->attrib >> SVM_SELECTOR_P_SHIFT) & 1;
	k->avl = (s->attrib >> SVM_SELECTOR_AVL_SHIFT) & 1;
	k->l = (s->attrib >> SVM_SELECTOR_L_SHIFT) & 1;
	k->db = (s->attrib >> SVM_SELECTOR_DB_SHIFT) & 1;
	k->g = (s->attrib >> SVM_SELECTOR_G_SHIFT) & 1;
	k->unusable = !k->present;
	k->padding = 0;
}

static void seg_from_kvm(struct vmcb_seg *s, const struct kvm_segment *k)
{
	s->base = k->base;
	s->limit = k->limit;
	s->selector = k->selector;
	if (k->unusable) {
		s->attrib = 0;
		return;
	}
	s->attrib = (k->type & SVM_SELECTOR_TYPE_MASK) |
		    (k->s & 1) << SVM_SELECTOR_S_SHIFT |
		    (k->dpl & 3) << SVM_SELECTOR_DPL_SHIFT |
		    (k->present & 1) << SVM_SELECTOR_P_SHIFT |
		    (k->avl & 1) << SVM_SELECTOR_AVL_SHIFT |
		    (k->l & 1) << SVM_SELECTOR_L_SHIFT |
		    (k->db & 1) << SVM_SELECTOR_DB_SHIFT |
		    (k->g & 1) << SVM_SELECTOR_G_SHIFT;
}

static void svm_get_sregs(struct pyvt_vcpu *vcpu, struct kvm_sregs *k)
{
	struct vmcb *vmcb = to_svm(vcpu)->vmcb;
	struct vmcb_save_area *s = &vmcb->save;

	memset(k, 0, sizeof(*k));
	seg_to_kvm(&s->cs, &k->cs);
	seg_to_kvm(&s->ds, &k->ds);
	seg_to_kvm(&s->es, &k->es);
	seg_to_kvm(&s->fs, &k->fs);
	seg_to_kvm(&s->gs, &k->gs);
	seg_to_kvm(&s->ss, &k->ss);
	seg_to_kvm(&s->tr, &k->tr);
	seg_to_kvm(&s->ldtr, &k->ldt);
	/* As KVM reports them: TR busy, data segments accessed, SS.DPL=CPL */
	k->tr.type |= 2;
	if (!k->ds.unusable)
		k->ds.type |= 1;
	if (!k->es.unusable)
		k->es.type |= 1;
	if (!k->fs.unusable)
		k->fs.type |= 1;
	if (!k->gs.unusable)
		k->gs.type |= 1;
	if (k->ss.unusable)
		k->ss.db = 0;
	k->ss.dpl = s->cpl;
	k->cs.g = s->cs.limit > 0xfffff;
	k->gdt.base = s->gdtr.base;
	k->gdt.limit = s->gdtr.limit;
	k->idt.base = s->idtr.base;
	k->idt.limit = s->idtr.limit;
	k->cr0 = s->cr0;
	k->cr2 = s->cr2;
	k->cr3 = s->cr3;
	k->cr4 = s->cr4;
	k->cr8 = vmcb->control.int_ctl & V_TPR_MASK;
	k->efer = s->efer & ~EFER_SVME;
	k->apic_base = vcpu->apic_base;
}

/* Checked by pyvt_check_sregs(); the rest is left to VMRUN. */
static int svm_set_sregs(struct pyvt_vcpu *vcpu, const struct kvm_sregs *k)
{
	struct vmcb *vmcb = to_svm(vcpu)->vmcb;
	struct vmcb_save_area *s = &vmcb->save;

	seg_from_kvm(&s->cs, &k->cs);
	seg_from_kvm(&s->ds, &k->ds);
	seg_from_kvm(&s->es, &k->es);
	seg_from_kvm(&s->fs, &k->fs);
	seg_from_kvm(&s->gs, &k->gs);
	seg_from_kvm(&s->ss, &k->ss);
	seg_from_kvm(&s->tr, &k->tr);
	seg_from_kvm(&s->ldtr, &k->ldt);
	s->gdtr.base = k->gdt.base;
	s->gdtr.limit = k->gdt.limit;
	s->idtr.base = k->idt.base;
	s->idtr.limit = k->idt.limit;
	s->cpl = (k->cr0 & X86_CR0_PE) ? k->ss.dpl & 3 : 0;
	s->cr0 = k->cr0;
	s->cr2 = k->cr2;
	s->cr3 = k->cr3;
	s->cr4 = k->cr4;
	s->efer = k->efer | EFER_SVME;
	vmcb->control.int_ctl = (vmcb->control.int_ctl & ~V_TPR_MASK) |
				(k->cr8 & V_TPR_MASK);
	vcpu->apic_base = k->apic_base;
	return 0;
}

static void svm_queue_exception(struct pyvt_vcpu *vcpu, u8 vector,
				bool has_error, u32 error)
{
	struct svm_vcpu *svm = to_svm(vcpu);

	if (svm->event_inj & SVM_EVTINJ_VALID)
		return;		/* one at a time; the guest will retry */
	/* Real mode exceptions push no error code. */
	if (!(svm->vmcb->save.cr0 & X86_CR0_PE))
		has_error = false;
	svm->event_inj = vector | SVM_EVTINJ_VALID | SVM_EVTINJ_TYPE_EXEPT |
			 (has_error ? SVM_EVTINJ_VALID_ERR : 0);
	svm->event_inj_err = error;
}

static void skip_insn(struct pyvt_vcpu *vcpu, int len)
{
	u64 next_rip = to_svm(vcpu)->vmcb->control.next_rip;

	/* NRIP save is optional (TCG lacks it): fall back to the length. */
	vcpu->rip = next_rip ? next_rip : vcpu->rip + len;
}

static void dump_vmcb(struct pyvt_vcpu *vcpu, const char *why)
{
	struct vmcb *vmcb = to_svm(vcpu)->vmcb;
	struct vmcb_save_area *s = &vmcb->save;

	if (!dump_invalid_vmcb)
		return;
	pr_info("%s: exit %#x info %#llx %#llx intinfo %#x\n", why,
		vmcb->control.exit_code, vmcb->control.exit_info_1,
		vmcb->control.exit_info_2, vmcb->control.exit_int_info);
	pr_info("rip %#llx rsp %#llx rflags %#llx cpl %d\n",
		s->rip, s->rsp, s->rflags, s->cpl);
	pr_info("cr0 %#llx cr3 %#llx cr4 %#llx efer %#llx\n",
		s->cr0, s->cr3, s->cr4, s->efer);
	pr_info("cs %04x %04x %08x %016llx ss %04x %04x %08x %016llx\n",
		s->cs.selector, s->cs.attrib, s->cs.limit, s->cs.base,
		s->ss.selector, s->ss.attrib, s->ss.limit, s->ss.base);
	pr_info("tr %04x %04x %08x %016llx ldtr %04x %04x\n",
		s->tr.selector, s->tr.attrib, s->tr.limit, s->tr.base,
		s->ldtr.selector, s->ldtr.attrib);
}

static int unexpected_exit(struct pyvt_vcpu *vcpu)
{
	u64 data[2] = { to_svm(vcpu)->vmcb->control.exit_code,
			vcpu->last_cpu };

	dump_vmcb(vcpu, "unhandled exit");
	pyvt_internal_error(vcpu, KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON,
			    2, data);
	return 0;
}

static int cpuid_interception(struct pyvt_vcpu *vcpu)
{
	pyvt_set_cpuid_result(vcpu);
	skip_insn(vcpu, 2);
	return 1;
}

static int invd_interception(struct pyvt_vcpu *vcpu)
{
	skip_insn(vcpu, 2);	/* never drop dirty host cache lines */
	return 1;
}

static int halt_interception(struct pyvt_vcpu *vcpu)
{
	skip_insn(vcpu, 1);
	vcpu->run->exit_reason = KVM_EXIT_HLT;
	return 0;
}

static int shutdown_interception(struct pyvt_vcpu *vcpu)
{
	/* The VMCB is undefined after SHUTDOWN: start over, as KVM does. */
	svm_reset(vcpu);
	vcpu->run->exit_reason = KVM_EXIT_SHUTDOWN;
	return 0;
}

static int io_interception(struct pyvt_vcpu *vcpu)
{
	struct vmcb *vmcb = to_svm(vcpu)->vmcb;
	u32 info = vmcb->control.exit_info_1;
	u8 size = (info & SVM_IOIO_SIZE_MASK) >> SVM_IOIO_SIZE_SHIFT;
	u8 asize = ((info & SVM_IOIO_ASIZE_MASK) >> SVM_IOIO_ASIZE_SHIFT) * 2;

	if (!asize) {
		bool lm = (vmcb->save.efer & EFER_LMA) &&
			  (vmcb->save.cs.attrib & SVM_SELECTOR_L_MASK);

		asize = lm ? 8 :
			(vmcb->save.cs.attrib & SVM_SELECTOR_DB_MASK) ? 4 : 2;
	}
	return pyvt_emulate_io(vcpu, info >> 16, size,
			       info & SVM_IOIO_TYPE_MASK,
			       info & SVM_IOIO_STR_MASK,
			       info & SVM_IOIO_REP_MASK, asize,
			       vmcb->control.exit_info_2);
}

/* The MSRs that live in the VMCB save area (VMLOAD/VMSAVE or VMRUN). */
static u64 *vmcb_msr(struct vmcb_save_area *s, u32 msr)
{
	switch (msr) {
	case MSR_STAR:			return &s->star;
	case MSR_LSTAR:			return &s->lstar;
	case MSR_CSTAR:			return &s->cstar;
	case MSR_SYSCALL_MASK:		return &s->sfmask;
	case MSR_KERNEL_GS_BASE:	return &s->kernel_gs_base;
	case MSR_FS_BASE:		return &s->fs.base;
	case MSR_GS_BASE:		return &s->gs.base;
	case MSR_IA32_SYSENTER_CS:	return &s->sysenter_cs;
	case MSR_IA32_SYSENTER_ESP:	return &s->sysenter_esp;
	case MSR_IA32_SYSENTER_EIP:	return &s->sysenter_eip;
	default:			return NULL;
	}
}

static int msr_read(struct pyvt_vcpu *vcpu, u32 msr, u64 *val)
{
	struct vmcb *vmcb = to_svm(vcpu)->vmcb;
	u64 *field = vmcb_msr(&vmcb->save, msr);

	if (field) {
		*val = *field;
		return 0;
	}
	switch (msr) {
	case MSR_EFER:
		*val = vmcb->save.efer & ~EFER_SVME;
		return 0;
	case MSR_IA32_CR_PAT:
		*val = vmcb->save.g_pat;
		return 0;
	case MSR_IA32_APICBASE:
		*val = vcpu->apic_base;
		return 0;
	case MSR_TSC_AUX:
		*val = vcpu->tsc_aux;
		return 0;
	case MSR_IA32_TSC:
		*val = rdtsc() + vmcb->control.tsc_offset;
		return 0;
	default:
		return -EINVAL;
	}
}

static int msr_write(struct pyvt_vcpu *vcpu, u32 msr, u64 val)
{
	struct vmcb *vmcb = to_svm(vcpu)->vmcb;
	u64 *field = vmcb_msr(&vmcb->save, msr), efer;

	if (!pyvt_msr_value_valid(msr, val))
		return -EINVAL;
	if (field) {
		*field = val;
		return 0;
	}
	switch (msr) {
	case MSR_EFER:
		if (pyvt_efer_write(vmcb->save.efer & ~EFER_SVME,
				    vmcb->save.cr0, val, &efer))
			return -EINVAL;
		vmcb->save.efer = efer | EFER_SVME;
		return 0;
	case MSR_IA32_CR_PAT:
		vmcb->save.g_pat = val;
		return 0;
	case MSR_IA32_APICBASE:
		vcpu->apic_base = val;
		return 0;
	case MSR_IA32_TSC:
		vmcb->control.tsc_offset = val - rdtsc();
		return 0;
	case MSR_TSC_AUX:
		vcpu->tsc_aux = val;
		return 0;
	default:
		return -EINVAL;
	}
}

static int msr_interception(struct pyvt_vcpu *vcpu)
{
	/* EXITINFO1: 1 for WRMSR, 0 for RDMSR. */
	if (!pyvt_emulate_msr(vcpu, to_svm(vcpu)->vmcb->control.exit_info_1))
		return pyvt_exit_gp(vcpu);
	skip_insn(vcpu, 2);
	return 1;
}

#define NPF_GUEST_PAGE_WALK	BIT_ULL(33)
#define NPF_FETCH		BIT_ULL(4)
#define NPF_WRITE		BIT_ULL(1)

/* EXITINFO1 is the fault's error code, EXITINFO2 the GPA. */
static int npf_interception(struct pyvt_vcpu *vcpu)
{
	struct vmcb *vmcb = to_svm(vcpu)->vmcb;
	u64 error = vmcb->control.exit_info_1;
	unsigned int access = 0;

	if (error & NPF_WRITE)
		access |= PYVT_NPF_WRITE;
	if (error & NPF_FETCH)
		access |= PYVT_NPF_FETCH;
	if (error & NPF_GUEST_PAGE_WALK)
		access |= PYVT_NPF_GUEST_WALK;
	return pyvt_handle_npf(vcpu, vmcb->control.exit_info_2, access,
			       SVM_EXIT_NPF, error);
}

static int (*const svm_exit_handlers[])(struct pyvt_vcpu *vcpu) = {
	[SVM_EXIT_EXCP_BASE + DB_VECTOR]	= pyvt_exit_db,
	[SVM_EXIT_EXCP_BASE + AC_VECTOR]	= pyvt_exit_ac,
	/* The host takes the interrupt after STGI. */
	[SVM_EXIT_INTR]				= pyvt_exit_resume,
	[SVM_EXIT_NMI]				= pyvt_exit_resume,
	[SVM_EXIT_SMI]				= pyvt_exit_resume,
	[SVM_EXIT_CPUID]			= cpuid_interception,
	[SVM_EXIT_INVD]				= invd_interception,
	[SVM_EXIT_HLT]				= halt_interception,
	[SVM_EXIT_INVLPGA]			= pyvt_exit_ud,
	[SVM_EXIT_IOIO]				= io_interception,
	[SVM_EXIT_MSR]				= msr_interception,
	[SVM_EXIT_SHUTDOWN]			= shutdown_interception,
	[SVM_EXIT_VMRUN]			= pyvt_exit_ud,
	[SVM_EXIT_VMMCALL]			= pyvt_exit_ud,
	[SVM_EXIT_VMLOAD]			= pyvt_exit_ud,
	[SVM_EXIT_VMSAVE]			= pyvt_exit_ud,
	[SVM_EXIT_STGI]				= pyvt_exit_ud,
	[SVM_EXIT_CLGI]				= pyvt_exit_ud,
	[SVM_EXIT_SKINIT]			= pyvt_exit_ud,
	[SVM_EXIT_MONITOR]			= pyvt_exit_ud,
	[SVM_EXIT_MWAIT]			= pyvt_exit_ud,
};

/* Keep an event the exit interrupted, so it is delivered on re-entry. */
static void save_interrupted_event(struct svm_vcpu *svm)
{
	u32 info = svm->vmcb->control.exit_int_info;
	u32 type = info & SVM_EXITINTINFO_TYPE_MASK;
	u8 vector = info & SVM_EXITINTINFO_VEC_MASK;

	svm->vmcb->control.event_inj = 0;
	if (!(info & SVM_EXITINTINFO_VALID))
		return;
	/* INTn, INT3 and INTO re-execute, and regenerate the event. */
	if (type == SVM_EXITINTINFO_TYPE_SOFT ||
	    (type == SVM_EXITINTINFO_TYPE_EXEPT &&
	     (vector == BP_VECTOR || vector == OF_VECTOR)))
		return;
	svm->event_inj = info;
	svm->event_inj_err = svm->vmcb->control.exit_int_info_err;
}

static int svm_run_once(struct pyvt_vcpu *vcpu)
{
	struct svm_vcpu *svm = to_svm(vcpu);
	struct vmcb *vmcb = svm->vmcb;
	struct svm_cpu *sd;
	bool flush;
	int cpu;

	vmcb->save.rax = vcpu->gprs[PYVT_RAX];
	vmcb->save.rsp = vcpu->gprs[PYVT_RSP];
	vmcb->save.rip = vcpu->rip;
	vmcb->save.rflags = vcpu->rflags;
	vmcb->control.event_inj = svm->event_inj;
	vmcb->control.event_inj_err = svm->event_inj_err;
	vmcb->control.next_rip = 0;	/* only NRIP-save CPUs set it */
	svm->event_inj = 0;

	kernel_fpu_begin();	/* also disables preemption */
	cpu = smp_processor_id();
	sd = this_cpu_ptr(&svm_cpu);
	if (unlikely(!sd->host_save)) {
		/* This CPU is going offline and SVM is already off here. */
		kernel_fpu_end();
		svm->event_inj = vmcb->control.event_inj;
		return 1;
	}
	flush = vcpu->last_cpu != cpu || sd->last_vcpu != vcpu ||
		vcpu->tlb_gen != vcpu->vm->tlb_gen;
	vmcb->control.tlb_ctl = flush ? TLB_CONTROL_FLUSH_ALL_ASID :
					TLB_CONTROL_DO_NOTHING;
	vcpu->last_cpu = cpu;
	vcpu->tlb_gen = vcpu->vm->tlb_gen;
	sd->last_vcpu = vcpu;
	pyvt_fxrstor(vcpu->fxsave);

	local_irq_disable();
	clgi();
	pyvt_svm_enter(svm->vmcb_pa, sme_page_pa(sd->host_save),
		       vcpu->gprs);
	stgi();
	local_irq_enable();

	pyvt_fxsave(vcpu->fxsave);
	kernel_fpu_end();

	vcpu->gprs[PYVT_RAX] = vmcb->save.rax;
	vcpu->gprs[PYVT_RSP] = vmcb->save.rsp;
	vcpu->rip = vmcb->save.rip;
	vcpu->rflags = vmcb->save.rflags;

	if (vmcb->control.exit_code == (u32)SVM_EXIT_ERR) {
		dump_vmcb(vcpu, "VMRUN failed");
		vcpu->run->exit_reason = KVM_EXIT_FAIL_ENTRY;
		vcpu->run->fail_entry.hardware_entry_failure_reason =
			vmcb->control.exit_code;
		vcpu->run->fail_entry.cpu = cpu;
		return 0;
	}
	save_interrupted_event(svm);

	if (vmcb->control.exit_code == SVM_EXIT_NPF)
		return npf_interception(vcpu);
	if (vmcb->control.exit_code >= ARRAY_SIZE(svm_exit_handlers) ||
	    !svm_exit_handlers[vmcb->control.exit_code])
		return unexpected_exit(vcpu);
	return svm_exit_handlers[vmcb->control.exit_code](vcpu);
}

/*
 * A real-mode guest with nested paging off whose CS base is a page
 * holding VMMCALL: every VMRUN exits straight back.  RIP is never
 * advanced, so each entry runs the same instruction.
 */
static int svm_measure_roundtrip(struct pyvt_roundtrip *rt, u64 *samples)
{
	struct page *vmcb_page, *code_page;
	struct vmcb *vmcb;
	u64 t0, t1;
	u32 i, n = 0, exit_code = 0;
	int ret = -ENOMEM, cpu = 0;

	vmcb_page = pyvt_alloc_page();
	code_page = alloc_page(GFP_KERNEL | __GFP_DMA32 | __GFP_ZERO);
	if (!vmcb_page || !code_page)
		goto out;
	memcpy(page_address(code_page), "\x0f\x01\xd9", 3);	/* vmmcall */

	vmcb = page_address(vmcb_page);
	set_intercept(&vmcb->control, INTERCEPT_INTR);
	set_intercept(&vmcb->control, INTERCEPT_NMI);
	set_intercept(&vmcb->control, INTERCEPT_SMI);
	set_intercept(&vmcb->control, INTERCEPT_SHUTDOWN);
	set_intercept(&vmcb->control, INTERCEPT_VMRUN);
	set_intercept(&vmcb->control, INTERCEPT_VMMCALL);
	vmcb->control.iopm_base_pa = sme_page_pa(iopm_pages);
	vmcb->control.msrpm_base_pa = sme_page_pa(msrpm_pages);
	vmcb->control.asid = SVM_ASID;
	vmcb->control.int_ctl = V_INTR_MASKING_MASK;
	vmcb->control.tlb_ctl = TLB_CONTROL_FLUSH_ALL_ASID;
	init_seg(&vmcb->save.cs, SVM_SELECTOR_S_MASK | SVM_SELECTOR_READ_MASK |
		 SVM_SELECTOR_CODE_MASK);
	vmcb->save.cs.base = sme_page_pa(code_page);
	init_seg(&vmcb->save.ss, SVM_SELECTOR_S_MASK | SVM_SELECTOR_WRITE_MASK);
	init_seg(&vmcb->save.ds, SVM_SELECTOR_S_MASK | SVM_SELECTOR_WRITE_MASK);
	init_seg(&vmcb->save.es, SVM_SELECTOR_S_MASK | SVM_SELECTOR_WRITE_MASK);
	init_seg(&vmcb->save.tr, SEG_TYPE_BUSY_TSS16);
	vmcb->save.efer = EFER_SVME;
	vmcb->save.cr0 = X86_CR0_ET;
	vmcb->save.dr6 = 0xffff0ff0;
	vmcb->save.dr7 = 0x400;
	vmcb->save.rflags = X86_EFLAGS_FIXED;
	vmcb->save.g_pat = DEFAULT_PAT;

	for (i = 0; i < rt->iterations; i++) {
		unsigned long gprs[PYVT_NR_GPRS] = {};
		struct svm_cpu *sd;

		preempt_disable();
		sd = this_cpu_ptr(&svm_cpu);
		cpu = smp_processor_id();
		if (unlikely(!sd->host_save)) {	/* CPU going offline */
			preempt_enable();
			cond_resched();
			continue;
		}
		vmcb->save.rip = 0;
		local_irq_disable();
		clgi();
		t0 = rdtsc_ordered();
		pyvt_svm_enter(sme_page_pa(vmcb_page),
			       sme_page_pa(sd->host_save), gprs);
		t1 = rdtsc_ordered();
		stgi();
		/* The guest ran without nested paging: no vCPU owns the TLB. */
		sd->last_vcpu = NULL;
		vmcb->control.tlb_ctl = TLB_CONTROL_DO_NOTHING;
		local_irq_enable();
		preempt_enable();
		exit_code = vmcb->control.exit_code;
		if (exit_code == SVM_EXIT_VMMCALL)
			samples[n++] = t1 - t0;
		else if (exit_code != SVM_EXIT_INTR && exit_code != SVM_EXIT_NMI)
			break;
		if (!(i & 255))
			cond_resched();
	}
	rt->cpu = cpu;
	rt->exit_code = exit_code;
	if (exit_code != SVM_EXIT_VMMCALL && exit_code != SVM_EXIT_INTR &&
	    exit_code != SVM_EXIT_NMI)
		ret = -EIO;
	else
		ret = n;
out:
	if (code_page)
		__free_page(code_page);
	pyvt_free_page(vmcb_page);
	return ret;
}

static void svm_read_caps(struct pyvt_cpu_caps *caps)
{
	cpuid(0x8000000a, &caps->svm_eax, &caps->svm_ebx, &caps->svm_ecx,
	      &caps->svm_edx);
	if (!rdmsrl_safe(MSR_VM_CR, &caps->vm_cr))
		caps->flags |= PYVT_CPU_CAPS_VM_CR_VALID;
}

const struct pyvt_vendor_ops pyvt_svm_ops = {
	.name			= "AMD-V",
	.vendor			= PYVT_VENDOR_AMD,
	.probe			= svm_probe,
	.cleanup		= svm_cleanup,
	.cpu_enable		= svm_cpu_enable,
	.cpu_disable		= svm_cpu_disable,
	.vcpu_create		= svm_vcpu_create,
	.vcpu_free		= svm_vcpu_free,
	.get_sregs		= svm_get_sregs,
	.set_sregs		= svm_set_sregs,
	.queue_exception	= svm_queue_exception,
	.run_once		= svm_run_once,
	.get_msr		= msr_read,
	.set_msr		= msr_write,
	.measure_roundtrip	= svm_measure_roundtrip,
	.read_caps		= svm_read_caps,
	.dump_state		= dump_vmcb,
};
