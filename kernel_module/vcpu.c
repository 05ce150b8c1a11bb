// SPDX-License-Identifier: GPL-2.0
/*
 * The vCPU fd: registers, CPUID table, the shared kvm_run page and the
 * KVM_RUN loop.  Exits that need no user space are handled here in a
 * loop; the vendor backend does one guest entry per iteration.
 */
#include <linux/anon_inodes.h>
#include <linux/fs.h>
#include <linux/module.h>
#include <linux/file.h>
#include <linux/mm.h>
#include <linux/sched/signal.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <asm/fpu/api.h>
#include <asm/msr-index.h>
#include <asm/processor-flags.h>
#include "core.h"

void pyvt_internal_error(struct pyvt_vcpu *vcpu, u32 suberror, int ndata,
			 const u64 *data)
{
	struct kvm_run *run = vcpu->run;
	int i;

	run->exit_reason = KVM_EXIT_INTERNAL_ERROR;
	run->internal.suberror = suberror;
	ndata = min_t(int, ndata, ARRAY_SIZE(run->internal.data));
	run->internal.ndata = ndata;
	for (i = 0; i < ndata; i++)
		run->internal.data[i] = data[i];
}

/* CPUID from the KVM_SET_CPUID2 table; a missing leaf reads as zeros. */
void pyvt_set_cpuid_result(struct pyvt_vcpu *vcpu)
{
	u32 function = vcpu->gprs[PYVT_RAX], index = vcpu->gprs[PYVT_RCX];
	struct kvm_cpuid_entry2 *e;
	int i;

	vcpu->gprs[PYVT_RAX] = 0;
	vcpu->gprs[PYVT_RBX] = 0;
	vcpu->gprs[PYVT_RCX] = 0;
	vcpu->gprs[PYVT_RDX] = 0;
	for (i = 0; i < vcpu->cpuid_nent; i++) {
		e = &vcpu->cpuid[i];
		if (e->function != function)
			continue;
		if ((e->flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX) &&
		    e->index != index)
			continue;
		vcpu->gprs[PYVT_RAX] = e->eax;
		vcpu->gprs[PYVT_RBX] = e->ebx;
		vcpu->gprs[PYVT_RCX] = e->ecx;
		vcpu->gprs[PYVT_RDX] = e->edx;
		return;
	}
}

static int pyvt_set_cpuid2(struct pyvt_vcpu *vcpu,
			   struct kvm_cpuid2 __user *ucpuid)
{
	struct kvm_cpuid_entry2 *entries = NULL;
	struct kvm_cpuid2 hdr;

	if (copy_from_user(&hdr, ucpuid, sizeof(hdr)))
		return -EFAULT;
	if (hdr.nent > PYVT_MAX_CPUID_ENTRIES)
		return -E2BIG;
	if (hdr.nent) {
		entries = memdup_user(ucpuid->entries,
				      array_size(hdr.nent, sizeof(*entries)));
		if (IS_ERR(entries))
			return PTR_ERR(entries);
	}
	kvfree(vcpu->cpuid);
	vcpu->cpuid = entries;
	vcpu->cpuid_nent = hdr.nent;
	return 0;
}

static int pyvt_get_cpuid2(struct pyvt_vcpu *vcpu,
			   struct kvm_cpuid2 __user *ucpuid)
{
	struct kvm_cpuid2 hdr;

	if (copy_from_user(&hdr, ucpuid, sizeof(hdr)))
		return -EFAULT;
	if (hdr.nent < vcpu->cpuid_nent)
		return -E2BIG;
	hdr.nent = vcpu->cpuid_nent;
	if (copy_to_user(ucpuid->entries, vcpu->cpuid,
			 array_size(hdr.nent, sizeof(*vcpu->cpuid))) ||
	    copy_to_user(ucpuid, &hdr, sizeof(hdr)))
		return -EFAULT;
	return 0;
}

/*
 * KVM_GET/SET_MSRS: process entries in order, stop at the first MSR we do
 * not have, and return how many were done, as KVM does.
 */
