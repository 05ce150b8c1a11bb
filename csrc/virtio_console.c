/* SPDX-License-Identifier: MIT */
/* virtio-console: see virtio_console.h. */
#include "virtio_console.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

#include "virtio_stream.h"

/*
 * The worker's own copy of a pipe or terminal fd, non-blocking: reopened
 * through /proc (a new open file description: the caller's fd keeps its
 * flags), so that a stalled reader or writer never blocks the worker and
 * stop() always returns.  Other fds (files, sockets) are dup'ed.
 */
static int own_fd(int fd, int access)
{
	struct stat st;
	if (fstat(fd, &st) == 0 && (S_ISFIFO(st.st_mode) || isatty(fd))) {
		char path[64];
		snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
		int copy = open(path, access | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
		if (copy >= 0)
			return copy;
	}
	int copy = fcntl(fd, F_DUPFD_CLOEXEC, 3);
	return copy < 0 ? -errno : copy;
}

static int receive(struct pvt_vworker *w)
{
	ssize_t got;

	while ((got = pvt_stream_receive(w, 0)) == -EBADMSG)
		;
	if (got <= 0)
		return got;
	pvt_vq_complete(&w->q[w->input_queue], &w->elem, got);
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
	int source = -1;
	con->out_fd = -1;
	if (out_fd >= 0) {
		con->out_fd = own_fd(out_fd, O_WRONLY);
		if (con->out_fd < 0)
			return con->out_fd;
	}
	if (in_fd >= 0) {
		source = own_fd(in_fd, O_RDONLY);
		if (source < 0) {
			release(&con->w);
			return source;
		}
	}
	/* The worker dups it again: ours is closed either way. */
	int rc = pvt_vw_init(&con->w, &console_ops, PVT_VCONSOLE_QUEUES, source,
			     PVT_VCONSOLE_RX_QUEUE);
	if (source >= 0)
		close(source);
	if (rc)
		release(&con->w);
	return rc;
}
