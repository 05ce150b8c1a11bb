# Long mode: `clac`, an instruction some KVM hosts cannot handle.  On
# software-assisted KVM (PVM, as on pyvt's test machines) it ends in
# KVM_EXIT_INTERNAL_ERROR ("emulation failure"); on hardware with SMAP it
# runs and the guest reaches hlt with rax = 0x600d; without SMAP it is #UD,
# which with no IDT becomes a triple fault.
	.code64
	.globl _start
_start:
	mov	$0x5000, %rdi
	clac
	mov	$0x600d, %rax
	hlt
