# Real mode: print a line through the 16550 UART, polling LSR before each
# byte as a real driver does, then halt.
	.code16
	.globl _start
_start:
	mov	$message, %si
next:
	lodsb
	test	%al, %al
	jz	done
	mov	%al, %bl
	mov	$0x3fd, %dx		# LSR
wait:
	in	%dx, %al
	test	$0x20, %al		# THRE: transmitter holding register empty
	jz	wait
	mov	$0x3f8, %dx		# THR
	mov	%bl, %al
	out	%al, %dx
	jmp	next
done:
	hlt

message:
	.asciz	"hello from real mode\n"
