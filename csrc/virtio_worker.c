/* SPDX-License-Identifier: MIT */
/* The native virtio worker thread: see virtio_worker.h. */
#include "virtio_worker.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

static int dup_fd(int fd)
{
	if (fd < 0)
		return -1;
	int copy = fcntl(fd, F_DUPFD_CLOEXEC, 3);
	return copy < 0 ? -errno : copy;
}

static void close_fd(int *fd)
{
	if (*fd >= 0)
		close(*fd);
	*fd = -1;
}

static void forget_queue(struct pvt_vq *vq)
{
	close_fd(&vq->kick_fd);
	close_fd(&vq->call_fd);
	struct pvt_vq_stats stats = vq->stats;
	memset(vq, 0, sizeof(*vq));
	vq->stats = stats;  /* counts run over the device's life */
	vq->kick_fd = vq->call_fd = -1;
}

int pvt_vw_init(struct pvt_vworker *w, const struct pvt_vdev_ops *ops, unsigned nqueues,
		int input_fd, unsigned input_queue)
{
	if (nqueues > PVT_VW_MAX_QUEUES)
		return -EINVAL;
	w->ops = ops;
	w->nqueues = nqueues;
	for (unsigned i = 0; i < PVT_VW_MAX_QUEUES; i++)
		w->q[i].kick_fd = w->q[i].call_fd = -1;
	w->input_fd = -1;
	w->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (w->stop_fd < 0)
		return -errno;
	if (input_fd >= 0) {
		w->input_fd = dup_fd(input_fd);
		if (w->input_fd < 0) {
			int rc = w->input_fd;
			close_fd(&w->stop_fd);
			w->input_fd = -1;
			return rc;
		}
	}
	w->input_queue = input_queue;
	w->input_wanted = true;
	return 0;
}

static size_t bitmap_words(uint64_t size)
{
	uint64_t pages = (size + PVT_VMEM_PAGE_SIZE - 1) / PVT_VMEM_PAGE_SIZE;
	return (pages + 63) / 64;
}

static void free_bitmaps(struct pvt_vmem *mem)
{
	for (unsigned i = 0; i < mem->count; i++) {
		free(mem->regions[i].written);
		mem->regions[i].written = NULL;
	}
}

void pvt_vw_destroy(struct pvt_vworker *w)
{
	pvt_vw_stop(w);
	if (w->ops && w->ops->release)
		w->ops->release(w);
	for (unsigned i = 0; i < PVT_VW_MAX_QUEUES; i++)
		forget_queue(&w->q[i]);
	close_fd(&w->input_fd);
	close_fd(&w->stop_fd);
	free_bitmaps(&w->mem);
	w->mem.count = 0;
}

int pvt_vw_set_memory(struct pvt_vworker *w, const struct pvt_vmem_region *regions,
		      unsigned count)
{
	if (w->running)
		return -EBUSY;
	if (count > PVT_VMEM_MAX_REGIONS)
		return -EINVAL;
	for (unsigned i = 0; i < count; i++)
		if (regions[i].size == 0 || regions[i].gpa + regions[i].size < regions[i].gpa ||
		    !regions[i].host)
			return -EINVAL;
	struct pvt_vmem fresh = {.count = count};
	for (unsigned i = 0; i < count; i++) {
		fresh.regions[i] = regions[i];
		fresh.regions[i].written = calloc(bitmap_words(regions[i].size), sizeof(uint64_t));
		if (!fresh.regions[i].written) {
			free_bitmaps(&fresh);
			return -ENOMEM;
		}
	}
	/* Pages written and not taken yet are lost with the old table: take
	 * them first (pvt_vw_take_written). */
	free_bitmaps(&w->mem);
	w->mem = fresh;
	/* The queues' rings move with the table, or break. */
	for (unsigned q = 0; q < w->nqueues; q++)
		pvt_vq_remap(&w->q[q]);
	return 0;
}

int pvt_vw_take_written(struct pvt_vworker *w, unsigned region, uint64_t *pages,
			size_t words)
{
	if (region >= w->mem.count)
		return -ENOENT;
	uint64_t *bitmap = w->mem.regions[region].written;
	size_t have = bitmap_words(w->mem.regions[region].size);
	if (words < have)
		return -EINVAL;
	for (size_t i = 0; i < have; i++)
		pages[i] = bitmap[i] ? __atomic_exchange_n(&bitmap[i], 0, __ATOMIC_RELAXED) : 0;
	return 0;
}

