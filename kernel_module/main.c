// SPDX-License-Identifier: GPL-2.0
/*
 * pyvt.ko: a small hardware-virtualization driver speaking the KVM ioctl
 * ABI on /dev/pyvt.  This file holds the misc device, the system fd
 * ioctls and the per-CPU enabling of the virtualization extensions.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/module.h>
#include <linux/miscdevice.h>
#include <linux/fs.h>
#include <linux/cpu.h>
#include <linux/cpuhotplug.h>
#include <linux/slab.h>
#include <linux/sort.h>
#include <linux/uaccess.h>
#include <asm/processor.h>
#include <asm/tsc.h>
#include <asm/cpufeature.h>
#include <asm/pgtable.h>
#include <asm/msr-index.h>
#include "core.h"

const struct pyvt_vendor_ops *pyvt_ops;
atomic_long_t pyvt_live_pages = ATOMIC_LONG_INIT(0);
atomic_long_t pyvt_live_objects = ATOMIC_LONG_INIT(0);

static int get_live_pages(char *buf, const struct kernel_param *kp)
{
	return sysfs_emit(buf, "%ld\n", atomic_long_read(&pyvt_live_pages));
}

static const struct kernel_param_ops live_pages_ops = {
	.get = get_live_pages,
};
module_param_cb(live_pages, &live_pages_ops, NULL, 0444);
MODULE_PARM_DESC(live_pages,
		 "Pages the module holds (allocated or pinned); 0 when idle");

static int get_live_objects(char *buf, const struct kernel_param *kp)
{
	return sysfs_emit(buf, "%ld\n", atomic_long_read(&pyvt_live_objects));
}

static const struct kernel_param_ops live_objects_ops = {
	.get = get_live_objects,
};
module_param_cb(live_objects, &live_objects_ops, NULL, 0444);
MODULE_PARM_DESC(live_objects, "VMs and vCPUs allocated; 0 when idle");

/*
 * The extensions are enabled on every CPU while at least one user
 * (a VM or a round-trip measurement) exists.  A dynamic hotplug state
 * does the per-CPU work and covers CPUs coming and going meanwhile.
 */
static DEFINE_MUTEX(hw_lock);
static int hw_users;
static int hw_state;

static int pyvt_cpu_online(unsigned int cpu)
{
	return pyvt_ops->cpu_enable();
}

static int pyvt_cpu_offline(unsigned int cpu)
{
	pyvt_ops->cpu_disable();
	return 0;
}

int pyvt_hw_get(void)
{
	int ret = 0;

	mutex_lock(&hw_lock);
	if (hw_users == 0) {
		ret = cpuhp_setup_state(CPUHP_AP_ONLINE_DYN, "pyvt:online",
					pyvt_cpu_online, pyvt_cpu_offline);
		if (ret < 0)
			goto out;
		hw_state = ret;
		ret = 0;
	}
	hw_users++;
out:
	mutex_unlock(&hw_lock);
	return ret;
}

void pyvt_hw_put(void)
{
	mutex_lock(&hw_lock);
	if (!WARN_ON(hw_users <= 0) && --hw_users == 0)
		cpuhp_remove_state(hw_state);
	mutex_unlock(&hw_lock);
}

int pyvt_npt_levels(void)
{
	if (pyvt_ops->npt_levels)
		return pyvt_ops->npt_levels;
	return pgtable_l5_enabled() ? 5 : 4;
}

/* Host CPUID, filtered to what a pyvt guest can use. */
static struct kvm_cpuid_entry2 supported_cpuid[64];
static int supported_cpuid_nent;

