# Long mode: MMIO to an address with no RAM (0xd0000000), answered by a
# Python handler: write a dword, read a qword back into rax and 0x5000.
	.code64
	.globl _start
_start:
	mov	$0xd0000000, %rbx
	movl	$0xdeadbeef, (%rbx)
	mov	0x10(%rbx), %rax
	mov	%rax, 0x5000
	hlt
