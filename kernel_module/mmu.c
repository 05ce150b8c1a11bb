// SPDX-License-Identifier: GPL-2.0
/*
 * Guest memory: user pages pinned per memory slot and mapped through
 * nested page tables of the host's paging depth (4 or 5 levels).
 */
#include <linux/mm.h>
#include <linux/highmem.h>
#include <linux/slab.h>
#include <linux/mem_encrypt.h>
#include <linux/io.h>
#include "core.h"

/*
 * Nested page table entries are walked as user accesses: set U too.
 * EPT entries have the same low bits with other names (read, write,
 * execute), so one format serves both; EPT leaves add a memory type.
 */
#define NPT_PRESENT	BIT_ULL(0)
#define NPT_WRITABLE	BIT_ULL(1)
#define NPT_USER	BIT_ULL(2)
#define NPT_LARGE	BIT_ULL(7)
#define NPT_ADDR_MASK	GENMASK_ULL(51, 12)
#define NPT_TABLE_FLAGS	(NPT_PRESENT | NPT_WRITABLE | NPT_USER)

struct page *pyvt_alloc_page(void)
{
	struct page *page = alloc_page(GFP_KERNEL_ACCOUNT | __GFP_ZERO);

	if (page)
		atomic_long_inc(&pyvt_live_pages);
	return page;
}

void pyvt_free_page(struct page *page)
{
	if (!page)
		return;
	atomic_long_dec(&pyvt_live_pages);
	__free_page(page);
}

static u64 *npt_table(u64 entry)
{
	return phys_to_virt(__sme_clr(entry & NPT_ADDR_MASK));
}

int pyvt_npt_init(struct pyvt_vm *vm)
{
	struct page *root = pyvt_alloc_page();

	if (!root)
		return -ENOMEM;
	vm->npt_levels = pyvt_npt_levels();
	vm->npt_root = page_to_phys(root);
	return 0;
}

static void npt_free_table(u64 *table, int level)
{
	int i;

	if (level > 1) {
		for (i = 0; i < 512; i++)
			if (table[i] & NPT_PRESENT)
				npt_free_table(npt_table(table[i]), level - 1);
	}
	pyvt_free_page(virt_to_page(table));
}

void pyvt_npt_destroy(struct pyvt_vm *vm)
{
	if (vm->npt_root)
		npt_free_table(phys_to_virt(vm->npt_root), vm->npt_levels);
	vm->npt_root = 0;
}

/* The leaf entry for @gpa, allocating tables on the way if @create. */
static u64 *npt_leaf(struct pyvt_vm *vm, u64 gpa, bool create)
{
	u64 *table = phys_to_virt(vm->npt_root);
	int level;

	for (level = vm->npt_levels; level > 1; level--) {
		u64 *entry = &table[(gpa >> (12 + 9 * (level - 1))) & 511];

		if (!(*entry & NPT_PRESENT)) {
			struct page *page;

			if (!create)
				return NULL;
			page = pyvt_alloc_page();
			if (!page)
				return NULL;
			*entry = __sme_set(page_to_phys(page)) | NPT_TABLE_FLAGS;
		}
		table = npt_table(*entry);
	}
	return &table[(gpa >> 12) & 511];
}

static void npt_unmap_range(struct pyvt_vm *vm, u64 gpa, u64 npages)
{
	u64 i, *leaf;

	for (i = 0; i < npages; i++) {
		leaf = npt_leaf(vm, gpa + (i << PAGE_SHIFT), false);
		if (leaf)
			*leaf = 0;
	}
	vm->tlb_gen++;
}

static int npt_map_slot(struct pyvt_vm *vm, struct pyvt_memslot *slot)
{
	u64 i, *leaf;

	for (i = 0; i < slot->npages; i++) {
		leaf = npt_leaf(vm, slot->gpa + (i << PAGE_SHIFT), true);
		if (!leaf) {
			npt_unmap_range(vm, slot->gpa, i);
			return -ENOMEM;
		}
		/* Writes to a read-only slot fault and become MMIO exits. */
		*leaf = __sme_set(page_to_phys(slot->pages[i])) |
			NPT_PRESENT | NPT_USER | pyvt_ops->npt_leaf_flags |
			(slot->flags & KVM_MEM_READONLY ? 0 : NPT_WRITABLE);
	}
	return 0;
}

