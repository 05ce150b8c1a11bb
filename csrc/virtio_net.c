/* SPDX-License-Identifier: MIT */
/* virtio-net: see virtio_net.h. */
#include "virtio_net.h"

#include <errno.h>

#include "virtio_stream.h"

/* Where num_buffers sits in struct virtio_net_hdr_v1. */
#define NUM_BUFFERS_OFFSET 10

static int receive(struct pvt_vworker *w)
{
	struct pvt_vnet *net = (struct pvt_vnet *)w;
	ssize_t got;

	while ((got = pvt_stream_receive(w, net->hdr_len)) == -EBADMSG)
		;
	if (got <= 0)
		return got;
	if (net->hdr_len == PVT_VNET_HDR_LEN && (size_t)got >= PVT_VNET_HDR_LEN) {
		/* The tap leaves num_buffers alone; one chain holds the packet. */
		uint16_t one = 1;
		pvt_vq_write(&w->elem, NUM_BUFFERS_OFFSET, &one, sizeof(one));
	}
	pvt_vq_complete(&w->q[w->input_queue], &w->elem, got);
	return 1;
}

static void serve(struct pvt_vworker *w, unsigned q)
{
	struct pvt_vnet *net = (struct pvt_vnet *)w;
	/* Only the transmit queue comes here: the worker turns kicks of the
	 * receive queue into reading the tap. */
	if (q == PVT_VNET_TX_QUEUE)
		pvt_stream_transmit(w, q, w->input_fd, net->hdr_len);
}

static const struct pvt_vdev_ops net_ops = {.serve = serve, .input = receive};

int pvt_vnet_init(struct pvt_vnet *net, int tap_fd, unsigned hdr_len)
{
	if (hdr_len != PVT_VNET_HDR_LEN && hdr_len != PVT_VNET_LEGACY_HDR_LEN)
		return -EINVAL;
	net->hdr_len = hdr_len;
	return pvt_vw_init(&net->w, &net_ops, PVT_VNET_QUEUES, tap_fd, PVT_VNET_RX_QUEUE);
}
