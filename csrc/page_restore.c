// SPDX-License-Identifier: MIT
#include "page_restore.h"

#include <errno.h>
#include <linux/kvm.h>
#include <string.h>
#include <sys/ioctl.h>

int pvt_restore_logged_pages(int vm_fd, uint32_t slot, uint64_t pages, uint8_t *target,
			     const uint8_t *image, const uint64_t *data, const uint64_t *also,
			     uint64_t *logged)
{
	struct kvm_dirty_log log = { .slot = slot, .dirty_bitmap = logged };
	uint64_t words = (pages + 63) / 64, i;

	memset(logged, 0, words * sizeof(*logged));
	if (ioctl(vm_fd, KVM_GET_DIRTY_LOG, &log) < 0)
		return -errno;
	for (i = 0; i < words; i++) {
		uint64_t bits = logged[i] | also[i];

		if (i == words - 1 && pages % 64) /* no page past the slot */
			bits &= (1ull << (pages % 64)) - 1;
		while (bits) {
			uint64_t page = i * 64 + __builtin_ctzll(bits);
			uint8_t *to = target + page * PVT_PAGE_RESTORE_PAGE_SIZE;

			if (data[i] >> (page % 64) & 1)
				memcpy(to, image + page * PVT_PAGE_RESTORE_PAGE_SIZE,
				       PVT_PAGE_RESTORE_PAGE_SIZE);
			else
				memset(to, 0, PVT_PAGE_RESTORE_PAGE_SIZE);
			bits &= bits - 1;
		}
	}
	return 0;
}
