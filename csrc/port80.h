/* SPDX-License-Identifier: MIT */
/*
 * Port 0x80, the POST-code port: firmware and kernels write progress codes
 * (and Linux uses it as an I/O delay).  Writes are absorbed natively, so
 * they never cost a trip to Python; the last byte written reads back, like
 * on most PCs, and is kept for the host to look at.
 */
#ifndef PVT_PORT80_H
#define PVT_PORT80_H

#include <stdbool.h>
#include <stdint.h>

#define PVT_PORT80_PORT 0x80
#define PVT_PORT80_PORT_COUNT 1

struct pvt_port80 {
	uint8_t last;     /* the last code written */
	uint64_t writes;  /* how many writes */
};

int pvt_port80_io(void *opaque, uint64_t offset, uint8_t *data, uint32_t len,
		  bool is_write, uint64_t *stop_code);

#endif