static void add_cpuid(u32 function, u32 index, u32 flags)
{
	struct kvm_cpuid_entry2 *e;

	if (supported_cpuid_nent >= ARRAY_SIZE(supported_cpuid))
		return;
	e = &supported_cpuid[supported_cpuid_nent++];
	e->function = function;
	e->index = index;
	e->flags = flags;
	cpuid_count(function, index, &e->eax, &e->ebx, &e->ecx, &e->edx);

	switch (function) {
	case 0:
		e->eax = min(e->eax, 7u);
		break;
	case 1:
		/* SSE3 PCLMUL SSSE3 CX16 SSE4.1 SSE4.2 MOVBE POPCNT AES RDRAND */
		e->ecx &= BIT(0) | BIT(1) | BIT(9) | BIT(13) | BIT(19) |
			  BIT(20) | BIT(22) | BIT(23) | BIT(25) | BIT(30);
		e->ecx |= BIT(31);	/* running under a hypervisor */
		/* No MCE/MCA, no ACPI thermal, no DS, no HTT games. */
		e->edx &= ~(BIT(7) | BIT(14) | BIT(21) | BIT(22) | BIT(27) |
			    BIT(29) | BIT(31));
		e->ebx &= 0x0000ffff;	/* APIC ID and logical count: ours */
		break;
	case 7:
		/* FSGSBASE BMI1 SMEP BMI2 ERMS ADX SMAP CLFLUSHOPT SHA */
		e->ebx &= BIT(0) | BIT(3) | BIT(7) | BIT(8) | BIT(9) |
			  BIT(19) | BIT(20) | BIT(23) | BIT(29);
		e->eax = 0;
		e->ecx = 0;
		e->edx = 0;
		break;
	case 0x80000000:
		e->eax = min(e->eax, 0x80000008u);
		break;
	case 0x80000001:
		/* LAHF CMPLEGACY ABM SSE4A MISALIGNSSE 3DNOWPREFETCH */
		e->ecx &= BIT(0) | BIT(1) | BIT(5) | BIT(6) | BIT(7) | BIT(8);
		/* SYSCALL NX MMXEXT FXSR_OPT PDPE1GB LM, plus the 0x1 copies */
		e->edx &= BIT(11) | BIT(20) | BIT(22) | BIT(25) | BIT(26) |
			  BIT(29) | 0x0183f3ff;
		break;
	case 0x80000008:
		e->ebx = 0;
		e->ecx = 0;
		e->edx = 0;
		break;
	}
}

static void build_supported_cpuid(void)
{
	u32 max = cpuid_eax(0), xmax = cpuid_eax(0x80000000), f;

	for (f = 0; f <= min(max, 7u); f++) {
		if (f == 3 || f == 5 || f == 6)	/* serial, MONITOR, power */
			continue;
		if (f == 4 || f == 7)
			add_cpuid(f, 0, KVM_CPUID_FLAG_SIGNIFCANT_INDEX);
		else
			add_cpuid(f, 0, 0);
	}
	for (f = 0x80000000; f <= min(xmax, 0x80000008u); f++) {
		if (f == 0x80000007)	/* power management */
			continue;
		add_cpuid(f, 0, 0);
	}
}

int pyvt_get_supported_cpuid(struct kvm_cpuid2 __user *ucpuid)
{
	struct kvm_cpuid2 hdr;

	if (copy_from_user(&hdr, ucpuid, sizeof(hdr)))
		return -EFAULT;
	if (hdr.nent < supported_cpuid_nent) {
		hdr.nent = supported_cpuid_nent;
		if (copy_to_user(ucpuid, &hdr, sizeof(hdr)))
			return -EFAULT;
		return -E2BIG;
	}
	hdr.nent = supported_cpuid_nent;
	if (copy_to_user(ucpuid, &hdr, sizeof(hdr)) ||
	    copy_to_user(ucpuid->entries, supported_cpuid,
			 supported_cpuid_nent * sizeof(supported_cpuid[0])))
		return -EFAULT;
	return 0;
}

static void read_caps_on_cpu(void *info)
{
	struct pyvt_cpu_caps *caps = info;

	caps->cpu = smp_processor_id();
	caps->feat_ecx = cpuid_ecx(1);
	caps->ext_ecx = cpuid_ecx(0x80000001);
	pyvt_ops->read_caps(caps);
}