static int pyvt_access_msrs(struct pyvt_vcpu *vcpu, struct kvm_msrs __user *umsrs,
			    bool set)
{
	struct kvm_msr_entry e;
	struct kvm_msrs hdr;
	u32 i;

	if (copy_from_user(&hdr, umsrs, sizeof(hdr)))
		return -EFAULT;
	if (hdr.nmsrs >= 256)
		return -E2BIG;
	for (i = 0; i < hdr.nmsrs; i++) {
		if (copy_from_user(&e, &umsrs->entries[i], sizeof(e)))
			return -EFAULT;
		if (set) {
			if (pyvt_ops->set_msr(vcpu, e.index, e.data))
				break;
			continue;
		}
		if (pyvt_ops->get_msr(vcpu, e.index, &e.data))
			break;
		if (copy_to_user(&umsrs->entries[i].data, &e.data,
				 sizeof(e.data)))
			return -EFAULT;
	}
	return i;
}

/* struct kvm_fpu <-> the FXSAVE image the guest's x87/SSE state lives in */
#define FX_FCW		0
#define FX_FSW		2
#define FX_FTW		4
#define FX_FOP		6
#define FX_FIP		8
#define FX_FDP		16
#define FX_MXCSR	24
#define FX_ST		32
#define FX_XMM		160

static void get_fpu(struct pyvt_vcpu *vcpu, struct kvm_fpu *f)
{
	const u8 *fx = vcpu->fxsave;

	memset(f, 0, sizeof(*f));
	memcpy(f->fpr, fx + FX_ST, sizeof(f->fpr));
	memcpy(&f->fcw, fx + FX_FCW, 2);
	memcpy(&f->fsw, fx + FX_FSW, 2);
	f->ftwx = fx[FX_FTW];
	memcpy(&f->last_opcode, fx + FX_FOP, 2);
	memcpy(&f->last_ip, fx + FX_FIP, 8);
	memcpy(&f->last_dp, fx + FX_FDP, 8);
	memcpy(f->xmm, fx + FX_XMM, sizeof(f->xmm));
	memcpy(&f->mxcsr, fx + FX_MXCSR, 4);
}

static int set_fpu(struct pyvt_vcpu *vcpu, const struct kvm_fpu *f)
{
	u8 *fx = vcpu->fxsave;

	/* FXRSTOR of reserved MXCSR bits would fault in the kernel. */
	if (f->mxcsr & 0xffff0000)
		return -EINVAL;
	memcpy(fx + FX_ST, f->fpr, sizeof(f->fpr));
	memcpy(fx + FX_FCW, &f->fcw, 2);
	memcpy(fx + FX_FSW, &f->fsw, 2);
	fx[FX_FTW] = f->ftwx;
	memcpy(fx + FX_FOP, &f->last_opcode, 2);
	memcpy(fx + FX_FIP, &f->last_ip, 8);
	memcpy(fx + FX_FDP, &f->last_dp, 8);
	memcpy(fx + FX_XMM, f->xmm, sizeof(f->xmm));
	memcpy(fx + FX_MXCSR, &f->mxcsr, 4);
	return 0;
}

static void get_regs(struct pyvt_vcpu *vcpu, struct kvm_regs *r)
{
	const unsigned long *g = vcpu->gprs;

	r->rax = g[PYVT_RAX]; r->rbx = g[PYVT_RBX];
	r->rcx = g[PYVT_RCX]; r->rdx = g[PYVT_RDX];
	r->rsi = g[PYVT_RSI]; r->rdi = g[PYVT_RDI];
	r->rsp = g[PYVT_RSP]; r->rbp = g[PYVT_RBP];
	r->r8 = g[PYVT_R8];   r->r9 = g[PYVT_R9];
	r->r10 = g[PYVT_R10]; r->r11 = g[PYVT_R11];
	r->r12 = g[PYVT_R12]; r->r13 = g[PYVT_R13];
	r->r14 = g[PYVT_R14]; r->r15 = g[PYVT_R15];
	r->rip = vcpu->rip;
	r->rflags = vcpu->rflags;
}

static void set_regs(struct pyvt_vcpu *vcpu, const struct kvm_regs *r)
{
	unsigned long *g = vcpu->gprs;

	g[PYVT_RAX] = r->rax; g[PYVT_RBX] = r->rbx;
	g[PYVT_RCX] = r->rcx; g[PYVT_RDX] = r->rdx;
	g[PYVT_RSI] = r->rsi; g[PYVT_RDI] = r->rdi;
	g[PYVT_RSP] = r->rsp; g[PYVT_RBP] = r->rbp;
	g[PYVT_R8] = r->r8;   g[PYVT_R9] = r->r9;
	g[PYVT_R10] = r->r10; g[PYVT_R11] = r->r11;
	g[PYVT_R12] = r->r12; g[PYVT_R13] = r->r13;
	g[PYVT_R14] = r->r14; g[PYVT_R15] = r->r15;
	vcpu->rip = r->rip;
	/* Bit 1 always reads as one; the reserved bits must stay zero. */
	vcpu->rflags = (r->rflags & 0x3f7fd5) | 2;
}

