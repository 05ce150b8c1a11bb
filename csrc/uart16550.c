// SPDX-License-Identifier: MIT
#include "uart16550.h"

#include <errno.h>
#include <linux/kvm.h>
#include <string.h>
#include <sys/ioctl.h>

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

#define UART_IER_ERBFI 0x01 /* received data available (and FIFO timeout) */
#define UART_IER_ETBEI 0x02 /* transmitter holding register empty */
#define UART_IER_ELSI 0x04  /* receiver line status */
#define UART_IER_EDSSI 0x08 /* modem status */

/* IIR interrupt identification, highest priority first. */
#define UART_IIR_LINE_STATUS 0x06
#define UART_IIR_RX_DATA 0x04
#define UART_IIR_RX_TIMEOUT 0x0c
#define UART_IIR_THR_EMPTY 0x02
#define UART_IIR_MODEM_STATUS 0x00
#define UART_IIR_NO_INT 0x01
#define UART_IIR_FIFO_ENABLED 0xc0

#define UART_FCR_ENABLE 0x01
#define UART_FCR_TRIGGER_SHIFT 6

#define UART_MCR_DTR 0x01
#define UART_MCR_RTS 0x02
#define UART_MCR_OUT1 0x04
#define UART_MCR_OUT2 0x08
#define UART_MCR_LOOP 0x10

#define UART_MSR_DCTS 0x01
#define UART_MSR_DDSR 0x02
#define UART_MSR_TERI 0x04
#define UART_MSR_DDCD 0x08
#define UART_MSR_CTS 0x10
#define UART_MSR_DSR 0x20
#define UART_MSR_RI 0x40
#define UART_MSR_DCD 0x80
#define UART_MSR_DELTAS 0x0f
/* The modem inputs outside loopback: CTS, DSR and DCD, as if a terminal is there. */
#define UART_MSR_CONNECTED (UART_MSR_CTS | UART_MSR_DSR | UART_MSR_DCD)