static void slot_unpin(struct pyvt_memslot *slot, u64 npages)
{
	unpin_user_pages_dirty_lock(slot->pages, npages, true);
	atomic_long_sub(npages, &pyvt_live_pages);
	kvfree(slot->pages);
	slot->pages = NULL;
}

static int slot_pin(struct pyvt_memslot *slot)
{
	u64 done = 0;
	long n;

	slot->pages = kvcalloc(slot->npages, sizeof(*slot->pages),
			       GFP_KERNEL_ACCOUNT);
	if (!slot->pages)
		return -ENOMEM;
	while (done < slot->npages) {
		n = pin_user_pages_fast(slot->uaddr + (done << PAGE_SHIFT),
					min_t(u64, slot->npages - done, INT_MAX),
					FOLL_WRITE | FOLL_LONGTERM,
					slot->pages + done);
		if (n <= 0) {
			slot_unpin(slot, done);
			return n ? n : -EFAULT;
		}
		atomic_long_add(n, &pyvt_live_pages);
		done += n;
		if (fatal_signal_pending(current)) {
			slot_unpin(slot, done);
			return -EINTR;
		}
	}
	return 0;
}

static void slot_delete(struct pyvt_vm *vm, struct pyvt_memslot *slot)
{
	if (!slot->pages)
		return;
	npt_unmap_range(vm, slot->gpa, slot->npages);
	slot_unpin(slot, slot->npages);
	slot->npages = 0;
}

int pyvt_set_memory_region(struct pyvt_vm *vm,
			   const struct kvm_userspace_memory_region *mr)
{
	struct pyvt_memslot *slot, new = {};
	u64 npages = mr->memory_size >> PAGE_SHIFT;
	int i, ret;

	if (mr->slot >= PYVT_MAX_MEMSLOTS || (mr->flags & ~KVM_MEM_READONLY))
		return -EINVAL;
	if (!PAGE_ALIGNED(mr->memory_size) ||
	    !PAGE_ALIGNED(mr->guest_phys_addr) ||
	    !PAGE_ALIGNED(mr->userspace_addr))
		return -EINVAL;
	if (npages) {
		if (npages > PYVT_MAX_SLOT_PAGES ||
		    mr->guest_phys_addr >= PYVT_MAX_GPA ||
		    mr->memory_size > PYVT_MAX_GPA - mr->guest_phys_addr)
			return -EINVAL;
		if (mr->userspace_addr + mr->memory_size < mr->userspace_addr ||
		    !access_ok(u64_to_user_ptr(mr->userspace_addr),
			       mr->memory_size))
			return -EINVAL;
	}

	if (down_write_killable(&vm->slots_lock))
		return -EINTR;
	slot = &vm->slots[mr->slot];
	ret = 0;
	if (slot->pages && slot->gpa == mr->guest_phys_addr &&
	    slot->npages == npages && slot->uaddr == mr->userspace_addr &&
	    slot->flags == mr->flags)
		goto out;

	if (npages) {
		for (i = 0; i < PYVT_MAX_MEMSLOTS; i++) {
			struct pyvt_memslot *s = &vm->slots[i];

			if (i == mr->slot || !s->pages)
				continue;
			if (mr->guest_phys_addr < s->gpa + (s->npages << PAGE_SHIFT) &&
			    s->gpa < mr->guest_phys_addr + mr->memory_size) {
				ret = -EEXIST;
				goto out;
			}
		}
		new.gpa = mr->guest_phys_addr;
		new.npages = npages;
		new.uaddr = mr->userspace_addr;
		new.flags = mr->flags;
		ret = slot_pin(&new);
		if (ret)
			goto out;
	}

	slot_delete(vm, slot);
	if (npages) {
		*slot = new;
		ret = npt_map_slot(vm, slot);
		if (ret) {
			slot_unpin(slot, slot->npages);
			slot->npages = 0;
		}
	}
out:
	up_write(&vm->slots_lock);
	return ret;
}

