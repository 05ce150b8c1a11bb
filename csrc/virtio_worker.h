/* SPDX-License-Identifier: MIT */
/*
 * The thread behind a native virtio device: it serves the device's queues
 * without the Python GIL.  It poll()s on each queue's kick eventfd (the
 * pci code registers it as a KVM ioeventfd, so a guest notification wakes
 * it with no exit to user space), on a stop eventfd and, for devices that
 * receive (net, console), on their input fd while the guest has posted
 * buffers.  It interrupts the guest by writing the queue's call eventfd (a
 * KVM irqfd bound to an MSI-X vector) and sets ISR bit 0 for INTx.
 *
 * Queues, features and positions are changed only while the thread is
 * stopped; stats and the ISR may be read any time.
 */
#ifndef PVT_VIRTIO_WORKER_H
#define PVT_VIRTIO_WORKER_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "virtio_ring.h"

#define PVT_VW_MAX_QUEUES 2
/* ISR bit 0: a queue interrupt (virtio 1.x 4.1.4.5). */
#define PVT_VW_ISR_QUEUE 1
/* How many input reads one wake-up serves before looking at kicks again. */
#define PVT_VW_INPUT_BATCH 64

struct pvt_vworker;

struct pvt_vdev_ops {
	/* Serves what queue `q` has available. */
	void (*serve)(struct pvt_vworker *w, unsigned q);
	/*
	 * The input fd is readable: moves one read of it into a chain of
	 * the input queue.  Returns 1 when it delivered something, 0 when
	 * there was nothing to read, -ENOBUFS when the guest posted no
	 * buffer, -EPIPE at end of input or a read error (stop reading).
	 */
	int (*input)(struct pvt_vworker *w);
	/* Closes what the device holds besides the worker's fds (may be NULL). */
	void (*release)(struct pvt_vworker *w);
};

struct pvt_vworker {
	const struct pvt_vdev_ops *ops;
	unsigned nqueues;
	struct pvt_vq q[PVT_VW_MAX_QUEUES];
	uint16_t flushed_used[PVT_VW_MAX_QUEUES];  /* used_idx at the last flush */
	struct pvt_vmem mem;
	uint64_t features;
	int stop_fd;
	pthread_t thread;
	bool running;
	uint32_t isr;
	int input_fd;            /* -1: the device has no input */
	unsigned input_queue;
	bool input_wanted;       /* buffers may be posted: poll input_fd */
	bool input_closed;       /* end of input, or it failed */
	uint64_t input_errors;
	int poll_error;          /* the errno that ended the thread, or 0 */
	struct pvt_vq_elem elem; /* the chain being served */
	struct iovec iov[PVT_VQ_MAX_SEGS];  /* its buffers, for readv/writev */
};

/* Sets up `w` (zeroed by the caller): -errno when no eventfd can be made. */
int pvt_vw_init(struct pvt_vworker *w, const struct pvt_vdev_ops *ops, unsigned nqueues,
		int input_fd, unsigned input_queue);
/* Stops the thread and closes every fd the worker holds. */
void pvt_vw_destroy(struct pvt_vworker *w);

/*
 * Replaces the memory table (the regions' `written` are ignored: the
 * worker keeps its own bitmaps).  Queues already set up are looked up
 * again; one whose rings left RAM breaks.  -EINVAL for too many or bad
 * regions, -ENOMEM, -EBUSY while running.
 */
int pvt_vw_set_memory(struct pvt_vworker *w, const struct pvt_vmem_region *regions,
		      unsigned count);
/*
 * Moves the pages the device wrote in region `region` of the table since
 * the last call into `pages` (a bitmap of `words` 64-bit words, bit n:
 * page n) and clears them.  May run while the worker runs: a page written
 * meanwhile is in this call's bitmap or the next one's.
 */
int pvt_vw_take_written(struct pvt_vworker *w, unsigned region, uint64_t *pages,
			size_t words);
/*
 * Sets up queue `index`.  The worker keeps its own duplicates of kick_fd
 * and call_fd (either may be -1: no kicks, no interrupts).  -EINVAL,
 * -EFAULT as pvt_vq_setup; -ENOENT for a queue the device lacks; -EBUSY.
 */
int pvt_vw_set_queue(struct pvt_vworker *w, unsigned index, uint32_t size,
		     uint64_t desc_gpa, uint64_t avail_gpa, uint64_t used_gpa,
		     int kick_fd, int call_fd);
int pvt_vw_set_features(struct pvt_vworker *w, uint64_t features);
int pvt_vw_set_position(struct pvt_vworker *w, unsigned index, uint16_t last_avail);

int pvt_vw_start(struct pvt_vworker *w);
/* Stops and joins the thread; queue positions stay. */
void pvt_vw_stop(struct pvt_vworker *w);
/* Forgets queues and features (a device reset); -EBUSY while running. */
int pvt_vw_reset(struct pvt_vworker *w);
uint32_t pvt_vw_take_isr(struct pvt_vworker *w);

/* For devices: interrupts the guest for what queue q handed back, if it wants one. */
void pvt_vw_flush(struct pvt_vworker *w, unsigned q);

/*
 * For devices: writes the iovecs to fd whole, waiting for it to be
 * writable when it is non-blocking.  0, -ECANCELED when the worker is
 * told to stop meanwhile, or -errno.
 */
int pvt_vw_write_all(struct pvt_vworker *w, int fd, struct iovec *iov, int iovcnt);

#endif
