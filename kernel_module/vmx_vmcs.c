// SPDX-License-Identifier: GPL-2.0
/*
 * VT-x VMCS access and setup: making a vCPU's VMCS current, its controls
 * and host fields, and the guest state KVM_GET/SET_SREGS and
 * KVM_GET/SET_MSRS see.
 *
 * A VMCS is "active" on at most one CPU.  Every access to it happens
 * with preemption off after vmx_get(), which makes it current on this
 * CPU, clearing it on the CPU it was last active on first (as KVM does
 * on vCPU migration).  Each CPU keeps a list of the VMCSs active on it,
 * so turning VMX off there (last VM gone, CPU unplugged) clears them.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/mm.h>
#include <linux/slab.h>
#include <linux/idr.h>
#include <linux/smp.h>
#include <linux/io.h>
#include <linux/sched.h>
#include <asm/msr.h>
#include <asm/msr-index.h>
#include <asm/desc.h>
#include <asm/cpu_entry_area.h>
#include <asm/processor-flags.h>
#include "vmx.h"

#define DEFAULT_PAT		0x0007040600070406ULL

const u32 vmx_autoload_msrs[] = {
	MSR_KERNEL_GS_BASE, MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_SYSCALL_MASK,
};

static_assert(ARRAY_SIZE(vmx_autoload_msrs) == NR_AUTOLOAD);

DEFINE_IDA(vmx_vpid_ida);

/* The four VMCS fields of each guest segment, and its kvm_sregs member. */
struct seg_fields {
	u32 sel, base, limit, ar;
	size_t sregs;			/* offset in struct kvm_sregs */
};

#define SEG(name, member) { GUEST_##name##_SELECTOR, GUEST_##name##_BASE, \
			    GUEST_##name##_LIMIT, GUEST_##name##_AR_BYTES, \
			    offsetof(struct kvm_sregs, member) }
enum { SEG_CS, SEG_DS, SEG_ES, SEG_FS, SEG_GS, SEG_SS, SEG_TR, SEG_LDTR };
static const struct seg_fields segs[] = {
	[SEG_CS] = SEG(CS, cs), [SEG_DS] = SEG(DS, ds), [SEG_ES] = SEG(ES, es),
	[SEG_FS] = SEG(FS, fs), [SEG_GS] = SEG(GS, gs), [SEG_SS] = SEG(SS, ss),
	[SEG_TR] = SEG(TR, tr), [SEG_LDTR] = SEG(LDTR, ldt),
};

/* Segment @seg's struct kvm_segment inside @k. */
#define SREGS_SEG(k, seg) \
	((struct kvm_segment *)((char *)(k) + segs[seg].sregs))

/* VMX access rights (SDM Table 24-2); <asm/vmx.h> names all but AVL. */
#define VMX_AR_AVL_MASK		BIT(12)

/* On the CPU the VMCS is active on, interrupts off. */
void vmcs_clear_here(void *arg)
{
	struct vmx_vcpu *vmx = arg;
	struct vmx_cpu *vc = this_cpu_ptr(&vmx_cpu);

	if (vmx->cpu != smp_processor_id())
		return;		/* cleared meanwhile */
	vmclear(vmx->vmcs_pa);
	if (vc->current_vmcs == vmx->vmcs_pa)
		vc->current_vmcs = 0;
	list_del(&vmx->active_link);
	vmx->launched = false;
	/* Everything above is done before another CPU may load it. */
	smp_store_release(&vmx->cpu, -1);
}

static void write_host_state_cpu(int cpu)
{
	struct desc_ptr dt;
	u64 msr;

	native_store_gdt(&dt);
	vmcs_write(HOST_GDTR_BASE, dt.address);
	store_idt(&dt);
	vmcs_write(HOST_IDTR_BASE, dt.address);
	vmcs_write(HOST_TR_BASE,
		(unsigned long)&get_cpu_entry_area(cpu)->tss.x86_tss);
	rdmsrl(MSR_GS_BASE, msr);
	vmcs_write(HOST_GS_BASE, msr);
	rdmsrl(MSR_IA32_SYSENTER_CS, msr);
	vmcs_write(HOST_IA32_SYSENTER_CS, msr);
	rdmsrl(MSR_IA32_SYSENTER_ESP, msr);
	vmcs_write(HOST_IA32_SYSENTER_ESP, msr);
	rdmsrl(MSR_IA32_SYSENTER_EIP, msr);
	vmcs_write(HOST_IA32_SYSENTER_EIP, msr);
}

