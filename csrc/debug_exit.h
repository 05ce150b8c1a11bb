/* SPDX-License-Identifier: MIT */
/*
 * QEMU's isa-debug-exit: a guest write of value v to the port stops the run
 * and the VMM exits with status (v << 1) | 1.  Any access width is accepted.
 */
#ifndef PVT_DEBUG_EXIT_H
#define PVT_DEBUG_EXIT_H

#include <stdbool.h>
#include <stdint.h>

#define PVT_DEBUG_EXIT_DEFAULT_PORT 0xf4
#define PVT_DEBUG_EXIT_PORT_COUNT 4 /* a 32-bit write fits */
/* pyvt's ring-3 exception stubs report through a debug-exit here (0xf8-0xff
 * were the math coprocessor's on the PC): see pyvt/guest_exceptions.py. */
#define PVT_GUEST_EXCEPTION_PORT 0xf8

int pvt_debug_exit_io(void *opaque, uint64_t offset, uint8_t *data,
		      uint32_t len, bool is_write, uint64_t *stop_code);

#endif