int pvt_vw_set_queue(struct pvt_vworker *w, unsigned index, uint32_t size,
		     uint64_t desc_gpa, uint64_t avail_gpa, uint64_t used_gpa,
		     int kick_fd, int call_fd)
{
	if (w->running)
		return -EBUSY;
	if (index >= w->nqueues)
		return -ENOENT;
	struct pvt_vq fresh;
	memset(&fresh, 0, sizeof(fresh));
	int rc = pvt_vq_setup(&fresh, &w->mem, size, desc_gpa, avail_gpa, used_gpa);
	if (rc)
		return rc;
	int kick = dup_fd(kick_fd);
	if (kick < -1)
		return kick;
	int call = dup_fd(call_fd);
	if (call < -1) {
		close_fd(&kick);
		return call;
	}
	struct pvt_vq *vq = &w->q[index];
	forget_queue(vq);
	fresh.stats = vq->stats;
	fresh.kick_fd = kick;
	fresh.call_fd = call;
	*vq = fresh;
	w->flushed_used[index] = 0;
	return 0;
}

int pvt_vw_set_features(struct pvt_vworker *w, uint64_t features)
{
	if (w->running)
		return -EBUSY;
	w->features = features;
	return 0;
}

int pvt_vw_set_position(struct pvt_vworker *w, unsigned index, uint16_t last_avail)
{
	if (w->running)
		return -EBUSY;
	if (index >= w->nqueues)
		return -ENOENT;
	if (!w->q[index].ready)
		return -ENODEV;
	pvt_vq_set_position(&w->q[index], last_avail);
	w->flushed_used[index] = w->q[index].used_idx;
	return 0;
}

int pvt_vw_reset(struct pvt_vworker *w)
{
	if (w->running)
		return -EBUSY;
	for (unsigned i = 0; i < PVT_VW_MAX_QUEUES; i++) {
		forget_queue(&w->q[i]);
		w->flushed_used[i] = 0;
	}
	w->features = 0;
	__atomic_store_n(&w->isr, 0, __ATOMIC_SEQ_CST);
	w->input_wanted = true;
	w->input_closed = false;
	return 0;
}

uint32_t pvt_vw_take_isr(struct pvt_vworker *w)
{
	return __atomic_exchange_n(&w->isr, 0, __ATOMIC_SEQ_CST);
}

void pvt_vw_flush(struct pvt_vworker *w, unsigned q)
{
	struct pvt_vq *vq = &w->q[q];
	if (vq->used_idx == w->flushed_used[q])
		return;
	w->flushed_used[q] = vq->used_idx;
	if (!pvt_vq_should_notify(vq, w->features))
		return;
	__atomic_fetch_or(&w->isr, PVT_VW_ISR_QUEUE, __ATOMIC_SEQ_CST);
	vq->stats.notifies++;
	if (vq->call_fd >= 0) {
		uint64_t one = 1;
		/* An eventfd write fails only when the counter would overflow:
		 * the guest has an interrupt pending then anyway. */
		(void)!write(vq->call_fd, &one, sizeof(one));
	}
}

static bool stop_requested(struct pvt_vworker *w)
{
	struct pollfd p = {.fd = w->stop_fd, .events = POLLIN};
	return poll(&p, 1, 0) > 0;
}

int pvt_vw_write_all(struct pvt_vworker *w, int fd, struct iovec *iov, int iovcnt)
{
	while (iovcnt > 0) {
		ssize_t n = writev(fd, iov, iovcnt);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno != EAGAIN)
				return -errno;
			struct pollfd p[2] = {{.fd = fd, .events = POLLOUT},
					      {.fd = w->stop_fd, .events = POLLIN}};
			if (poll(p, 2, -1) < 0 && errno != EINTR)
				return -errno;
			if (p[1].revents)
				return -ECANCELED;
			continue;
		}
		/* A partial write (a pipe): go on after what was taken. */
		pvt_iov_advance(&iov, &iovcnt, n);
	}
	return 0;
}

