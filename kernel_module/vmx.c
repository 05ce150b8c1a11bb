// SPDX-License-Identifier: GPL-2.0
/*
 * Intel VT-x (VMX) backend: VMXON per CPU, one VMCS per vCPU, one guest
 * entry and the exit handlers.  EPT with a 4-level walk and unrestricted
 * guest are required, so real and protected mode guests run natively;
 * VPID is used when the CPU has it.
 *
 * This file holds the vendor ops and the world switch around them;
 * vmx.h says where the rest lives.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/module.h>
#include <linux/mm.h>
#include <linux/slab.h>
#include <linux/smp.h>
#include <linux/io.h>
#include <asm/msr.h>
#include <asm/msr-index.h>
#include <asm/desc.h>
#include <asm/debugreg.h>
#include <asm/fpu/api.h>
#include <asm/processor-flags.h>
#include <asm/tlbflush.h>
#include <asm/tsc.h>
#include "vmx.h"

DEFINE_PER_CPU(struct vmx_cpu, vmx_cpu);

static int vmx_cpu_enable(void)
{
	struct vmx_cpu *vc = this_cpu_ptr(&vmx_cpu);
	unsigned long cr0 = read_cr0();
	int ret;

	if (cr4_read_shadow() & X86_CR4_VMXE) {
		pr_warn("CPU %d: VT-x already in use by another hypervisor\n",
			smp_processor_id());
		return -EBUSY;
	}
	ret = vmx_firmware_check();
	if (ret)
		return ret;
	if ((cr0 & vmx_conf.cr0_fixed0) != vmx_conf.cr0_fixed0 ||
	    (cr0 & ~vmx_conf.cr0_fixed1)) {
		pr_err("CPU %d: CR0 %#lx violates the VMX fixed bits\n",
		       smp_processor_id(), cr0);
		return -EIO;
	}
	vc->vmxon_region = pyvt_alloc_page();
	if (!vc->vmxon_region)
		return -ENOMEM;
	*(u32 *)page_address(vc->vmxon_region) = vmx_conf.revision;
	INIT_LIST_HEAD(&vc->active);
	vc->current_vmcs = 0;

	cr4_set_bits(X86_CR4_VMXE | (vmx_conf.cr4_fixed0 & ~X86_CR4_VMXE &
				     ~cr4_read_shadow()));
	if (vmxon(page_to_phys(vc->vmxon_region))) {
		cr4_clear_bits(X86_CR4_VMXE);
		pyvt_free_page(vc->vmxon_region);
		vc->vmxon_region = NULL;
		pr_err("CPU %d: VMXON failed\n", smp_processor_id());
		return -EIO;
	}
	return 0;
}

static void vmx_cpu_disable(void)
{
	struct vmx_cpu *vc = this_cpu_ptr(&vmx_cpu);
	struct vmx_vcpu *vmx, *tmp;
	unsigned long flags;

	if (!vc->vmxon_region)
		return;
	local_irq_save(flags);
	list_for_each_entry_safe(vmx, tmp, &vc->active, active_link)
		vmcs_clear_here(vmx);
	asm volatile("vmxoff" ::: "cc", "memory");
	cr4_clear_bits_irqsoff(X86_CR4_VMXE);
	local_irq_restore(flags);
	pyvt_free_page(vc->vmxon_region);
	vc->vmxon_region = NULL;
}

/* What a VM exit clobbers and Linux needs back. */
struct host_save {
	unsigned long fs_base;
	u64 debugctl;
	u16 ds, es, fs, gs, ldt;
};

