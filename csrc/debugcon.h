/* SPDX-License-Identifier: MIT */
/*
 * QEMU's debug console (-debugcon) at port 0xe9: every byte written is
 * output; a read returns 0xe9 so a guest can tell the console is there.
 * Writes never need the vCPU to stop, so the port is coalesced in KVM.
 */
#ifndef PVT_DEBUGCON_H
#define PVT_DEBUGCON_H

#include <stdbool.h>
#include <stdint.h>

#include "sink.h"

#define PVT_DEBUGCON_DEFAULT_PORT 0xe9
#define PVT_DEBUGCON_PORT_COUNT 1
#define PVT_DEBUGCON_READBACK 0xe9

int pvt_debugcon_io(void *opaque, uint64_t offset, uint8_t *data,
		    uint32_t len, bool is_write, uint64_t *stop_code);

#endif