int pvt_uart_init(struct pvt_uart *uart)
{
	int ret;

	memset(uart, 0, sizeof(*uart));
	uart->irq_fd = -1;
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

/*
 * The modem status inputs (MSR bits 4-7).  In loopback they are wired to the
 * modem control outputs: RTS to CTS, DTR to DSR, OUT1 to RI, OUT2 to DCD.
 */
static uint8_t uart_modem_inputs(uint8_t mcr)
{
	if (!(mcr & UART_MCR_LOOP))
		return UART_MSR_CONNECTED;
	return ((mcr & UART_MCR_RTS) ? UART_MSR_CTS : 0) |
	       ((mcr & UART_MCR_DTR) ? UART_MSR_DSR : 0) |
	       ((mcr & UART_MCR_OUT1) ? UART_MSR_RI : 0) |
	       ((mcr & UART_MCR_OUT2) ? UART_MSR_DCD : 0);
}

/* Received-data trigger level of the FIFO (FCR bits 6-7): 1, 4, 8 or 14. */
static uint32_t uart_rx_trigger(const struct pvt_uart *uart)
{
	static const uint32_t levels[4] = { 1, 4, 8, 14 };

	if (!(uart->fcr & UART_FCR_ENABLE))
		return 1;
	return levels[uart->fcr >> UART_FCR_TRIGGER_SHIFT];
}

/*
 * The interrupt IIR reports: the pending, enabled one of highest priority.
 * A line-status interrupt (ELSI) needs an overrun, parity or framing error
 * or a break, which this UART never has: the host's feed takes only what
 * fits instead of overrunning, and bytes arrive whole.  With the FIFO on,
 * fewer bytes than the trigger level report the character timeout at once:
 * no more input is on its way (the host queues all it has in one go).
 */
static uint8_t uart_pending(const struct pvt_uart *uart)
{
	if ((uart->ier & UART_IER_ERBFI) && uart->rx_count)
		return uart->rx_count >= uart_rx_trigger(uart) ? UART_IIR_RX_DATA
							       : UART_IIR_RX_TIMEOUT;
	if ((uart->ier & UART_IER_ETBEI) && uart->thr_ipending)
		return UART_IIR_THR_EMPTY;
	if ((uart->ier & UART_IER_EDSSI) && (uart->msr_delta & UART_MSR_DELTAS))
		return UART_IIR_MODEM_STATUS;
	return UART_IIR_NO_INT;
}

/*
 * The ISA line's level: the UART's INTR, passed on by a PC's buffer only
 * while MCR.OUT2 is set (loopback forces the OUT2 pin inactive).
 */
static bool uart_line_wanted(const struct pvt_uart *uart)
{
	return (uart->mcr & UART_MCR_OUT2) && !(uart->mcr & UART_MCR_LOOP) &&
	       uart_pending(uart) != UART_IIR_NO_INT;
}

static void uart_drive_line(struct pvt_uart *uart, bool level)
{
	struct kvm_irq_level line = { .irq = uart->irq_gsi, .level = level };

	uart->irq_level = level;
	/* ENXIO: the VM has no in-kernel irqchip, and a guest only polls. */
	if (uart->irq_fd >= 0)
		(void)ioctl(uart->irq_fd, KVM_IRQ_LINE, &line);
}

/* Follows a change of the UART's state on the line (called under the lock). */
static void uart_update_irq(struct pvt_uart *uart)
{
	bool level = uart_line_wanted(uart);

	if (level != uart->irq_level)
		uart_drive_line(uart, level);
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
		uart_update_irq(uart);
		return value;
	case UART_IER_DLM:
		return dlab ? uart->dlm : uart->ier;
	case UART_IIR_FCR:
		value = uart_pending(uart);
		if (value == UART_IIR_THR_EMPTY) {
			/* Reading the IIR that reports it acknowledges it. */
			uart->thr_ipending = false;
			uart_update_irq(uart);
		}
		return value | ((uart->fcr & UART_FCR_ENABLE) ? UART_IIR_FIFO_ENABLED : 0);
	case UART_LCR:
		return uart->lcr;
	case UART_MCR:
		return uart->mcr;
	case UART_LSR:
		return UART_LSR_THRE | UART_LSR_TEMT |
		       (uart->rx_count ? UART_LSR_DR : 0);
	case UART_MSR:
		value = uart_modem_inputs(uart->mcr) | uart->msr_delta;
		if (uart->msr_delta) {
			uart->msr_delta = 0;
			uart_update_irq(uart);
		}
		return value;
	case UART_SCR:
		return uart->scr;
	}
	return 0xff;
}

/* Sets MSR's delta bits for the modem inputs that changed from ``old``. */
static void uart_note_modem_change(struct pvt_uart *uart, uint8_t old)
{
	uint8_t now = uart_modem_inputs(uart->mcr), changed = old ^ now;

	if (changed & UART_MSR_CTS)
		uart->msr_delta |= UART_MSR_DCTS;
	if (changed & UART_MSR_DSR)
		uart->msr_delta |= UART_MSR_DDSR;
	if (changed & UART_MSR_DCD)
		uart->msr_delta |= UART_MSR_DDCD;
	if ((old & UART_MSR_RI) && !(now & UART_MSR_RI)) /* the trailing edge */
		uart->msr_delta |= UART_MSR_TERI;
}

