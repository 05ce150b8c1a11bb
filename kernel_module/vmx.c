// SPDX-License-Identifier: GPL-2.0
/*
 * Intel VT-x (VMX) backend: VMXON per CPU, one VMCS per vCPU, one guest
 * entry and the exit handlers.  EPT with a 4-level walk and unrestricted
 * guest are required, so real and protected mode guests run natively;
 * VPID is used when the CPU has it.
 *
 * A VMCS is "active" on at most one CPU.  Every access to it happens
 * with preemption off after vmx_get(), which makes it current on this
 * CPU, clearing it on the CPU it was last active on first (as KVM does
 * on vCPU migration).  Each CPU keeps a list of the VMCSs active on it,
 * so turning VMX off there (last VM gone, CPU unplugged) clears them.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/module.h>
#include <linux/mm.h>
#include <linux/slab.h>
#include <linux/idr.h>
#include <linux/smp.h>
#include <linux/io.h>
#include <asm/vmx.h>
#include <asm/msr.h>
#include <asm/msr-index.h>
#include <asm/cpufeature.h>
#include <asm/desc.h>
#include <asm/debugreg.h>
#include <asm/cpu_entry_area.h>
#include <asm/fpu/api.h>
#include <asm/processor-flags.h>
#include <asm/tlbflush.h>
#include <asm/traps.h>
#include <asm/tsc.h>
#include "core.h"

static bool dump_invalid_vmcs;
module_param(dump_invalid_vmcs, bool, 0644);
MODULE_PARM_DESC(dump_invalid_vmcs,
		 "Log the guest state when VM entry fails or an exit is not handled");

#define DEFAULT_PAT		0x0007040600070406ULL
#define VM_INSTRUCTION_ERROR_FIELD	0x4400
#define VM_EXIT_REASON_FIELD	0x4402
#define EXIT_REASON_ENTRY_FAILED	BIT(31)
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

/* The syscall MSRs VMX does not switch: loaded and stored by lists. */
static const u32 autoload_msrs[] = {
	MSR_KERNEL_GS_BASE, MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_SYSCALL_MASK,
};
#define NR_AUTOLOAD		ARRAY_SIZE(autoload_msrs)
#define AUTOLOAD_KERNEL_GS	0

/* What the capability MSRs allow, settled once at load. */
static struct {
	u32 revision;
	u32 pin, proc, proc2, exit, entry;
	u64 cr0_fixed0, cr0_fixed1, cr4_fixed0, cr4_fixed1;
	u64 ept_vpid;
	bool ins_outs_info;	/* VM-exit instruction info for INS/OUTS */
	bool true_ctls;		/* the IA32_VMX_TRUE_*_CTLS MSRs exist */
	u32 time_slice;		/* VMX-preemption timer ticks in 1 ms */
	int invept_type;
} vmx_conf;

struct vmx_cpu {
	struct page *vmxon_region;	/* NULL while VMX is off here */
	u64 current_vmcs;		/* physical address, 0 if none */
	struct list_head active;	/* VMCSs active on this CPU */
};
static DEFINE_PER_CPU(struct vmx_cpu, vmx_cpu);

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

static struct page *msr_bitmap;
static DEFINE_IDA(vpid_ida);

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

static struct vmx_vcpu *to_vmx(struct pyvt_vcpu *vcpu)
{
	return vcpu->priv;
}

/* --- VMX instructions ------------------------------------------------- */

static __always_inline u64 vmcs_read(unsigned long field)
{
	u64 value;

	asm volatile("vmread %1, %0" : "=r" (value) : "r" (field) : "cc");
	return value;
}

static __always_inline void vmcs_write(unsigned long field, u64 value)
{
	asm volatile("vmwrite %1, %0" : : "r" (field), "r" (value) : "cc");
}

/* A VMX instruction taking a physical address operand; true on VMfail. */
#define VMX_INSN_PA(insn, pa) ({					\
	bool __fail;							\
	asm volatile(insn " %1; setna %0" : "=qm" (__fail) : "m" (pa)	\
		     : "cc", "memory");					\
	__fail;								\
})

static bool vmxon(u64 pa)
{
	return VMX_INSN_PA("vmxon", pa);
}

