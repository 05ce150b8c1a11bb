/* SPDX-License-Identifier: MIT */
/*
 * Split virtqueues (virtio 1.x section 2.7) as a device sees them, for the
 * native virtio workers: the guest-memory table every guest address is
 * checked against, popping descriptor chains from the available ring,
 * pushing them to the used ring, and the interrupt and notification
 * suppression rules.
 *
 * Nothing here trusts the guest.  Ring pointers are checked once, when the
 * queue is set up; every descriptor is copied out of guest memory before it
 * is looked at (the guest may rewrite it meanwhile), and every buffer it
 * names is looked up in the memory table: a buffer that is not wholly
 * inside one RAM region has no host pointer, and the device fails that
 * request.  A malformed chain (a loop, an index past the table, a chain
 * longer than the queue, a device-readable buffer after a device-writable
 * one, a nested indirect table) is handed back unused and counted; an
 * available-ring entry naming a descriptor past the table breaks the queue.
 */
#ifndef PVT_VIRTIO_RING_H
#define PVT_VIRTIO_RING_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include <linux/virtio_ring.h>

/* At most this many RAM regions in a worker's memory table. */
#define PVT_VMEM_MAX_REGIONS 32
/* The largest queue a worker accepts (the split-ring maximum). */
#define PVT_VQ_MAX_SIZE 32768
/*
 * The most buffers one request may have (IOV_MAX, what one preadv/writev
 * takes).  A longer chain is refused; a block device advertises
 * PVT_VQ_MAX_SEGS - 2 as its seg_max (the header and status take two).
 */
#define PVT_VQ_MAX_SEGS 1024

/* Device writes are tracked by page, for snapshots and migration. */
#define PVT_VMEM_PAGE_SIZE 4096

struct pvt_vmem_region {
	uint64_t gpa;
	uint64_t size;
	uint8_t *host;
	/*
	 * One bit per page the device wrote (bit n: page n), set atomically,
	 * or NULL.  KVM's dirty log sees only the guest's own writes: these
	 * are the device's, for pyvt's snapshot and migration code.
	 */
	uint64_t *written;
};

/* Guest RAM as the host maps it: where a device may read and write. */
struct pvt_vmem {
	unsigned count;
	struct pvt_vmem_region regions[PVT_VMEM_MAX_REGIONS];
};

/*
 * The host address of guest-physical [gpa, gpa + len), or NULL when that
 * range is not wholly inside one region (or wraps).  len 0 is allowed.
 */
void *pvt_vmem_ptr(const struct pvt_vmem *mem, uint64_t gpa, uint64_t len);

/* Records that the device wrote guest-physical [gpa, gpa + len). */
void pvt_vmem_mark(const struct pvt_vmem *mem, uint64_t gpa, uint64_t len);

/* One buffer of a chain. */
struct pvt_vq_seg {
	uint64_t gpa;
	uint32_t len;
	bool writable;  /* device-writable (VIRTQ_DESC_F_WRITE) */
	void *host;     /* NULL: not inside guest RAM */
};

/* A chain popped from the available ring. */
struct pvt_vq_elem {
	uint16_t head;
	unsigned nsegs;
	unsigned nout;      /* device-readable buffers, first */
	unsigned nin;       /* device-writable buffers, after them */
	uint64_t out_len;   /* bytes the device may read */
	uint64_t in_len;    /* bytes the device may write */
	bool unmapped;      /* some buffer is outside guest RAM */
	struct pvt_vq_seg segs[PVT_VQ_MAX_SEGS];
};

struct pvt_vq_stats {
	uint64_t requests;  /* chains handed back */
	uint64_t bytes;     /* payload bytes moved */
	uint64_t errors;    /* requests that failed, malformed chains */
	uint64_t notifies;  /* interrupts sent */
	uint64_t kicks;     /* notifications received */
};

struct pvt_vq {
	const struct pvt_vmem *mem;  /* what the rings and buffers are checked against */
	bool ready;
	bool broken;        /* the guest broke the ring: not served until reset */
	uint16_t size;
	uint64_t desc_gpa, avail_gpa, used_gpa;
	struct vring_desc *desc;
	struct vring_avail *avail;
	struct vring_used *used;
	uint16_t last_avail;    /* next available-ring slot to take */
	uint16_t used_idx;      /* next used-ring slot to fill */
	uint16_t signalled_used;  /* used_idx when the guest was last notified */
	bool signalled_valid;
	int kick_fd, call_fd;   /* the worker's own dups; -1 when unset */
	struct pvt_vq_stats stats;
};

