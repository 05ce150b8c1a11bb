# Print %ecx bytes to QEMU's debug console at port 0xe9, then hlt.
	.code16
	.globl _start
_start:
	mov	$'x', %al
	out	%al, $0xe9
	dec	%ecx
	jnz	_start
	hlt
