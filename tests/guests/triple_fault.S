# Long mode: load an empty IDT and execute ud2.  With no IDT the #UD cannot
# be delivered: #GP, then a double fault, then a triple fault, which KVM
# reports as KVM_EXIT_SHUTDOWN.
	.code64
	.globl _start
_start:
	mov	$0x1234, %rax
	lidt	empty_idt(%rip)
	ud2
	hlt

empty_idt:
	.word	0
	.quad	0
