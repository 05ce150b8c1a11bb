/*
 * A pyvt.Sandbox guest: CRC-32 (the zlib one) in freestanding C, with a
 * table built once by pyvt_init() before the snapshot, and a call back
 * into Python.  run.py builds and drives it; benchmarks/sandbox.py times it.
 */
#include "pyvt_guest.h"

static unsigned int table[256];

/* Runs once, before the snapshot every call starts from. */
void pyvt_init(void)
{
	for (unsigned int i = 0; i < 256; i++) {
		unsigned int c = i;

		for (int k = 0; k < 8; k++)
			c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
		table[i] = c;
	}
	pyvt_host_call("log", "crc32 guest: table ready");
}

unsigned int crc32(const unsigned char *data, unsigned long size)
{
	unsigned int c = ~0u;

	while (size--)
		c = table[(c ^ *data++) & 0xff] ^ (c >> 8);
	return ~c;
}

/* CRC-32 of a buffer, reporting each 64 KiB done to the host. */
unsigned int crc32_with_progress(const unsigned char *data, unsigned long size)
{
	unsigned int c = ~0u;

	for (unsigned long done = 0; done < size; done++) {
		c = table[(c ^ data[done]) & 0xff] ^ (c >> 8);
		if ((done + 1) % 65536 == 0)
			pyvt_host_call("progress", done + 1, size);
	}
	return ~c;
}

/* Does nothing: what a call costs on its own. */
void ping(void)
{
}
