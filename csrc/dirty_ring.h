/* SPDX-License-Identifier: MIT */
/*
 * Harvesting a vCPU's dirty ring (KVM_CAP_DIRTY_LOG_RING, api.rst 8.29).
 *
 * KVM appends one struct kvm_dirty_gfn per page the vCPU dirties and sets
 * its flags to DIRTY last; userspace reads the entries in order from where
 * it stopped, flips each to RESET, then calls KVM_RESET_DIRTY_RINGS so that
 * KVM re-protects those pages and recycles the entries.  The flags are read
 * with acquire and written with release semantics, as
 * KVM_CAP_DIRTY_LOG_RING_ACQ_REL requires: slot and offset are read only
 * after the DIRTY flag that publishes them, and KVM sees RESET only after
 * they were read.
 */
#ifndef PVT_DIRTY_RING_H
#define PVT_DIRTY_RING_H

#include <stdint.h>

#include <linux/kvm.h>

/*
 * Harvests the dirty entries of `ring` (`entries`, a power of two) from
 * *fetch on, in order, until one is not dirty or `max` were taken; stores
 * each one's slot and offset and advances *fetch past it.  Returns how
 * many were harvested.
 */
uint32_t pvt_dirty_ring_collect(struct kvm_dirty_gfn *ring, uint32_t entries,
				uint32_t *fetch, uint32_t *slots,
				uint64_t *offsets, uint32_t max);

/*
 * KVM keeps a vCPU's ring from overflowing by making it exit when the ring
 * is nearly full, but a backend that runs many guest instructions between
 * those checks (PVM's emulation of ring-0 code) can push more entries than
 * the ring holds: the oldest are overwritten, and KVM counts entries past
 * *fetch that are no longer there.  This harvest copes with that: it takes
 * every dirty entry, wherever it is (each names a page written since the
 * last reset), and works out where KVM's next entry is from where the
 * dirty run ends.  It marks the entries from *fetch up to there harvested
 * (one lap at most: *advance may exceed `entries` by what the caller marks
 * with pvt_dirty_ring_mark_harvested after a first KVM_RESET_DIRTY_RINGS).
 * `dirty` is scratch of `entries` bytes.  Returns how many dirty entries
 * it took; *all_dirty says every entry was dirty (some may have been lost).
 */
uint32_t pvt_dirty_ring_recover(struct kvm_dirty_gfn *ring, uint32_t entries,
				uint32_t fetch, uint8_t *dirty, uint32_t *slots,
				uint64_t *offsets, uint32_t *advance,
				int *all_dirty);

/* Marks `count` (at most `entries`) entries from `first` on harvested. */
void pvt_dirty_ring_mark_harvested(struct kvm_dirty_gfn *ring,
				   uint32_t entries, uint32_t first,
				   uint32_t count);

#endif