static bool vmclear(u64 pa)
{
	return VMX_INSN_PA("vmclear", pa);
}

static bool vmptrld(u64 pa)
{
	return VMX_INSN_PA("vmptrld", pa);
}

static void ept_flush(int type, u64 eptp)
{
	struct { u64 eptp, gpa; } desc = { eptp, 0 };

	asm volatile("invept %0, %1" : : "m" (desc), "r" ((u64)type)
		     : "cc", "memory");
}

static void vpid_flush(int type, u16 vpid)
{
	struct { u64 vpid, gva; } desc = { vpid, 0 };

	asm volatile("invvpid %0, %1" : : "m" (desc), "r" ((u64)type)
		     : "cc", "memory");
}

/* Write-back memory type, in each EPT leaf (npt_leaf_flags). */
#define EPT_LEAF_WB		(VMX_EPTP_MT_WB << VMX_EPT_MT_EPTE_SHIFT)

static u64 eptp_of(struct pyvt_vm *vm)
{
	return vm->npt_root | VMX_EPTP_MT_WB | VMX_EPTP_PWL_4;
}

/* --- Capabilities ----------------------------------------------------- */

/*
 * Settle one control field: @want bits are required, @may bits are used
 * when allowed; bits the CPU forces on stay on.  -EOPNOTSUPP names the
 * first required bit the CPU cannot set.
 */
static int adjust_controls(u32 want, u32 may, u32 msr, u32 true_msr,
			   const char *what, u32 *out)
{
	u32 allowed0, allowed1;

	if (vmx_conf.true_ctls && true_msr)
		msr = true_msr;
	rdmsr(msr, allowed0, allowed1);
	if (want & ~allowed1) {
		pr_err("VT-x lacks %s control bit %lu\n", what,
		       __ffs(want & ~allowed1));
		return -EOPNOTSUPP;
	}
	*out = ((want | may) & allowed1) | allowed0;
	return 0;
}

