# Print %ecx bytes through the 16550 UART the way drivers do: poll LSR until
# the transmitter is empty before every byte.
	.code16
	.globl _start
_start:
	mov	$0x3fd, %dx
wait:
	in	(%dx), %al
	test	$0x20, %al
	jz	wait
	mov	$0x3f8, %dx
	mov	$'x', %al
	out	%al, (%dx)
	dec	%ecx
	jnz	_start
	hlt
