# Long mode: load an empty IDT and raise #BP.  With no IDT the exception
# cannot be delivered: #GP, then a double fault, then a triple fault, which
# KVM reports as KVM_EXIT_SHUTDOWN.
	.code64
	.globl _start
_start:
	mov	$0x1234, %rax
	lidt	empty_idt(%rip)
	int3
	hlt

empty_idt:
	.word	0
	.quad	0