static void uart_write(struct pvt_uart *uart, enum uart_register reg,
		       uint8_t value)
{
	bool dlab = uart->lcr & UART_LCR_DLAB;
	uint8_t old;

	switch (reg) {
	case UART_RBR_THR_DLL:
		if (dlab) {
			uart->dll = value;
			break;
		}
		/*
		 * Writing THR takes back its empty interrupt; the byte leaves at
		 * once, and THR is empty again: a new interrupt, a new edge.
		 */
		uart->thr_ipending = false;
		uart_update_irq(uart);
		pvt_sink_put(&uart->output, &value, 1);
		uart->thr_ipending = true;
		uart_update_irq(uart);
		break;
	case UART_IER_DLM:
		if (dlab) {
			uart->dlm = value;
			break;
		}
		old = uart->ier;
		uart->ier = value & 0x0f;
		/*
		 * Enabling ETBEI while THR is empty (it always is) raises the THR
		 * empty interrupt again, even after an IIR read took it back, as
		 * 16550s do and Linux's THRE test expects; disabling it drops it.
		 */
		if ((old ^ uart->ier) & UART_IER_ETBEI)
			uart->thr_ipending = uart->ier & UART_IER_ETBEI;
		uart_update_irq(uart);
		break;
	case UART_IIR_FCR:
		uart->fcr = value;
		uart_update_irq(uart); /* the trigger level may have moved */
		break;
	case UART_LCR:
		uart->lcr = value;
		break;
	case UART_MCR:
		old = uart_modem_inputs(uart->mcr);
		uart->mcr = value & 0x1f;
		uart_note_modem_change(uart, old);
		uart_update_irq(uart);
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
	state->thr_ipending = uart->thr_ipending;
	state->msr_delta = uart->msr_delta;
	state->irq_level = uart->irq_level;
	state->rx_count = uart->rx_count;
	for (i = 0; i < uart->rx_count; i++)
		state->rx[i] = uart->rx[(uart->rx_head + i) % PVT_UART_RX_CAPACITY];
	pthread_mutex_unlock(&uart->lock);
}

/* Whether ``state``'s line level is the one its registers give. */
static bool uart_state_consistent(const struct pvt_uart_state *state)
{
	struct pvt_uart probe = { 0 };

	probe.ier = state->ier;
	probe.mcr = state->mcr;
	probe.fcr = state->fcr;
	probe.thr_ipending = state->thr_ipending;
	probe.msr_delta = state->msr_delta;
	probe.rx_count = state->rx_count;
	return uart_line_wanted(&probe) == (bool)state->irq_level;
}

int pvt_uart_load_state(struct pvt_uart *uart, const struct pvt_uart_state *state,
			bool irqchip)
{
	bool level;

	if (state->rx_count > PVT_UART_RX_CAPACITY)
		return -EOVERFLOW;
	if (state->ier > 0x0f || state->mcr > 0x1f || state->thr_ipending > 1 ||
	    state->irq_level > 1 || state->msr_delta > UART_MSR_DELTAS ||
	    !uart_state_consistent(state))
		return -EINVAL;
	pthread_mutex_lock(&uart->lock);
	uart->ier = state->ier;
	uart->lcr = state->lcr;
	uart->mcr = state->mcr;
	uart->scr = state->scr;
	uart->fcr = state->fcr;
	uart->dll = state->dll;
	uart->dlm = state->dlm;
	uart->thr_ipending = state->thr_ipending;
	uart->msr_delta = state->msr_delta;
	uart->rx_head = 0;
	uart->rx_count = state->rx_count;
	memcpy(uart->rx, state->rx, state->rx_count);
	/*
	 * The level follows from the registers; drive it even when it looks
	 * unchanged: the line of this VM may stand elsewhere (a restore after
	 * the guest ran on), and a missed fall would hide the next edge.  A VM
	 * without an in-kernel irqchip has no line: KVM_IRQ_LINE would fail
	 * (ENXIO) and change nothing, so it is left out.
	 */
	level = uart_line_wanted(uart);
	if (irqchip)
		uart_drive_line(uart, level);
	else
		uart->irq_level = level;
	pthread_mutex_unlock(&uart->lock);
	return 0;
}

void pvt_uart_connect_irq(struct pvt_uart *uart, int vm_fd, uint32_t gsi)
{
	pthread_mutex_lock(&uart->lock);
	if (uart->irq_fd >= 0 && uart->irq_level) /* let go of the old line */
		uart_drive_line(uart, false);
	uart->irq_fd = vm_fd;
	uart->irq_gsi = gsi;
	uart_drive_line(uart, uart_line_wanted(uart));
	pthread_mutex_unlock(&uart->lock);
}

int pvt_uart_irq_level(struct pvt_uart *uart)
{
	int level;

	pthread_mutex_lock(&uart->lock);
	level = uart->irq_level;
	pthread_mutex_unlock(&uart->lock);
	return level;
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
	uart_update_irq(uart); /* from the feeding thread: the guest may be halted */
	pthread_mutex_unlock(&uart->lock);
	return fed;
}
