// SPDX-License-Identifier: GPL-2.0
/*
 * VT-x capability probing: the controls pyvt uses, settled once at load
 * from the VMX capability MSRs, and the raw MSRs for PYVT_GET_HW_CAPS.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/mm.h>
#include <asm/msr.h>
#include <asm/msr-index.h>
#include <asm/cpufeature.h>
#include <asm/tsc.h>
#include "vmx.h"

/* What the capability MSRs allow, settled once at load. */
struct vmx_config vmx_conf;

struct page *vmx_msr_bitmap;

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
int vmx_firmware_check(void)
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
int vmx_probe(void)
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

	vmx_msr_bitmap = alloc_page(GFP_KERNEL);
	if (!vmx_msr_bitmap)
		return -ENOMEM;
	memset(page_address(vmx_msr_bitmap), 0xff, PAGE_SIZE);
	/* Switched by the VMCS (bases, SYSENTER) or the MSR lists. */
	msr_bitmap_allow(page_address(vmx_msr_bitmap), MSR_FS_BASE);
	msr_bitmap_allow(page_address(vmx_msr_bitmap), MSR_GS_BASE);
	msr_bitmap_allow(page_address(vmx_msr_bitmap), MSR_IA32_SYSENTER_CS);
	msr_bitmap_allow(page_address(vmx_msr_bitmap), MSR_IA32_SYSENTER_ESP);
	msr_bitmap_allow(page_address(vmx_msr_bitmap), MSR_IA32_SYSENTER_EIP);
	for (i = 0; i < NR_AUTOLOAD; i++)
		msr_bitmap_allow(page_address(vmx_msr_bitmap),
				 vmx_autoload_msrs[i]);
	return 0;
}

void vmx_cleanup(void)
{
	__free_page(vmx_msr_bitmap);
	ida_destroy(&vmx_vpid_ida);
}

void vmx_read_caps(struct pyvt_cpu_caps *caps)
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