/*
 * Sets up a queue over guest memory: -EINVAL for a size that is not a power
 * of two up to PVT_VQ_MAX_SIZE or a misaligned ring, -EFAULT for a ring not
 * inside guest RAM.  The positions start at 0.  `mem` must outlive the queue.
 */
int pvt_vq_setup(struct pvt_vq *vq, const struct pvt_vmem *mem, uint32_t size,
		 uint64_t desc_gpa, uint64_t avail_gpa, uint64_t used_gpa);

/*
 * Looks the rings up again after the memory table changed: -EFAULT (and
 * the queue is broken) when they are no longer inside guest RAM.
 */
int pvt_vq_remap(struct pvt_vq *vq);

/* Chains the guest made available and the device has not taken. */
uint16_t pvt_vq_pending(const struct pvt_vq *vq);

/*
 * Takes the next chain.  Returns 1 with *e filled, 0 when the ring is
 * empty or the queue broken, -EBADMSG for a malformed chain (already handed
 * back unused and counted: take the next one), -EIO when the available
 * ring names a descriptor past the table (the queue is now broken).
 */
int pvt_vq_pop(struct pvt_vq *vq, const struct pvt_vmem *mem, uint64_t features,
	       struct pvt_vq_elem *e);

/*
 * Takes the next usable chain (malformed ones are handed back and counted
 * on the way): true with *e filled, false when there is none or the queue
 * is broken.
 */
bool pvt_vq_next(struct pvt_vq *vq, uint64_t features, struct pvt_vq_elem *e);

/* Puts the last popped chain back: it is taken again next time. */
void pvt_vq_unpop(struct pvt_vq *vq);

/* Hands chain `head` back with `len` bytes written into it. */
void pvt_vq_push(struct pvt_vq *vq, uint16_t head, uint32_t len);

/*
 * Hands back a popped chain whose first `len` writable bytes the device
 * wrote: pvt_vq_push, with those pages recorded as written.
 */
void pvt_vq_complete(struct pvt_vq *vq, const struct pvt_vq_elem *e, uint32_t len);

/*
 * Whether the guest wants an interrupt for what was pushed since the last
 * one: VRING_AVAIL_F_NO_INTERRUPT, or with EVENT_IDX its used_event.
 */
bool pvt_vq_should_notify(struct pvt_vq *vq, uint64_t features);

/*
 * Asks for (or stops asking for) kicks: with EVENT_IDX avail_event, else
 * VRING_USED_F_NO_NOTIFY.  After enabling, returns true when chains
 * arrived meanwhile (the caller must serve them: no kick will come).
 */
bool pvt_vq_enable_kicks(struct pvt_vq *vq, uint64_t features);
void pvt_vq_disable_kicks(struct pvt_vq *vq, uint64_t features);

/*
 * Restores a queue's position (a snapshot's): the next chain to take is
 * `last_avail`; the used index is read back from the used ring.
 */
void pvt_vq_set_position(struct pvt_vq *vq, uint16_t last_avail);

/*
 * Copies up to `len` bytes of a chain's device-readable part, from byte
 * `offset` of it, to `buf`.  Returns the bytes copied.
 */
size_t pvt_vq_read(const struct pvt_vq_elem *e, size_t offset, void *buf, size_t len);

/* Copies `len` bytes into the device-writable part at `offset`; returns the bytes copied. */
size_t pvt_vq_write(const struct pvt_vq_elem *e, size_t offset, const void *buf, size_t len);

/*
 * Fills `iov` with the bytes [offset, offset + len) of the chain's
 * device-readable (writable=false) or device-writable part.  Returns how
 * many iovecs were used (at most `max`), or -EFAULT when a buffer in that
 * range is outside guest RAM, -EINVAL when the part is shorter.
 */
int pvt_vq_iov(const struct pvt_vq_elem *e, bool writable, size_t offset, size_t len,
	       struct iovec *iov, int max);

/*
 * Moves an iovec array past `done` bytes (after a short readv/writev):
 * *iov and *n then describe what is left.
 */
void pvt_iov_advance(struct iovec **iov, int *n, size_t done);

#endif
