# Long mode: an instruction some KVM hosts cannot handle.  On hosts that run
# it, the guest reaches hlt with rax = 0x600d.  On software-assisted KVM
# (PVM) `movbe` with a register operand ends in KVM_EXIT_INTERNAL_ERROR.
	.code64
	.globl _start
_start:
	mov	$0x1122334455667788, %rbx
	mov	$0x5000, %rdi
	mov	%rbx, (%rdi)
	movbe	(%rdi), %rax
	movbe	%rax, (%rdi)
	mov	$0x600d, %rax
	hlt
