// SPDX-License-Identifier: MIT
#include "lazy_coalesce.h"

#include <errno.h>
#include <linux/kvm.h>
#include <sys/ioctl.h>

void pvt_lazy_coalesce_init(struct pvt_lazy_coalesce *lazy, int vm_fd,
			    uint64_t port, pvt_io_fn fn, void *opaque)
{
	pthread_mutex_init(&lazy->lock, NULL);
	lazy->state = PVT_COALESCE_ARMED;
	lazy->vm_fd = vm_fd;
	lazy->port = port;
	lazy->fn = fn;
	lazy->opaque = opaque;
}

void pvt_lazy_coalesce_destroy(struct pvt_lazy_coalesce *lazy)
{
	pthread_mutex_destroy(&lazy->lock);
}

static struct kvm_coalesced_mmio_zone zone_of(struct pvt_lazy_coalesce *lazy)
{
	return (struct kvm_coalesced_mmio_zone){
		.addr = lazy->port, .size = 1, .pio = 1,
	};
}

static void register_zone(struct pvt_lazy_coalesce *lazy)
{
	struct kvm_coalesced_mmio_zone zone = zone_of(lazy);

	pthread_mutex_lock(&lazy->lock);
	if (lazy->state == PVT_COALESCE_ARMED) {
		/* A refusal only costs speed: the writes keep exiting. */
		int ok = !ioctl(lazy->vm_fd, KVM_REGISTER_COALESCED_MMIO, &zone);

		__atomic_store_n(&lazy->state,
				 ok ? PVT_COALESCE_REGISTERED : PVT_COALESCE_OFF,
				 __ATOMIC_RELEASE);
	}
	pthread_mutex_unlock(&lazy->lock);
}

int pvt_lazy_coalesce_io(void *opaque, uint64_t offset, uint8_t *data,
			 uint32_t len, bool is_write, uint64_t *stop_code)
{
	struct pvt_lazy_coalesce *lazy = opaque;

	if (is_write && offset == 0 &&
	    __atomic_load_n(&lazy->state, __ATOMIC_ACQUIRE) == PVT_COALESCE_ARMED)
		register_zone(lazy);
	return lazy->fn(lazy->opaque, offset, data, len, is_write, stop_code);
}

int pvt_lazy_coalesce_disable(struct pvt_lazy_coalesce *lazy)
{
	struct kvm_coalesced_mmio_zone zone = zone_of(lazy);
	int ret = 0;

	pthread_mutex_lock(&lazy->lock);
	if (lazy->state == PVT_COALESCE_REGISTERED &&
	    ioctl(lazy->vm_fd, KVM_UNREGISTER_COALESCED_MMIO, &zone))
		ret = -errno;
	__atomic_store_n(&lazy->state, PVT_COALESCE_OFF, __ATOMIC_RELEASE);
	pthread_mutex_unlock(&lazy->lock);
	return ret;
}

int pvt_lazy_coalesce_state(struct pvt_lazy_coalesce *lazy)
{
	return __atomic_load_n(&lazy->state, __ATOMIC_ACQUIRE);
}
