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

void pvt_dirty_ring_mark_harvested(struct kvm_dirty_gfn *ring,
				   uint32_t entries, uint32_t first,
				   uint32_t count)
{
	uint32_t i;

	for (i = 0; i < count && i < entries; i++)
		__atomic_store_n(&ring[(first + i) & (entries - 1)].flags,
				 KVM_DIRTY_GFN_F_RESET, __ATOMIC_RELEASE);
}

uint32_t pvt_dirty_ring_recover(struct kvm_dirty_gfn *ring, uint32_t entries,
				uint32_t fetch, uint8_t *dirty, uint32_t *slots,
				uint64_t *offsets, uint32_t *advance,
				int *all_dirty)
{
	uint32_t mask = entries - 1, taken = 0, i, end = 0;

	/* Positions are counted from fetch: dirty[i] is entry fetch + i. */
	for (i = 0; i < entries; i++) {
		struct kvm_dirty_gfn *gfn = &ring[(fetch + i) & mask];

		dirty[i] = __atomic_load_n(&gfn->flags, __ATOMIC_ACQUIRE) ==
			   KVM_DIRTY_GFN_F_DIRTY;
		if (dirty[i]) {
			slots[taken] = gfn->slot;
			offsets[taken] = gfn->offset;
			taken++;
		}
	}
	*all_dirty = taken == entries;
	if (taken == 0) {
		*advance = 0;
		return 0;
	}
	if (taken == entries) {
		*advance = entries;
	} else {
		/* KVM's next entry follows the end of the dirty run... */
		for (i = 0; i < entries; i++)
			if (dirty[i] && !dirty[(i + 1) & mask])
				end = i;
		*advance = end + 1;
		/* ...a lap further if the run came round past fetch. */
		if (dirty[0] && dirty[entries - 1])
			*advance += entries;
	}
	pvt_dirty_ring_mark_harvested(ring, entries, fetch,
				      *advance < entries ? *advance : entries);
	return taken;
}
