# 32-bit protected mode: print a line through the UART, then halt.
	.code32
	.globl _start
_start:
	mov	$message, %esi
next:
	lodsb
	test	%al, %al
	jz	done
	mov	%al, %bl
	mov	$0x3fd, %dx
wait:
	in	%dx, %al
	test	$0x20, %al
	jz	wait
	mov	$0x3f8, %dx
	mov	%bl, %al
	out	%al, %dx
	jmp	next
done:
	hlt

message:
	.asciz	"hello from protected mode\n"