/*
 * Make @vmx's VMCS current on this CPU.  Preemption must be off; false
 * if VMX is off here (a CPU on its way in or out), so try again later.
 */
bool vmx_load(struct vmx_vcpu *vmx)
{
	struct vmx_cpu *vc = this_cpu_ptr(&vmx_cpu);
	int cpu = smp_processor_id(), old;
	unsigned long flags;

	/* Pairs with vmcs_clear_here(): a -1 means the VMCLEAR is done. */
	old = smp_load_acquire(&vmx->cpu);

	if (!vc->vmxon_region)
		return false;
	if (old != cpu) {
		if (old >= 0)
			smp_call_function_single(old, vmcs_clear_here, vmx, 1);
		local_irq_save(flags);
		list_add(&vmx->active_link, &vc->active);
		vmx->cpu = cpu;
		vmx->launched = false;
		local_irq_restore(flags);
		/* Clear launch state; a new VMCS must be cleared before use. */
		vmclear(vmx->vmcs_pa);
		vmptrld(vmx->vmcs_pa);
		vc->current_vmcs = vmx->vmcs_pa;
		write_host_state_cpu(cpu);
		/* Translations cached for it elsewhere may be stale here. */
		vmx->vcpu->last_cpu = -1;
	} else if (vc->current_vmcs != vmx->vmcs_pa) {
		vmptrld(vmx->vmcs_pa);
		vc->current_vmcs = vmx->vmcs_pa;
	}
	return true;
}

/* Disable preemption and make the VMCS current; pair with vmx_put(). */
void vmx_get(struct vmx_vcpu *vmx)
{
	for (;;) {
		preempt_disable();
		if (vmx_load(vmx))
			return;
		preempt_enable();
		schedule_timeout_uninterruptible(1);
	}
}

void vmx_put(void)
{
	preempt_enable();
}

static u32 seg_ar_from_kvm(const struct kvm_segment *k, bool ldtr)
{
	u32 type = k->type;

	if (k->unusable || !k->present)
		return VMX_AR_UNUSABLE_MASK;
	/* The accessed bit is required; KVM sets it for old user spaces. */
	if (!ldtr)
		type |= 1;
	return (type & VMX_AR_TYPE_MASK) | (k->s ? VMX_AR_S_MASK : 0) |
	       (k->dpl & 3) << VMX_AR_DPL_SHIFT | VMX_AR_P_MASK |
	       (k->avl ? VMX_AR_AVL_MASK : 0) | (k->l ? VMX_AR_L_MASK : 0) |
	       (k->db ? VMX_AR_DB_MASK : 0) | (k->g ? VMX_AR_G_MASK : 0);
}

static void seg_get(int seg, struct kvm_segment *k)
{
	u32 ar = vmcs_read(segs[seg].ar);

	k->selector = vmcs_read(segs[seg].sel);
	k->base = vmcs_read(segs[seg].base);
	k->limit = vmcs_read(segs[seg].limit);
	k->type = ar & VMX_AR_TYPE_MASK;
	k->s = !!(ar & VMX_AR_S_MASK);
	k->dpl = (ar >> VMX_AR_DPL_SHIFT) & 3;
	k->unusable = !!(ar & VMX_AR_UNUSABLE_MASK);
	k->present = !k->unusable;
	k->avl = !!(ar & VMX_AR_AVL_MASK);
	k->l = !!(ar & VMX_AR_L_MASK);
	k->db = !!(ar & VMX_AR_DB_MASK);
	k->g = !!(ar & VMX_AR_G_MASK);
	k->padding = 0;
}