/* The checks KVM makes on KVM_SET_SREGS; the rest is left to the CPU. */
int pyvt_check_sregs(const struct kvm_sregs *k)
{
	if (k->efer & ~PYVT_EFER_ALLOWED)
		return -EINVAL;
	if ((k->efer & EFER_LME) && (k->cr0 & X86_CR0_PG)) {
		if (!(k->cr4 & X86_CR4_PAE) || !(k->efer & EFER_LMA))
			return -EINVAL;
	} else if (k->efer & EFER_LMA) {
		return -EINVAL;
	}
	if (!pyvt_cr0_valid(k->cr0) || k->cr8 > 15 || (k->cr4 & X86_CR4_VMXE))
		return -EINVAL;
	return 0;
}

/* A CR0 value MOV to CR0 would not #GP on (paging needs PE, NW needs CD). */
bool pyvt_cr0_valid(u64 cr0)
{
	return !(cr0 >> 32) &&
	       !((cr0 & X86_CR0_PG) && !(cr0 & X86_CR0_PE)) &&
	       !((cr0 & X86_CR0_NW) && !(cr0 & X86_CR0_CD));
}

/*
 * The RDMSR or WRMSR the guest ran, through the vendor's get/set_msr
 * (EDX:EAX <-> the MSR named by ECX).  False if it must raise #GP.
 */
bool pyvt_emulate_msr(struct pyvt_vcpu *vcpu, bool write)
{
	u32 msr = vcpu->gprs[PYVT_RCX];
	u64 val;

	if (write) {
		val = (u32)vcpu->gprs[PYVT_RAX] |
		      (u64)vcpu->gprs[PYVT_RDX] << 32;
		return !pyvt_ops->set_msr(vcpu, msr, val);
	}
	if (pyvt_ops->get_msr(vcpu, msr, &val))
		return false;
	vcpu->gprs[PYVT_RAX] = (u32)val;
	vcpu->gprs[PYVT_RDX] = val >> 32;
	return true;
}

/* Values WRMSR and KVM_SET_MSRS refuse, whoever holds the MSR. */
bool pyvt_msr_value_valid(u32 msr, u64 val)
{
	switch (msr) {
	case MSR_FS_BASE:
	case MSR_GS_BASE:
	case MSR_KERNEL_GS_BASE:
	case MSR_LSTAR:
	case MSR_CSTAR:
	case MSR_IA32_SYSENTER_ESP:
	case MSR_IA32_SYSENTER_EIP:
		/* Bases must be canonical or the CPU would load junk. */
		return (s64)(val << 16) >> 16 == (s64)val;
	case MSR_IA32_CR_PAT:
		/* Each byte a valid memory type: 0, 1, 4, 5, 6 or 7. */
		return !(val & 0xf8f8f8f8f8f8f8f8ULL) &&
		       !((val & 0x0202020202020202ULL) &
			 ~(val << 1 & 0x0404040404040404ULL) >> 1);
	case MSR_TSC_AUX:
		return !(val >> 32);
	default:
		return true;
	}
}

/*
 * EFER after the guest or user space writes @val: LME cannot change
 * while paging is on, LMA is read-only.
 */
int pyvt_efer_write(u64 old, u64 cr0, u64 val, u64 *efer)
{
	if (val & ~PYVT_EFER_ALLOWED)
		return -EINVAL;
	if ((cr0 & X86_CR0_PG) && ((val ^ old) & EFER_LME))
		return -EINVAL;
	*efer = (val & ~EFER_LMA) | (old & EFER_LMA);
	return 0;
}

int pyvt_exit_ud(struct pyvt_vcpu *vcpu)
{
	pyvt_ops->queue_exception(vcpu, UD_VECTOR, false, 0);
	return 1;
}

int pyvt_exit_gp(struct pyvt_vcpu *vcpu)
{
	pyvt_ops->queue_exception(vcpu, GP_VECTOR, true, 0);
	return 1;
}

int pyvt_exit_db(struct pyvt_vcpu *vcpu)
{
	pyvt_ops->queue_exception(vcpu, DB_VECTOR, false, 0);
	return 1;
}

int pyvt_exit_ac(struct pyvt_vcpu *vcpu)
{
	pyvt_ops->queue_exception(vcpu, AC_VECTOR, true, 0);
	return 1;
}

