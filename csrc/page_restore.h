/* SPDX-License-Identifier: MIT */
/*
 * A snapshot restore's memory step for one dirty-logged memory slot, in one
 * call: KVM_GET_DIRTY_LOG, then every page it or the caller names is copied
 * back from the snapshot image (a data page) or zeroed (a hole: images
 * are sparse, and a hole is never read).  pyvt.snapshot's fast path; the
 * bookkeeping (pyvt.memory's baselines) stays in Python.
 */
#ifndef PVT_PAGE_RESTORE_H
#define PVT_PAGE_RESTORE_H

#include <stdint.h>

#define PVT_PAGE_RESTORE_PAGE_SIZE 4096

/*
 * `pages` pages at `target` (the slot's memory) and `image`.  `logged`
 * receives the dirty log (pages / 64 words, rounded up); `also` names the
 * further pages to copy back, `data` the image's data pages (same size).
 * Returns 0, or -errno from KVM_GET_DIRTY_LOG (nothing was copied then).
 */
int pvt_restore_logged_pages(int vm_fd, uint32_t slot, uint64_t pages, uint8_t *target,
			     const uint8_t *image, const uint64_t *data, const uint64_t *also,
			     uint64_t *logged);

#endif