static int vmx_setup_conf(void)
{
	u64 basic, misc;
	int ret;

	rdmsrl(MSR_IA32_VMX_BASIC, basic);
	rdmsrl(MSR_IA32_VMX_MISC, misc);
	vmx_conf.revision = basic & 0x7fffffff;
	vmx_conf.time_slice = max_t(u32, 1, tsc_khz >>
				    (misc & VMX_MISC_PREEMPTION_TIMER_RATE_MASK));
	vmx_conf.ins_outs_info = basic & BIT_ULL(54);
	vmx_conf.true_ctls = basic & VMX_BASIC_TRUE_CTLS;
	if (((basic >> VMX_BASIC_VMCS_SIZE_SHIFT) & 0x1fff) > PAGE_SIZE ||
	    ((basic >> 50) & 0xf) != 6) {	/* VMCS memory type WB */
		pr_err("VT-x VMCS layout not supported (basic %#llx)\n", basic);
		return -EOPNOTSUPP;
	}

	/*
	 * The preemption timer bounds each stay in the guest to about 1 ms,
	 * so a pending signal is seen even where a host interrupt does not
	 * exit the guest (Bochs 2.7 with guest RFLAGS.IF=0).
	 */
	ret = adjust_controls(PIN_BASED_EXT_INTR_MASK | PIN_BASED_NMI_EXITING,
			      PIN_BASED_VMX_PREEMPTION_TIMER,
			      MSR_IA32_VMX_PINBASED_CTLS,
			      MSR_IA32_VMX_TRUE_PINBASED_CTLS, "pin-based",
			      &vmx_conf.pin);
	if (!ret)
		ret = adjust_controls(CPU_BASED_HLT_EXITING |
				      CPU_BASED_CR8_LOAD_EXITING |
				      CPU_BASED_CR8_STORE_EXITING |
				      CPU_BASED_MOV_DR_EXITING |
				      CPU_BASED_UNCOND_IO_EXITING |
				      CPU_BASED_USE_MSR_BITMAPS |
				      CPU_BASED_MWAIT_EXITING |
				      CPU_BASED_MONITOR_EXITING |
				      CPU_BASED_RDPMC_EXITING |
				      CPU_BASED_ACTIVATE_SECONDARY_CONTROLS,
				      CPU_BASED_USE_TSC_OFFSETTING,
				      MSR_IA32_VMX_PROCBASED_CTLS,
				      MSR_IA32_VMX_TRUE_PROCBASED_CTLS,
				      "processor-based", &vmx_conf.proc);
	if (!ret)
		ret = adjust_controls(SECONDARY_EXEC_ENABLE_EPT |
				      SECONDARY_EXEC_UNRESTRICTED_GUEST,
				      SECONDARY_EXEC_ENABLE_VPID,
				      MSR_IA32_VMX_PROCBASED_CTLS2, 0,
				      "secondary (EPT, unrestricted guest)",
				      &vmx_conf.proc2);
	if (!ret)
		ret = adjust_controls(VM_EXIT_HOST_ADDR_SPACE_SIZE |
				      VM_EXIT_SAVE_IA32_EFER |
				      VM_EXIT_LOAD_IA32_EFER |
				      VM_EXIT_SAVE_IA32_PAT |
				      VM_EXIT_LOAD_IA32_PAT, 0,
				      MSR_IA32_VMX_EXIT_CTLS,
				      MSR_IA32_VMX_TRUE_EXIT_CTLS, "VM-exit",
				      &vmx_conf.exit);
	if (!ret)
		ret = adjust_controls(VM_ENTRY_LOAD_IA32_EFER |
				      VM_ENTRY_LOAD_IA32_PAT, 0,
				      MSR_IA32_VMX_ENTRY_CTLS,
				      MSR_IA32_VMX_TRUE_ENTRY_CTLS, "VM-entry",
				      &vmx_conf.entry);
	if (ret)
		return ret;
	/* Never let the forced-on bits select a guest mode: set per vCPU. */
	vmx_conf.entry &= ~VM_ENTRY_IA32E_MODE;

	rdmsrl(MSR_IA32_VMX_EPT_VPID_CAP, vmx_conf.ept_vpid);
	if (!(vmx_conf.ept_vpid & VMX_EPT_PAGE_WALK_4_BIT) ||
	    !(vmx_conf.ept_vpid & VMX_EPTP_WB_BIT) ||
	    !(vmx_conf.ept_vpid & VMX_EPT_INVEPT_BIT)) {
		pr_err("VT-x EPT lacks a 4-level walk, write-back or INVEPT (%#llx)\n",
		       vmx_conf.ept_vpid);
		return -EOPNOTSUPP;
	}
	vmx_conf.invept_type = (vmx_conf.ept_vpid & VMX_EPT_EXTENT_CONTEXT_BIT) ?
			       VMX_EPT_EXTENT_CONTEXT : VMX_EPT_EXTENT_GLOBAL;
	/* VPID without a single-context INVVPID is not worth the bother. */
	if (!(vmx_conf.ept_vpid & ((u64)VMX_VPID_INVVPID_BIT << 32)) ||
	    !(vmx_conf.ept_vpid & ((u64)VMX_VPID_EXTENT_SINGLE_CONTEXT_BIT << 32)))
		vmx_conf.proc2 &= ~SECONDARY_EXEC_ENABLE_VPID;

	rdmsrl(MSR_IA32_VMX_CR0_FIXED0, vmx_conf.cr0_fixed0);
	rdmsrl(MSR_IA32_VMX_CR0_FIXED1, vmx_conf.cr0_fixed1);
	rdmsrl(MSR_IA32_VMX_CR4_FIXED0, vmx_conf.cr4_fixed0);
	rdmsrl(MSR_IA32_VMX_CR4_FIXED1, vmx_conf.cr4_fixed1);
	return 0;
}

static void msr_bitmap_allow(u8 *bitmap, u32 msr)
{
	u32 base;

	if (msr <= 0x1fff)
		base = 0;
	else if (msr >= 0xc0000000 && msr <= 0xc0001fff)
		base = 0x400;
	else
		return;
	msr &= 0x1fff;
	bitmap[base + msr / 8] &= ~BIT(msr % 8);		/* read */
	bitmap[base + 0x800 + msr / 8] &= ~BIT(msr % 8);	/* write */
}

