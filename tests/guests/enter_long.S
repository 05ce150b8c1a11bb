# Starts in real mode and goes all the way to 64-bit long mode by itself:
# its own GDT, page tables (an identity map of the first GiB with 2 MiB
# pages, built into the image), PAE, EFER.LME, paging; then halts with
# %rax = 0x600d in 64-bit code.
	.code16
	.globl _start
_start:
	cli
	lgdtl	gdt_descriptor
	mov	%cr0, %eax
	or	$1, %eax			# PE
	mov	%eax, %cr0
	ljmpl	$0x08, $protected

	.code32
protected:
	mov	$0x10, %ax
	mov	%ax, %ds
	mov	%ax, %ss
	mov	%cr4, %eax
	or	$0x20, %eax			# PAE
	mov	%eax, %cr4
	mov	$pml4, %eax
	mov	%eax, %cr3
	mov	$0xc0000080, %ecx		# EFER
	rdmsr
	or	$0x100, %eax			# LME
	wrmsr
	mov	%cr0, %eax
	or	$0x80000000, %eax		# PG
	mov	%eax, %cr0
	ljmpl	$0x18, $long_mode

	.code64
long_mode:
	mov	$0x600d, %rax
	hlt

	.p2align 3
gdt:
	.quad	0
	.quad	0x00cf9a000000ffff		# 0x08: flat 32-bit code
	.quad	0x00cf92000000ffff		# 0x10: flat data
	.quad	0x00af9a000000ffff		# 0x18: 64-bit code
gdt_descriptor:
	.word	gdt_descriptor - gdt - 1
	.long	gdt

	.p2align 12
pml4:					# (32-bit object: pointers as two longs)
	.long	pdpt + 3, 0
	.fill	511, 8, 0
pdpt:
	.long	pd + 3, 0
	.fill	511, 8, 0
pd:
	.set	page, 0
	.rept	512
	.quad	(page << 21) | 0x83		# present, writable, 2 MiB
	.set	page, page + 1
	.endr