/* VMCS current, preemption off: the host fields that vary per entry. */
static void host_before_entry(struct vmx_vcpu *vmx, struct host_save *h)
{
	unsigned long cr3 = __read_cr3(), cr4 = cr4_read_shadow();

	if (cr3 != vmx->host_cr3) {
		vmcs_write(HOST_CR3, cr3);
		vmx->host_cr3 = cr3;
	}
	if (cr4 != vmx->host_cr4) {
		vmcs_write(HOST_CR4, cr4);
		vmx->host_cr4 = cr4;
	}
	savesegment(ds, h->ds);
	savesegment(es, h->es);
	savesegment(fs, h->fs);
	savesegment(gs, h->gs);
	store_ldt(h->ldt);
	rdmsrl(MSR_FS_BASE, h->fs_base);
	if (h->fs_base != vmx->host_fs_base) {
		vmcs_write(HOST_FS_BASE, h->fs_base);
		vmx->host_fs_base = h->fs_base;
	}
	/* The user GS base of whichever thread runs the vCPU now. */
	rdmsrl(MSR_KERNEL_GS_BASE, vmx->host_msrs[AUTOLOAD_KERNEL_GS].value);
	h->debugctl = get_debugctlmsr();
}

/* Interrupts off, right after the exit (or a failed entry). */
static void host_after_exit(struct vmx_vcpu *vmx, struct host_save *h,
			    int cpu)
{
	if (h->ldt)
		asm volatile("lldt %0" : : "m" (h->ldt));
	if (h->gs) {
		load_gs_index(h->gs);
		wrmsrl(MSR_KERNEL_GS_BASE,
		       vmx->host_msrs[AUTOLOAD_KERNEL_GS].value);
	}
	if (h->fs) {
		loadsegment(fs, h->fs);
		wrmsrl(MSR_FS_BASE, h->fs_base);
	}
	if (h->ds | h->es) {
		loadsegment(ds, h->ds);
		loadsegment(es, h->es);
	}
	/* VM exit sets the TR limit to 0x67 and the GDT limit to 0xffff. */
	invalidate_tss_limit();
	load_fixmap_gdt(cpu);
	/* VM exit sets DR7 to 0x400 and clears IA32_DEBUGCTL. */
	if (hw_breakpoint_active())
		hw_breakpoint_restore();
	if (h->debugctl)
		update_debugctlmsr(h->debugctl);
}

/* Flush EPT (and VPID) translations the CPU may hold for this vCPU. */
static void flush_if_needed(struct pyvt_vcpu *vcpu, int cpu)
{
	struct vmx_vcpu *vmx = to_vmx(vcpu);

	if (vcpu->last_cpu == cpu && vcpu->tlb_gen == vcpu->vm->tlb_gen)
		return;
	ept_flush(vmx_conf.invept_type, eptp_of(vcpu->vm));
	if (vmx->vpid)
		vpid_flush(VMX_VPID_EXTENT_SINGLE_CONTEXT, vmx->vpid);
	vcpu->last_cpu = cpu;
	vcpu->tlb_gen = vcpu->vm->tlb_gen;
}

/*
 * One entry and exit: host state saved and restored around it, a host
 * NMI the exit swallowed handed back to Linux.  VMCS current, preemption
 * off.  Returns what pyvt_vmx_enter() does; the exit reason is read.
 */
static int enter_guest(struct pyvt_vcpu *vcpu, int cpu, u64 *tsc)
{
	struct vmx_vcpu *vmx = to_vmx(vcpu);
	struct host_save h;
	u64 t0 = 0;
	int fail;

	host_before_entry(vmx, &h);
	local_irq_disable();
	if (native_read_cr2() != vmx->cr2)
		native_write_cr2(vmx->cr2);
	if (tsc)
		t0 = rdtsc_ordered();
	fail = pyvt_vmx_enter(vcpu->gprs, vmx->launched);
	if (tsc)
		*tsc = rdtsc_ordered() - t0;
	vmx->cr2 = native_read_cr2();
	host_after_exit(vmx, &h, cpu);
	vmx->exit_reason = fail ? 0 : vmcs_read(VM_EXIT_REASON_FIELD);
	if (!fail && vmx->exit_reason == EXIT_REASON_EXCEPTION_NMI) {
		vmx->exit_intr_info = vmcs_read(VM_EXIT_INTR_INFO);
		if ((vmx->exit_intr_info & INTR_INFO_INTR_TYPE_MASK) ==
		    INTR_TYPE_NMI_INTR)
			pyvt_vmx_do_nmi();
	}
	local_irq_enable();
	if (!fail && !(vmx->exit_reason & EXIT_REASON_ENTRY_FAILED))
		vmx->launched = true;
	return fail;
}

