# The example from README.md: a 64-bit guest that prints a line through the
# 16550 UART (polling the line status register like a real driver) and
# halts.  Run it with:  pyvt run examples/hello.S
	.code64
	.globl _start
_start:
	lea	message(%rip), %rsi
next:
	lodsb
	test	%al, %al
	jz	done
	mov	%al, %bl
	mov	$0x3fd, %dx		# line status register
wait:
	in	%dx, %al
	test	$0x20, %al		# transmitter holding register empty?
	jz	wait
	mov	$0x3f8, %dx		# transmit register
	mov	%bl, %al
	out	%al, %dx
	jmp	next
done:
	hlt

message:
	.asciz	"hello from a pyvt guest\n"
