# Long mode: alternate coalesced debug-console writes with port I/O that
# reaches a Python handler, to check that output stays in program order.
#   for i in 0..9: out '0'+i to 0xe9; out i to port 0x10 (Python)
	.code64
	.globl _start
_start:
	xor	%rbx, %rbx
next:
	mov	%bl, %al
	add	$'0', %al
	out	%al, $0xe9
	mov	%bl, %al
	out	%al, $0x10
	inc	%rbx
	cmp	$10, %rbx
	jb	next
	hlt
