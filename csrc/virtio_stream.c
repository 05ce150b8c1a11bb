/* SPDX-License-Identifier: MIT */
/* Host fd <-> virtqueue streams: see virtio_stream.h. */
#include "virtio_stream.h"

#include <errno.h>
#include <unistd.h>

ssize_t pvt_stream_receive(struct pvt_vworker *w, size_t skip)
{
	struct pvt_vq *vq = &w->q[w->input_queue];
	struct pvt_vq_elem *e = &w->elem;

	if (!pvt_vq_next(vq, w->features, e))
		return -ENOBUFS;
	int n = e->nin && e->in_len > skip ?
		pvt_vq_iov(e, true, 0, e->in_len, w->iov, PVT_VQ_MAX_SEGS) : -EINVAL;
	if (n < 0) {
		vq->stats.errors++;
		pvt_vq_push(vq, e->head, 0);
		return -EBADMSG;
	}
	ssize_t got;
	do
		got = readv(w->input_fd, w->iov, n);
	while (got < 0 && errno == EINTR);
	if (got > 0) {
		vq->stats.bytes += (size_t)got > skip ? got - skip : 0;
		return got;
	}
	pvt_vq_unpop(vq);
	if (got < 0 && errno == EAGAIN)
		return 0;
	if (got < 0)
		w->input_errors++;
	return -EPIPE;  /* end of input, or it failed */
}

void pvt_stream_transmit(struct pvt_vworker *w, unsigned q, int fd, size_t skip)
{
	struct pvt_vq *vq = &w->q[q];
	struct pvt_vq_elem *e = &w->elem;

	while (pvt_vq_next(vq, w->features, e)) {
		/* Writable buffers in a transmit chain are ignored. */
		int n = e->out_len >= skip ?
			pvt_vq_iov(e, false, 0, e->out_len, w->iov, PVT_VQ_MAX_SEGS) : -EINVAL;
		if (n >= 0 && fd >= 0) {
			int err = pvt_vw_write_all(w, fd, w->iov, n);
			if (err == -ECANCELED) {
				pvt_vq_unpop(vq);
				break;
			}
			n = err ? err : n;
		}
		if (n < 0)
			vq->stats.errors++;
		else
			vq->stats.bytes += e->out_len - skip;
		pvt_vq_push(vq, e->head, 0);
	}
	pvt_vw_flush(w, q);
}
