/* SPDX-License-Identifier: MIT */
/*
 * virtio-net (virtio 1.x 5.1), native, over a tap opened with IFF_VNET_HDR:
 * receiveq 0 (tap -> guest) and transmitq 1 (guest -> tap).  The
 * virtio_net_hdr the guest and the tap exchange passes through as it is
 * (the tap's TUNSETVNETHDRSZ must equal hdr_len: 12 for virtio 1.x, 10
 * legacy).  One packet per receive chain: mergeable receive buffers
 * (VIRTIO_NET_F_MRG_RXBUF) are not supported, so num_buffers is set to 1;
 * a packet larger than the chain is truncated by the tap.  No control
 * queue.
 */
#ifndef PVT_VIRTIO_NET_H
#define PVT_VIRTIO_NET_H

#include "virtio_worker.h"

#define PVT_VNET_QUEUES 2
#define PVT_VNET_RX_QUEUE 0
#define PVT_VNET_TX_QUEUE 1
#define PVT_VNET_HDR_LEN 12         /* struct virtio_net_hdr_v1 */
#define PVT_VNET_LEGACY_HDR_LEN 10  /* struct virtio_net_hdr */

struct pvt_vnet {
	struct pvt_vworker w;  /* first: the worker's callbacks cast back; its input fd is the tap */
	unsigned hdr_len;
};

/* -EINVAL for a header length other than 10 or 12. */
int pvt_vnet_init(struct pvt_vnet *net, int tap_fd, unsigned hdr_len);

#endif
