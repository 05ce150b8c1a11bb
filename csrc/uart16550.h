/* SPDX-License-Identifier: MIT */
/*
 * A 16550A UART as a guest sees it at 0x3f8: output is captured in a sink,
 * input comes from a small receive FIFO fed by the host.  The transmitter is
 * always empty (bytes leave at once), so LSR always reports THRE | TEMT.
 */
#ifndef PVT_UART16550_H
#define PVT_UART16550_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "sink.h"

#define PVT_UART_DEFAULT_PORT 0x3f8 /* COM1 */
#define PVT_UART_PORT_COUNT 8
#define PVT_UART_RX_CAPACITY 4096

struct pvt_uart {
	pthread_mutex_t lock;
	struct pvt_sink output;
	uint8_t ier, lcr, mcr, scr, fcr;
	uint8_t dll, dlm;
	uint8_t rx[PVT_UART_RX_CAPACITY];
	uint32_t rx_head, rx_count;
};

/* Everything a snapshot needs to put the UART back as it was. */
struct pvt_uart_state {
	uint8_t ier, lcr, mcr, scr, fcr, dll, dlm;
	uint32_t rx_count;
	uint8_t rx[PVT_UART_RX_CAPACITY]; /* oldest byte first */
};

int pvt_uart_init(struct pvt_uart *uart);
void pvt_uart_save(struct pvt_uart *uart, struct pvt_uart_state *state);
int pvt_uart_load(struct pvt_uart *uart, const struct pvt_uart_state *state);
void pvt_uart_destroy(struct pvt_uart *uart);
int pvt_uart_io(void *opaque, uint64_t offset, uint8_t *data, uint32_t len,
		bool is_write, uint64_t *stop_code);
/* Queues host input for the guest; returns how many bytes fit. */
uint32_t pvt_uart_feed(struct pvt_uart *uart, const uint8_t *bytes, uint32_t n);

#endif
