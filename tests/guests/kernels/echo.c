/* Reads a line from the serial port (as typed on pyvt boot's stdin) and echoes it. */
#include "lib.h"

#define UART 0x3f8

void kmain(uint32_t magic, const void *info)
{
	char line[80];
	uint32_t n = 0;

	(void)info;
	check(magic == 0x2BADB002, "EAX is not the multiboot magic");
	puts("ready\n");
	while (n < sizeof(line) - 1) {
		char c;

		while (!(inb(UART + 5) & 0x01)) /* LSR: data ready */
			__asm__ volatile("pause");
		c = (char)inb(UART);
		if (c == '\n')
			break;
		line[n++] = c;
	}
	line[n] = 0;
	puts("got=");
	puts(line);
	putc('\n');
	pass();
}
