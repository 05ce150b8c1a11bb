// SPDX-License-Identifier: MIT
#include "port80.h"

#include <string.h>

int pvt_port80_io(void *opaque, uint64_t offset, uint8_t *data, uint32_t len,
		  bool is_write, uint64_t *stop_code)
{
	struct pvt_port80 *post = opaque;

	(void)offset;
	(void)stop_code;
	if (is_write) {
		__atomic_store_n(&post->last, data[0], __ATOMIC_RELAXED);
		__atomic_add_fetch(&post->writes, 1, __ATOMIC_RELAXED);
	} else {
		memset(data, __atomic_load_n(&post->last, __ATOMIC_RELAXED),
		       len);
	}
	return 0;
}
