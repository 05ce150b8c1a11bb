/* SPDX-License-Identifier: MIT */
/*
 * Moving data between a host fd and a device's queues, shared by the
 * devices that are a pair of streams: virtio-net (a tap: one packet per
 * read or write) and virtio-console (pipes, a tty: bytes).
 *
 * Receive: one read() of the worker's input fd into the next chain of the
 * input queue, readv straight into the guest's buffers.  Transmit: each
 * chain of a queue gathered and written whole with writev.  `skip` is a
 * header at the front of each chain (the net header): a chain shorter is
 * handed back unused, and it does not count as payload in the stats.
 */
#ifndef PVT_VIRTIO_STREAM_H
#define PVT_VIRTIO_STREAM_H

#include <sys/types.h>

#include "virtio_worker.h"

/*
 * Pops a chain of the input queue and reads the input fd into its
 * writable part.  Returns the bytes read, the chain in w->elem still to be
 * pushed; or, as pvt_vdev_ops.input: 0 (nothing to read, the chain put
 * back), -ENOBUFS, -EPIPE; or -EBADMSG for a chain that was unusable (too
 * small, outside RAM), already handed back.
 */
ssize_t pvt_stream_receive(struct pvt_vworker *w, size_t skip);

/*
 * Writes every chain queue q has available to `fd` (-1: drops them), each
 * in one writev.  Stops early when the worker is told to stop: the chain
 * is put back.
 */
void pvt_stream_transmit(struct pvt_vworker *w, unsigned q, int fd, size_t skip);

#endif
