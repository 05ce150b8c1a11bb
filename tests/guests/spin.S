# Any mode: spin forever without an exit (for timeouts and Ctrl-C).
	.globl _start
_start:
	jmp	_start
