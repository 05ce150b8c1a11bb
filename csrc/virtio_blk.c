/* SPDX-License-Identifier: MIT */
/* virtio-blk: see virtio_blk.h. */
#include "virtio_blk.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

#define HEADER_SIZE 16  /* struct virtio_blk_outhdr */

/*
 * preadv/pwritev of the whole iovec at `offset`, going on after short
 * transfers.  A read past the end of the image reads zeros (a disk may be
 * declared larger than its file).
 */
static int transfer(int fd, struct iovec *iov, int n, uint64_t offset, bool write)
{
	while (n > 0) {
		ssize_t done = write ? pwritev(fd, iov, n, offset) : preadv(fd, iov, n, offset);
		if (done < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (done == 0) {
			if (write)
				return -EIO;
			for (int i = 0; i < n; i++)
				memset(iov[i].iov_base, 0, iov[i].iov_len);
			return 0;
		}
		offset += done;
		pvt_iov_advance(&iov, &n, done);
	}
	return 0;
}

/* Whether `len` bytes from `sector` are whole sectors inside the disk. */
static bool in_disk(const struct pvt_vblk *blk, uint64_t sector, uint64_t len)
{
	if (len % PVT_VBLK_SECTOR_SIZE)
		return false;
	uint64_t count = len / PVT_VBLK_SECTOR_SIZE;
	return sector <= blk->sectors && count <= blk->sectors - sector;
}

/*
 * Serves one request whose status byte is the last writable byte: returns
 * the status and sets *written to the data bytes put in the guest's
 * buffers.
 */
static uint8_t handle(struct pvt_vblk *blk, struct pvt_vq *vq, struct pvt_vq_elem *e,
		      uint32_t *written)
{
	struct pvt_vworker *w = &blk->w;
	uint8_t header[HEADER_SIZE];
	uint64_t data_in = e->in_len - 1;  /* writable bytes before the status */

	*written = 0;
	if (e->unmapped || pvt_vq_read(e, 0, header, HEADER_SIZE) != HEADER_SIZE)
		return VIRTIO_BLK_S_IOERR;  /* outside RAM, or too short */
	uint32_t type;
	uint64_t sector;
	memcpy(&type, header, 4);
	memcpy(&sector, header + 8, 8);

	switch (type) {
	case VIRTIO_BLK_T_IN: {
		/* Data in a device-readable buffer would be a write to it. */
		if (e->out_len != HEADER_SIZE || data_in == 0 || !in_disk(blk, sector, data_in))
			return VIRTIO_BLK_S_IOERR;
		int n = pvt_vq_iov(e, true, 0, data_in, w->iov, PVT_VQ_MAX_SEGS);
		if (n < 0 || transfer(blk->fd, w->iov, n, sector * PVT_VBLK_SECTOR_SIZE, false))
			return VIRTIO_BLK_S_IOERR;
		*written = data_in;
		vq->stats.bytes += data_in;
		return VIRTIO_BLK_S_OK;
	}
	case VIRTIO_BLK_T_OUT: {
		uint64_t len = e->out_len - HEADER_SIZE;
		if (blk->readonly || len == 0 || !in_disk(blk, sector, len))
			return VIRTIO_BLK_S_IOERR;
		int n = pvt_vq_iov(e, false, HEADER_SIZE, len, w->iov, PVT_VQ_MAX_SEGS);
		if (n < 0 || transfer(blk->fd, w->iov, n, sector * PVT_VBLK_SECTOR_SIZE, true))
			return VIRTIO_BLK_S_IOERR;
		vq->stats.bytes += len;
		return VIRTIO_BLK_S_OK;
	}
	case VIRTIO_BLK_T_FLUSH:
		if (!blk->readonly && fdatasync(blk->fd) && errno != EINVAL)
			return VIRTIO_BLK_S_IOERR;
		return VIRTIO_BLK_S_OK;
	case VIRTIO_BLK_T_GET_ID: {
		/* The serial, NUL-padded, as much as the buffer takes. */
		size_t len = data_in < VIRTIO_BLK_ID_BYTES ? data_in : VIRTIO_BLK_ID_BYTES;
		if (len == 0 || pvt_vq_write(e, 0, blk->serial, len) != len)
			return VIRTIO_BLK_S_IOERR;
		*written = len;
		return VIRTIO_BLK_S_OK;
	}
	default:
		return VIRTIO_BLK_S_UNSUPP;
	}
}

static void serve(struct pvt_vworker *w, unsigned q)
{
	struct pvt_vblk *blk = (struct pvt_vblk *)w;
	struct pvt_vq *vq = &w->q[q];
	struct pvt_vq_elem *e = &w->elem;

	while (pvt_vq_next(vq, w->features, e)) {
		/* The status byte: the last byte of the last buffer, writable. */
		struct pvt_vq_seg *last = &e->segs[e->nsegs - 1];
		if (e->nin == 0 || last->len == 0 || !last->host) {
			vq->stats.errors++;
			pvt_vq_push(vq, e->head, 0);
			continue;
		}
		uint32_t written;
		uint8_t status = handle(blk, vq, e, &written);
		if (status != VIRTIO_BLK_S_OK)
			vq->stats.errors++;
		((volatile uint8_t *)last->host)[last->len - 1] = status;
		pvt_vmem_mark(&w->mem, last->gpa + last->len - 1, 1);
		/* The data, then the status (counted in the length, wherever it is). */
		pvt_vq_complete(vq, e, written + 1);
	}
	pvt_vw_flush(w, q);
}

static void release(struct pvt_vworker *w)
{
	struct pvt_vblk *blk = (struct pvt_vblk *)w;
	if (blk->fd >= 0)
		close(blk->fd);
	blk->fd = -1;
}

static const struct pvt_vdev_ops blk_ops = {.serve = serve, .release = release};

int pvt_vblk_init(struct pvt_vblk *blk, int fd, bool readonly, uint64_t sectors,
		  const char *serial, size_t serial_len)
{
	blk->fd = fcntl(fd, F_DUPFD_CLOEXEC, 3);
	if (blk->fd < 0)
		return -errno;
	int rc = pvt_vw_init(&blk->w, &blk_ops, PVT_VBLK_QUEUES, -1, 0);
	if (rc) {
		close(blk->fd);
		blk->fd = -1;
		return rc;
	}
	blk->readonly = readonly;
	blk->sectors = sectors;
	memset(blk->serial, 0, sizeof(blk->serial));
	memcpy(blk->serial, serial,
	       serial_len < sizeof(blk->serial) ? serial_len : sizeof(blk->serial));
	return 0;
}
