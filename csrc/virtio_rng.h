/* SPDX-License-Identifier: MIT */
/*
 * virtio-rng (virtio 1.x 5.4), native: one request queue; the device fills
 * each device-writable buffer with getrandom() bytes.
 */
#ifndef PVT_VIRTIO_RNG_H
#define PVT_VIRTIO_RNG_H

#include "virtio_worker.h"

#define PVT_VRNG_QUEUES 1

struct pvt_vrng {
	struct pvt_vworker w;  /* first: the worker's callbacks cast back */
};

int pvt_vrng_init(struct pvt_vrng *rng);

#endif