static void seg_set(int seg, const struct kvm_segment *k)
{
	vmcs_write(segs[seg].sel, k->selector);
	vmcs_write(segs[seg].base, k->base);
	vmcs_write(segs[seg].limit, k->limit);
	vmcs_write(segs[seg].ar, seg_ar_from_kvm(k, seg == SEG_LDTR));
}

/* CR0/CR4 bits the host owns: fixed by VMX, or kept off (CD, NW). */
static u64 cr0_host_bits(void)
{
	return ((vmx_conf.cr0_fixed0 | ~vmx_conf.cr0_fixed1) &
		~(u64)(X86_CR0_PE | X86_CR0_PG) & 0xffffffff) |
	       X86_CR0_CD | X86_CR0_NW;
}

static u64 cr4_host_bits(void)
{
	return (vmx_conf.cr4_fixed0 | ~vmx_conf.cr4_fixed1) & 0xffffffff;
}

/* The guest's view of CR0/CR4, from the VMCS and the read shadows. */
u64 vmx_guest_cr0(void)
{
	u64 mask = cr0_host_bits();

	return (vmcs_read(GUEST_CR0) & ~mask) | (vmcs_read(CR0_READ_SHADOW) & mask);
}

u64 vmx_guest_cr4(void)
{
	u64 mask = cr4_host_bits();

	return (vmcs_read(GUEST_CR4) & ~mask) | (vmcs_read(CR4_READ_SHADOW) & mask);
}

void vmx_set_cr0(u64 cr0)
{
	u64 fixed = vmx_conf.cr0_fixed0 & ~(u64)(X86_CR0_PE | X86_CR0_PG);

	vmcs_write(CR0_READ_SHADOW, cr0);
	vmcs_write(GUEST_CR0, (cr0 & ~(u64)(X86_CR0_CD | X86_CR0_NW)) | fixed);
}

void vmx_set_cr4(u64 cr4)
{
	vmcs_write(CR4_READ_SHADOW, cr4);
	vmcs_write(GUEST_CR4, cr4 | vmx_conf.cr4_fixed0);
}

void vmx_set_efer(u64 efer)
{
	u32 entry = vmcs_read(VM_ENTRY_CONTROLS) & ~VM_ENTRY_IA32E_MODE;

	vmcs_write(GUEST_IA32_EFER, efer);
	vmcs_write(VM_ENTRY_CONTROLS,
		entry | ((efer & EFER_LMA) ? VM_ENTRY_IA32E_MODE : 0));
}

/*
 * With EPT, VM entry takes PAE paging's four PDPTEs from the VMCS, not
 * from memory: load them whenever the guest enters PAE paging from
 * outside (KVM_SET_SREGS, an emulated CR write).  -EINVAL if one is bad.
 */
int vmx_load_pdptrs(struct pyvt_vcpu *vcpu, u64 cr0, u64 cr4, u64 efer,
		    u64 cr3)
{
	u64 pdpte[4];
	int i;

	if (!(cr0 & X86_CR0_PG) || !(cr4 & X86_CR4_PAE) || (efer & EFER_LMA))
		return 0;
	if (pyvt_read_gpa(vcpu->vm, cr3 & 0xffffffe0, pdpte, sizeof(pdpte)))
		memset(pdpte, 0, sizeof(pdpte));
	for (i = 0; i < 4; i++) {
		/* Reserved: bits 2:1, 8:5 and above MAXPHYADDR. */
		if ((pdpte[i] & 1) && (pdpte[i] & (0x1e6ULL |
		    ~GENMASK_ULL(boot_cpu_data.x86_phys_bits - 1, 0))))
			return -EINVAL;
		vmcs_write(GUEST_PDPTR0 + 2 * i, pdpte[i]);
	}
	return 0;
}