/* Nothing to do but enter again (after the run loop's signal check). */
int pyvt_exit_resume(struct pyvt_vcpu *vcpu)
{
	return 1;
}

static int pyvt_vcpu_run(struct pyvt_vcpu *vcpu)
{
	struct pyvt_vm *vm = vcpu->vm;
	struct kvm_run *run = vcpu->run;
	int ret;

	down_read(&vm->slots_lock);
	ret = pyvt_complete_pending(vcpu);
	up_read(&vm->slots_lock);
	if (ret <= 0)
		return ret;

	/* Like KVM, leave exit_reason alone here: nothing ran. */
	if (READ_ONCE(run->immediate_exit))
		return -EINTR;

	for (;;) {
		if (signal_pending(current)) {
			run->exit_reason = KVM_EXIT_INTR;
			return -EINTR;
		}
		cond_resched();
		if (down_read_killable(&vm->slots_lock))
			return -EINTR;
		ret = pyvt_ops->run_once(vcpu);
		up_read(&vm->slots_lock);
		if (ret <= 0)
			return ret;
	}
}

static long pyvt_vcpu_ioctl(struct file *filp, unsigned int ioctl,
			    unsigned long arg)
{
	struct pyvt_vcpu *vcpu = filp->private_data;
	void __user *argp = (void __user *)arg;
	union {
		struct kvm_regs regs;
		struct kvm_sregs sregs;
		struct kvm_fpu fpu;
	} *u;
	long ret;

	if (vcpu->vm->mm != current->mm)
		return -EIO;
	if (mutex_lock_killable(&vcpu->mutex))
		return -EINTR;

	switch (ioctl) {
	case KVM_RUN:
		ret = arg ? -EINVAL : pyvt_vcpu_run(vcpu);
		goto out;
	case KVM_SET_CPUID2:
		ret = pyvt_set_cpuid2(vcpu, argp);
		goto out;
	case KVM_GET_CPUID2:
		ret = pyvt_get_cpuid2(vcpu, argp);
		goto out;
	case KVM_GET_MSRS:
	case KVM_SET_MSRS:
		ret = pyvt_access_msrs(vcpu, argp, ioctl == KVM_SET_MSRS);
		goto out;
	case KVM_GET_REGS:
	case KVM_SET_REGS:
	case KVM_GET_SREGS:
	case KVM_SET_SREGS:
	case KVM_GET_FPU:
	case KVM_SET_FPU:
		break;
	default:
		ret = -ENOTTY;
		goto out;
	}

	u = kzalloc(sizeof(*u), GFP_KERNEL);
	if (!u) {
		ret = -ENOMEM;
		goto out;
	}
	ret = 0;
	switch (ioctl) {
	case KVM_GET_REGS:
		get_regs(vcpu, &u->regs);
		if (copy_to_user(argp, &u->regs, sizeof(u->regs)))
			ret = -EFAULT;
		break;
	case KVM_SET_REGS:
		if (copy_from_user(&u->regs, argp, sizeof(u->regs))) {
			ret = -EFAULT;
			break;
		}
		set_regs(vcpu, &u->regs);
		break;
	case KVM_GET_SREGS:
		pyvt_ops->get_sregs(vcpu, &u->sregs);
		if (copy_to_user(argp, &u->sregs, sizeof(u->sregs)))
			ret = -EFAULT;
		break;
	case KVM_SET_SREGS:
		if (copy_from_user(&u->sregs, argp, sizeof(u->sregs))) {
			ret = -EFAULT;
			break;
		}
		ret = pyvt_check_sregs(&u->sregs);
		if (!ret)
			ret = pyvt_ops->set_sregs(vcpu, &u->sregs);
		break;
	case KVM_GET_FPU:
		get_fpu(vcpu, &u->fpu);
		if (copy_to_user(argp, &u->fpu, sizeof(u->fpu)))
			ret = -EFAULT;
		break;
	case KVM_SET_FPU:
		if (copy_from_user(&u->fpu, argp, sizeof(u->fpu))) {
			ret = -EFAULT;
			break;
		}
		ret = set_fpu(vcpu, &u->fpu);
		break;
	}
	kfree(u);
out:
	mutex_unlock(&vcpu->mutex);
	return ret;
}

static vm_fault_t pyvt_vcpu_fault(struct vm_fault *vmf)
{
	struct pyvt_vcpu *vcpu = vmf->vma->vm_file->private_data;

	if (vmf->pgoff >= PYVT_RUN_PAGES)
		return VM_FAULT_SIGBUS;
	vmf->page = vcpu->run_pages[vmf->pgoff];
	get_page(vmf->page);
	return 0;
}

