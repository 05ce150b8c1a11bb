/* SPDX-License-Identifier: MIT */
/*
 * A 16550A UART as a guest sees it at 0x3f8: output is captured in a sink,
 * input comes from a small receive FIFO fed by the host.  The transmitter is
 * always empty (bytes leave at once), so LSR always reports THRE | TEMT.
 *
 * Interrupts follow the 16550: IER enables received data, THR empty, line
 * status and modem status; IIR reports the highest pending one; MCR.OUT2
 * gates the INTR output onto the ISA line, as on PCs.  The line is driven
 * with KVM_IRQ_LINE on the VM fd (pvt_uart_connect_irq), level 1 while an
 * interrupt is pending and 0 otherwise, so the edge-triggered ISA pin of the
 * PIC/IOAPIC sees a rising edge for every new interrupt.  It is driven from
 * whichever thread changes the UART: the vCPU's (guest I/O, coalesced THR
 * writes replayed by the run loop) or the host's feeding thread.  Without
 * an in-kernel irqchip the ioctl fails (ENXIO) and nothing else changes:
 * polling guests never see a difference.
 */
#ifndef PVT_UART16550_H
#define PVT_UART16550_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "sink.h"

#define PVT_UART_DEFAULT_PORT 0x3f8 /* COM1 */
#define PVT_UART_PORT_COUNT 8
#define PVT_UART_DEFAULT_IRQ 4 /* COM1's ISA line */
#define PVT_UART_COM2_IRQ 3    /* the line of COM2 (0x2f8) and COM4 (0x2e8) */
#define PVT_UART_RX_CAPACITY 4096

struct pvt_uart {
	pthread_mutex_t lock;
	struct pvt_sink output;
	uint8_t ier, lcr, mcr, scr, fcr;
	uint8_t dll, dlm;
	uint8_t rx[PVT_UART_RX_CAPACITY];
	uint32_t rx_head, rx_count;
	bool thr_ipending; /* THR-empty interrupt not yet acknowledged */
	uint8_t msr_delta; /* MSR bits 0-3: modem inputs changed, cleared by reading MSR */
	bool irq_level;    /* what the IRQ line is driven to */
	int irq_fd;        /* the VM fd for KVM_IRQ_LINE, -1: no line */
	uint32_t irq_gsi;
};

/* Everything a snapshot needs to put the UART back as it was. */
struct pvt_uart_state {
	uint8_t ier, lcr, mcr, scr, fcr, dll, dlm;
	uint8_t thr_ipending;
	uint32_t rx_count;
	uint8_t rx[PVT_UART_RX_CAPACITY]; /* oldest byte first */
	/* After the FIFO: the layout before them stays as it was. */
	uint8_t msr_delta, irq_level;
};

int pvt_uart_init(struct pvt_uart *uart);
void pvt_uart_save(struct pvt_uart *uart, struct pvt_uart_state *state);
/* -EOVERFLOW: more input than the FIFO holds; -EINVAL: bad registers, or a
 * line level that its registers do not give.  ``irqchip``: whether the VM
 * has an in-kernel irqchip; without one the line is not driven (the ioctl
 * could only fail), only its level set. */
int pvt_uart_load_state(struct pvt_uart *uart, const struct pvt_uart_state *state,
			bool irqchip);
void pvt_uart_destroy(struct pvt_uart *uart);
int pvt_uart_io(void *opaque, uint64_t offset, uint8_t *data, uint32_t len,
		bool is_write, uint64_t *stop_code);
/*
 * Connects the UART's interrupt output to ISA line ``gsi`` of the VM
 * ``vm_fd`` (-1: disconnects; no KVM_IRQ_LINE happens after this returns).
 * The line is driven to the UART's current level at once.
 */
void pvt_uart_connect_irq(struct pvt_uart *uart, int vm_fd, uint32_t gsi);
/* The level the UART drives its interrupt line to (0 or 1). */
int pvt_uart_irq_level(struct pvt_uart *uart);
/* Queues host input for the guest; returns how many bytes fit. */
uint32_t pvt_uart_feed(struct pvt_uart *uart, const uint8_t *bytes, uint32_t n);

#endif
