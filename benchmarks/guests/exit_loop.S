# One port-I/O exit per iteration: out %al to port %dx, %ecx times, then hlt.
	.code16
	.globl _start
_start:
	out	%al, (%dx)
	dec	%ecx
	jnz	_start
	hlt