/* Power-on state, as KVM shows it after KVM_CREATE_VCPU.  VMCS current. */
static void vmx_reset_guest(struct pyvt_vcpu *vcpu)
{
	struct vmx_vcpu *vmx = to_vmx(vcpu);
	struct kvm_segment seg = {
		.limit = 0xffff, .type = 3, .s = 1, .present = 1,
	};
	int i;

	for (i = SEG_CS; i <= SEG_SS; i++)
		seg_set(i, &seg);
	seg.type = 11;
	seg.selector = 0xf000;
	seg.base = 0xffff0000;
	seg_set(SEG_CS, &seg);
	seg.selector = 0;
	seg.base = 0;
	seg.s = 0;
	seg_set(SEG_TR, &seg);
	seg.type = 2;
	seg_set(SEG_LDTR, &seg);
	vmcs_write(GUEST_GDTR_BASE, 0);
	vmcs_write(GUEST_GDTR_LIMIT, 0xffff);
	vmcs_write(GUEST_IDTR_BASE, 0);
	vmcs_write(GUEST_IDTR_LIMIT, 0xffff);
	vmx_set_cr0(X86_CR0_NW | X86_CR0_CD | X86_CR0_ET);
	vmx_set_cr4(0);
	vmcs_write(GUEST_CR3, 0);
	vmx_set_efer(0);
	vmcs_write(GUEST_IA32_PAT, DEFAULT_PAT);
	vmcs_write(GUEST_DR7, 0x400);
	vmcs_write(GUEST_IA32_DEBUGCTL, 0);
	vmcs_write(GUEST_SYSENTER_CS, 0);
	vmcs_write(GUEST_SYSENTER_ESP, 0);
	vmcs_write(GUEST_SYSENTER_EIP, 0);
	vmcs_write(GUEST_INTERRUPTIBILITY_INFO, 0);
	vmcs_write(GUEST_ACTIVITY_STATE, GUEST_ACTIVITY_ACTIVE);
	vmcs_write(GUEST_PENDING_DBG_EXCEPTIONS, 0);
	for (i = 0; i < NR_AUTOLOAD; i++)
		vmx->guest_msrs[i].value = 0;
	vmx->cr8 = 0;
	vmx->cr2 = 0;
	vmx->inject_info = 0;

	memset(vcpu->gprs, 0, sizeof(vcpu->gprs));
	vcpu->gprs[PYVT_RDX] = 0x600;
	vcpu->rip = 0xfff0;
	vcpu->rflags = X86_EFLAGS_FIXED;
	vcpu->pending.kind = PYVT_PENDING_NONE;
}

