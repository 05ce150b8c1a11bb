/* SPDX-License-Identifier: GPL-2.0 */
/*
 * pyvt.ko internals: the vendor-neutral core (VM and vCPU objects, memory
 * slots, nested page tables, the run loop, instruction decode) and the
 * small interface a vendor backend (svm.c, vmx.c) implements.
 */
#ifndef PYVT_CORE_H
#define PYVT_CORE_H

#include <linux/kvm.h>
#include <linux/mutex.h>
#include <linux/rwsem.h>
#include <linux/kref.h>
#include <linux/types.h>
#include "include/uapi/pyvt.h"

#define PYVT_MAX_VCPUS		8
#define PYVT_MAX_MEMSLOTS	32
#define PYVT_MAX_CPUID_ENTRIES	256
/* Guest-physical addresses must fit in what a 4-level NPT or EPT maps. */
#define PYVT_MAX_GPA		(1ULL << 48)
/* Pinning is eager: cap one slot so a bad size cannot pin all of RAM. */
#define PYVT_MAX_SLOT_PAGES	(1UL << 20)	/* 4 GiB */
#define PYVT_RUN_PAGES		2	/* struct kvm_run, then the PIO data page */
#define PYVT_PIO_DATA_OFFSET	PAGE_SIZE

enum pyvt_reg {
	PYVT_RAX, PYVT_RCX, PYVT_RDX, PYVT_RBX,
	PYVT_RSP, PYVT_RBP, PYVT_RSI, PYVT_RDI,
	PYVT_R8, PYVT_R9, PYVT_R10, PYVT_R11,
	PYVT_R12, PYVT_R13, PYVT_R14, PYVT_R15,
	PYVT_NR_GPRS
};

struct pyvt_memslot {
	u64 gpa;
	u64 npages;
	u64 uaddr;
	u32 flags;		/* KVM_MEM_READONLY or 0 */
	struct page **pages;	/* pinned, NULL when the slot is unused */
};

struct pyvt_vm {
	struct kref ref;
	struct mm_struct *mm;	/* creator; other processes get -EIO */
	struct mutex lock;	/* vCPU creation */
	/* Writers change slots and the NPT; KVM_RUN reads around each entry. */
	struct rw_semaphore slots_lock;
	struct pyvt_memslot slots[PYVT_MAX_MEMSLOTS];
	u64 npt_root;		/* physical address of the NPT root */
	int npt_levels;
	unsigned long tlb_gen;	/* bumped when a mapping goes away */
	struct pyvt_vcpu *vcpus[PYVT_MAX_VCPUS];
	int nr_vcpus;
};

/* What KVM_RUN must finish on the next entry before running the guest. */
enum pyvt_pending {
	PYVT_PENDING_NONE,
	PYVT_PENDING_PIO_IN,	/* IN: data page -> rAX, then skip */
	PYVT_PENDING_PIO_OUT,	/* OUT: skip */
	PYVT_PENDING_INS,	/* INS: data page -> ES:rDI, step rDI/rCX */
	PYVT_PENDING_MMIO_READ,	/* mov reg, [mmio]: run->mmio.data -> reg */
};

struct pyvt_pending_op {
	enum pyvt_pending kind;
	u64 rip;		/* the instruction it belongs to */
	u64 next_rip;
	u32 count;
	u8 size;
	u8 reg;			/* MMIO read: destination register */
	u8 ext;			/* MMIO read: 0 zero-extend, 1 sign-extend */
	u8 dst_size;		/* MMIO read: destination operand size */
	u8 high_byte;		/* MMIO read: AH/CH/DH/BH */
	u8 addr_size;		/* INS */
	u8 rep;			/* INS */
};

