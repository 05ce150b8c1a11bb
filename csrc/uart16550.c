// SPDX-License-Identifier: MIT
#include "uart16550.h"

#include <errno.h>
#include <string.h>

/* Register offsets from the base port (DLAB selects the divisor latch). */
enum uart_register {
	UART_RBR_THR_DLL = 0,
	UART_IER_DLM = 1,
	UART_IIR_FCR = 2,
	UART_LCR = 3,
	UART_MCR = 4,
	UART_LSR = 5,
	UART_MSR = 6,
	UART_SCR = 7,
};

#define UART_LCR_DLAB 0x80
#define UART_LSR_DR 0x01
#define UART_LSR_THRE 0x20
#define UART_LSR_TEMT 0x40
#define UART_IIR_NO_INT 0x01
#define UART_IIR_FIFO_ENABLED 0xc0
#define UART_FCR_ENABLE 0x01
#define UART_MCR_LOOP 0x10
/* What MSR reads as: CTS, DSR and DCD asserted, as if a terminal is there. */
#define UART_MSR_CONNECTED 0xb0

int pvt_uart_init(struct pvt_uart *uart)
{
	int ret;

	memset(uart, 0, sizeof(*uart));
	ret = pthread_mutex_init(&uart->lock, NULL);
	if (ret)
		return -ret;
	ret = pvt_sink_init(&uart->output);
	if (ret)
		pthread_mutex_destroy(&uart->lock);
	uart->dll = 12; /* 9600 baud, as after a PC BIOS */
	return ret;
}

void pvt_uart_destroy(struct pvt_uart *uart)
{
	pvt_sink_destroy(&uart->output);
	pthread_mutex_destroy(&uart->lock);
}

static uint8_t uart_read(struct pvt_uart *uart, enum uart_register reg)
{
	bool dlab = uart->lcr & UART_LCR_DLAB;
	uint8_t value;

	switch (reg) {
	case UART_RBR_THR_DLL:
		if (dlab)
			return uart->dll;
		if (!uart->rx_count)
			return 0;
		value = uart->rx[uart->rx_head];
		uart->rx_head = (uart->rx_head + 1) % PVT_UART_RX_CAPACITY;
		uart->rx_count--;
		return value;
	case UART_IER_DLM:
		return dlab ? uart->dlm : uart->ier;
	case UART_IIR_FCR:
		return UART_IIR_NO_INT |
		       ((uart->fcr & UART_FCR_ENABLE) ? UART_IIR_FIFO_ENABLED : 0);
	case UART_LCR:
		return uart->lcr;
	case UART_MCR:
		return uart->mcr;
	case UART_LSR:
		return UART_LSR_THRE | UART_LSR_TEMT |
		       (uart->rx_count ? UART_LSR_DR : 0);
	case UART_MSR:
		return (uart->mcr & UART_MCR_LOOP) ? 0 : UART_MSR_CONNECTED;
	case UART_SCR:
		return uart->scr;
	}
	return 0xff;
}

static void uart_write(struct pvt_uart *uart, enum uart_register reg,
		       uint8_t value)
{
	bool dlab = uart->lcr & UART_LCR_DLAB;

	switch (reg) {
	case UART_RBR_THR_DLL:
		if (dlab)
			uart->dll = value;
		else
			pvt_sink_put(&uart->output, &value, 1);
		break;
	case UART_IER_DLM:
		if (dlab)
			uart->dlm = value;
		else
			uart->ier = value & 0x0f;
		break;
	case UART_IIR_FCR:
		uart->fcr = value;
		break;
	case UART_LCR:
		uart->lcr = value;
		break;
	case UART_MCR:
		uart->mcr = value & 0x1f;
		break;
	case UART_LSR:
	case UART_MSR:
		break; /* read-only */
	case UART_SCR:
		uart->scr = value;
		break;
	}
}

int pvt_uart_io(void *opaque, uint64_t offset, uint8_t *data, uint32_t len,
		bool is_write, uint64_t *stop_code)
{
	struct pvt_uart *uart = opaque;
	uint32_t i;

	(void)stop_code;
	/* A wider access touches consecutive registers, as on the ISA bus. */
	pthread_mutex_lock(&uart->lock);
	for (i = 0; i < len && offset + i < PVT_UART_PORT_COUNT; i++) {
		enum uart_register reg = (enum uart_register)(offset + i);

		if (is_write)
			uart_write(uart, reg, data[i]);
		else
			data[i] = uart_read(uart, reg);
	}
	for (; !is_write && i < len; i++)
		data[i] = 0xff;
	pthread_mutex_unlock(&uart->lock);
	return 0;
}

void pvt_uart_save(struct pvt_uart *uart, struct pvt_uart_state *state)
{
	uint32_t i;

	memset(state, 0, sizeof(*state));
	pthread_mutex_lock(&uart->lock);
	state->ier = uart->ier;
	state->lcr = uart->lcr;
	state->mcr = uart->mcr;
	state->scr = uart->scr;
	state->fcr = uart->fcr;
	state->dll = uart->dll;
	state->dlm = uart->dlm;
	state->rx_count = uart->rx_count;
	for (i = 0; i < uart->rx_count; i++)
		state->rx[i] = uart->rx[(uart->rx_head + i) % PVT_UART_RX_CAPACITY];
	pthread_mutex_unlock(&uart->lock);
}

int pvt_uart_load(struct pvt_uart *uart, const struct pvt_uart_state *state)
{
	if (state->rx_count > PVT_UART_RX_CAPACITY)
		return -EINVAL;
	pthread_mutex_lock(&uart->lock);
	uart->ier = state->ier;
	uart->lcr = state->lcr;
	uart->mcr = state->mcr;
	uart->scr = state->scr;
	uart->fcr = state->fcr;
	uart->dll = state->dll;
	uart->dlm = state->dlm;
	uart->rx_head = 0;
	uart->rx_count = state->rx_count;
	memcpy(uart->rx, state->rx, state->rx_count);
	pthread_mutex_unlock(&uart->lock);
	return 0;
}

uint32_t pvt_uart_feed(struct pvt_uart *uart, const uint8_t *bytes, uint32_t n)
{
	uint32_t fed = 0;

	pthread_mutex_lock(&uart->lock);
	while (fed < n && uart->rx_count < PVT_UART_RX_CAPACITY) {
		uint32_t tail = (uart->rx_head + uart->rx_count) %
				PVT_UART_RX_CAPACITY;

		uart->rx[tail] = bytes[fed++];
		uart->rx_count++;
	}
	pthread_mutex_unlock(&uart->lock);
	return fed;
}
