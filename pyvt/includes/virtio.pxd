# Declarations of the native virtio workers (csrc/virtio_*.h) used by
# _virtio.pyx.  The C headers are the source of truth for limits and
# feature bits; _virtio.pyx exports them.

from libc.stddef cimport size_t
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t


cdef extern from "<linux/virtio_config.h>" nogil:
    int VIRTIO_F_VERSION_1


cdef extern from "<linux/virtio_ring.h>" nogil:
    int VIRTIO_RING_F_INDIRECT_DESC
    int VIRTIO_RING_F_EVENT_IDX


cdef extern from "<linux/virtio_blk.h>" nogil:
    int VIRTIO_BLK_F_SEG_MAX
    int VIRTIO_BLK_F_RO
    int VIRTIO_BLK_F_FLUSH
    int VIRTIO_BLK_ID_BYTES


cdef extern from "<linux/virtio_net.h>" nogil:
    int VIRTIO_NET_F_CSUM
    int VIRTIO_NET_F_GUEST_CSUM


cdef extern from "virtio_ring.h" nogil:
    int PVT_VMEM_MAX_REGIONS
    int PVT_VQ_MAX_SIZE
    int PVT_VQ_MAX_SEGS
    int PVT_VMEM_PAGE_SIZE

    struct pvt_vmem_region:
        uint64_t gpa
        uint64_t size
        uint8_t *host
        uint64_t *written

    struct pvt_vq_stats:
        uint64_t requests
        uint64_t bytes
        uint64_t errors
        uint64_t notifies
        uint64_t kicks

    struct pvt_vq:
        bint ready
        bint broken
        uint16_t size
        uint16_t last_avail
        uint16_t used_idx
        pvt_vq_stats stats


cdef extern from "virtio_worker.h" nogil:
    int PVT_VW_MAX_QUEUES

    struct pvt_vworker:
        unsigned nqueues
        pvt_vq q[2]
        uint64_t features
        bint running
        int input_fd
        bint input_closed
        uint64_t input_errors
        int poll_error

    void pvt_vw_destroy(pvt_vworker *w)
    int pvt_vw_set_memory(pvt_vworker *w, const pvt_vmem_region *regions, unsigned count)
    int pvt_vw_set_queue(pvt_vworker *w, unsigned index, uint32_t size, uint64_t desc_gpa,
                         uint64_t avail_gpa, uint64_t used_gpa, int kick_fd, int call_fd)
    int pvt_vw_set_features(pvt_vworker *w, uint64_t features)
    int pvt_vw_set_position(pvt_vworker *w, unsigned index, uint16_t last_avail)
    int pvt_vw_start(pvt_vworker *w)
    void pvt_vw_stop(pvt_vworker *w)
    int pvt_vw_reset(pvt_vworker *w)
    uint32_t pvt_vw_take_isr(pvt_vworker *w)
    int pvt_vw_take_written(pvt_vworker *w, unsigned region, uint64_t *pages, size_t words)


cdef extern from "virtio_rng.h" nogil:
    int PVT_VRNG_QUEUES

    struct pvt_vrng:
        pvt_vworker w

    int pvt_vrng_init(pvt_vrng *rng)


cdef extern from "virtio_blk.h" nogil:
    int PVT_VBLK_SECTOR_SIZE
    int PVT_VBLK_SEG_MAX

    struct pvt_vblk:
        pvt_vworker w
        bint readonly
        uint64_t sectors
        char serial[20]

    int pvt_vblk_init(pvt_vblk *blk, int fd, bint readonly, uint64_t sectors,
                      const char *serial, size_t serial_len)


cdef extern from "virtio_net.h" nogil:
    int PVT_VNET_RX_QUEUE
    int PVT_VNET_TX_QUEUE
    int PVT_VNET_HDR_LEN
    int PVT_VNET_LEGACY_HDR_LEN

    struct pvt_vnet:
        pvt_vworker w
        unsigned hdr_len

    int pvt_vnet_init(pvt_vnet *net, int tap_fd, unsigned hdr_len)


cdef extern from "virtio_console.h" nogil:
    int PVT_VCONSOLE_RX_QUEUE
    int PVT_VCONSOLE_TX_QUEUE

    struct pvt_vconsole:
        pvt_vworker w

    int pvt_vconsole_init(pvt_vconsole *con, int in_fd, int out_fd)