/* What may have changed since the last exit, into the VMCS. */
static void write_entry_state(struct pyvt_vcpu *vcpu)
{
	struct vmx_vcpu *vmx = to_vmx(vcpu);

	vmcs_write(GUEST_RSP, vcpu->gprs[PYVT_RSP]);
	vmcs_write(GUEST_RIP, vcpu->rip);
	vmcs_write(GUEST_RFLAGS, vcpu->rflags);
	/* RIP moved on (skipped, emulated, set): no STI/MOV SS shadow left. */
	if (vcpu->rip != vmx->exit_rip)
		vmcs_write(GUEST_INTERRUPTIBILITY_INFO,
			   vmcs_read(GUEST_INTERRUPTIBILITY_INFO) &
			   ~(u64)(GUEST_INTR_STATE_STI |
				  GUEST_INTR_STATE_MOV_SS));
	vmcs_write(VM_ENTRY_INTR_INFO_FIELD, vmx->inject_info);
	if (vmx->inject_info & INTR_INFO_DELIVER_CODE_MASK)
		vmcs_write(VM_ENTRY_EXCEPTION_ERROR_CODE, vmx->inject_error);
	vmx->inject_info = 0;
}

static int vmx_run_once(struct pyvt_vcpu *vcpu)
{
	struct vmx_vcpu *vmx = to_vmx(vcpu);
	u32 reason;
	int cpu, fail;

	kernel_fpu_begin();	/* also disables preemption */
	if (!vmx_load(vmx)) {
		/* This CPU is on its way in or out and VMX is off here. */
		kernel_fpu_end();
		return 1;
	}
	cpu = smp_processor_id();
	write_entry_state(vcpu);
	flush_if_needed(vcpu, cpu);
	pyvt_fxrstor(vcpu->fxsave);

	fail = enter_guest(vcpu, cpu, NULL);

	pyvt_fxsave(vcpu->fxsave);
	if (fail) {
		reason = vmcs_read(VM_INSTRUCTION_ERROR_FIELD);
	} else {
		/*
		 * Every exit needs these; the rest only by reason (the
		 * interruption info of an exception exit was read with the
		 * NMI check in enter_guest()).
		 */
		reason = vmx->exit_reason;
		vmx->exit_qual = vmcs_read(EXIT_QUALIFICATION);
		vmx->insn_len = vmcs_read(VM_EXIT_INSTRUCTION_LEN);
		vmx->idt_info = vmcs_read(IDT_VECTORING_INFO_FIELD);
		if (vmx->idt_info & INTR_INFO_DELIVER_CODE_MASK)
			vmx->idt_error = vmcs_read(IDT_VECTORING_ERROR_CODE);
		if (reason == EXIT_REASON_EPT_VIOLATION)
			vmx->exit_gpa = vmcs_read(GUEST_PHYSICAL_ADDRESS);
		if (reason == EXIT_REASON_IO_INSTRUCTION)
			vmx->insn_info = vmcs_read(VMX_INSTRUCTION_INFO);
		vcpu->gprs[PYVT_RSP] = vmcs_read(GUEST_RSP);
		vcpu->rip = vmcs_read(GUEST_RIP);
		vcpu->rflags = vmcs_read(GUEST_RFLAGS);
		vmx->exit_rip = vcpu->rip;
	}
	kernel_fpu_end();

	if (fail || (reason & EXIT_REASON_ENTRY_FAILED)) {
		dump_vmcs(vcpu, "VM entry failed");
		vcpu->run->exit_reason = KVM_EXIT_FAIL_ENTRY;
		vcpu->run->fail_entry.hardware_entry_failure_reason = reason;
		vcpu->run->fail_entry.cpu = cpu;
		return 0;
	}
	return vmx_handle_exit(vcpu, reason);
}

/*
 * A real-mode guest whose one page of memory holds VMCALL, mapped by a
 * throwaway EPT: each VMLAUNCH/VMRESUME exits straight back.  RIP is
 * never advanced, so each entry runs the same instruction.
 */
