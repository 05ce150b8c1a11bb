# Real mode: echo UART input back to the UART until a newline, then halt.
# Waits for LSR.DR (data ready) before each read of RBR.
	.code16
	.globl _start
_start:
	mov	$0x3fd, %dx
wait_input:
	in	%dx, %al
	test	$0x01, %al		# DR: a byte is waiting
	jz	wait_input
	mov	$0x3f8, %dx
	in	%dx, %al
	out	%al, %dx
	cmp	$'\n', %al
	je	done
	mov	$0x3fd, %dx
	jmp	wait_input
done:
	hlt
