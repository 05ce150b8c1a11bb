// SPDX-License-Identifier: GPL-2.0
/*
 * The VM fd: memory slots, vCPU creation, capability answers.
 */
#include <linux/anon_inodes.h>
#include <linux/fs.h>
#include <linux/module.h>
#include <linux/file.h>
#include <linux/sched/mm.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include "core.h"

int pyvt_check_extension(long ext)
{
	switch (ext) {
	case KVM_CAP_USER_MEMORY:
	case KVM_CAP_EXT_CPUID:
	case KVM_CAP_DESTROY_MEMORY_REGION_WORKS:
	case KVM_CAP_IMMEDIATE_EXIT:
	case KVM_CAP_CHECK_EXTENSION_VM:
	case KVM_CAP_READONLY_MEM:
		return 1;
	case KVM_CAP_NR_VCPUS:
	case KVM_CAP_MAX_VCPUS:
	case KVM_CAP_MAX_VCPU_ID:
		return PYVT_MAX_VCPUS;
	case KVM_CAP_NR_MEMSLOTS:
		return PYVT_MAX_MEMSLOTS;
	default:
		return 0;
	}
}

static void pyvt_vm_release_kref(struct kref *ref)
{
	struct pyvt_vm *vm = container_of(ref, struct pyvt_vm, ref);

	pyvt_free_memslots(vm);
	pyvt_npt_destroy(vm);
	mmdrop(vm->mm);
	kfree(vm);
	atomic_long_dec(&pyvt_live_objects);
	pyvt_hw_put();
	module_put(THIS_MODULE);
}

void pyvt_vm_put(struct pyvt_vm *vm)
{
	kref_put(&vm->ref, pyvt_vm_release_kref);
}

static long pyvt_vm_ioctl(struct file *filp, unsigned int ioctl,
			  unsigned long arg)
{
	struct pyvt_vm *vm = filp->private_data;
	void __user *argp = (void __user *)arg;
	struct kvm_userspace_memory_region mr;

	if (vm->mm != current->mm)
		return -EIO;

	switch (ioctl) {
	case KVM_CREATE_VCPU:
		return pyvt_create_vcpu(vm, arg);
	case KVM_SET_USER_MEMORY_REGION:
		if (copy_from_user(&mr, argp, sizeof(mr)))
			return -EFAULT;
		return pyvt_set_memory_region(vm, &mr);
	case KVM_CHECK_EXTENSION:
		return pyvt_check_extension(arg);
	default:
		return -ENOTTY;
	}
}

static int pyvt_vm_release(struct inode *inode, struct file *filp)
{
	pyvt_vm_put(filp->private_data);
	return 0;
}

static const struct file_operations pyvt_vm_fops = {
	.owner		= THIS_MODULE,
	.release	= pyvt_vm_release,
	.unlocked_ioctl	= pyvt_vm_ioctl,
	.compat_ioctl	= compat_ptr_ioctl,
	.llseek		= noop_llseek,
};

int pyvt_create_vm(void)
{
	struct pyvt_vm *vm;
	int ret;

	ret = pyvt_hw_get();
	if (ret)
		return ret;

	vm = kzalloc(sizeof(*vm), GFP_KERNEL_ACCOUNT);
	if (!vm) {
		ret = -ENOMEM;
		goto err_hw;
	}
	atomic_long_inc(&pyvt_live_objects);
	kref_init(&vm->ref);
	mutex_init(&vm->lock);
	init_rwsem(&vm->slots_lock);
	vm->mm = current->mm;
	mmgrab(vm->mm);
	ret = pyvt_npt_init(vm);
	if (ret)
		goto err_free;

	/* The VM's kref holds a module reference of its own, for vCPUs. */
	__module_get(THIS_MODULE);
	ret = anon_inode_getfd("kvm-vm", &pyvt_vm_fops, vm, O_RDWR | O_CLOEXEC);
	if (ret < 0)
		pyvt_vm_put(vm);
	return ret;

err_free:
	mmdrop(vm->mm);
	kfree(vm);
	atomic_long_dec(&pyvt_live_objects);
err_hw:
	pyvt_hw_put();
	return ret;
}
