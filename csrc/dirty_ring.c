// SPDX-License-Identifier: MIT
#include "dirty_ring.h"

uint32_t pvt_dirty_ring_collect(struct kvm_dirty_gfn *ring, uint32_t entries,
				uint32_t *fetch, uint32_t *slots,
				uint64_t *offsets, uint32_t max)
{
	uint32_t taken = 0;

	while (taken < max) {
		struct kvm_dirty_gfn *gfn = &ring[*fetch & (entries - 1)];
		uint32_t flags = __atomic_load_n(&gfn->flags, __ATOMIC_ACQUIRE);

		/* Empty (0) or harvested and not reset yet (RESET): the end. */
		if (flags != KVM_DIRTY_GFN_F_DIRTY)
			break;
		slots[taken] = gfn->slot;
		offsets[taken] = gfn->offset;
		taken++;
		__atomic_store_n(&gfn->flags, KVM_DIRTY_GFN_F_RESET,
				 __ATOMIC_RELEASE);
		(*fetch)++;
	}
	return taken;
}

uint32_t pvt_dirty_ring_resync(struct kvm_dirty_gfn *ring, uint32_t entries,
			       uint32_t *fetch)
{
	uint32_t skip, i;

	for (skip = 1; skip < entries; skip++) {
		struct kvm_dirty_gfn *gfn = &ring[(*fetch + skip) & (entries - 1)];

		if (__atomic_load_n(&gfn->flags, __ATOMIC_ACQUIRE) ==
		    KVM_DIRTY_GFN_F_DIRTY)
			break;
	}
	if (skip == entries)
		return 0;
	for (i = 0; i < skip; i++)
		__atomic_store_n(&ring[(*fetch + i) & (entries - 1)].flags,
				 KVM_DIRTY_GFN_F_RESET, __ATOMIC_RELEASE);
	*fetch += skip;
	return skip;
}
