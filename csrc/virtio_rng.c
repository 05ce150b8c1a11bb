/* SPDX-License-Identifier: MIT */
/* virtio-rng: see virtio_rng.h. */
#include "virtio_rng.h"

#include <errno.h>
#include <sys/random.h>

/* Fills [buf, buf + len) from the kernel's pool; -errno if it cannot. */
static int fill_random(uint8_t *buf, size_t len)
{
	while (len) {
		ssize_t n = getrandom(buf, len, 0);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		buf += n;
		len -= n;
	}
	return 0;
}

static void serve(struct pvt_vworker *w, unsigned q)
{
	struct pvt_vq *vq = &w->q[q];
	struct pvt_vq_elem *e = &w->elem;

	while (pvt_vq_next(vq, w->features, e)) {
		uint32_t written = 0;
		/* Only device-writable buffers: a readable one is not ours to fill. */
		bool failed = e->unmapped || e->nout > 0;
		for (unsigned i = e->nout; i < e->nsegs && !failed; i++) {
			if (fill_random(e->segs[i].host, e->segs[i].len))
				failed = true;
			else
				written += e->segs[i].len;
		}
		if (failed) {
			vq->stats.errors++;
			written = 0;
		}
		vq->stats.bytes += written;
		pvt_vq_complete(vq, e, written);
	}
	pvt_vw_flush(w, q);
}

static const struct pvt_vdev_ops rng_ops = {.serve = serve};

int pvt_vrng_init(struct pvt_vrng *rng)
{
	return pvt_vw_init(&rng->w, &rng_ops, PVT_VRNG_QUEUES, -1, 0);
}
