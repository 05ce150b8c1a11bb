/* Multiboot header, entry, and the real-mode trampoline for APs. */
#define MB_MAGIC 0x1BADB002
#ifdef AOUT_KLUDGE
#define MB_FLAGS 0x00010003 /* page-align modules, memory info, a.out kludge */
#else
#define MB_FLAGS 0x00000003
#endif
#define TRAMPOLINE 0x8000

	.section .multiboot, "a"
	.align 4
mb_header:
	.long MB_MAGIC
	.long MB_FLAGS
	.long -(MB_MAGIC + MB_FLAGS)
#ifdef AOUT_KLUDGE
	.long mb_header		/* header_addr */
	.long __load_start	/* load_addr */
	.long _edata		/* load_end_addr */
	.long _end		/* bss_end_addr */
	.long _start		/* entry_addr */
#endif

	.text
	.code32
	.globl _start
_start:
	cli
	mov	$stack_top, %esp
	push	%ebx		/* multiboot info */
	push	%eax		/* magic */
	call	kmain
1:	cli
	hlt
	jmp	1b

/* Copied to TRAMPOLINE by start_aps(); SIPI vector TRAMPOLINE >> 12. */
	.globl trampoline_start, trampoline_end
	.code16
trampoline_start:
	cli
	xor	%ax, %ax
	mov	%ax, %ds
	lgdtl	(tramp_gdtr - trampoline_start + TRAMPOLINE)
	mov	%cr0, %eax
	or	$1, %eax
	mov	%eax, %cr0
	ljmpl	$0x08, $(tramp32 - trampoline_start + TRAMPOLINE)
	.code32
tramp32:
	mov	$0x10, %ax
	mov	%ax, %ds
	mov	%ax, %es
	mov	%ax, %ss
	mov	$1, %eax
	lock xadd %eax, ap_stack_index
	inc	%eax
	shl	$12, %eax
	add	$ap_stacks, %eax
	mov	%eax, %esp
	mov	$ap_main, %eax	/* absolute: this code runs from a copy */
	call	*%eax
2:	cli
	hlt
	jmp	2b
	.align 8
tramp_gdt:
	.quad	0
	.quad	0x00CF9A000000FFFF	/* 0x08: flat 32-bit code */
	.quad	0x00CF92000000FFFF	/* 0x10: flat data */
tramp_gdtr:
	.word	23
	.long	tramp_gdt - trampoline_start + TRAMPOLINE
trampoline_end:

	.bss
	.align 16
	.globl ap_stacks, ap_stack_index
ap_stacks:
	.skip	4096 * 17
ap_stack_index:
	.long	0
	.align 16
stack:
	.skip	16384
stack_top:
	.section .note.GNU-stack, "", @progbits