/*
 * Linux itself locks IA32_FEATURE_CONTROL at boot; locked without VMX
 * means the firmware turned it off.  Never written here.  On this CPU.
 */
static int vmx_firmware_check(void)
{
	u64 feature_control;

	if (rdmsrl_safe(MSR_IA32_FEAT_CTL, &feature_control))
		return -ENODEV;
	if (!(feature_control & FEAT_CTL_LOCKED) ||
	    !(feature_control & FEAT_CTL_VMX_ENABLED_OUTSIDE_SMX)) {
		pr_err("CPU %d: VT-x is disabled by firmware (IA32_FEATURE_CONTROL %#llx): enable it in the BIOS setup\n",
		       smp_processor_id(), feature_control);
		return -EPERM;
	}
	return 0;
}

/* main.c picked VMX from CPUID; the rest is checked here. */
static int vmx_probe(void)
{
	int i, ret;

	if (boot_cpu_data.x86_vendor != X86_VENDOR_INTEL &&
	    boot_cpu_data.x86_vendor != X86_VENDOR_ZHAOXIN &&
	    boot_cpu_data.x86_vendor != X86_VENDOR_CENTAUR)
		return -ENODEV;
	ret = vmx_firmware_check();
	if (!ret)
		ret = vmx_setup_conf();
	if (ret)
		return ret;

	msr_bitmap = alloc_page(GFP_KERNEL);
	if (!msr_bitmap)
		return -ENOMEM;
	memset(page_address(msr_bitmap), 0xff, PAGE_SIZE);
	/* Switched by the VMCS (bases, SYSENTER) or the MSR lists. */
	msr_bitmap_allow(page_address(msr_bitmap), MSR_FS_BASE);
	msr_bitmap_allow(page_address(msr_bitmap), MSR_GS_BASE);
	msr_bitmap_allow(page_address(msr_bitmap), MSR_IA32_SYSENTER_CS);
	msr_bitmap_allow(page_address(msr_bitmap), MSR_IA32_SYSENTER_ESP);
	msr_bitmap_allow(page_address(msr_bitmap), MSR_IA32_SYSENTER_EIP);
	for (i = 0; i < NR_AUTOLOAD; i++)
		msr_bitmap_allow(page_address(msr_bitmap), autoload_msrs[i]);
	return 0;
}

static void vmx_cleanup(void)
{
	__free_page(msr_bitmap);
	ida_destroy(&vpid_ida);
}

/* --- Per-CPU enabling ------------------------------------------------- */

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

/* On the CPU the VMCS is active on, interrupts off. */
static void vmcs_clear_here(void *arg)
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

/* --- Making a VMCS current -------------------------------------------- */

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
static bool vmx_load(struct vmx_vcpu *vmx)
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
static void vmx_get(struct vmx_vcpu *vmx)
{
	for (;;) {
		preempt_disable();
		if (vmx_load(vmx))
			return;
		preempt_enable();
		schedule_timeout_uninterruptible(1);
	}
}

static void vmx_put(void)
{
	preempt_enable();
}

/* --- Guest state ------------------------------------------------------ */

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
static u64 guest_cr0(void)
{
	u64 mask = cr0_host_bits();

	return (vmcs_read(GUEST_CR0) & ~mask) | (vmcs_read(CR0_READ_SHADOW) & mask);
}

static u64 guest_cr4(void)
{
	u64 mask = cr4_host_bits();

	return (vmcs_read(GUEST_CR4) & ~mask) | (vmcs_read(CR4_READ_SHADOW) & mask);
}

static void set_cr0(u64 cr0)
{
	u64 fixed = vmx_conf.cr0_fixed0 & ~(u64)(X86_CR0_PE | X86_CR0_PG);

	vmcs_write(CR0_READ_SHADOW, cr0);
	vmcs_write(GUEST_CR0, (cr0 & ~(u64)(X86_CR0_CD | X86_CR0_NW)) | fixed);
}

static void set_cr4(u64 cr4)
{
	vmcs_write(CR4_READ_SHADOW, cr4);
	vmcs_write(GUEST_CR4, cr4 | vmx_conf.cr4_fixed0);
}

