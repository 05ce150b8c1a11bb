/*
 * A multiboot kernel that enters long mode itself: the loader starts it in
 * 32-bit protected mode (it is an ELF64 file, loaded by its program
 * headers); it builds an identity map of the first 1 GiB with 2 MiB pages,
 * turns on PAE, EFER.LME and paging, and calls kmain(magic, info) in 64-bit
 * mode.
 */
#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x00000003

	.section .multiboot, "a"
	.align 4
	.long MB_MAGIC
	.long MB_FLAGS
	.long -(MB_MAGIC + MB_FLAGS)

	.text
	.code32
	.globl _start
_start:
	cli
	mov	%eax, %edi		/* magic: first argument */
	mov	%ebx, %esi		/* info: second argument */
	mov	$stack_top, %esp
	/* PML4[0] -> PDPT, PDPT[0] -> PD, PD[i] -> 2 MiB page i. */
	mov	$pdpt, %eax
	or	$3, %eax
	mov	%eax, pml4
	mov	$pd, %eax
	or	$3, %eax
	mov	%eax, pdpt
	xor	%ecx, %ecx
1:	mov	%ecx, %eax
	shl	$21, %eax
	or	$0x83, %eax		/* present, writable, 2 MiB */
	mov	%eax, pd(,%ecx,8)
	inc	%ecx
	cmp	$512, %ecx
	jne	1b
	mov	$pml4, %eax
	mov	%eax, %cr3
	mov	%cr4, %eax
	or	$0x20, %eax		/* PAE */
	mov	%eax, %cr4
	mov	$0xC0000080, %ecx	/* EFER */
	rdmsr
	or	$0x100, %eax		/* LME */
	wrmsr
	mov	%cr0, %eax
	or	$0x80000001, %eax	/* PG, PE */
	mov	%eax, %cr0
	lgdt	gdtr
	ljmp	$0x08, $long_entry

	.code64
long_entry:
	mov	$0x10, %ax
	mov	%ax, %ds
	mov	%ax, %es
	mov	%ax, %ss
	mov	$stack_top, %rsp
	call	kmain
2:	cli
	hlt
	jmp	2b

	.data
	.align 8
gdt:
	.quad	0
	.quad	0x00AF9A000000FFFF	/* 0x08: 64-bit code */
	.quad	0x00CF92000000FFFF	/* 0x10: data */
gdtr:
	.word	23
	.long	gdt

	.bss
	.align 4096
pml4:	.skip	4096
pdpt:	.skip	4096
pd:	.skip	4096
	.align 16
stack:	.skip	16384
stack_top:
	.section .note.GNU-stack, "", @progbits
