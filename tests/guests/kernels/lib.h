#ifndef KLIB_H
#define KLIB_H
#include <stdint.h>
#include <stddef.h>

static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outw(uint16_t port, uint16_t v) { __asm__ volatile("outw %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outl(uint16_t port, uint32_t v) { __asm__ volatile("outl %0, %1" :: "a"(v), "Nd"(port)); }
static inline uint8_t inb(uint16_t port) { uint8_t v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline uint32_t inl(uint16_t port) { uint32_t v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline void cpuid(uint32_t leaf, uint32_t *a, uint32_t *b, uint32_t *c, uint32_t *d)
{
	__asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}

void putc(char c);
void puts(const char *s);
void put_hex(uint32_t v);
void put_dec(uint32_t v);
void print(const char *label, uint32_t v); /* "label=decimal\n" */
size_t strlen(const char *s);
int strcmp(const char *a, const char *b);
int memcmp(const void *a, const void *b, size_t n);
void *memcpy(void *d, const void *s, size_t n);
void *memset(void *d, int c, size_t n);
__attribute__((noreturn)) void debug_exit(uint32_t code);
/* Prints "FAIL: msg" and exits with code 1 unless ok. */
void check(int ok, const char *msg);
__attribute__((noreturn)) void pass(void);

/* fw_cfg */
void fw_cfg_read(uint16_t key, void *buf, uint32_t len);
/* The key of the named file (0 if none) and its size. */
uint16_t fw_cfg_find(const char *name, uint32_t *size);

/* ACPI */
struct acpi_header {
	char signature[4];
	uint32_t length;
	uint8_t revision, checksum;
	char oem_id[6], oem_table_id[8];
	uint32_t oem_revision, creator_id, creator_revision;
} __attribute__((packed));
uint8_t sum_bytes(const void *p, uint32_t len);
/* The RSDP in 0xE0000-0xFFFFF with a valid checksum, or NULL. */
const uint8_t *acpi_find_rsdp(void);
/* The table with this signature through the RSDT (checksums checked). */
const struct acpi_header *acpi_find(const char *sig);
#endif
