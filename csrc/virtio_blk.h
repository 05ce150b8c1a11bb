/* SPDX-License-Identifier: MIT */
/*
 * virtio-blk (virtio 1.x 5.2), native, over a raw image fd: one request
 * queue.  A request is a 16-byte header (type, reserved, sector) the device
 * reads, the data, and a status byte the device writes last.  IN is
 * preadv, OUT pwritev (IOERR on a read-only disk), FLUSH fdatasync, GET_ID
 * the serial; any other type is UNSUPP.  A request that runs past the
 * disk, is not whole sectors, moves no data, has its IN data in
 * device-readable buffers, or names memory outside guest RAM gets IOERR;
 * one with no status byte to write is handed back unused.
 */
#ifndef PVT_VIRTIO_BLK_H
#define PVT_VIRTIO_BLK_H

#include <linux/virtio_blk.h>

#include "virtio_worker.h"

#define PVT_VBLK_QUEUES 1
#define PVT_VBLK_SECTOR_SIZE 512
/* Data buffers per request: the header and status take two of the chain. */
#define PVT_VBLK_SEG_MAX (PVT_VQ_MAX_SEGS - 2)

struct pvt_vblk {
	struct pvt_vworker w;  /* first: the worker's callbacks cast back */
	int fd;                /* the worker's own dup of the image fd */
	bool readonly;
	uint64_t sectors;      /* the disk's capacity, in 512-byte sectors */
	char serial[VIRTIO_BLK_ID_BYTES];
};

/* `serial` is copied, up to VIRTIO_BLK_ID_BYTES bytes. */
int pvt_vblk_init(struct pvt_vblk *blk, int fd, bool readonly, uint64_t sectors,
		  const char *serial, size_t serial_len);

#endif
