/* SPDX-License-Identifier: MIT */
/* Split virtqueues, device side: see virtio_ring.h. */
#include "virtio_ring.h"

#include <errno.h>
#include <string.h>

#include <linux/virtio_config.h>

/*
 * A descriptor as it lies in guest memory.  Packed and read through a
 * volatile pointer: each field is loaded exactly once (the guest may
 * change it under us) and an indirect table need not be aligned.
 */
struct pvt_raw_desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags;
	uint16_t next;
} __attribute__((packed));

#define HAS(features, bit) (((features) >> (bit)) & 1)

void *pvt_vmem_ptr(const struct pvt_vmem *mem, uint64_t gpa, uint64_t len)
{
	for (unsigned i = 0; i < mem->count; i++) {
		const struct pvt_vmem_region *r = &mem->regions[i];
		if (gpa >= r->gpa && gpa - r->gpa <= r->size &&
		    len <= r->size - (gpa - r->gpa)) {
			if (len == 0 && gpa - r->gpa == r->size)
				continue;  /* the end of a region is not inside it */
			return r->host + (gpa - r->gpa);
		}
	}
	return NULL;
}

void pvt_vmem_mark(const struct pvt_vmem *mem, uint64_t gpa, uint64_t len)
{
	if (len == 0)
		return;
	for (unsigned i = 0; i < mem->count; i++) {
		const struct pvt_vmem_region *r = &mem->regions[i];
		if (gpa < r->gpa || gpa - r->gpa >= r->size || !r->written)
			continue;
		uint64_t first = (gpa - r->gpa) / PVT_VMEM_PAGE_SIZE;
		uint64_t end = gpa - r->gpa + len;
		if (end > r->size)
			end = r->size;
		uint64_t last = (end - 1) / PVT_VMEM_PAGE_SIZE;
		for (uint64_t page = first; page <= last; page++)
			__atomic_fetch_or(&r->written[page / 64], 1ULL << (page % 64),
					  __ATOMIC_RELAXED);
		return;
	}
}

/* The host addresses of the rings (with their event words): 0 or -EFAULT. */
static int map_rings(struct pvt_vq *vq, const struct pvt_vmem *mem, uint32_t size,
		     uint64_t desc_gpa, uint64_t avail_gpa, uint64_t used_gpa)
{
	void *desc = pvt_vmem_ptr(mem, desc_gpa, 16ULL * size);
	void *avail = pvt_vmem_ptr(mem, avail_gpa, 6 + 2ULL * size);
	void *used = pvt_vmem_ptr(mem, used_gpa, 6 + 8ULL * size);
	if (!desc || !avail || !used)
		return -EFAULT;
	vq->desc = desc;
	vq->avail = avail;
	vq->used = used;
	return 0;
}

int pvt_vq_remap(struct pvt_vq *vq)
{
	if (!vq->ready)
		return 0;
	int rc = map_rings(vq, vq->mem, vq->size, vq->desc_gpa, vq->avail_gpa, vq->used_gpa);
	if (rc) {
		vq->ready = false;
		vq->broken = true;
	}
	return rc;
}

int pvt_vq_setup(struct pvt_vq *vq, const struct pvt_vmem *mem, uint32_t size,
		 uint64_t desc_gpa, uint64_t avail_gpa, uint64_t used_gpa)
{
	if (size == 0 || (size & (size - 1)) || size > PVT_VQ_MAX_SIZE)
		return -EINVAL;
	if ((desc_gpa & 15) || (avail_gpa & 1) || (used_gpa & 3))
		return -EINVAL;
	int rc = map_rings(vq, mem, size, desc_gpa, avail_gpa, used_gpa);
	if (rc)
		return rc;
	vq->mem = mem;
	vq->size = size;
	vq->desc_gpa = desc_gpa;
	vq->avail_gpa = avail_gpa;
	vq->used_gpa = used_gpa;
	vq->last_avail = 0;
	vq->used_idx = 0;
	/* A fresh ring: nothing used, nothing signalled yet. */
	vq->signalled_used = 0;
	vq->signalled_valid = true;
	vq->broken = false;
	vq->ready = true;
	return 0;
}

static uint16_t avail_idx(const struct pvt_vq *vq)
{
	/* Acquire: the ring entries and descriptors are read after the index
	 * that publishes them (the driver wrote them before it, with a
	 * release/write barrier: virtio 1.x 2.7.13). */
	return __atomic_load_n(&vq->avail->idx, __ATOMIC_ACQUIRE);
}

uint16_t pvt_vq_pending(const struct pvt_vq *vq)
{
	if (!vq->ready || vq->broken)
		return 0;
	return (uint16_t)(avail_idx(vq) - vq->last_avail);
}

static void add_seg(struct pvt_vq_elem *e, const struct pvt_vmem *mem,
		    uint64_t addr, uint32_t len, bool writable)
{
	struct pvt_vq_seg *s = &e->segs[e->nsegs++];
	s->gpa = addr;
	s->len = len;
	s->writable = writable;
	s->host = pvt_vmem_ptr(mem, addr, len);
	if (!s->host)
		e->unmapped = true;
	if (writable) {
		e->nin++;
		e->in_len += len;
	} else {
		e->nout++;
		e->out_len += len;
	}
}

