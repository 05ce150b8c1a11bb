# Long mode: each run adds 1 to the qword at 0x5000 and to %rbx, writes
# 'A' + (%rbx & 15) to the debug console and halts; running again loops.
	.code64
	.globl _start
_start:
	incq	0x5000
	inc	%rbx
	mov	%bl, %al
	and	$15, %al
	add	$'A', %al
	out	%al, $0xe9
	hlt
	jmp	_start
