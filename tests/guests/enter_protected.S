# Starts in real mode and switches itself to 32-bit protected mode with its
# own GDT, then halts with %eax = 0x600d.
	.code16
	.globl _start
_start:
	cli
	lgdtl	gdt_descriptor
	mov	%cr0, %eax
	or	$1, %eax
	mov	%eax, %cr0
	ljmpl	$0x08, $protected

	.code32
protected:
	mov	$0x10, %ax
	mov	%ax, %ds
	mov	%ax, %ss
	mov	$0x600d, %eax
	hlt

	.p2align 3
gdt:
	.quad	0
	.quad	0x00cf9a000000ffff	# flat 32-bit code
	.quad	0x00cf92000000ffff	# flat data
gdt_descriptor:
	.word	gdt_descriptor - gdt - 1
	.long	gdt