/*
 * Serves a queue with kicks off; turns them back on and serves again if
 * the guest added chains meanwhile (else its next kick could be lost).
 */
static void serve_queue(struct pvt_vworker *w, unsigned q)
{
	struct pvt_vq *vq = &w->q[q];
	if (!vq->ready)
		return;
	if (w->ops->input && q == w->input_queue) {
		/* Buffers to receive into: read the input again. */
		w->input_wanted = true;
		pvt_vq_disable_kicks(vq, w->features);
		return;
	}
	do {
		pvt_vq_disable_kicks(vq, w->features);
		w->ops->serve(w, q);
		if (stop_requested(w))
			break;
	} while (pvt_vq_enable_kicks(vq, w->features));
}

static void serve_input(struct pvt_vworker *w)
{
	struct pvt_vq *vq = &w->q[w->input_queue];
	for (int i = 0; i < PVT_VW_INPUT_BATCH; i++) {
		int rc = w->ops->input(w);
		if (rc == -ENOBUFS) {
			/* No buffer: wait for a kick before reading more. */
			if (pvt_vq_enable_kicks(vq, w->features))
				continue;
			w->input_wanted = false;
			break;
		}
		if (rc == -EPIPE) {
			w->input_closed = true;
			break;
		}
		/* One read per wake-up: the fd may be blocking. */
		break;
	}
	pvt_vw_flush(w, w->input_queue);
}

static void drain_eventfd(int fd)
{
	uint64_t count;
	(void)!read(fd, &count, sizeof(count));
}

static void *run(void *arg)
{
	struct pvt_vworker *w = arg;
	struct pollfd fds[2 + PVT_VW_MAX_QUEUES];
	int queue_of[2 + PVT_VW_MAX_QUEUES];

	/* Chains made available while the worker was stopped get no kick. */
	for (unsigned q = 0; q < w->nqueues; q++)
		serve_queue(w, q);
	for (;;) {
		int n = 0;
		fds[n].fd = w->stop_fd;
		fds[n].events = POLLIN;
		queue_of[n++] = -1;
		for (unsigned q = 0; q < w->nqueues; q++) {
			if (!w->q[q].ready || w->q[q].broken || w->q[q].kick_fd < 0)
				continue;
			fds[n].fd = w->q[q].kick_fd;
			fds[n].events = POLLIN;
			queue_of[n++] = q;
		}
		int input = -1;
		if (w->input_fd >= 0 && w->input_wanted && !w->input_closed &&
		    w->q[w->input_queue].ready && !w->q[w->input_queue].broken) {
			input = n;
			fds[n].fd = w->input_fd;
			fds[n].events = POLLIN;
			queue_of[n++] = -1;
		}
		if (poll(fds, n, -1) < 0) {
			if (errno == EINTR)
				continue;
			w->poll_error = errno;
			break;
		}
		if (fds[0].revents)
			break;
		for (int i = 1; i < n; i++) {
			if (i == input || !fds[i].revents)
				continue;
			drain_eventfd(fds[i].fd);
			w->q[queue_of[i]].stats.kicks++;
			serve_queue(w, queue_of[i]);
		}
		if (input >= 0 && fds[input].revents) {
			if (fds[input].revents & POLLIN)
				serve_input(w);
			else
				w->input_closed = true;  /* POLLHUP/POLLERR with nothing to read */
		}
	}
	return NULL;
}

int pvt_vw_start(struct pvt_vworker *w)
{
	if (w->running)
		return -EBUSY;
	drain_eventfd(w->stop_fd);
	w->poll_error = 0;
	/* The thread takes no signals: they are the Python thread's (Ctrl-C)
	 * and the vCPU threads' (kicks). */
	sigset_t all, old;
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	int rc = pthread_create(&w->thread, NULL, run, w);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (rc)
		return -rc;
	w->running = true;
	return 0;
}

void pvt_vw_stop(struct pvt_vworker *w)
{
	if (!w->running)
		return;
	uint64_t one = 1;
	(void)!write(w->stop_fd, &one, sizeof(one));
	pthread_join(w->thread, NULL);
	w->running = false;
	drain_eventfd(w->stop_fd);
}