struct pyvt_vcpu {
	struct pyvt_vm *vm;
	int id;
	struct mutex mutex;	/* one KVM_RUN or register access at a time */
	struct kvm_run *run;
	struct page *run_pages[PYVT_RUN_PAGES];
	unsigned long gprs[PYVT_NR_GPRS];	/* authoritative between runs */
	u64 rip;
	u64 rflags;
	u64 apic_base;
	u64 tsc_aux;		/* stored only: RDTSCP/RDPID are not offered */
	struct pyvt_pending_op pending;
	struct kvm_cpuid_entry2 *cpuid;
	int cpuid_nent;
	int last_cpu;
	unsigned long tlb_gen;
	void *fxsave;		/* guest x87/SSE state, 512 bytes, 16-aligned */
	void *priv;		/* vendor state */
};

/*
 * A vendor backend.  Callbacks that touch hardware state run with
 * preemption disabled where noted; everything else may sleep.
 */
struct pyvt_vendor_ops {
	const char *name;
	u32 vendor;			/* PYVT_VENDOR_* */
	int npt_levels;			/* 0: the host's paging depth */
	u64 npt_leaf_flags;		/* extra bits in a leaf (EPT: type) */
	int (*probe)(void);		/* hardware usable? once, at load */
	void (*cleanup)(void);		/* undo probe, at unload */
	int (*cpu_enable)(void);	/* on each CPU, from CPU hotplug */
	void (*cpu_disable)(void);
	int (*vcpu_create)(struct pyvt_vcpu *vcpu);
	void (*vcpu_free)(struct pyvt_vcpu *vcpu);
	void (*get_sregs)(struct pyvt_vcpu *vcpu, struct kvm_sregs *sregs);
	int (*set_sregs)(struct pyvt_vcpu *vcpu, const struct kvm_sregs *s);
	void (*queue_exception)(struct pyvt_vcpu *vcpu, u8 vector,
				bool has_error, u32 error);
	/*
	 * Enter the guest once and handle the exit.  Called with the slots
	 * lock held for reading.  Returns 1 to re-enter, 0 to return to
	 * user space with vcpu->run filled in, or a negative errno.
	 */
	int (*run_once)(struct pyvt_vcpu *vcpu);
	/* KVM_GET/SET_MSRS: 0, or -EINVAL for an MSR it does not have */
	int (*get_msr)(struct pyvt_vcpu *vcpu, u32 index, u64 *data);
	int (*set_msr)(struct pyvt_vcpu *vcpu, u32 index, u64 data);
	/*
	 * PYVT_MEASURE_ROUNDTRIP: time up to rt->iterations guest entries
	 * that exit straight back, in TSC cycles, into @samples; set
	 * rt->cpu and rt->exit_code.  Returns how many samples it took
	 * or a negative errno.
	 */
	int (*measure_roundtrip)(struct pyvt_roundtrip *rt, u64 *samples);
	void (*read_caps)(struct pyvt_cpu_caps *caps);	/* on that CPU */
	/* Log the guest state if the vendor's dump_invalid_* asks for it. */
	void (*dump_state)(struct pyvt_vcpu *vcpu, const char *why);
};

extern const struct pyvt_vendor_ops pyvt_svm_ops;
extern const struct pyvt_vendor_ops pyvt_vmx_ops;
extern const struct pyvt_vendor_ops *pyvt_ops;
extern atomic_long_t pyvt_live_pages;
extern atomic_long_t pyvt_live_objects;	/* VMs and vCPUs */

/* main.c */
int pyvt_hw_get(void);
void pyvt_hw_put(void);
int pyvt_npt_levels(void);

/* vm.c */
int pyvt_create_vm(void);
void pyvt_vm_put(struct pyvt_vm *vm);
int pyvt_check_extension(long ext);

/* mmu.c */
int pyvt_npt_init(struct pyvt_vm *vm);
void pyvt_npt_destroy(struct pyvt_vm *vm);
int pyvt_set_memory_region(struct pyvt_vm *vm,
			   const struct kvm_userspace_memory_region *mr);
void pyvt_free_memslots(struct pyvt_vm *vm);
int pyvt_read_gpa(struct pyvt_vm *vm, u64 gpa, void *buf, unsigned int len);
int pyvt_write_gpa(struct pyvt_vm *vm, u64 gpa, const void *buf,
		   unsigned int len);
