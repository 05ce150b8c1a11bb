/* SPDX-License-Identifier: MIT */
/*
 * virtio-console (virtio 1.x 5.3), native, port 0 only (no
 * VIRTIO_CONSOLE_F_MULTIPORT): receiveq 0 takes what in_fd reads, transmitq
 * 1 is written to out_fd.  Either fd may be -1: no input; output dropped.
 * At the end of input (or a read error) the worker stops reading in_fd.
 * Pipes and terminals are reopened non-blocking for the worker (its own
 * open file description), so a full pipe never keeps stop() waiting.
 */
#ifndef PVT_VIRTIO_CONSOLE_H
#define PVT_VIRTIO_CONSOLE_H

#include "virtio_worker.h"

#define PVT_VCONSOLE_QUEUES 2
#define PVT_VCONSOLE_RX_QUEUE 0
#define PVT_VCONSOLE_TX_QUEUE 1

struct pvt_vconsole {
	struct pvt_vworker w;  /* first: the worker's callbacks cast back; its input fd is in_fd */
	int out_fd;            /* the worker's own dup, or -1 */
};

int pvt_vconsole_init(struct pvt_vconsole *con, int in_fd, int out_fd);

#endif