/* Walks the chain from `head` into *e; -errno for a malformed chain. */
static int walk(const struct pvt_vq *vq, const struct pvt_vmem *mem,
		uint64_t features, uint16_t head, struct pvt_vq_elem *e)
{
	const volatile struct pvt_raw_desc *table = (const void *)vq->desc;
	uint32_t table_size = vq->size;
	/* A chain visits each descriptor of its table at most once: more
	 * steps than that is a loop. */
	uint32_t budget = vq->size;
	uint32_t idx = head;
	bool indirect = false;

	e->head = head;
	e->nsegs = e->nout = e->nin = 0;
	e->out_len = e->in_len = 0;
	e->unmapped = false;
	for (;;) {
		if (budget-- == 0)
			return -ELOOP;
		const volatile struct pvt_raw_desc *d = &table[idx];
		uint64_t addr = d->addr;
		uint32_t len = d->len;
		uint16_t flags = d->flags;
		uint16_t next = d->next;

		if (flags & VRING_DESC_F_INDIRECT) {
			/* Not negotiated, nested, chained, or not whole descriptors. */
			if (!HAS(features, VIRTIO_RING_F_INDIRECT_DESC) || indirect ||
			    (flags & VRING_DESC_F_NEXT) || len == 0 || len % 16)
				return -EINVAL;
			table = pvt_vmem_ptr(mem, addr, len);
			if (!table)
				return -EFAULT;
			table_size = budget = len / 16;
			idx = 0;
			indirect = true;
			continue;
		}
		if (e->nsegs == PVT_VQ_MAX_SEGS)
			return -E2BIG;
		bool writable = flags & VRING_DESC_F_WRITE;
		/* Device-readable buffers come first (2.7.4.2). */
		if (!writable && e->nin)
			return -EINVAL;
		add_seg(e, mem, addr, len, writable);
		/* The used ring counts bytes written in 32 bits. */
		if (e->in_len > UINT32_MAX || e->out_len > UINT32_MAX)
			return -E2BIG;
		if (!(flags & VRING_DESC_F_NEXT))
			return 0;
		idx = next;
		if (idx >= table_size)
			return -EINVAL;
	}
}

static void mark_broken(struct pvt_vq *vq)
{
	vq->broken = true;
	vq->stats.errors++;
}

int pvt_vq_pop(struct pvt_vq *vq, const struct pvt_vmem *mem, uint64_t features,
	       struct pvt_vq_elem *e)
{
	if (!vq->ready || vq->broken)
		return 0;
	uint16_t pending = (uint16_t)(avail_idx(vq) - vq->last_avail);
	if (pending == 0)
		return 0;
	if (pending > vq->size) {
		/* The driver claims more chains than the ring holds. */
		mark_broken(vq);
		return -EIO;
	}
	const volatile uint16_t *ring = vq->avail->ring;
	uint16_t head = ring[vq->last_avail & (vq->size - 1)];
	if (head >= vq->size) {
		mark_broken(vq);
		return -EIO;
	}
	vq->last_avail++;
	if (walk(vq, mem, features, head, e)) {
		/* Hand it back unused, so that the driver does not wait forever
		 * for this chain. */
		vq->stats.errors++;
		pvt_vq_push(vq, head, 0);
		return -EBADMSG;
	}
	return 1;
}

bool pvt_vq_next(struct pvt_vq *vq, uint64_t features, struct pvt_vq_elem *e)
{
	int rc;
	while ((rc = pvt_vq_pop(vq, vq->mem, features, e)) == -EBADMSG)
		;
	return rc == 1;
}

void pvt_vq_unpop(struct pvt_vq *vq)
{
	vq->last_avail--;
}

void pvt_vq_push(struct pvt_vq *vq, uint16_t head, uint32_t len)
{
	uint16_t slot = vq->used_idx & (vq->size - 1);
	volatile struct vring_used_elem *u = &vq->used->ring[slot];
	u->id = head;
	u->len = len;
	pvt_vmem_mark(vq->mem, vq->used_gpa + 4 + 8ULL * slot, 8);
	pvt_vmem_mark(vq->mem, vq->used_gpa + 2, 2);
	vq->used_idx++;
	/* Release: the entry is visible before the index that publishes it. */
	__atomic_store_n(&vq->used->idx, vq->used_idx, __ATOMIC_RELEASE);
	vq->stats.requests++;
}

void pvt_vq_complete(struct pvt_vq *vq, const struct pvt_vq_elem *e, uint32_t len)
{
	uint64_t left = len;
	for (unsigned i = e->nout; i < e->nsegs && left; i++) {
		uint64_t take = e->segs[i].len < left ? e->segs[i].len : left;
		pvt_vmem_mark(vq->mem, e->segs[i].gpa, take);
		left -= take;
	}
	pvt_vq_push(vq, e->head, len);
}