struct page *pyvt_alloc_page(void);
void pyvt_free_page(struct page *page);

/*
 * A nested page fault (AMD NPF, Intel EPT violation) as the vendor
 * decoded it: PYVT_NPF_* bits of what the access was.
 */
#define PYVT_NPF_WRITE		BIT(0)
#define PYVT_NPF_FETCH		BIT(1)
#define PYVT_NPF_GUEST_WALK	BIT(2)	/* in the guest's own page walk */
int pyvt_handle_npf(struct pyvt_vcpu *vcpu, u64 gpa, unsigned int access,
		    u64 exit_code, u64 exit_info);

/* vcpu.c */
int pyvt_create_vcpu(struct pyvt_vm *vm, unsigned long id);
void pyvt_vcpu_free(struct pyvt_vcpu *vcpu);
void pyvt_set_cpuid_result(struct pyvt_vcpu *vcpu);
void pyvt_internal_error(struct pyvt_vcpu *vcpu, u32 suberror, int ndata,
			 const u64 *data);

/* The EFER bits a guest may set. */
#define PYVT_EFER_ALLOWED	(EFER_SCE | EFER_LME | EFER_LMA | EFER_NX)
int pyvt_check_sregs(const struct kvm_sregs *s);
bool pyvt_msr_value_valid(u32 msr, u64 val);
int pyvt_efer_write(u64 old, u64 cr0, u64 val, u64 *efer);
bool pyvt_cr0_valid(u64 cr0);
bool pyvt_emulate_msr(struct pyvt_vcpu *vcpu, bool write);

/* Exit handlers both vendors share: reflect an exception, or go round. */
int pyvt_exit_ud(struct pyvt_vcpu *vcpu);
int pyvt_exit_gp(struct pyvt_vcpu *vcpu);
int pyvt_exit_db(struct pyvt_vcpu *vcpu);
int pyvt_exit_ac(struct pyvt_vcpu *vcpu);
int pyvt_exit_resume(struct pyvt_vcpu *vcpu);

/* Guest x87/SSE state in and out of the CPU, around each entry. */
static inline void pyvt_fxsave(void *area)
{
	asm volatile("fxsaveq %0" : "=m" (*(u8 (*)[512])area));
}

static inline void pyvt_fxrstor(void *area)
{
	asm volatile("fxrstorq %0" : : "m" (*(u8 (*)[512])area));
}

/* emulate.c */
int pyvt_read_guest_linear(struct pyvt_vcpu *vcpu, const struct kvm_sregs *s,
			   u64 la, void *buf, unsigned int len);
int pyvt_write_guest_linear(struct pyvt_vcpu *vcpu, const struct kvm_sregs *s,
			    u64 la, const void *buf, unsigned int len);
int pyvt_emulate_io(struct pyvt_vcpu *vcpu, u16 port, u8 size, bool in,
		    bool string, bool rep, u8 addr_size, u64 next_rip);
int pyvt_emulate_mmio(struct pyvt_vcpu *vcpu, u64 gpa);
int pyvt_complete_pending(struct pyvt_vcpu *vcpu);

/* svm_vmrun.S: one world switch, GIF and interrupts already off */
void pyvt_svm_enter(u64 vmcb_pa, u64 host_save_pa, unsigned long *gprs);

/* vmx_vmenter.S: one world switch (0, or 1 on VMfail), interrupts off */
int pyvt_vmx_enter(unsigned long *gprs, bool launched);
void pyvt_vmx_exit(void);	/* HOST_RIP; not to be called */
void pyvt_vmx_do_nmi(void);

/* MSRs KVM_GET/SET_MSRS know, as KVM_GET_MSR_INDEX_LIST reports them */
extern const u32 pyvt_msr_list[];
extern const unsigned int pyvt_msr_list_len;

/* supported CPUID (main.c) */
int pyvt_get_supported_cpuid(struct kvm_cpuid2 __user *ucpuid);

#endif /* PYVT_CORE_H */