static long pyvt_get_hw_caps(struct pyvt_hw_caps __user *uarg)
{
	struct pyvt_cpu_caps __user *ucpus;
	struct pyvt_cpu_caps *caps;
	struct pyvt_hw_caps hdr;
	unsigned int n = 0;
	long ret = 0;
	int cpu;

	if (copy_from_user(&hdr, uarg, sizeof(hdr)))
		return -EFAULT;
	ucpus = u64_to_user_ptr(hdr.cpus);
	caps = kmalloc(sizeof(*caps), GFP_KERNEL);
	if (!caps)
		return -ENOMEM;

	cpus_read_lock();
	for_each_online_cpu(cpu) {
		if (n < hdr.max_cpus) {
			memset(caps, 0, sizeof(*caps));
			ret = smp_call_function_single(cpu, read_caps_on_cpu,
						       caps, 1);
			if (ret)
				break;
			if (copy_to_user(&ucpus[n], caps, sizeof(*caps))) {
				ret = -EFAULT;
				break;
			}
		}
		n++;
	}
	cpus_read_unlock();
	kfree(caps);
	if (ret)
		return ret;

	hdr.abi_version = PYVT_ABI_VERSION;
	hdr.vendor = pyvt_ops->vendor;
	hdr.nr_cpus = n;
	hdr.npt_levels = pyvt_npt_levels();
	hdr.reserved = 0;
	if (copy_to_user(uarg, &hdr, sizeof(hdr)))
		return -EFAULT;
	return 0;
}

static int cmp_u64(const void *a, const void *b)
{
	u64 x = *(const u64 *)a, y = *(const u64 *)b;

	return x < y ? -1 : x > y;
}

/* The vendor times the round trips; the summary is the same for both. */
static long pyvt_measure_roundtrip(struct pyvt_roundtrip __user *uarg)
{
	struct pyvt_roundtrip rt;
	u64 *samples;
	long ret;
	int n;

	if (copy_from_user(&rt, uarg, sizeof(rt)))
		return -EFAULT;
	if (rt.iterations < 1 || rt.iterations > PYVT_ROUNDTRIP_MAX_ITERATIONS)
		return -EINVAL;
	samples = kvmalloc_array(rt.iterations, sizeof(u64), GFP_KERNEL);
	if (!samples)
		return -ENOMEM;
	ret = pyvt_hw_get();
	if (ret)
		goto out;
	n = pyvt_ops->measure_roundtrip(&rt, samples);
	pyvt_hw_put();
	ret = n < 0 ? n : n == 0 ? -EAGAIN : 0;
	if (!ret) {
		sort(samples, n, sizeof(u64), cmp_u64, NULL);
		rt.iterations = n;
		rt.min_cycles = samples[0];
		rt.median_cycles = samples[n / 2];
		rt.max_cycles = samples[n - 1];
		rt.tsc_khz = tsc_khz;
		rt.reserved = 0;
		if (copy_to_user(uarg, &rt, sizeof(rt)))
			ret = -EFAULT;
	}
out:
	kvfree(samples);
	return ret;
}

const u32 pyvt_msr_list[] = {
	MSR_EFER, MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_SYSCALL_MASK,
	MSR_KERNEL_GS_BASE, MSR_FS_BASE, MSR_GS_BASE,
	MSR_IA32_SYSENTER_CS, MSR_IA32_SYSENTER_ESP, MSR_IA32_SYSENTER_EIP,
	MSR_IA32_CR_PAT, MSR_IA32_APICBASE, MSR_IA32_TSC, MSR_TSC_AUX,
};
const unsigned int pyvt_msr_list_len = ARRAY_SIZE(pyvt_msr_list);

static long pyvt_get_msr_index_list(struct kvm_msr_list __user *ulist)
{
	struct kvm_msr_list hdr;
	u32 n;

	if (copy_from_user(&hdr, ulist, sizeof(hdr)))
		return -EFAULT;
	n = hdr.nmsrs;
	hdr.nmsrs = pyvt_msr_list_len;
	if (copy_to_user(ulist, &hdr, sizeof(hdr)))
		return -EFAULT;
	if (n < pyvt_msr_list_len)
		return -E2BIG;
	if (copy_to_user(ulist->indices, pyvt_msr_list, sizeof(pyvt_msr_list)))
		return -EFAULT;
	return 0;
}