void pyvt_free_memslots(struct pyvt_vm *vm)
{
	int i;

	for (i = 0; i < PYVT_MAX_MEMSLOTS; i++)
		slot_delete(vm, &vm->slots[i]);
}

static struct pyvt_memslot *gpa_to_slot(struct pyvt_vm *vm, u64 gpa)
{
	int i;

	for (i = 0; i < PYVT_MAX_MEMSLOTS; i++) {
		struct pyvt_memslot *s = &vm->slots[i];

		if (s->pages && gpa >= s->gpa &&
		    gpa - s->gpa < (s->npages << PAGE_SHIFT))
			return s;
	}
	return NULL;
}

static bool gpa_is_ram(struct pyvt_vm *vm, u64 gpa)
{
	return gpa_to_slot(vm, gpa) != NULL;
}

static bool gpa_is_readonly(struct pyvt_vm *vm, u64 gpa)
{
	struct pyvt_memslot *s = gpa_to_slot(vm, gpa);

	return s && (s->flags & KVM_MEM_READONLY);
}

/*
 * One policy for a nested page fault on either vendor.  Every slot is
 * mapped when it is set, so a guest faults only on an address outside
 * RAM, which is MMIO, or on a write to a read-only slot, which is
 * reported as MMIO too, as in KVM.  MMIO is emulated only for data
 * accesses: the guest's page tables or code outside RAM, or any other
 * fault on RAM, end the run with an internal error carrying the
 * vendor's @exit_code, @exit_info and @gpa.  Returns what an exit
 * handler returns.
 */
int pyvt_handle_npf(struct pyvt_vcpu *vcpu, u64 gpa, unsigned int access,
		    u64 exit_code, u64 exit_info)
{
	bool walk = access & PYVT_NPF_GUEST_WALK;
	u64 data[3] = { exit_code, exit_info, gpa };

	if ((access & PYVT_NPF_WRITE) && !walk &&
	    gpa_is_readonly(vcpu->vm, gpa))
		return pyvt_emulate_mmio(vcpu, gpa);
	if (!walk && !(access & PYVT_NPF_FETCH) && !gpa_is_ram(vcpu->vm, gpa))
		return pyvt_emulate_mmio(vcpu, gpa);
	pyvt_ops->dump_state(vcpu, "nested page fault");
	pyvt_internal_error(vcpu, KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON,
			    3, data);
	return 0;
}

static int access_gpa(struct pyvt_vm *vm, u64 gpa, void *buf,
		      unsigned int len, bool write)
{
	while (len) {
		unsigned int off = offset_in_page(gpa);
		unsigned int n = min_t(unsigned int, len, PAGE_SIZE - off);
		struct pyvt_memslot *s = gpa_to_slot(vm, gpa);
		struct page *page;
		void *va;

		if (!s || (write && (s->flags & KVM_MEM_READONLY)))
			return -EFAULT;
		page = s->pages[(gpa - s->gpa) >> PAGE_SHIFT];
		va = kmap_local_page(page);
		if (write)
			memcpy(va + off, buf, n);
		else
			memcpy(buf, va + off, n);
		kunmap_local(va);
		gpa += n;
		buf += n;
		len -= n;
	}
	return 0;
}

int pyvt_read_gpa(struct pyvt_vm *vm, u64 gpa, void *buf, unsigned int len)
{
	return access_gpa(vm, gpa, buf, len, false);
}

int pyvt_write_gpa(struct pyvt_vm *vm, u64 gpa, const void *buf,
		   unsigned int len)
{
	return access_gpa(vm, gpa, (void *)buf, len, true);
}
