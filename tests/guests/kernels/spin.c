/* Never exits: for --timeout. */
#include "lib.h"

void kmain(uint32_t magic, const void *info)
{
	(void)magic;
	(void)info;
	puts("spinning\n");
	for (;;)
		__asm__ volatile("pause");
}
