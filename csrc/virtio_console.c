/* SPDX-License-Identifier: MIT */
/* virtio-console: see virtio_console.h. */
#include "virtio_console.h"

#include <errno.h>
#include <fcntl.h>
#include <unistd.h>

#include "virtio_stream.h"

static int receive(struct pvt_vworker *w)
{
	ssize_t got;

	while ((got = pvt_stream_receive(w, 0)) == -EBADMSG)
		;
	if (got <= 0)
		return got;
	pvt_vq_push(&w->q[w->input_queue], w->elem.head, got);
	return 1;
}

static void serve(struct pvt_vworker *w, unsigned q)
{
	struct pvt_vconsole *con = (struct pvt_vconsole *)w;
	/* Only the transmit queue comes here: the worker turns kicks of the
	 * receive queue into reading in_fd. */
	if (q == PVT_VCONSOLE_TX_QUEUE)
		pvt_stream_transmit(w, q, con->out_fd, 0);
}

static void release(struct pvt_vworker *w)
{
	struct pvt_vconsole *con = (struct pvt_vconsole *)w;
	if (con->out_fd >= 0)
		close(con->out_fd);
	con->out_fd = -1;
}

static const struct pvt_vdev_ops console_ops = {
	.serve = serve, .input = receive, .release = release,
};

int pvt_vconsole_init(struct pvt_vconsole *con, int in_fd, int out_fd)
{
	con->out_fd = -1;
	if (out_fd >= 0) {
		con->out_fd = fcntl(out_fd, F_DUPFD_CLOEXEC, 3);
		if (con->out_fd < 0)
			return -errno;
	}
	int rc = pvt_vw_init(&con->w, &console_ops, PVT_VCONSOLE_QUEUES, in_fd,
			     PVT_VCONSOLE_RX_QUEUE);
	if (rc)
		release(&con->w);
	return rc;
}