static long pyvt_dev_ioctl(struct file *filp, unsigned int ioctl,
			   unsigned long arg)
{
	void __user *argp = (void __user *)arg;

	switch (ioctl) {
	case KVM_GET_API_VERSION:
		return arg ? -EINVAL : KVM_API_VERSION;
	case KVM_CREATE_VM:
		/* Only the default machine type exists. */
		return arg ? -EINVAL : pyvt_create_vm();
	case KVM_CHECK_EXTENSION:
		return pyvt_check_extension(arg);
	case KVM_GET_VCPU_MMAP_SIZE:
		return arg ? -EINVAL : PYVT_RUN_PAGES * PAGE_SIZE;
	case KVM_GET_SUPPORTED_CPUID:
		return pyvt_get_supported_cpuid(argp);
	case KVM_GET_MSR_INDEX_LIST:
		return pyvt_get_msr_index_list(argp);
	case PYVT_GET_HW_CAPS:
		return pyvt_get_hw_caps(argp);
	case PYVT_MEASURE_ROUNDTRIP:
		return pyvt_measure_roundtrip(argp);
	default:
		return -ENOTTY;
	}
}

static const struct file_operations pyvt_dev_fops = {
	.owner		= THIS_MODULE,
	.unlocked_ioctl	= pyvt_dev_ioctl,
	.compat_ioctl	= compat_ptr_ioctl,
	.llseek		= noop_llseek,
};

static struct miscdevice pyvt_dev = {
	.minor	= MISC_DYNAMIC_MINOR,
	.name	= "pyvt",
	.fops	= &pyvt_dev_fops,
	.mode	= 0600,	/* like /dev/kvm: a udev rule may open it up */
};

static int __init pyvt_init(void)
{
	int ret;

	/*
	 * The vendor is the CPU's: each probe refuses the other's CPUs.
	 * CPUID itself too, not only Linux's flag: Linux clears the vmx
	 * flag when the firmware disabled VT-x, and the probe says so.
	 */
	if (boot_cpu_has(X86_FEATURE_VMX) || (cpuid_ecx(1) & BIT(5))) {
		pyvt_ops = &pyvt_vmx_ops;
	} else if (boot_cpu_has(X86_FEATURE_SVM)) {
		pyvt_ops = &pyvt_svm_ops;
	} else {
		pr_err("this CPU has neither Intel VT-x (vmx) nor AMD-V (svm)\n");
		return -ENODEV;
	}
	ret = pyvt_ops->probe();
	if (ret) {
		pr_err("%s hardware not usable (%d)\n", pyvt_ops->name, ret);
		return ret;
	}
	build_supported_cpuid();
	ret = misc_register(&pyvt_dev);
	if (ret) {
		pyvt_ops->cleanup();
		return ret;
	}
	pr_info("/dev/pyvt ready (%s, %d-level nested paging)\n",
		pyvt_ops->name, pyvt_npt_levels());
	return 0;
}

static void __exit pyvt_exit(void)
{
	misc_deregister(&pyvt_dev);
	WARN_ON(hw_users);
	pyvt_ops->cleanup();
	if (atomic_long_read(&pyvt_live_pages))
		pr_err("%ld pages leaked\n",
		       atomic_long_read(&pyvt_live_pages));
	if (atomic_long_read(&pyvt_live_objects))
		pr_err("%ld VMs/vCPUs leaked\n",
		       atomic_long_read(&pyvt_live_objects));
}

module_init(pyvt_init);
module_exit(pyvt_exit);
MODULE_LICENSE("GPL");
MODULE_AUTHOR("pyvt developers");
MODULE_DESCRIPTION("Small Intel VT-x and AMD-V driver with a KVM-compatible /dev/pyvt");