/* Controls and host state that never change for this VMCS. */
static void vmx_setup_vmcs(struct pyvt_vcpu *vcpu)
{
	struct vmx_vcpu *vmx = to_vmx(vcpu);

	vmcs_write(PIN_BASED_VM_EXEC_CONTROL, vmx_conf.pin);
	vmcs_write(CPU_BASED_VM_EXEC_CONTROL, vmx_conf.proc);
	vmcs_write(SECONDARY_VM_EXEC_CONTROL, vmx_conf.proc2);
	vmcs_write(VM_EXIT_CONTROLS, vmx_conf.exit);
	vmcs_write(VM_ENTRY_CONTROLS, vmx_conf.entry);
	/* #DB and #AC: a guest must not hold the CPU in an endless loop. */
	vmcs_write(EXCEPTION_BITMAP, BIT(DB_VECTOR) | BIT(AC_VECTOR));
	vmcs_write(PAGE_FAULT_ERROR_CODE_MASK, 0);
	vmcs_write(PAGE_FAULT_ERROR_CODE_MATCH, 0);
	vmcs_write(CR3_TARGET_COUNT, 0);
	vmcs_write(CR0_GUEST_HOST_MASK, cr0_host_bits());
	vmcs_write(CR4_GUEST_HOST_MASK, cr4_host_bits());
	vmcs_write(MSR_BITMAP, page_to_phys(vmx_msr_bitmap));
	vmcs_write(EPT_POINTER, eptp_of(vcpu->vm));
	if (vmx_conf.proc2 & SECONDARY_EXEC_ENABLE_VPID)
		vmcs_write(VIRTUAL_PROCESSOR_ID, vmx->vpid);
	vmcs_write(TSC_OFFSET, 0);
	if (vmx_conf.pin & PIN_BASED_VMX_PREEMPTION_TIMER)
		vmcs_write(VMX_PREEMPTION_TIMER_VALUE, vmx_conf.time_slice);
	vmcs_write(VMCS_LINK_POINTER, -1ULL);
	vmcs_write(VM_ENTRY_INTR_INFO_FIELD, 0);
	vmcs_write(VM_ENTRY_MSR_LOAD_ADDR, virt_to_phys(vmx->guest_msrs));
	vmcs_write(VM_ENTRY_MSR_LOAD_COUNT, NR_AUTOLOAD);
	vmcs_write(VM_EXIT_MSR_STORE_ADDR, virt_to_phys(vmx->guest_msrs));
	vmcs_write(VM_EXIT_MSR_STORE_COUNT, NR_AUTOLOAD);
	vmcs_write(VM_EXIT_MSR_LOAD_ADDR, virt_to_phys(vmx->host_msrs));
	vmcs_write(VM_EXIT_MSR_LOAD_COUNT, NR_AUTOLOAD);

	vmcs_write(HOST_CR0, read_cr0());
	vmcs_write(HOST_CS_SELECTOR, __KERNEL_CS);
	vmcs_write(HOST_SS_SELECTOR, __KERNEL_DS);
	/* User selectors have RPL 3, which VM exit refuses: restored after. */
	vmcs_write(HOST_DS_SELECTOR, 0);
	vmcs_write(HOST_ES_SELECTOR, 0);
	vmcs_write(HOST_FS_SELECTOR, 0);
	vmcs_write(HOST_GS_SELECTOR, 0);
	vmcs_write(HOST_TR_SELECTOR, GDT_ENTRY_TSS * 8);
	vmcs_write(HOST_IA32_EFER, native_read_msr(MSR_EFER));
	vmcs_write(HOST_IA32_PAT, native_read_msr(MSR_IA32_CR_PAT));
	vmcs_write(HOST_RIP, (unsigned long)pyvt_vmx_exit);
	vmx->host_cr3 = 0;
	vmx->host_cr4 = 0;
	vmx->host_fs_base = 0;
	vmcs_write(HOST_CR3, 0);
	vmcs_write(HOST_CR4, 0);
	vmcs_write(HOST_FS_BASE, 0);
}

int vmx_vcpu_create(struct pyvt_vcpu *vcpu)
{
	struct vmx_vcpu *vmx;
	int i, vpid = 0;

	vmx = kzalloc(sizeof(*vmx), GFP_KERNEL_ACCOUNT);
	if (!vmx)
		return -ENOMEM;
	if (vmx_conf.proc2 & SECONDARY_EXEC_ENABLE_VPID) {
		/* VPID 0 is the host's and not allowed for a guest. */
		vpid = ida_alloc_range(&vmx_vpid_ida, 1, 0xffff, GFP_KERNEL);
		if (vpid < 0) {
			kfree(vmx);
			return vpid;
		}
	}
	vmx->vpid = vpid;
	vmx->vmcs = pyvt_alloc_page();
	vmx->msr_page = pyvt_alloc_page();
	if (!vmx->vmcs || !vmx->msr_page) {
		pyvt_free_page(vmx->vmcs);
		pyvt_free_page(vmx->msr_page);
		if (vpid)
			ida_free(&vmx_vpid_ida, vpid);
		kfree(vmx);
		return -ENOMEM;
	}
	*(u32 *)page_address(vmx->vmcs) = vmx_conf.revision;
	vmx->vmcs_pa = page_to_phys(vmx->vmcs);
	vmx->guest_msrs = page_address(vmx->msr_page);
	vmx->host_msrs = vmx->guest_msrs + NR_AUTOLOAD;
	for (i = 0; i < NR_AUTOLOAD; i++) {
		vmx->guest_msrs[i].index = vmx_autoload_msrs[i];
		vmx->host_msrs[i].index = vmx_autoload_msrs[i];
		/* The same on every CPU; KERNEL_GS_BASE is read per entry. */
		rdmsrl(vmx_autoload_msrs[i], vmx->host_msrs[i].value);
	}
	vmx->cpu = -1;
	vmx->vcpu = vcpu;
	INIT_LIST_HEAD(&vmx->active_link);
	vcpu->priv = vmx;

	vmx_get(vmx);
	vmx_setup_vmcs(vcpu);
	vmx_reset_guest(vcpu);
	vmx_put();
	return 0;
}