bool pvt_vq_should_notify(struct pvt_vq *vq, uint64_t features)
{
	/* The used index is visible before the suppression fields are read:
	 * else the driver may re-enable interrupts unseen (2.7.10). */
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	if (HAS(features, VIRTIO_RING_F_EVENT_IDX)) {
		uint16_t used_event = ((volatile uint16_t *)vq->avail->ring)[vq->size];
		uint16_t old = vq->signalled_used;
		bool valid = vq->signalled_valid;
		vq->signalled_used = vq->used_idx;
		vq->signalled_valid = true;
		return !valid || vring_need_event(used_event, vq->used_idx, old);
	}
	return !(((volatile struct vring_avail *)vq->avail)->flags & VRING_AVAIL_F_NO_INTERRUPT);
}

static volatile uint16_t *avail_event(struct pvt_vq *vq)
{
	return (volatile uint16_t *)&vq->used->ring[vq->size];
}

bool pvt_vq_enable_kicks(struct pvt_vq *vq, uint64_t features)
{
	if (!vq->ready || vq->broken)
		return false;
	if (HAS(features, VIRTIO_RING_F_EVENT_IDX)) {
		*avail_event(vq) = vq->last_avail;
		pvt_vmem_mark(vq->mem, vq->used_gpa + 4 + 8ULL * vq->size, 2);
	} else {
		((volatile struct vring_used *)vq->used)->flags = 0;
		pvt_vmem_mark(vq->mem, vq->used_gpa, 2);
	}
	/* The request is visible before the available index is read again. */
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	return pvt_vq_pending(vq) != 0;
}

void pvt_vq_disable_kicks(struct pvt_vq *vq, uint64_t features)
{
	if (!vq->ready)
		return;
	/* With EVENT_IDX an avail_event left behind asks for nothing more. */
	if (!HAS(features, VIRTIO_RING_F_EVENT_IDX)) {
		((volatile struct vring_used *)vq->used)->flags = VRING_USED_F_NO_NOTIFY;
		pvt_vmem_mark(vq->mem, vq->used_gpa, 2);
	}
}

void pvt_vq_set_position(struct pvt_vq *vq, uint16_t last_avail)
{
	vq->last_avail = last_avail;
	vq->used_idx = __atomic_load_n(&vq->used->idx, __ATOMIC_ACQUIRE);
	vq->signalled_valid = false;
	vq->broken = false;
}

/* The segments of one part of a chain. */
static void part(const struct pvt_vq_elem *e, bool writable, unsigned *first, unsigned *count)
{
	*first = writable ? e->nout : 0;
	*count = writable ? e->nin : e->nout;
}

int pvt_vq_iov(const struct pvt_vq_elem *e, bool writable, size_t offset, size_t len,
	       struct iovec *iov, int max)
{
	unsigned first, count;
	int n = 0;

	part(e, writable, &first, &count);
	for (unsigned i = first; i < first + count && len; i++) {
		const struct pvt_vq_seg *s = &e->segs[i];
		if (offset >= s->len) {
			offset -= s->len;
			continue;
		}
		size_t take = s->len - offset;
		if (take > len)
			take = len;
		if (!s->host)
			return -EFAULT;
		if (n == max)
			return -E2BIG;
		iov[n].iov_base = (uint8_t *)s->host + offset;
		iov[n].iov_len = take;
		n++;
		len -= take;
		offset = 0;
	}
	return len ? -EINVAL : n;
}

static size_t copy(const struct pvt_vq_elem *e, bool writable, size_t offset,
		   void *buf, size_t len)
{
	unsigned first, count;
	size_t done = 0;

	part(e, writable, &first, &count);
	for (unsigned i = first; i < first + count && done < len; i++) {
		const struct pvt_vq_seg *s = &e->segs[i];
		if (offset >= s->len) {
			offset -= s->len;
			continue;
		}
		if (!s->host)
			break;
		size_t take = s->len - offset;
		if (take > len - done)
			take = len - done;
		if (writable)
			memcpy((uint8_t *)s->host + offset, (const uint8_t *)buf + done, take);
		else
			memcpy((uint8_t *)buf + done, (const uint8_t *)s->host + offset, take);
		done += take;
		offset = 0;
	}
	return done;
}

size_t pvt_vq_read(const struct pvt_vq_elem *e, size_t offset, void *buf, size_t len)
{
	return copy(e, false, offset, buf, len);
}

size_t pvt_vq_write(const struct pvt_vq_elem *e, size_t offset, const void *buf, size_t len)
{
	return copy(e, true, offset, (void *)buf, len);
}

void pvt_iov_advance(struct iovec **iov, int *n, size_t done)
{
	while (*n > 0 && done >= (*iov)->iov_len) {
		done -= (*iov)->iov_len;
		(*iov)++;
		(*n)--;
	}
	if (*n > 0) {
		(*iov)->iov_base = (uint8_t *)(*iov)->iov_base + done;
		(*iov)->iov_len -= done;
	}
}