static void set_efer(u64 efer)
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
static int load_pdptrs(struct pyvt_vcpu *vcpu, u64 cr0, u64 cr4, u64 efer,
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
	set_cr0(X86_CR0_NW | X86_CR0_CD | X86_CR0_ET);
	set_cr4(0);
	vmcs_write(GUEST_CR3, 0);
	set_efer(0);
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
	vmcs_write(MSR_BITMAP, page_to_phys(msr_bitmap));
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

static int vmx_vcpu_create(struct pyvt_vcpu *vcpu)
{
	struct vmx_vcpu *vmx;
	int i, vpid = 0;

	vmx = kzalloc(sizeof(*vmx), GFP_KERNEL_ACCOUNT);
	if (!vmx)
		return -ENOMEM;
	if (vmx_conf.proc2 & SECONDARY_EXEC_ENABLE_VPID) {
		/* VPID 0 is the host's and not allowed for a guest. */
		vpid = ida_alloc_range(&vpid_ida, 1, 0xffff, GFP_KERNEL);
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
			ida_free(&vpid_ida, vpid);
		kfree(vmx);
		return -ENOMEM;
	}
	*(u32 *)page_address(vmx->vmcs) = vmx_conf.revision;
	vmx->vmcs_pa = page_to_phys(vmx->vmcs);
	vmx->guest_msrs = page_address(vmx->msr_page);
	vmx->host_msrs = vmx->guest_msrs + NR_AUTOLOAD;
	for (i = 0; i < NR_AUTOLOAD; i++) {
		vmx->guest_msrs[i].index = autoload_msrs[i];
		vmx->host_msrs[i].index = autoload_msrs[i];
		/* The same on every CPU; KERNEL_GS_BASE is read per entry. */
		rdmsrl(autoload_msrs[i], vmx->host_msrs[i].value);
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

static void vmx_vcpu_free(struct pyvt_vcpu *vcpu)
{
	struct vmx_vcpu *vmx = to_vmx(vcpu);
	int cpu;

	/* Pairs with vmcs_clear_here(), as in vmx_load(). */
	cpu = smp_load_acquire(&vmx->cpu);
	if (cpu >= 0)
		smp_call_function_single(cpu, vmcs_clear_here, vmx, 1);
	/* An offline CPU cleared its VMCSs on the way out. */
	if (vmx->vpid)
		ida_free(&vpid_ida, vmx->vpid);
	pyvt_free_page(vmx->vmcs);
	pyvt_free_page(vmx->msr_page);
	kfree(vmx);
	vcpu->priv = NULL;
}

static void vmx_get_sregs(struct pyvt_vcpu *vcpu, struct kvm_sregs *k)
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
	k->cr0 = guest_cr0();
	k->cr3 = vmcs_read(GUEST_CR3);
	k->cr4 = guest_cr4();
	k->efer = vmcs_read(GUEST_IA32_EFER);
	vmx_put();
	k->cr2 = vmx->cr2;
	k->cr8 = vmx->cr8;
	k->apic_base = vcpu->apic_base;
}

static int vmx_set_sregs(struct pyvt_vcpu *vcpu, const struct kvm_sregs *k)
{
	struct vmx_vcpu *vmx = to_vmx(vcpu);
	int i, ret;

	/* The PDPTEs are read from guest memory: keep the slots still. */
	down_read(&vcpu->vm->slots_lock);
	vmx_get(vmx);
	ret = load_pdptrs(vcpu, k->cr0, k->cr4, k->efer, k->cr3);
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
	set_cr0(k->cr0);
	vmcs_write(GUEST_CR3, k->cr3);
	set_cr4(k->cr4);
	set_efer(k->efer);
	vmx_put();
	up_read(&vcpu->vm->slots_lock);
	vmx->cr2 = k->cr2;
	vmx->cr8 = k->cr8;
	vcpu->apic_base = k->apic_base;
	return 0;
}

static void vmx_queue_exception(struct pyvt_vcpu *vcpu, u8 vector,
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

/* --- Host state around an entry --------------------------------------- */

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

/* --- Exits ------------------------------------------------------------ */

static void dump_vmcs(struct pyvt_vcpu *vcpu, const char *why)
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

static int exception_interception(struct pyvt_vcpu *vcpu)
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

static int triple_fault_interception(struct pyvt_vcpu *vcpu)
{
	vcpu->run->exit_reason = KVM_EXIT_SHUTDOWN;
	return 0;
}

static int cpuid_interception(struct pyvt_vcpu *vcpu)
{
	pyvt_set_cpuid_result(vcpu);
	skip_insn(vcpu);
	return 1;
}

static int skip_interception(struct pyvt_vcpu *vcpu)
{
	skip_insn(vcpu);	/* INVD: never drop dirty host cache lines */
	return 1;
}

static int invlpg_interception(struct pyvt_vcpu *vcpu)
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

static int halt_interception(struct pyvt_vcpu *vcpu)
{
	skip_insn(vcpu);
	vcpu->run->exit_reason = KVM_EXIT_HLT;
	return 0;
}

/* MOV to CR0, CLTS or LMSW touching a bit the host owns.  VMCS current. */
static int emulate_cr0(struct pyvt_vcpu *vcpu, u64 val)
{
	u64 old = guest_cr0(), cr4 = guest_cr4();
	u64 efer = vmcs_read(GUEST_IA32_EFER);

	val |= X86_CR0_ET;
	if (!pyvt_cr0_valid(val))
		return -EINVAL;
	if (!(old & X86_CR0_PG) && (val & X86_CR0_PG) && (efer & EFER_LME)) {
		if (!(cr4 & X86_CR4_PAE))
			return -EINVAL;
		set_efer(efer | EFER_LMA);
		efer |= EFER_LMA;
	} else if ((old & X86_CR0_PG) && !(val & X86_CR0_PG) &&
		   (efer & EFER_LMA)) {
		set_efer(efer & ~EFER_LMA);
		efer &= ~EFER_LMA;
	}
	if (load_pdptrs(vcpu, val, cr4, efer, vmcs_read(GUEST_CR3)))
		return -EINVAL;
	set_cr0(val);
	return 0;
}

/* MOV to CR4 setting a bit the host owns (VMXE, reserved).  VMCS current. */
static int emulate_cr4(struct pyvt_vcpu *vcpu, u64 val)
{
	u64 allowed = vmx_conf.cr4_fixed1 & ~(u64)X86_CR4_VMXE;
	u64 efer = vmcs_read(GUEST_IA32_EFER);

	if ((val & ~allowed) || ((efer & EFER_LMA) && !(val & X86_CR4_PAE)))
		return -EINVAL;
	if (load_pdptrs(vcpu, guest_cr0(), val, efer, vmcs_read(GUEST_CR3)))
		return -EINVAL;
	set_cr4(val);
	return 0;
}

static int cr_interception(struct pyvt_vcpu *vcpu)
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
		set_cr0(guest_cr0() & ~(u64)X86_CR0_TS);
		break;
	case CR_ACCESS_LMSW:
		/* LMSW sets PE, MP, EM and TS; it cannot clear PE. */
		ret = emulate_cr0(vcpu, (guest_cr0() & ~0xeULL) |
				  ((q >> 16) & 0xf));
		break;
	}
	vmx_put();
	if (ret)
		return pyvt_exit_gp(vcpu);
	skip_insn(vcpu);
	return 1;
}

static int io_interception(struct pyvt_vcpu *vcpu)
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

/* The MSRs the VMCS or the MSR lists hold. */
static u64 *autoload_value(struct vmx_vcpu *vmx, u32 msr)
{
	int i;

	for (i = 0; i < NR_AUTOLOAD; i++)
		if (autoload_msrs[i] == msr)
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

static int vmx_get_msr(struct pyvt_vcpu *vcpu, u32 msr, u64 *val)
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

static int vmx_set_msr(struct pyvt_vcpu *vcpu, u32 msr, u64 val)
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

		ret = pyvt_efer_write(efer, guest_cr0(), val, &efer);
		if (!ret)
			set_efer(efer);
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

static int msr_interception(struct pyvt_vcpu *vcpu, bool write)
{
	if (!pyvt_emulate_msr(vcpu, write))
		return pyvt_exit_gp(vcpu);
	skip_insn(vcpu);
	return 1;
}

static int rdmsr_interception(struct pyvt_vcpu *vcpu)
{
	return msr_interception(vcpu, false);
}

static int wrmsr_interception(struct pyvt_vcpu *vcpu)
{
	return msr_interception(vcpu, true);
}

static int ept_violation_interception(struct pyvt_vcpu *vcpu)
{
	struct vmx_vcpu *vmx = to_vmx(vcpu);
	u64 q = vmx->exit_qual, gpa = vmx->exit_gpa;
	bool walk = (q & EPT_QUAL_LINEAR_VALID) && !(q & EPT_QUAL_TRANSLATED);

	/* A write to a read-only slot is reported as MMIO, as in KVM. */
	if ((q & EPT_QUAL_WRITE) && !walk &&
	    pyvt_gpa_is_readonly(vcpu->vm, gpa))
		return pyvt_emulate_mmio(vcpu, gpa);
	/* Page tables or code outside RAM, or a fault on RAM: not MMIO. */
	if (walk || (q & EPT_QUAL_FETCH) || pyvt_gpa_is_ram(vcpu->vm, gpa)) {
		u64 data[3] = { EXIT_REASON_EPT_VIOLATION, q, gpa };

		dump_vmcs(vcpu, "EPT violation");
		pyvt_internal_error(vcpu,
				    KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON,
				    3, data);
		return 0;
	}
	return pyvt_emulate_mmio(vcpu, gpa);
}

static int (*const vmx_exit_handlers[])(struct pyvt_vcpu *vcpu) = {
	[EXIT_REASON_EXCEPTION_NMI]		= exception_interception,
	/*
	 * An interrupt (the host took it once interrupts were back on) or
	 * the end of a time slice: go round, checking for signals.
	 */
	[EXIT_REASON_EXTERNAL_INTERRUPT]	= pyvt_exit_resume,
	[EXIT_REASON_PREEMPTION_TIMER]		= pyvt_exit_resume,
	[EXIT_REASON_TRIPLE_FAULT]		= triple_fault_interception,
	[EXIT_REASON_CPUID]			= cpuid_interception,
	[EXIT_REASON_GETSEC]			= pyvt_exit_ud,
	[EXIT_REASON_HLT]			= halt_interception,
	[EXIT_REASON_INVD]			= skip_interception,
	[EXIT_REASON_INVLPG]			= invlpg_interception,
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
	[EXIT_REASON_CR_ACCESS]			= cr_interception,
	[EXIT_REASON_IO_INSTRUCTION]		= io_interception,
	[EXIT_REASON_MSR_READ]			= rdmsr_interception,
	[EXIT_REASON_MSR_WRITE]			= wrmsr_interception,
	[EXIT_REASON_MWAIT_INSTRUCTION]		= pyvt_exit_ud,
	[EXIT_REASON_MONITOR_INSTRUCTION]	= pyvt_exit_ud,
	[EXIT_REASON_EPT_VIOLATION]		= ept_violation_interception,
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
	save_interrupted_event(vmx);
	reason &= 0xffff;
	if (reason >= ARRAY_SIZE(vmx_exit_handlers) ||
	    !vmx_exit_handlers[reason])
		return unexpected_exit(vcpu);
	return vmx_exit_handlers[reason](vcpu);
}

/* --- Measurements and capabilities ------------------------------------ */

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
		else if ((reason >= ARRAY_SIZE(vmx_exit_handlers) ||
			  vmx_exit_handlers[reason] != pyvt_exit_resume) &&
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

static void vmx_read_caps(struct pyvt_cpu_caps *caps)
{
	int i;

	if (rdmsrl_safe(MSR_IA32_FEAT_CTL, &caps->feature_control))
		caps->feature_control = 0;
	for (i = 0; i < PYVT_VMX_NR_MSRS; i++)
		if (rdmsrl_safe(PYVT_VMX_MSR_FIRST + i, &caps->vmx_msrs[i]))
			caps->vmx_msrs[i] = 0;
	if (caps->vmx_msrs[0])
		caps->flags |= PYVT_CPU_CAPS_VMX_VALID;
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
};