void vmx_vcpu_free(struct pyvt_vcpu *vcpu)
{
	struct vmx_vcpu *vmx = to_vmx(vcpu);
	int cpu;

	/* Pairs with vmcs_clear_here(), as in vmx_load(). */
	cpu = smp_load_acquire(&vmx->cpu);
	if (cpu >= 0)
		smp_call_function_single(cpu, vmcs_clear_here, vmx, 1);
	/* An offline CPU cleared its VMCSs on the way out. */
	if (vmx->vpid)
		ida_free(&vmx_vpid_ida, vmx->vpid);
	pyvt_free_page(vmx->vmcs);
	pyvt_free_page(vmx->msr_page);
	kfree(vmx);
	vcpu->priv = NULL;
}

void vmx_get_sregs(struct pyvt_vcpu *vcpu, struct kvm_sregs *k)
{
	struct vmx_vcpu *vmx = to_vmx(vcpu);
	int i;

	memset(k, 0, sizeof(*k));
	vmx_get(vmx);
	for (i = 0; i < ARRAY_SIZE(segs); i++)
		seg_get(i, SREGS_SEG(k, i));
	k->gdt.base = vmcs_read(GUEST_GDTR_BASE);
	k->gdt.limit = vmcs_read(GUEST_GDTR_LIMIT);
	k->idt.base = vmcs_read(GUEST_IDTR_BASE);
	k->idt.limit = vmcs_read(GUEST_IDTR_LIMIT);
	k->cr0 = vmx_guest_cr0();
	k->cr3 = vmcs_read(GUEST_CR3);
	k->cr4 = vmx_guest_cr4();
	k->efer = vmcs_read(GUEST_IA32_EFER);
	vmx_put();
	k->cr2 = vmx->cr2;
	k->cr8 = vmx->cr8;
	k->apic_base = vcpu->apic_base;
}

int vmx_set_sregs(struct pyvt_vcpu *vcpu, const struct kvm_sregs *k)
{
	struct vmx_vcpu *vmx = to_vmx(vcpu);
	int i, ret;

	/* The PDPTEs are read from guest memory: keep the slots still. */
	down_read(&vcpu->vm->slots_lock);
	vmx_get(vmx);
	ret = vmx_load_pdptrs(vcpu, k->cr0, k->cr4, k->efer, k->cr3);
	if (ret) {
		vmx_put();
		up_read(&vcpu->vm->slots_lock);
		return ret;
	}
	for (i = 0; i < ARRAY_SIZE(segs); i++)
		seg_set(i, SREGS_SEG(k, i));
	vmcs_write(GUEST_GDTR_BASE, k->gdt.base);
	vmcs_write(GUEST_GDTR_LIMIT, k->gdt.limit);
	vmcs_write(GUEST_IDTR_BASE, k->idt.base);
	vmcs_write(GUEST_IDTR_LIMIT, k->idt.limit);
	vmx_set_cr0(k->cr0);
	vmcs_write(GUEST_CR3, k->cr3);
	vmx_set_cr4(k->cr4);
	vmx_set_efer(k->efer);
	vmx_put();
	up_read(&vcpu->vm->slots_lock);
	vmx->cr2 = k->cr2;
	vmx->cr8 = k->cr8;
	vcpu->apic_base = k->apic_base;
	return 0;
}

