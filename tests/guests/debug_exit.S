# Long mode: leave through isa-debug-exit with code 0x2a (a 32-bit write, as
# test kernels often do); QEMU would exit with status (0x2a << 1) | 1 = 85.
	.code64
	.globl _start
_start:
	mov	$0x2a, %eax
	mov	$0xf4, %dx
	out	%eax, %dx
	# Never reached unless the device is gone: make that visible.
	mov	$0xdead, %eax
	hlt