static const struct vm_operations_struct pyvt_vcpu_vm_ops = {
	.fault = pyvt_vcpu_fault,
};

static int pyvt_vcpu_mmap(struct file *file, struct vm_area_struct *vma)
{
	if (vma->vm_pgoff >= PYVT_RUN_PAGES ||
	    vma_pages(vma) > PYVT_RUN_PAGES - vma->vm_pgoff)
		return -EINVAL;
	vma->vm_ops = &pyvt_vcpu_vm_ops;
	return 0;
}

static int pyvt_vcpu_release(struct inode *inode, struct file *filp)
{
	struct pyvt_vcpu *vcpu = filp->private_data;
	struct pyvt_vm *vm = vcpu->vm;

	mutex_lock(&vm->lock);
	vm->vcpus[vcpu->id] = NULL;
	vm->nr_vcpus--;
	mutex_unlock(&vm->lock);
	pyvt_vcpu_free(vcpu);
	pyvt_vm_put(vm);
	return 0;
}

static const struct file_operations pyvt_vcpu_fops = {
	.owner		= THIS_MODULE,
	.release	= pyvt_vcpu_release,
	.unlocked_ioctl	= pyvt_vcpu_ioctl,
	.compat_ioctl	= compat_ptr_ioctl,
	.mmap		= pyvt_vcpu_mmap,
	.llseek		= noop_llseek,
};

void pyvt_vcpu_free(struct pyvt_vcpu *vcpu)
{
	int i;

	if (vcpu->priv)
		pyvt_ops->vcpu_free(vcpu);
	for (i = 0; i < PYVT_RUN_PAGES; i++)
		pyvt_free_page(vcpu->run_pages[i]);
	kvfree(vcpu->cpuid);
	kfree(vcpu->fxsave);
	kfree(vcpu);
	atomic_long_dec(&pyvt_live_objects);
}

int pyvt_create_vcpu(struct pyvt_vm *vm, unsigned long id)
{
	struct pyvt_vcpu *vcpu;
	int i, ret;

	if (id >= PYVT_MAX_VCPUS)
		return -EINVAL;

	vcpu = kzalloc(sizeof(*vcpu), GFP_KERNEL_ACCOUNT);
	if (!vcpu)
		return -ENOMEM;
	atomic_long_inc(&pyvt_live_objects);
	vcpu->vm = vm;
	vcpu->id = id;
	vcpu->last_cpu = -1;
	mutex_init(&vcpu->mutex);
	ret = -ENOMEM;
	for (i = 0; i < PYVT_RUN_PAGES; i++) {
		vcpu->run_pages[i] = pyvt_alloc_page();
		if (!vcpu->run_pages[i])
			goto err;
	}
	vcpu->run = page_address(vcpu->run_pages[0]);
	/* kmalloc of 512 bytes is 512-aligned, as FXSAVE needs 16. */
	vcpu->fxsave = kzalloc(512, GFP_KERNEL_ACCOUNT);
	if (!vcpu->fxsave)
		goto err;
	*(u16 *)vcpu->fxsave = 0x37f;			/* FCW */
	*(u32 *)(vcpu->fxsave + 24) = 0x1f80;		/* MXCSR */
	vcpu->apic_base = 0xfee00000 | BIT(11) | (id == 0 ? BIT(8) : 0);
	vcpu->gprs[PYVT_RDX] = 0x600;	/* reset signature, as KVM shows */
	ret = pyvt_ops->vcpu_create(vcpu);
	if (ret)
		goto err;

	mutex_lock(&vm->lock);
	if (vm->vcpus[id]) {
		mutex_unlock(&vm->lock);
		ret = -EEXIST;
		goto err;
	}
	vm->vcpus[id] = vcpu;
	vm->nr_vcpus++;
	kref_get(&vm->ref);
	mutex_unlock(&vm->lock);

	ret = anon_inode_getfd("kvm-vcpu", &pyvt_vcpu_fops, vcpu,
			       O_RDWR | O_CLOEXEC);
	if (ret < 0) {
		mutex_lock(&vm->lock);
		vm->vcpus[id] = NULL;
		vm->nr_vcpus--;
		mutex_unlock(&vm->lock);
		pyvt_vm_put(vm);
		goto err;
	}
	return ret;

err:
	pyvt_vcpu_free(vcpu);
	return ret;
}