static int vmx_measure_roundtrip(struct pyvt_roundtrip *rt, u64 *samples)
{
	struct page *tables[4] = {}, *code = NULL;
	struct pyvt_vcpu *vcpu = NULL;
	struct pyvt_vm *vm = NULL;
	u32 i, n = 0, reason = 0;
	int ret = -ENOMEM, cpu = 0, level;
	u64 cycles;

	vm = kzalloc(sizeof(*vm), GFP_KERNEL);
	vcpu = kzalloc(sizeof(*vcpu), GFP_KERNEL);
	code = pyvt_alloc_page();
	for (level = 0; level < 4; level++)
		tables[level] = pyvt_alloc_page();
	if (!vm || !vcpu || !code || !tables[0] || !tables[1] ||
	    !tables[2] || !tables[3])
		goto out;
	memcpy(page_address(code), "\x0f\x01\xc1", 3);	/* vmcall */
	/* GPA 0 -> code: index 0 at every level. */
	for (level = 0; level < 3; level++)
		*(u64 *)page_address(tables[level]) =
			page_to_phys(tables[level + 1]) | VMX_EPT_RWX_MASK;
	*(u64 *)page_address(tables[3]) = page_to_phys(code) |
		VMX_EPT_RWX_MASK | EPT_LEAF_WB;
	vm->npt_root = page_to_phys(tables[0]);
	vcpu->vm = vm;
	vcpu->last_cpu = -1;
	ret = vmx_vcpu_create(vcpu);
	if (ret)
		goto out;

	for (i = 0; i < rt->iterations; i++) {
		struct vmx_vcpu *vmx = to_vmx(vcpu);

		preempt_disable();
		if (!vmx_load(vmx)) {	/* CPU going offline */
			preempt_enable();
			cond_resched();
			continue;
		}
		cpu = smp_processor_id();
		flush_if_needed(vcpu, cpu);
		if (i == 0) {
			vmcs_write(GUEST_CS_SELECTOR, 0);
			vmcs_write(GUEST_CS_BASE, 0);
		}
		vcpu->rip = 0;
		write_entry_state(vcpu);
		ret = enter_guest(vcpu, cpu, &cycles);
		reason = ret ? vmcs_read(VM_INSTRUCTION_ERROR_FIELD) :
			       to_vmx(vcpu)->exit_reason;
		preempt_enable();
		if (ret)
			break;
		if (reason == EXIT_REASON_VMCALL)
			samples[n++] = cycles;
		else if (!vmx_exit_resumes(reason) &&
			 reason != EXIT_REASON_EXCEPTION_NMI)
			break;
		if (!(i & 255))
			cond_resched();
	}
	rt->cpu = cpu;
	rt->exit_code = reason;
	if (ret || reason != EXIT_REASON_VMCALL) {
		pr_info("round trip: %s %#x\n", ret ? "VM entry failed, error" :
			"unexpected exit", reason);
		ret = -EIO;
	} else {
		ret = n;
	}
out:
	if (vcpu && vcpu->priv)
		vmx_vcpu_free(vcpu);
	for (level = 0; level < 4; level++)
		pyvt_free_page(tables[level]);
	pyvt_free_page(code);
	kfree(vcpu);
	kfree(vm);
	return ret;
}

const struct pyvt_vendor_ops pyvt_vmx_ops = {
	.name			= "Intel VT-x",
	.vendor			= PYVT_VENDOR_INTEL,
	.npt_levels		= 4,
	.npt_leaf_flags		= EPT_LEAF_WB,
	.probe			= vmx_probe,
	.cleanup		= vmx_cleanup,
	.cpu_enable		= vmx_cpu_enable,
	.cpu_disable		= vmx_cpu_disable,
	.vcpu_create		= vmx_vcpu_create,
	.vcpu_free		= vmx_vcpu_free,
	.get_sregs		= vmx_get_sregs,
	.set_sregs		= vmx_set_sregs,
	.queue_exception	= vmx_queue_exception,
	.run_once		= vmx_run_once,
	.get_msr		= vmx_get_msr,
	.set_msr		= vmx_set_msr,
	.measure_roundtrip	= vmx_measure_roundtrip,
	.read_caps		= vmx_read_caps,
	.dump_state		= dump_vmcs,
};