void vmx_queue_exception(struct pyvt_vcpu *vcpu, u8 vector,
			 bool has_error, u32 error)
{
	struct vmx_vcpu *vmx = to_vmx(vcpu);

	if (vmx->inject_info & INTR_INFO_VALID_MASK)
		return;		/* one at a time; the guest will retry */
	vmx_get(vmx);
	/* Real mode exceptions push no error code. */
	if (!(vmcs_read(GUEST_CR0) & X86_CR0_PE))
		has_error = false;
	vmx_put();
	vmx->inject_info = vector | INTR_TYPE_HARD_EXCEPTION |
			   INTR_INFO_VALID_MASK |
			   (has_error ? INTR_INFO_DELIVER_CODE_MASK : 0);
	vmx->inject_error = error;
}

/* The MSRs the VMCS or the MSR lists hold. */
static u64 *autoload_value(struct vmx_vcpu *vmx, u32 msr)
{
	int i;

	for (i = 0; i < NR_AUTOLOAD; i++)
		if (vmx_autoload_msrs[i] == msr)
			return &vmx->guest_msrs[i].value;
	return NULL;
}

static u32 vmcs_msr_field(u32 msr)
{
	switch (msr) {
	case MSR_FS_BASE:		return GUEST_FS_BASE;
	case MSR_GS_BASE:		return GUEST_GS_BASE;
	case MSR_IA32_SYSENTER_CS:	return GUEST_SYSENTER_CS;
	case MSR_IA32_SYSENTER_ESP:	return GUEST_SYSENTER_ESP;
	case MSR_IA32_SYSENTER_EIP:	return GUEST_SYSENTER_EIP;
	case MSR_IA32_CR_PAT:		return GUEST_IA32_PAT;
	default:			return 0;
	}
}

int vmx_get_msr(struct pyvt_vcpu *vcpu, u32 msr, u64 *val)
{
	struct vmx_vcpu *vmx = to_vmx(vcpu);
	u64 *slot = autoload_value(vmx, msr);
	u32 field = vmcs_msr_field(msr);

	if (slot) {
		*val = *slot;
		return 0;
	}
	switch (msr) {
	case MSR_IA32_APICBASE:
		*val = vcpu->apic_base;
		return 0;
	case MSR_TSC_AUX:
		*val = vcpu->tsc_aux;
		return 0;
	case MSR_EFER:
		field = GUEST_IA32_EFER;
		break;
	case MSR_IA32_TSC:
		vmx_get(vmx);
		*val = rdtsc() + vmcs_read(TSC_OFFSET);
		vmx_put();
		return 0;
	}
	if (!field)
		return -EINVAL;
	vmx_get(vmx);
	*val = vmcs_read(field);
	vmx_put();
	return 0;
}

int vmx_set_msr(struct pyvt_vcpu *vcpu, u32 msr, u64 val)
{
	struct vmx_vcpu *vmx = to_vmx(vcpu);
	u64 *slot = autoload_value(vmx, msr);
	u32 field = vmcs_msr_field(msr);
	int ret = 0;

	if (!pyvt_msr_value_valid(msr, val))
		return -EINVAL;
	if (slot) {
		*slot = val;
		return 0;
	}
	switch (msr) {
	case MSR_IA32_APICBASE:
		vcpu->apic_base = val;
		return 0;
	case MSR_TSC_AUX:
		vcpu->tsc_aux = val;
		return 0;
	}
	if (!field && msr != MSR_EFER && msr != MSR_IA32_TSC)
		return -EINVAL;
	vmx_get(vmx);
	if (msr == MSR_EFER) {
		u64 efer = vmcs_read(GUEST_IA32_EFER);

		ret = pyvt_efer_write(efer, vmx_guest_cr0(), val, &efer);
		if (!ret)
			vmx_set_efer(efer);
	} else if (msr == MSR_IA32_TSC) {
		if (vmx_conf.proc & CPU_BASED_USE_TSC_OFFSETTING)
			vmcs_write(TSC_OFFSET, val - rdtsc());
		else
			ret = -EINVAL;
	} else {
		vmcs_write(field, val);
	}
	vmx_put();
	return ret;
}
